"""Omniglot loader, cache, class splits and offline download checks.

The ``real`` tests read the full data set from ``../shared/data/omniglot`` (beside the clone),
else ``$MAML_JAX_OMNIGLOT``; they are skipped when neither exists. Decoding it takes ~10 s once
per session; the cache goes to a pytest tmp dir, or to ``$MAML_JAX_DATA/omniglot`` when that
variable is set (so it survives between runs). Nothing here touches the network.
"""

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maml_jax.data import cache as data_cache
from maml_jax.data import omniglot
from maml_jax.data.cache import DatasetError


def _real_omniglot_dir() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"]
    if os.environ.get("MAML_JAX_OMNIGLOT"):
        candidates.append(Path(os.environ["MAML_JAX_OMNIGLOT"]))
    for path in candidates:
        if all((path / name).is_file() or (path / name[:-4]).is_dir() for name in omniglot.ZIP_NAMES.values()):
            return path
    return None


REAL_DIR = _real_omniglot_dir()
needs_real = pytest.mark.skipif(
    REAL_DIR is None,
    reason="real Omniglot not found in ../shared/data/omniglot nor $MAML_JAX_OMNIGLOT "
    "(images_background.zip and images_evaluation.zip)",
)


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    if os.environ.get(omniglot.ENV_DATA):
        return Path(os.environ[omniglot.ENV_DATA]) / "omniglot"
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def real(real_cache_dir) -> omniglot.Omniglot:
    if REAL_DIR is None:
        pytest.skip("real Omniglot not available")
    return omniglot.load_omniglot(REAL_DIR, cache_dir=real_cache_dir)


# ----------------------------------------------------------------------------- a tiny fake Omniglot

FAKE_ALPHABETS = {"background": ("Alpha", "Beta"), "evaluation": ("Gamma",)}
FAKE_CHARACTERS = 2  # per alphabet


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.random((105, 105)) > 0.1  # white background with black ink, 1-bit like the originals
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _fake_members(half: str):
    for a, alphabet in enumerate(FAKE_ALPHABETS[half]):
        for c in range(1, FAKE_CHARACTERS + 1):
            for d in range(1, 21):
                yield (
                    f"images_{half}/{alphabet}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png",
                    _png(1000 * a + 50 * c + d),
                )


def _fake_count(half: str) -> int:
    return len(FAKE_ALPHABETS[half]) * FAKE_CHARACTERS * 20


def make_fake_zip(directory: Path, half: str, top: str | None = None) -> Path:
    path = directory / omniglot.ZIP_NAMES[half]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in _fake_members(half):
            zf.writestr(name if top is None else name.replace(f"images_{half}", top), data)
    return path


def make_fake_folders(directory: Path) -> None:
    for half in omniglot.HALVES:
        for name, data in _fake_members(half):
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)


@pytest.fixture
def fake_zips(tmp_path) -> Path:
    src = tmp_path / "server"
    src.mkdir()
    for half in omniglot.HALVES:
        make_fake_zip(src, half)
    return src


FAKE_COUNTS = {half: _fake_count(half) for half in omniglot.HALVES}


# ----------------------------------------------------------------------------- real data


@needs_real
def test_real_counts_shapes_and_names(real):
    for half in omniglot.HALVES:
        part = getattr(real, half)
        n = omniglot.NUM_CHARACTERS[half]
        assert part.images.shape == (n, 20, 28, 28) and part.images.dtype == np.uint8
        assert len(part.names) == len(set(part.names)) == n
        assert len({name.split("/")[0] for name in part.names}) == omniglot.NUM_ALPHABETS[half]
        assert list(part.names) == sorted(part.names)
    assert not set(real.background.names) & set(real.evaluation.names)
    # inverted strokes: mostly background (0) with bright ink, every drawing has some ink
    images = real.background.images
    assert images.min() == 0 and images.max() == 255
    assert np.median(images) == 0 and (images.reshape(-1, 784).max(axis=1) > 128).all()


@needs_real
def test_real_cache_entry_matches_pil_decoding_of_the_zip(real):
    name = real.evaluation.names[5]
    with zipfile.ZipFile(REAL_DIR / "images_evaluation.zip") as zf:
        members = sorted(m for m in zf.namelist() if m.startswith(f"images_evaluation/{name}/") and m.endswith(".png"))
        assert len(members) == 20
        with Image.open(io.BytesIO(zf.read(members[3]))) as im:
            expected = 255 - np.asarray(im.convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(real.evaluation.images[5, 3], expected)


@needs_real
def test_real_cache_is_reused_without_decoding(real, real_cache_dir, monkeypatch):
    assert omniglot.cache_path(real_cache_dir).is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a PNG although the cache exists")

    monkeypatch.setattr(omniglot, "_decode_png", no_decoding)
    again = omniglot.load_omniglot(REAL_DIR, cache_dir=real_cache_dir)
    for half in omniglot.HALVES:
        np.testing.assert_array_equal(getattr(again, half).images, getattr(real, half).images)
        assert getattr(again, half).names == getattr(real, half).names


@needs_real
def test_real_paper_split_is_1200_423_disjoint_reproducible_and_written(real, real_cache_dir):
    split = omniglot.omniglot_split(real, "paper", write_to=real_cache_dir)
    assert (len(split.train), len(split.val), len(split.test)) == (1200, 0, 423)
    assert not set(split.train) & set(split.test)
    assert set(split.train) | set(split.test) == set(real.background.names) | set(real.evaluation.names)
    assert omniglot.omniglot_split(real, "paper") == split
    assert omniglot.omniglot_split(real, "paper", seed=2).train != split.train
    written = omniglot.split_path(real_cache_dir, "paper")
    assert omniglot.read_split(written) == split
    assert json.loads(written.read_text())["seed"] == omniglot.PAPER_SEED
    # a validation set is carved from the 1200 meta-training characters, as in the MAML code
    with_val = omniglot.omniglot_split(real, "paper", num_val=100)
    assert (len(with_val.train), len(with_val.val), len(with_val.test)) == (1100, 100, 423)
    assert with_val.train + with_val.val == split.train and with_val.test == split.test


@needs_real
def test_real_lake_split_and_arrays(real, real_cache_dir):
    split = omniglot.omniglot_split(real, "lake")
    assert (len(split.train), len(split.val), len(split.test)) == (964, 0, 659)
    images, names = omniglot.load_split_arrays("test", "lake", REAL_DIR, cache_dir=real_cache_dir)
    assert images.shape == (659, 20, 28, 28) and images.dtype == np.uint8 and names == real.evaluation.names
    np.testing.assert_array_equal(images, real.evaluation.images)
    with pytest.raises(ValueError, match="no 'val' classes"):
        omniglot.load_split_arrays("val", "lake", REAL_DIR, cache_dir=real_cache_dir)


@needs_real
def test_real_rotation_augmentation_gives_4x_classes(real_cache_dir):
    plain, names = omniglot.load_split_arrays("train", data_dir=REAL_DIR, cache_dir=real_cache_dir)
    rotated, rot_names = omniglot.load_split_arrays(
        "train", data_dir=REAL_DIR, cache_dir=real_cache_dir, rotations=True
    )
    assert plain.shape == (1200, 20, 28, 28) and rotated.shape == (4800, 20, 28, 28) and len(set(rot_names)) == 4800
    np.testing.assert_array_equal(rotated[:1200], plain)
    for k in range(4):
        np.testing.assert_array_equal(rotated[1200 * k + 7], np.rot90(plain[7], k, axes=(1, 2)))
        assert rot_names[1200 * k + 7] == f"{names[7]}/rot{90 * k}"
    test, _ = omniglot.load_split_arrays("test", data_dir=REAL_DIR, cache_dir=real_cache_dir)
    assert test.shape == (423, 20, 28, 28)


@needs_real
def test_real_download_from_file_url_verifies_the_official_layout(tmp_path):
    dest = omniglot.download_omniglot(tmp_path / "dl", REAL_DIR.as_uri())
    for half, name in omniglot.ZIP_NAMES.items():
        assert (dest / name).stat().st_size == (REAL_DIR / name).stat().st_size
        omniglot.verify_zip(dest / name, half, num_images=omniglot.NUM_IMAGES[half])


# ----------------------------------------------------------------------------- loading (fake data)


def test_zip_and_folder_sources_decode_identically_and_cache_is_reused(fake_zips, tmp_path, monkeypatch):
    folders = tmp_path / "folders"
    make_fake_folders(folders)
    from_zip = omniglot.load_omniglot(fake_zips, cache_dir=tmp_path / "c1")
    from_folders = omniglot.load_omniglot(folders)  # writable data dir: the cache goes beside the data
    assert omniglot.cache_path(folders).is_file()
    assert from_zip.background.images.shape == (4, 20, 28, 28) and from_zip.evaluation.images.shape == (2, 20, 28, 28)
    assert from_zip.background.names == (
        "Alpha/character01",
        "Alpha/character02",
        "Beta/character01",
        "Beta/character02",
    )
    for half in omniglot.HALVES:
        np.testing.assert_array_equal(getattr(from_zip, half).images, getattr(from_folders, half).images)

    calls = []
    real_decode = omniglot._decode_png
    monkeypatch.setattr(omniglot, "_decode_png", lambda *a: calls.append(1) or real_decode(*a))
    omniglot.load_omniglot(fake_zips, cache_dir=tmp_path / "c2")
    assert len(calls) == sum(FAKE_COUNTS.values())
    again = omniglot.load_omniglot(fake_zips, cache_dir=tmp_path / "c2")
    assert len(calls) == sum(FAKE_COUNTS.values())  # second load: no PNG decoded
    np.testing.assert_array_equal(again.background.images, from_zip.background.images)
    # a different size or filter is a different cache file
    small = omniglot.load_omniglot(fake_zips, cache_dir=tmp_path / "c2", image_size=14, resample="nearest")
    assert small.background.images.shape == (4, 20, 14, 14) and len(calls) == 2 * sum(FAKE_COUNTS.values())


def test_unreadable_cache_is_rebuilt(fake_zips, tmp_path):
    path = omniglot.cache_path(tmp_path)
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable cache") as caught:
        data = omniglot.load_omniglot(fake_zips, cache_dir=tmp_path)
    assert [w.filename for w in caught] == [__file__]  # reported at the caller's line, not inside the loader
    path.write_bytes(b"not an npz")  # again, through a loader that calls load_omniglot
    with pytest.warns(UserWarning, match="unreadable cache") as caught:
        images, _ = omniglot.load_split_arrays("train", "lake", fake_zips, cache_dir=tmp_path)
    assert [w.filename for w in caught] == [__file__]
    np.testing.assert_array_equal(images, data.background.images)
    assert data.background.images.shape == (4, 20, 28, 28)
    assert omniglot.load_omniglot(fake_zips, cache_dir=tmp_path).background.names == data.background.names


def test_missing_data_names_the_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match="images_background.zip") as err:
        omniglot.load_omniglot(tmp_path / "nowhere", cache_dir=tmp_path)
    assert str(tmp_path / "nowhere") in str(err.value) and "download_omniglot" in str(err.value)


def test_character_with_missing_drawings_is_reported(tmp_path):
    make_fake_folders(tmp_path)
    victim = next((tmp_path / "images_background" / "Beta" / "character02").glob("*.png"))
    victim.unlink()
    with pytest.raises(DatasetError, match="Beta/character02 has 19 drawings; expected 20"):
        omniglot.load_omniglot(tmp_path)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(omniglot.ENV_DATA, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert omniglot.resolve_data_dir() == tmp_path / "xdg" / "maml_jax" / "omniglot"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert omniglot.resolve_data_dir() == tmp_path / "home" / ".cache" / "maml_jax" / "omniglot"
    monkeypatch.setenv(omniglot.ENV_DATA, str(tmp_path / "data"))
    assert omniglot.resolve_data_dir() == tmp_path / "data" / "omniglot"
    assert omniglot.resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    # the cache goes beside the data when that dir exists (and is writable), else to the default
    # data dir; an explicit cache_dir always wins (unwritable data dirs: the tests below)
    (tmp_path / "writable").mkdir()
    assert omniglot.resolve_cache_dir(None, tmp_path / "writable") == tmp_path / "writable"
    assert omniglot.resolve_cache_dir(None, tmp_path / "missing") == tmp_path / "data" / "omniglot"
    assert omniglot.resolve_cache_dir(tmp_path / "c", tmp_path / "writable") == tmp_path / "c"


def _no_png_decoding(*args):
    raise AssertionError("decoded a PNG although the cache exists")


def test_unwritable_data_dir_caches_in_the_default_data_dir(fake_zips, tmp_path, monkeypatch):
    """A data dir the process cannot write to (faked through the ``os.access`` that
    ``maml_jax.data.cache`` asks: CI runs as root, which a chmod does not stop) sends the cache to
    ``$MAML_JAX_DATA/omniglot``, where the next load finds it; when that cannot be written
    either, loading still works and only warns."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == fake_zips and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(data_cache.os, "access", access)
    monkeypatch.setenv(omniglot.ENV_DATA, str(tmp_path / "data"))
    fallback = tmp_path / "data" / "omniglot"
    assert omniglot.resolve_cache_dir(None, fake_zips) == fallback
    assert omniglot.resolve_cache_dir(tmp_path / "c", fake_zips) == tmp_path / "c"  # explicit cache_dir wins
    data = omniglot.load_omniglot(fake_zips)
    assert data.background.images.shape == (4, 20, 28, 28)
    assert omniglot.cache_path(fallback).is_file() and not omniglot.cache_path(fake_zips).exists()
    with monkeypatch.context() as m:
        m.setattr(omniglot, "_decode_png", _no_png_decoding)
        again = omniglot.load_omniglot(fake_zips)
    for half in omniglot.HALVES:
        np.testing.assert_array_equal(getattr(again, half).images, getattr(data, half).images)
        assert getattr(again, half).names == getattr(data, half).names

    # the default data dir cannot be created (a file is in the way): a warning, not an error
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv(omniglot.ENV_DATA, str(blocker))
    target = omniglot.cache_path(blocker / "omniglot")
    with pytest.warns(UserWarning, match=f"could not write the cache {target} .*pass a writable cache_dir") as caught:
        unsaved = omniglot.load_omniglot(fake_zips)
    assert [w.filename for w in caught] == [__file__]
    np.testing.assert_array_equal(unsaved.evaluation.images, data.evaluation.images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "data", "server"]  # nothing written elsewhere
    assert sorted(p.name for p in fake_zips.iterdir()) == sorted(omniglot.ZIP_NAMES.values())


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only dir")
def test_read_only_data_dir_caches_in_the_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(omniglot.ENV_DATA, str(tmp_path / "data"))
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        assert omniglot.resolve_cache_dir(None, read_only) == tmp_path / "data" / "omniglot"
    finally:
        read_only.chmod(0o755)


def test_paper_split_validates_and_rotations_check_shape():
    names = [f"A/character{i:02d}" for i in range(10)]
    split = omniglot.paper_split(names, num_train=6, num_val=2)
    assert (len(split.train), len(split.val), len(split.test)) == (4, 2, 4)
    assert sorted(split.train + split.val + split.test) == names
    assert omniglot.paper_split(reversed(names), num_train=6, num_val=2) == split  # input order does not matter
    with pytest.raises(ValueError, match="num_train"):
        omniglot.paper_split(names, num_train=10)
    with pytest.raises(ValueError, match="num_val"):
        omniglot.paper_split(names, num_train=6, num_val=6)
    with pytest.raises(ValueError, match="unique"):
        omniglot.paper_split(names + names[:1])
    with pytest.raises(ValueError, match="H == W"):
        omniglot.rotate_classes(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="split kind"):
        omniglot.omniglot_split(None, "random")


# ----------------------------------------------------------------------------- download (offline)


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_download_from_file_url(fake_zips, tmp_path):
    dest = omniglot.download_omniglot(tmp_path / "dest", fake_zips.as_uri(), num_images=FAKE_COUNTS)
    assert _leftovers(dest) == sorted(omniglot.ZIP_NAMES.values())
    data = omniglot.load_omniglot(dest)
    assert data.background.images.shape == (4, 20, 28, 28)
    # verified zips already in place are kept: nothing is fetched from the (unreachable) source
    omniglot.download_omniglot(dest, "http://127.0.0.1:9/", num_images=FAKE_COUNTS, timeout=5)


def test_download_checks_optional_sha256(fake_zips, tmp_path):
    digests = {name: omniglot._sha256(fake_zips / name) for name in omniglot.ZIP_NAMES.values()}
    omniglot.download_omniglot(tmp_path / "ok", fake_zips.as_uri(), sha256=digests, num_images=None)
    wrong = {**digests, "images_evaluation.zip": "0" * 64}
    with pytest.raises(DatasetError, match="sha256"):
        omniglot.download_omniglot(tmp_path / "bad", fake_zips.as_uri(), sha256=wrong, num_images=None)
    assert _leftovers(tmp_path / "bad") == ["images_background.zip"]  # no partial file left behind


def test_download_default_counts_reject_an_incomplete_zip(fake_zips, tmp_path):
    with pytest.raises(DatasetError, match=f"holds {FAKE_COUNTS['background']} PNGs.*expected 19280"):
        omniglot.download_omniglot(tmp_path / "dest", fake_zips.as_uri())
    assert _leftovers(tmp_path / "dest") == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_crc", "wrong_top_folder"])
def test_download_rejects_damaged_zips(fake_zips, tmp_path, damage):
    path = fake_zips / "images_background.zip"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif damage == "bad_crc":
        with zipfile.ZipFile(path) as zf:
            info = zf.infolist()[3]
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        make_fake_zip(fake_zips, "background", top="something_else")
    match = {"bad_crc": "CRC", "wrong_top_folder": "images_background/"}.get(damage, "not a readable zip")
    with pytest.raises(DatasetError, match=match) as err:
        omniglot.download_omniglot(tmp_path / "dest", fake_zips.as_uri(), num_images=FAKE_COUNTS)
    assert "images_background.zip" in str(err.value)
    assert _leftovers(tmp_path / "dest") == []


def test_download_missing_file_and_offline(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="could not download file:.*images_background.zip"):
        omniglot.download_omniglot(tmp_path / "dest", empty.as_uri())
    with pytest.raises(DatasetError, match=r"could not download http://127.0.0.1:9/images_background.zip.*offline"):
        omniglot.download_omniglot(tmp_path / "dest", "http://127.0.0.1:9/", timeout=5)
    assert _leftovers(tmp_path / "dest") == []
    assert issubclass(DatasetError, RuntimeError)
