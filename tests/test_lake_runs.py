"""The one-shot runs reader (``maml_jax.data.lake_runs``) on its synthetic fixture: zip and
folder forms, shapes and labels, polarity, a nearest-neighbour sanity check, and the errors."""

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from maml_jax.data import omniglot
from maml_jax.data.cache import DatasetError
from maml_jax.data.lake_runs import (
    LakeRun,
    lake_run_task,
    lake_runs_tasks,
    load_lake_runs,
    write_lake_runs_fixture,
)

NUM_RUNS = 2


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lake_runs")
    folder = write_lake_runs_fixture(root, num_runs=NUM_RUNS)
    zip_path = write_lake_runs_fixture(root, num_runs=NUM_RUNS, as_zip=True)
    flat_zip = root / "flat" / "all_runs.zip"  # the runs at the top of the archive, no all_runs/
    flat_zip.parent.mkdir()
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(flat_zip, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename.removeprefix("all_runs/"), src.read(info))
    return {"folder": folder, "parent": folder.parent, "zip": zip_path, "flat_zip": flat_zip}


@pytest.fixture(scope="module")
def runs(written) -> list[LakeRun]:
    return load_lake_runs(written["folder"], num_runs=NUM_RUNS)


@pytest.fixture
def folder_copy(written, tmp_path) -> Path:
    """A private copy of the fixture folder, to damage."""
    return Path(shutil.copytree(written["folder"], tmp_path / "all_runs"))


def _written_labels(folder: Path, run: str) -> np.ndarray:
    """class_labels.txt read independently of the module: item i -> class index."""
    pairs = dict(line.split() for line in (folder / run / "class_labels.txt").read_text().splitlines())
    return np.array([int(pairs[f"{run}/test/item{i:02d}.png"][-6:-4]) - 1 for i in range(1, 21)])


def test_shapes_dtypes_labels(runs, written):
    assert [r.name for r in runs] == ["run01", "run02"]
    for run in runs:
        assert run.train_images.shape == run.test_images.shape == (20, 28, 28)
        assert run.train_images.dtype == run.test_images.dtype == np.uint8
        assert run.test_labels.dtype == np.int32 and run.test_labels.shape == (20,)
        np.testing.assert_array_equal(run.test_labels, _written_labels(written["folder"], run.name))
        assert sorted(run.test_labels) == list(range(20))
        assert not np.array_equal(run.test_labels, np.arange(20))  # the fixture did shuffle
    assert not np.array_equal(runs[0].test_labels, runs[1].test_labels)


@pytest.mark.parametrize("form", ["parent", "zip", "flat_zip"])
def test_all_forms_agree(runs, written, form):
    other = load_lake_runs(written[form], num_runs=NUM_RUNS)
    for a, b in zip(runs, other, strict=True):
        assert a.name == b.name
        for x, y in zip(a[1:], b[1:], strict=True):
            np.testing.assert_array_equal(x, y)


def test_folder_holding_the_zip(written):
    assert [r.name for r in load_lake_runs(written["flat_zip"].parent, num_runs=None)] == ["run01", "run02"]


def test_polarity_and_resize_match_omniglot(runs, written):
    png = (written["folder"] / "run01" / "training" / "class03.png").read_bytes()
    np.testing.assert_array_equal(runs[0].train_images[2], omniglot._decode_png(png, 28, "lanczos"))
    for images in (runs[0].train_images, runs[0].test_images):
        assert (images[:, 0, 0] == 0).all()  # background dark
        assert images.max() == 255 and images.mean() < 100  # ink bright and sparse
    full = load_lake_runs(written["zip"], num_runs=NUM_RUNS, image_size=105, resample="nearest")
    assert full[0].train_images.shape == (20, 105, 105)
    assert set(np.unique(full[0].train_images)) == {0, 255}  # 1-bit source, unresized


def test_nearest_neighbour_is_perfect(runs):
    for run in runs:
        test = run.test_images.reshape(20, -1).astype(np.float32)
        train = run.train_images.reshape(20, -1).astype(np.float32)
        dist = ((test[:, None] - train[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(dist.argmin(1), run.test_labels)


def test_task(runs):
    task = lake_run_task(runs[1])
    assert task.support.x.shape == task.query.x.shape == (20, 28, 28, 1)
    assert task.support.x.dtype == task.query.x.dtype == np.float32
    assert task.support.y.dtype == task.query.y.dtype == np.int32
    np.testing.assert_array_equal(task.support.y, np.arange(20))
    np.testing.assert_array_equal(task.query.y, runs[1].test_labels)
    np.testing.assert_allclose(np.asarray(task.support.x[..., 0]) * 255, runs[1].train_images, atol=1e-3)
    assert 0 <= float(task.query.x.min()) and float(task.query.x.max()) <= 1
    batch = lake_runs_tasks(runs)
    assert batch.support.x.shape == (2, 20, 28, 28, 1) and batch.query.y.shape == (2, 20)


def test_small_fixture_needs_num_classes(tmp_path):
    folder = write_lake_runs_fixture(tmp_path, num_runs=1, num_classes=5, seed=3)
    (run,) = load_lake_runs(folder, num_runs=1, num_classes=5)
    assert run.train_images.shape == (5, 28, 28) and sorted(run.test_labels) == list(range(5))
    assert load_lake_runs(folder, num_runs=None, num_classes=None)[0].test_labels.shape == (5,)
    with pytest.raises(DatasetError, match=r"training holds 5 PNGs.*expected 20: class01.png \.\.\. class20.png"):
        load_lake_runs(folder, num_runs=1)


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere does not exist; expected all_runs.zip or a folder holding run01"):
        load_lake_runs(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"holds no runNN/ folders"):
        load_lake_runs(tmp_path)


def test_run_count(written):
    with pytest.raises(DatasetError, match=r"run03, .*run20 missing .*num_runs=20; pass num_runs=None"):
        load_lake_runs(written["zip"])
    with pytest.raises(DatasetError, match=r"run02 beyond run01 \.\.\. run01.*num_runs=1"):
        load_lake_runs(written["folder"], num_runs=1)
    assert len(load_lake_runs(written["folder"], num_runs=None)) == NUM_RUNS
    with pytest.raises(ValueError, match="num_runs"):
        load_lake_runs(written["folder"], num_runs=0)
    with pytest.raises(ValueError, match="resample"):
        load_lake_runs(written["folder"], resample="bicubic")


def test_missing_run_folder(folder_copy):
    shutil.rmtree(folder_copy / "run01")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(folder_copy))}.*run folder run01 missing"):
        load_lake_runs(folder_copy, num_runs=NUM_RUNS)


@pytest.mark.parametrize("kind, file, message", [("training", "class20.png", "class"), ("test", "item07.png", "item")])
def test_image_count(folder_copy, kind, file, message):
    (folder_copy / "run02" / kind / file).unlink()
    folder = re.escape(str(folder_copy / "run02" / kind))
    expected = rf"{folder}/? holds 19 PNGs.*expected 20: {message}01.png \.\.\. {message}20.png"
    with pytest.raises(DatasetError, match=expected):
        load_lake_runs(folder_copy, num_runs=NUM_RUNS)


def _edit_labels(folder: Path, lineno: int, new: str | None) -> Path:
    file = folder / "run02" / "class_labels.txt"
    lines = file.read_text().splitlines()
    if new is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new
    file.write_text("\n".join(lines) + "\n")
    return file


@pytest.mark.parametrize(
    "new, match",
    [
        ("run02/test/item04.png", r"line 4: expected 'runNN/test/itemKK.png runNN/training/classMM.png'"),
        ("run02/test/item04.png run02/training/class03.png extra", "line 4: expected"),
        ("run02/training/class01.png run02/test/item04.png", "line 4: expected"),
        ("run02/test/item04.png run02/training/class21.png", r"line 4: run02/training/class21.png does not exist"),
        ("run02/test/item21.png run02/training/class01.png", r"line 4: run02/test/item21.png does not exist"),
        ("run01/test/item04.png run01/training/class01.png", r"line 4: 'run01/test/item04.png' names run01, not run02"),
        ("run02/test/item03.png run02/training/class01.png", r"line 4: run02/test/item03.png is listed twice"),
        (None, r"gives no class for item20.png"),
    ],
)
def test_bad_labels_line(folder_copy, new, match):
    file = _edit_labels(folder_copy, 4 if new is not None else 20, new)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(file))}.*{match}"):
        load_lake_runs(folder_copy, num_runs=NUM_RUNS)


def test_labels_without_run_prefix_are_accepted(folder_copy, runs):
    file = folder_copy / "run02" / "class_labels.txt"
    file.write_text(file.read_text().replace("run02/", ""))
    np.testing.assert_array_equal(load_lake_runs(folder_copy, num_runs=NUM_RUNS)[1].test_labels, runs[1].test_labels)


def test_missing_labels_file(folder_copy):
    (folder_copy / "run01" / "class_labels.txt").unlink()
    with pytest.raises(DatasetError, match=rf"{re.escape(str(folder_copy / 'run01' / 'class_labels.txt'))} is missing"):
        load_lake_runs(folder_copy, num_runs=NUM_RUNS)


def test_errors_in_a_zip_name_the_member(folder_copy, tmp_path):
    _edit_labels(folder_copy, 2, "garbage")
    zip_path = tmp_path / "all_runs.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for file in folder_copy.rglob("*"):
            if file.is_file():
                zf.write(file, f"all_runs/{file.relative_to(folder_copy).as_posix()}")
    with pytest.raises(
        DatasetError, match=rf"{re.escape(str(zip_path))}:all_runs/run02/class_labels.txt line 2: expected"
    ):
        load_lake_runs(zip_path, num_runs=NUM_RUNS)


def test_corrupt_zip_and_png(folder_copy, tmp_path):
    bad_zip = tmp_path / "all_runs.zip"
    bad_zip.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(bad_zip))} is not a readable zip"):
        load_lake_runs(bad_zip)
    png = folder_copy / "run01" / "test" / "item05.png"
    png.write_bytes(png.read_bytes()[:40])
    with pytest.raises(DatasetError, match=rf"could not decode {re.escape(str(png))}"):
        load_lake_runs(folder_copy, num_runs=NUM_RUNS)
