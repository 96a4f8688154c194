"""mini-ImageNet with the Ravi & Larochelle (2017) split: 64 / 16 / 20 classes (train / val /
test), 600 images per class, 84x84 RGB.

Two on-disk layouts are read from the data dir (the explicit argument, else
``$MAML_JAX_DATA/miniimagenet``, else ``<user cache>/maml_jax/miniimagenet``):

* CSV + images (Ravi & Larochelle)::

      <data_dir>/{train,val,test}.csv     header ``filename,label``
      <data_dir>/images/n0153282900000005.jpg ...

  Images are resized to 84x84 (PIL LANCZOS, as the MAML preprocessing script) when they are
  not already, and each split is decoded once into ``miniimagenet_<split>_84px_v1.npz`` (in
  ``cache_dir``: the data dir when writable, else ``$MAML_JAX_DATA/miniimagenet`` or the user
  cache dir); the cache is rebuilt when the CSV changes.
* pickles::

      <data_dir>/mini-imagenet-cache-{train,val,test}.pkl
      each a dict {"image_data": uint8 [N, 84, 84, 3], "class_dict": {class name: [row indices]}}

  Unpickling runs code from the file: only read pickles from a source you trust.

``load_miniimagenet`` returns ``uint8 [classes, images_per_class, 84, 84, 3]`` with classes
sorted by name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from maml_jax.data.cache import DatasetError, atomic_save_npz, load_npz, resolve_cache_dir, resolve_data_dir

SPLITS = ("train", "val", "test")
NUM_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600
IMAGE_SIZE = 84
FORMATS = ("auto", "pickle", "csv")
CACHE_VERSION = 1

LAYOUT = (
    "expected either {d}/{split}.csv (header 'filename,label') with the images in {d}/images/, "
    "or the pickle {d}/mini-imagenet-cache-{split}.pkl (dict with 'image_data' uint8 [N, 84, 84, 3] "
    "and 'class_dict' {{class name: [row indices]}})"
)


class MiniImagenetSplit(NamedTuple):
    """``images: uint8 [classes, images_per_class, 84, 84, 3]``; ``class_names[i]`` (a WordNet id
    such as ``n01532829``) is the class of ``images[i]``."""

    images: np.ndarray
    class_names: tuple[str, ...]


def csv_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.csv"


def pickle_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / f"mini-imagenet-cache-{split}.pkl"


def cache_path(cache_dir: Path, split: str, image_size: int = IMAGE_SIZE) -> Path:
    return Path(cache_dir) / f"miniimagenet_{split}_{image_size}px_v{CACHE_VERSION}.npz"


def _check_counts(
    images: np.ndarray, names: tuple[str, ...], source: Path, num_classes: int | None, images_per_class: int | None
) -> None:
    if num_classes is not None and len(names) != num_classes:
        raise DatasetError(f"{source} has {len(names)} classes; expected {num_classes} (num_classes)")
    if images_per_class is not None and images.shape[1] != images_per_class:
        raise DatasetError(
            f"{source} has {images.shape[1]} images per class; expected {images_per_class} (images_per_class)"
        )


def _class_rows(
    rows: Mapping[str, list[int]], source: Path, images_per_class: int | None
) -> tuple[tuple[str, ...], list[list[int]]]:
    """Class names (sorted) and each class's row indices; all classes must be the same size."""
    names = tuple(sorted(rows))
    if not names:
        raise DatasetError(f"{source} lists no images")
    if images_per_class is not None and (bad := [n for n in names if len(rows[n]) != images_per_class]):
        raise DatasetError(
            f"{source}: class {bad[0]} has {len(rows[bad[0]])} images; expected {images_per_class} (images_per_class)"
        )
    if len(sizes := {len(rows[n]) for n in names}) != 1:
        raise DatasetError(f"{source}: classes have different numbers of images {sorted(sizes)}")
    return names, [list(rows[n]) for n in names]


# ----------------------------------------------------------------------------- pickle layout


def _load_pickle(path: Path, images_per_class: int | None, image_size: int) -> MiniImagenetSplit:
    try:
        with open(path, "rb") as f:
            try:
                obj = pickle.load(f)
            except UnicodeDecodeError:  # pickles written by Python 2
                f.seek(0)
                obj = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as err:
        raise DatasetError(f"could not read {path}: {err}") from err
    if isinstance(obj, Mapping):
        obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if not isinstance(obj, Mapping) or not {"image_data", "class_dict"} <= obj.keys():
        found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise DatasetError(f"{path} must hold a dict with keys 'image_data' and 'class_dict'; found {found}")
    data = np.asarray(obj["image_data"])
    if data.dtype != np.uint8 or data.shape[1:] != (image_size, image_size, 3):
        raise DatasetError(
            f"{path}: image_data is {data.dtype} {data.shape}; expected uint8 [N, {image_size}, {image_size}, 3]"
        )
    class_dict = {k.decode() if isinstance(k, bytes) else str(k): list(v) for k, v in obj["class_dict"].items()}
    names, rows = _class_rows(class_dict, path, images_per_class)
    index = np.array(rows, dtype=np.int64)
    if index.min() < 0 or index.max() >= len(data):
        raise DatasetError(f"{path}: class_dict refers to rows outside image_data (N = {len(data)})")
    return MiniImagenetSplit(data[index], names)


# ----------------------------------------------------------------------------- csv + images layout


def _decode_image(path: Path, image_size: int) -> np.ndarray:
    """Image file -> ``uint8 [image_size, image_size, 3]`` (LANCZOS resize when needed)."""
    from PIL import Image

    with Image.open(io.BytesIO(path.read_bytes())) as im:
        im = im.convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def _read_csv(path: Path) -> tuple[list[str], list[str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [r for r in reader if r]
    except OSError as err:
        raise DatasetError(f"could not read {path}: {err}") from err
    if header is None or [h.strip() for h in header] != ["filename", "label"]:
        raise DatasetError(f"{path}: header is {header}; expected 'filename,label'")
    if any(len(r) != 2 for r in rows):
        bad = next(i for i, r in enumerate(rows) if len(r) != 2)
        raise DatasetError(f"{path}: line {bad + 2} has {len(rows[bad])} fields; expected 'filename,label'")
    return [r[0].strip() for r in rows], [r[1].strip() for r in rows]


def _decode_csv_split(
    csv_file: Path, image_dir: Path, images_per_class: int | None, image_size: int, num_workers: int
) -> MiniImagenetSplit:
    filenames, labels = _read_csv(csv_file)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    names, rows = _class_rows(by_class, csv_file, images_per_class)
    files = [image_dir / filenames[i] for class_rows in rows for i in class_rows]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} images listed in {csv_file} are missing from {image_dir}, e.g. {missing[0]}"
        )
    images = np.empty((len(names), len(rows[0]), image_size, image_size, 3), np.uint8)
    flat = images.reshape(-1, image_size, image_size, 3)

    def decode(i: int) -> None:
        try:
            flat[i] = _decode_image(files[i], image_size)
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DatasetError(f"could not decode {files[i]}: {err}") from err

    # JPEG decoding and resizing release the GIL, so threads help with full-size ImageNet images.
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        list(pool.map(decode, range(len(files))))
    return MiniImagenetSplit(images, names)


def _load_csv(
    data_dir: Path,
    split: str,
    cache_dir: str | os.PathLike | None,
    images_per_class: int | None,
    image_size: int,
    num_workers: int | None,
) -> MiniImagenetSplit:
    csv_file = csv_path(data_dir, split)
    digest = hashlib.sha256(csv_file.read_bytes()).hexdigest()
    path = cache_path(resolve_cache_dir(cache_dir, data_dir, "miniimagenet"), split, image_size)
    if path.is_file() and (arrays := load_npz(path)) is not None:
        if {"images", "class_names", "csv_sha256"} <= arrays.keys() and str(arrays["csv_sha256"]) == digest:
            return MiniImagenetSplit(arrays["images"], tuple(arrays["class_names"].tolist()))
    image_dir = data_dir / "images"
    if not image_dir.is_dir():
        raise DatasetError(f"image folder {image_dir} not found; " + LAYOUT.format(d=data_dir, split=split))
    workers = num_workers if num_workers is not None else os.cpu_count() or 1
    result = _decode_csv_split(csv_file, image_dir, images_per_class, image_size, workers)
    atomic_save_npz(path, images=result.images, class_names=np.array(result.class_names), csv_sha256=np.array(digest))
    return result


# ----------------------------------------------------------------------------- entry point


def load_miniimagenet(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    format: str = "auto",
    num_classes: int | None = None,
    images_per_class: int = IMAGES_PER_CLASS,
    check_counts: bool = True,
    image_size: int = IMAGE_SIZE,
    num_workers: int | None = None,
) -> MiniImagenetSplit:
    """One split (``"train"``, ``"val"``, ``"test"``): ``uint8 [classes, images_per_class,
    image_size, image_size, 3]`` and the class names.

    ``format="auto"`` reads the pickle when present, else the CSV + images. ``num_classes``
    (default: 64 / 16 / 20 by split) and ``images_per_class`` (default 600) are checked unless
    ``check_counts`` is false (all classes must still be the same size). Raises
    ``DatasetError`` naming the path and the expected layout when files are missing or malformed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    num_classes = NUM_CLASSES[split] if num_classes is None else num_classes
    for name, value in (
        ("num_classes", num_classes),
        ("images_per_class", images_per_class),
        ("image_size", image_size),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    per_class = images_per_class if check_counts else None
    data_path = resolve_data_dir(data_dir, "miniimagenet")
    pkl, csv_file = pickle_path(data_path, split), csv_path(data_path, split)
    if format == "pickle" or (format == "auto" and pkl.is_file()):
        if not pkl.is_file():
            raise DatasetError(f"{pkl} not found; " + LAYOUT.format(d=data_path, split=split))
        result = _load_pickle(pkl, per_class, image_size)
        source = pkl
    elif csv_file.is_file():
        result = _load_csv(data_path, split, cache_dir, per_class, image_size, num_workers)
        source = csv_file
    else:
        raise DatasetError(f"mini-ImageNet {split} split not found: " + LAYOUT.format(d=data_path, split=split))
    if check_counts:
        _check_counts(result.images, result.class_names, source, num_classes, images_per_class)
    return result
