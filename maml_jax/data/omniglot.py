"""Omniglot (Lake et al. 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

Source: the official ``images_background.zip`` (30 alphabets, 964 characters) and
``images_evaluation.zip`` (20 alphabets, 659 characters), or the folders they unpack to::

    <data_dir>/images_background/<Alphabet>/characterNN/<id>_<drawer>.png   (105x105, 1-bit)
    <data_dir>/images_evaluation/<Alphabet>/characterNN/...

The data dir is the explicit argument, else ``$MAML_JAX_DATA/omniglot``, else
``$XDG_CACHE_HOME/maml_jax/omniglot`` (default ``~/.cache/maml_jax/omniglot``).

The PNGs are decoded once into ``omniglot_<size>px_<resample>_v1.npz`` (uint8
``[characters, 20, size, size]`` per half plus the character names), written atomically; later
loads read only that file. Images are inverted as the MAML and ProtoNet code feed them: ink is
bright (255), background 0. Characters are named ``"<Alphabet>/characterNN"`` and sorted.

Class splits (``omniglot_split``):

* ``"paper"`` (Finn et al. 2017, after Santoro et al. 2016): all 1623 characters pooled, shuffled
  with a fixed seed; the first 1200 are meta-train (``num_val`` of them carved off as
  meta-validation, 100 in the MAML code), the other 423 meta-test.
* ``"lake"``: background alphabets (964 characters) train, evaluation alphabets (659) test.

Either can be augmented with rotations by 90°, 180°, 270°, each a new class (``rotate_classes``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from maml_jax.data.cache import (
    ENV_DATA,
    DatasetError,
    atomic_save_npz,
    load_npz,
    resolve_cache_dir,
    resolve_data_dir,
    warn_at_caller,
)
from maml_jax.files import atomic_write

HALVES = ("background", "evaluation")
ZIP_NAMES = {half: f"images_{half}.zip" for half in HALVES}
NUM_ALPHABETS = {"background": 30, "evaluation": 20}
NUM_CHARACTERS = {"background": 964, "evaluation": 659}
DRAWINGS_PER_CHARACTER = 20
# PNG files in each official zip; the structural check of ``download_omniglot``.
NUM_IMAGES = {half: n * DRAWINGS_PER_CHARACTER for half, n in NUM_CHARACTERS.items()}
DEFAULT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
CACHE_VERSION = 1
SPLIT_KINDS = ("paper", "lake")
SUBSETS = ("train", "val", "test")
# The MAML code seeds Python's ``random`` with 1 before shuffling; its order also depends on
# ``os.listdir``, so the exact characters cannot be reproduced, only the protocol.
PAPER_SEED = 1
PAPER_NUM_TRAIN = 1200
RESAMPLE = ("lanczos", "bilinear", "nearest")


class OmniglotHalf(NamedTuple):
    """One half of Omniglot: ``images: uint8 [characters, 20, size, size]``, ``names[i]`` is
    ``"<Alphabet>/characterNN"`` of ``images[i]``."""

    images: np.ndarray
    names: tuple[str, ...]


class Omniglot(NamedTuple):
    background: OmniglotHalf
    evaluation: OmniglotHalf


class ClassSplit(NamedTuple):
    """Character names of each subset (disjoint); ``val`` may be empty."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


# ----------------------------------------------------------------------------- decoding

_PIL_RESAMPLE = {"lanczos": "LANCZOS", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def _decode_png(data: bytes, size: int, resample: str) -> np.ndarray:
    """PNG bytes -> inverted grayscale ``uint8 [size, size]`` (ink 255, background 0)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        # Converting to "L" first matters: PIL resizes 1-bit images with NEAREST whatever is asked.
        im = im.convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), resample=getattr(Image.Resampling, _PIL_RESAMPLE[resample]))
        return 255 - np.asarray(im, dtype=np.uint8)


class _Source(NamedTuple):
    description: str  # for error messages
    characters: dict[str, list[str]]  # "Alphabet/characterNN" -> PNG file names of its drawings
    read: Callable[[str, str], bytes]  # (character, drawing) -> PNG bytes


def _zip_source(path: Path, half: str) -> _Source:
    top = f"images_{half}/"
    characters: dict[str, list[str]] = {}
    blobs: dict[str, bytes] = {}
    try:  # one sequential pass over the archive; decoding then works from memory (~15 MB)
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if info.filename.startswith(top) and len(parts) == 4 and parts[3].endswith(".png"):
                    characters.setdefault(f"{parts[1]}/{parts[2]}", []).append(parts[3])
                    blobs[info.filename] = zf.read(info)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetError(f"{path} is not a readable zip ({err}); delete it and download it again") from err

    def read(character: str, drawing: str) -> bytes:
        return blobs[f"{top}{character}/{drawing}"]

    return _Source(f"{path} (members {top}<Alphabet>/characterNN/*.png)", characters, read)


def _folder_source(path: Path) -> _Source:
    characters = {
        f"{char_dir.parent.name}/{char_dir.name}": [p.name for p in char_dir.glob("*.png")]
        for char_dir in path.glob("*/*")
        if char_dir.is_dir()
    }
    return _Source(f"{path} (<Alphabet>/characterNN/*.png)", characters, lambda c, d: (path / c / d).read_bytes())


def _find_source(data_dir: Path, half: str) -> _Source:
    zip_path, folder = data_dir / ZIP_NAMES[half], data_dir / f"images_{half}"
    if zip_path.is_file():
        return _zip_source(zip_path, half)
    if folder.is_dir():
        return _folder_source(folder)
    raise DatasetError(
        f"Omniglot {half} half not found: expected {zip_path} or the folder "
        f"{folder}/<Alphabet>/characterNN/*.png. Download it with "
        f"maml_jax.data.omniglot.download_omniglot({str(data_dir)!r}) or set ${ENV_DATA} "
        f"(data is looked up in $MAML_JAX_DATA/omniglot)."
    )


def _decode_half(source: _Source, size: int, resample: str) -> OmniglotHalf:
    names = sorted(source.characters)
    if not names:
        raise DatasetError(f"no character folders with PNGs in {source.description}")
    for name in names:
        if len(source.characters[name]) != DRAWINGS_PER_CHARACTER:
            raise DatasetError(
                f"{source.description}: character {name} has {len(source.characters[name])} drawings; "
                f"expected {DRAWINGS_PER_CHARACTER}"
            )

    try:  # one thread: PIL's per-image overhead holds the GIL, so threads measured slower here
        images = np.stack(
            [
                np.stack([_decode_png(source.read(n, d), size, resample) for d in sorted(source.characters[n])])
                for n in names
            ]
        )
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # PIL raises these for damaged PNGs
        raise DatasetError(f"could not decode a PNG of {source.description}: {err}") from err
    return OmniglotHalf(images, tuple(names))


def cache_path(cache_dir: Path, image_size: int = 28, resample: str = "lanczos") -> Path:
    return Path(cache_dir) / f"omniglot_{image_size}px_{resample}_v{CACHE_VERSION}.npz"


def load_omniglot(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = 28,
    resample: str = "lanczos",
) -> Omniglot:
    """Both halves, ``images: uint8 [characters, 20, image_size, image_size]``.

    The first call decodes the PNGs (about 10 s on 2 cores) into ``cache_path(cache_dir)``;
    later calls read that file. ``cache_dir`` defaults to the data dir when writable, else
    ``default_data_dir()``. ``resample`` is the PIL filter used to shrink 105x105 -> ``image_size``
    (``"lanczos"`` as the MAML resize script asks; that script in fact got ``"nearest"``,
    because Pillow shrinks 1-bit images with NEAREST whatever is asked). The cache is not
    checked against the source: delete it to rebuild.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    data_path = resolve_data_dir(data_dir)
    path = cache_path(resolve_cache_dir(cache_dir, data_path), image_size, resample)
    if path.is_file() and (arrays := load_npz(path)) is not None:
        try:
            return Omniglot(
                *(OmniglotHalf(arrays[f"{h}_images"], tuple(arrays[f"{h}_names"].tolist())) for h in HALVES)
            )
        except KeyError as err:
            warn_at_caller(f"cache {path} lacks {err}; rebuilding it")
    halves = [_decode_half(_find_source(data_path, h), image_size, resample) for h in HALVES]
    arrays = {}
    for h, half in zip(HALVES, halves, strict=True):
        arrays[f"{h}_images"], arrays[f"{h}_names"] = half.images, np.array(half.names)
    atomic_save_npz(path, **arrays)
    return Omniglot(*halves)


# ----------------------------------------------------------------------------- download


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_zip(
    path: str | os.PathLike,
    half: str,
    *,
    sha256: str | None = None,
    num_images: int | None = None,
) -> None:
    """Raise ``DatasetError`` unless ``path`` is an intact zip (CRCs checked) whose PNGs all sit
    under ``images_<half>/``, with ``num_images`` PNGs and the given ``sha256`` when those are given."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    if sha256 is not None and (digest := _sha256(path)) != sha256.lower():
        raise DatasetError(f"{path}: sha256 {digest} does not match the expected {sha256}")
    top = f"images_{half}/"
    try:
        with zipfile.ZipFile(path) as zf:
            if (bad := zf.testzip()) is not None:
                raise DatasetError(f"{path} is corrupt: member {bad} fails its CRC check")
            pngs = [n for n in zf.namelist() if n.endswith(".png")]
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DatasetError(f"{path} is not a readable zip (truncated or corrupt?): {err}") from err
    if not pngs or any(not n.startswith(top) for n in pngs):
        raise DatasetError(f"{path} does not hold the Omniglot {half} half: expected PNGs under {top}")
    if num_images is not None and len(pngs) != num_images:
        raise DatasetError(f"{path} holds {len(pngs)} PNGs under {top}; expected {num_images}")


def download_omniglot(
    dest: str | os.PathLike | None = None,
    source_url: str = DEFAULT_URL,
    *,
    sha256: Mapping[str, str] | None = None,
    num_images: Mapping[str, int] | None = NUM_IMAGES,
    timeout: float = 60.0,
    force: bool = False,
) -> Path:
    """Fetch ``images_background.zip`` and ``images_evaluation.zip`` from ``source_url`` (any
    urllib URL, ``file://`` included) into ``dest`` (default: the resolved data dir).

    Each zip is verified with ``verify_zip`` (structure, CRCs, PNG count ``num_images[half]``,
    and ``sha256[zip name]`` when given; no checksum is pinned by default, since equivalent
    re-packed zips differ) before it is renamed into place; a zip already in ``dest`` that
    verifies is kept unless ``force``. Raises ``DatasetError`` naming the URL when offline, when
    the file is missing, truncated or corrupt. Returns ``dest``.
    """
    dest = resolve_data_dir(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = source_url if source_url.endswith("/") else source_url + "/"
    for half in HALVES:
        name = ZIP_NAMES[half]
        target = dest / name
        expect = {"sha256": (sha256 or {}).get(name), "num_images": (num_images or {}).get(half)}
        if target.is_file() and not force:
            try:
                verify_zip(target, half, **expect)
                continue
            except DatasetError as err:
                warn_at_caller(f"re-downloading {target}: {err}")
        url = base + name
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=name + ".", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        length = response.headers.get("Content-Length")
                        shutil.copyfileobj(response, out, 1 << 20)
                except (urllib.error.URLError, OSError) as err:
                    raise DatasetError(
                        f"could not download {url} ({getattr(err, 'reason', err)}). If this machine is "
                        f"offline, fetch {name} elsewhere (from {DEFAULT_URL}) and put it in {dest}"
                    ) from err
                out.flush()
                os.fsync(out.fileno())
            if length is not None and tmp.stat().st_size != int(length):
                raise DatasetError(f"download of {url} truncated: got {tmp.stat().st_size} of {length} bytes")
            try:
                verify_zip(tmp, half, **expect)
            except DatasetError as err:
                raise DatasetError(f"downloaded {url} is unusable: {err}") from err
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------- class splits


def paper_split(
    names: Iterable[str], *, seed: int = PAPER_SEED, num_train: int = PAPER_NUM_TRAIN, num_val: int = 0
) -> ClassSplit:
    """Shuffle the sorted ``names`` with ``seed``; the first ``num_train`` are train (its last
    ``num_val`` carved off as val), the rest test. Uses ``np.random.RandomState``, whose stream
    NumPy keeps fixed across versions."""
    names = sorted(names)
    if len(set(names)) != len(names):
        raise ValueError("character names must be unique")
    if not 0 < num_train < len(names):
        raise ValueError(f"num_train must be in [1, {len(names) - 1}] for {len(names)} characters, got {num_train}")
    if not 0 <= num_val < num_train:
        raise ValueError(f"num_val must be in [0, num_train={num_train}), got {num_val}")
    order = np.random.RandomState(seed).permutation(len(names))
    shuffled = tuple(names[i] for i in order)
    cut = num_train - num_val
    return ClassSplit(shuffled[:cut], shuffled[cut:num_train], shuffled[num_train:])


def lake_split(data: Omniglot) -> ClassSplit:
    """Background alphabets train, evaluation alphabets test (Lake et al. 2015), no val."""
    return ClassSplit(data.background.names, (), data.evaluation.names)


def split_path(cache_dir: Path, kind: str = "paper", *, seed: int = PAPER_SEED, num_val: int = 0) -> Path:
    suffix = f"_seed{seed}_val{num_val}" if kind == "paper" else ""
    return Path(cache_dir) / f"omniglot_split_{kind}{suffix}.json"


def write_split(path: str | os.PathLike, split: ClassSplit, **meta: Any) -> None:
    """JSON ``{"train": [...], "val": [...], "test": [...], **meta}``, written atomically."""
    obj = {**meta, **{k: list(v) for k, v in split._asdict().items()}}
    atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_split(path: str | os.PathLike) -> ClassSplit:
    try:
        obj = json.loads(Path(path).read_text())
        return ClassSplit(*(tuple(obj[k]) for k in ClassSplit._fields))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path} is not a split file with keys {ClassSplit._fields}: {err}") from err


def omniglot_split(
    data: Omniglot,
    kind: str = "paper",
    *,
    seed: int = PAPER_SEED,
    num_train: int = PAPER_NUM_TRAIN,
    num_val: int = 0,
    write_to: str | os.PathLike | None = None,
) -> ClassSplit:
    """The ``"paper"`` or ``"lake"`` split of ``data``'s character names; when ``write_to`` is
    a directory, also writes it there (``split_path``) so it can be audited."""
    if kind == "paper":
        split = paper_split(
            data.background.names + data.evaluation.names, seed=seed, num_train=num_train, num_val=num_val
        )
        meta = {"kind": kind, "seed": seed, "num_train": num_train, "num_val": num_val}
    elif kind == "lake":
        split, meta = lake_split(data), {"kind": kind}
    else:
        raise ValueError(f"split kind must be one of {SPLIT_KINDS}, got {kind!r}")
    if write_to is not None:
        write_split(split_path(Path(write_to), kind, seed=seed, num_val=num_val), split, **meta)
    return split


def rotate_classes(images: np.ndarray, names: Sequence[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """``[classes, n, H, W, ...] -> [4 * classes, n, H, W, ...]``: rotations by 0°, 90°, 180°,
    270° (rotation-major), each a new class named ``"<name>/rot<deg>"``."""
    if images.ndim < 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be [classes, n, H, W, ...] with H == W, got shape {images.shape}")
    names = tuple(names) if names is not None else tuple(str(i) for i in range(images.shape[0]))
    if len(names) != images.shape[0]:
        raise ValueError(f"{len(names)} names for {images.shape[0]} classes")
    rotated = np.concatenate([np.rot90(images, k, axes=(2, 3)) for k in range(4)])
    return rotated, tuple(f"{n}/rot{90 * k}" for k in range(4) for n in names)


def select_classes(data: Omniglot, names: Sequence[str]) -> np.ndarray:
    """``uint8 [len(names), 20, H, W]``: the images of the named characters, in that order."""
    index = {n: (h, i) for h in HALVES for i, n in enumerate(getattr(data, h).names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f"unknown Omniglot characters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    size = data.background.images.shape[2:]
    out = np.empty((len(names), DRAWINGS_PER_CHARACTER, *size), np.uint8)
    for j, n in enumerate(names):
        h, i = index[n]
        out[j] = getattr(data, h).images[i]
    return out


def load_split_arrays(
    subset: str,
    kind: str = "paper",
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    rotations: bool = False,
    seed: int = PAPER_SEED,
    num_val: int = 0,
    image_size: int = 28,
    resample: str = "lanczos",
) -> tuple[np.ndarray, tuple[str, ...]]:
    """``uint8 [classes, 20, image_size, image_size]`` and class names of one subset
    (``"train"``, ``"val"``, ``"test"``) of the ``kind`` split; ``rotations`` multiplies the
    classes by 4 (``rotate_classes``). The split is written to ``split_path(cache_dir, ...)``."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    data = load_omniglot(data_dir, cache_dir=cache_dir, image_size=image_size, resample=resample)
    cache = resolve_cache_dir(cache_dir, resolve_data_dir(data_dir))
    names = getattr(omniglot_split(data, kind, seed=seed, num_val=num_val, write_to=cache), subset)
    if not names:
        raise ValueError(f"the {kind!r} split has no {subset!r} classes (num_val={num_val})")
    images = select_classes(data, names)
    return rotate_classes(images, names) if rotations else (images, names)
