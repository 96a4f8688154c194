"""mini-ImageNet loader on tiny fixtures in both layouts (CSV + images, and the pickles)."""

import pickle

import numpy as np
import pytest
from PIL import Image

from maml_jax.data import miniimagenet
from maml_jax.data.miniimagenet import DatasetError

CLASSES = ("n01532829", "n01558993", "n01704323")
PER_CLASS = 4


def _random_image(rng, size) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def _exact_image(split: str, i: int) -> np.ndarray:
    """Image ``i`` of class 0 of ``split``: an 84x84 PNG, so it must load bit-exactly."""
    return _random_image(np.random.default_rng([miniimagenet.SPLITS.index(split), i]), (84, 84))


@pytest.fixture
def csv_dir(tmp_path):
    """3 classes x 4 images per split; class 0 of each split is exact 84x84 PNGs, the others
    JPEGs of other sizes (they get resized). Rows are shuffled, so grouping is tested."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for split in miniimagenet.SPLITS:
        rows = []
        for c, cls in enumerate(CLASSES):
            for i in range(PER_CLASS):
                stem = f"{cls}{split}{i:08d}"
                if c == 0:
                    name = stem + ".png"
                    Image.fromarray(_exact_image(split, i)).save(tmp_path / "images" / name)
                else:
                    name = stem + ".jpg"
                    Image.fromarray(_random_image(rng, (60 + 10 * c, 100))).save(tmp_path / "images" / name)
                rows.append(f"{name},{cls}")
        order = rng.permutation(len(rows))
        (tmp_path / f"{split}.csv").write_text("filename,label\n" + "\n".join(rows[j] for j in order) + "\n")
    return tmp_path


def _load(data_dir, split="train", **kwargs):
    return miniimagenet.load_miniimagenet(split, data_dir, num_classes=3, images_per_class=PER_CLASS, **kwargs)


def _no_decoding(*args):
    raise AssertionError("decoded an image although the cache is up to date")


def test_csv_layout_shapes_grouping_resize_and_cache(csv_dir, monkeypatch):
    decoded = {}
    for split in miniimagenet.SPLITS:
        decoded[split] = result = _load(csv_dir, split)
        assert result.images.shape == (3, PER_CLASS, 84, 84, 3) and result.images.dtype == np.uint8
        assert result.class_names == CLASSES
        # class 0 holds exactly its 84x84 PNGs (in shuffled CSV order)
        assert {img.tobytes() for img in result.images[0]} == {
            _exact_image(split, i).tobytes() for i in range(PER_CLASS)
        }
        assert miniimagenet.cache_path(csv_dir, split).is_file()

    monkeypatch.setattr(miniimagenet, "_decode_image", _no_decoding)
    again = _load(csv_dir, "val")  # from the cache: equal to what was decoded from the images
    assert again.images.dtype == np.uint8
    np.testing.assert_array_equal(again.images, decoded["val"].images)
    assert again.class_names == decoded["val"].class_names == CLASSES
    # editing the CSV invalidates the cache
    csv = csv_dir / "val.csv"
    csv.write_text(csv.read_text() + "\n")
    with pytest.raises(AssertionError, match="cache is up to date"):
        _load(csv_dir, "val")


def test_csv_cache_can_live_elsewhere(csv_dir, tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("mini_cache")
    result = _load(csv_dir, "test", cache_dir=cache)
    assert miniimagenet.cache_path(cache, "test").is_file() and not miniimagenet.cache_path(csv_dir, "test").exists()
    assert result.images.shape == (3, PER_CLASS, 84, 84, 3)
    # read back from that cache (no decoding), equal to what was decoded
    monkeypatch.setattr(miniimagenet, "_decode_image", _no_decoding)
    again = _load(csv_dir, "test", cache_dir=cache)
    np.testing.assert_array_equal(again.images, result.images)
    assert again.class_names == result.class_names == CLASSES
    with pytest.raises(AssertionError, match="cache is up to date"):  # nothing was cached beside the data
        _load(csv_dir, "test")


def test_unreadable_csv_cache_is_rebuilt_with_a_warning_at_the_callers_line(csv_dir):
    decoded = _load(csv_dir, "val")
    miniimagenet.cache_path(csv_dir, "val").write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="ignoring unreadable cache") as caught:
        again = _load(csv_dir, "val")
    # two loader frames deep (load_miniimagenet, _load_csv), yet reported where the test called it
    assert [w.filename for w in caught] == [__file__]
    np.testing.assert_array_equal(again.images, decoded.images)
    assert np.load(miniimagenet.cache_path(csv_dir, "val"))["images"].shape == decoded.images.shape  # rewritten


def test_pickle_layout(tmp_path):
    rng = np.random.default_rng(1)
    data = _random_image(rng, (3 * PER_CLASS, 84, 84))
    order = rng.permutation(len(data))
    class_dict = {cls: order[c * PER_CLASS : (c + 1) * PER_CLASS].tolist() for c, cls in enumerate(CLASSES[::-1])}
    with open(miniimagenet.pickle_path(tmp_path, "train"), "wb") as f:
        pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    result = _load(tmp_path)
    assert result.images.shape == (3, PER_CLASS, 84, 84, 3) and result.class_names == CLASSES
    for c, cls in enumerate(CLASSES):
        np.testing.assert_array_equal(result.images[c], data[class_dict[cls]])
    assert not list(tmp_path.glob("*.npz"))  # pickles are not re-cached


def test_default_counts_are_the_ravi_split(csv_dir):
    with pytest.raises(DatasetError, match="has 3 classes; expected 64 .num_classes."):
        miniimagenet.load_miniimagenet("train", csv_dir, images_per_class=PER_CLASS)
    with pytest.raises(DatasetError, match="has 4 images; expected 600 .images_per_class."):
        miniimagenet.load_miniimagenet("test", csv_dir)
    assert miniimagenet.load_miniimagenet("val", csv_dir, check_counts=False).images.shape[:2] == (3, PER_CLASS)


def test_missing_files_name_the_path_and_layout(tmp_path, csv_dir):
    with pytest.raises(DatasetError) as err:
        miniimagenet.load_miniimagenet("val", tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "val.csv") in message and "mini-imagenet-cache-val.pkl" in message
    with pytest.raises(DatasetError, match="mini-imagenet-cache-train.pkl not found"):
        _load(csv_dir, format="pickle")
    victim = sorted((csv_dir / "images").glob("*.jpg"))[0]
    victim.unlink()
    split = next(s for s in miniimagenet.SPLITS if victim.name in (csv_dir / f"{s}.csv").read_text())
    with pytest.raises(DatasetError, match=f"1 images listed in .*{split}.csv are missing.*{victim.name}"):
        _load(csv_dir, split)


def test_malformed_inputs(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "train.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(DatasetError, match="expected 'filename,label'"):
        _load(tmp_path)
    (tmp_path / "train.csv").write_text("filename,label\n" + "".join(f"{i}.jpg,n{i % 2}\n" for i in range(5)))
    with pytest.raises(DatasetError, match="different numbers of images"):
        _load(tmp_path, check_counts=False)
    with open(miniimagenet.pickle_path(tmp_path, "val"), "wb") as f:
        pickle.dump({"images": np.zeros((1, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(DatasetError, match="'image_data' and 'class_dict'"):
        _load(tmp_path, "val")
    with open(miniimagenet.pickle_path(tmp_path, "test"), "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 32, 32, 3), np.uint8), "class_dict": {"n1": [0, 1]}}, f)
    with pytest.raises(DatasetError, match=r"expected uint8 \[N, 84, 84, 3\]"):
        _load(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        miniimagenet.load_miniimagenet("training", tmp_path)
    with pytest.raises(ValueError, match="images_per_class"):
        miniimagenet.load_miniimagenet("train", tmp_path, images_per_class=0)
