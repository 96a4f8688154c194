"""The 20 one-shot classification runs of the Omniglot paper (Lake et al. 2015, Science).

Source: ``all_runs.zip`` from https://github.com/brendenlake/omniglot (``python/one-shot-classification``),
or the folder it unpacks to::

    all_runs/run01/training/class01.png ... class20.png   one drawing of each of 20 characters
    all_runs/run01/test/item01.png ... item20.png         another drawing of each, shuffled
    all_runs/run01/class_labels.txt                       "run01/test/item01.png run01/training/class12.png"
    ...
    all_runs/run20/...

Each line of ``class_labels.txt`` pairs a test item with the training image of its character.
Images are 105x105 PNGs like Omniglot's and are decoded exactly as ``maml_jax.data.omniglot``
does (``_decode_png``): grayscale, resized to ``image_size`` (LANCZOS by default), inverted so
that ink is 255 and background 0. Nothing is cached: 800 small PNGs decode in well under a second.

``lake_run_task`` turns a run into a 20-way 1-shot ``Task`` (support = the 20 training images,
labels 0..19; query = the 20 test items with their correct labels) for ``maml_jax.core``.
``write_lake_runs_fixture`` writes a small synthetic copy in the same format, for tests and demos.
"""

from __future__ import annotations

import io
import operator
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from maml_jax.data.cache import DatasetError
from maml_jax.data.omniglot import RESAMPLE, _decode_png
from maml_jax.types import Batch, Task

NUM_RUNS = 20
NUM_CLASSES = 20  # ways of each run, and test items of each run
ZIP_NAME = "all_runs.zip"
TOP_FOLDER = "all_runs"
LABELS_FILE = "class_labels.txt"
TRAIN_DIR, TEST_DIR = "training", "test"
IMAGE_SIZE = 105  # of the original PNGs

_RUN_RE = re.compile(r"run(\d+)")
_FILE_RE = {TRAIN_DIR: re.compile(r"class(\d+)\.png"), TEST_DIR: re.compile(r"item(\d+)\.png")}
_LINE_FORMAT = "'runNN/test/itemKK.png runNN/training/classMM.png'"


class LakeRun(NamedTuple):
    """One run: ``train_images[k]`` is ``training/class{k+1:02d}.png``, ``test_images[i]`` is
    ``test/item{i+1:02d}.png`` and ``test_labels[i]`` the 0-based index of its training class.
    Images are ``uint8 [20, S, S]``, ink 255; ``test_labels`` is ``int32 [20]``."""

    name: str
    train_images: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# ----------------------------------------------------------------------------- sources


class _Tree(NamedTuple):
    """The files under the folder that holds ``runNN/``, by relative POSIX name."""

    files: dict[str, Callable[[], bytes]]  # "run01/training/class01.png" -> its bytes
    where: Callable[[str], str]  # relative name -> where it is, for messages
    description: str


def _zip_tree(path: Path) -> _Tree:
    try:
        with zipfile.ZipFile(path) as zf:
            members = {
                info.filename: zf.read(info)
                for info in zf.infolist()
                if not info.is_dir() and not info.filename.startswith("__MACOSX/")
            }
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetError(f"{path} is not a readable zip ({err}); expected {ZIP_NAME} of the Omniglot runs") from err
    # the runs sit at the top of the archive or under one top folder (all_runs/ in the original)
    prefixes = set()
    for name in members:
        parts = name.split("/")
        for depth in (0, 1):
            if len(parts) > depth + 1 and _RUN_RE.fullmatch(parts[depth]):
                prefixes.add("".join(p + "/" for p in parts[:depth]))
                break
    if not prefixes:
        raise DatasetError(
            f"{path} holds no runNN/ folders; expected members run01/{LABELS_FILE}, run01/{TRAIN_DIR}/class01.png, "
            f"... (optionally under {TOP_FOLDER}/)"
        )
    if len(prefixes) > 1:
        raise DatasetError(f"{path} holds runNN/ folders under several top folders {sorted(prefixes)}; expected one")
    (prefix,) = prefixes
    files = {name[len(prefix) :]: (lambda data=data: data) for name, data in members.items() if name.startswith(prefix)}
    return _Tree(files, lambda rel: f"{path}:{prefix}{rel}", f"{path} (members {prefix}runNN/...)")


def _folder_tree(root: Path) -> _Tree:
    files: dict[str, Callable[[], bytes]] = {}
    for run_dir in root.iterdir():
        if run_dir.is_dir() and _RUN_RE.fullmatch(run_dir.name):
            for file in [*run_dir.glob("*"), *run_dir.glob("*/*")]:
                if file.is_file():
                    files[file.relative_to(root).as_posix()] = file.read_bytes
    return _Tree(files, lambda rel: str(root / rel), str(root))


def _has_runs(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and _RUN_RE.fullmatch(p.name) for p in folder.iterdir())


def _open_tree(path: Path) -> _Tree:
    if not path.exists():
        raise DatasetError(
            f"{path} does not exist; expected {ZIP_NAME} or a folder holding run01/ ... run20/ "
            f"(each with {TRAIN_DIR}/, {TEST_DIR}/ and {LABELS_FILE}), or its parent"
        )
    if path.is_file():
        return _zip_tree(path)
    for root in (path, path / TOP_FOLDER):
        if _has_runs(root):
            return _folder_tree(root)
    if (path / ZIP_NAME).is_file():
        return _zip_tree(path / ZIP_NAME)
    raise DatasetError(
        f"{path} holds no runNN/ folders; expected {ZIP_NAME}, or a folder holding run01/ ... run20/ "
        f"(each with {TRAIN_DIR}/, {TEST_DIR}/ and {LABELS_FILE}), or its parent {TOP_FOLDER}/"
    )


# ----------------------------------------------------------------------------- parsing


def _optional_count(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value}")
    return value


def _run_names(tree: _Tree, num_runs: int | None) -> list[str]:
    tops = {rel.split("/")[0] for rel in tree.files if "/" in rel}
    present = sorted((r for r in tops if _RUN_RE.fullmatch(r)), key=lambda r: (int(r[3:]), r))
    if num_runs is None:
        if not present:
            raise DatasetError(f"{tree.description}: no run folders with files")
        return present
    expected = [f"run{k:02d}" for k in range(1, num_runs + 1)]
    if missing := [r for r in expected if r not in present]:
        raise DatasetError(
            f"{tree.description}: run folder{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing "
            f"({len(present)} present: {', '.join(present)}); expected run01 ... {expected[-1]} "
            f"(num_runs={num_runs}; pass num_runs=None to load whatever runs are present)"
        )
    if extra := [r for r in present if r not in expected]:
        raise DatasetError(
            f"{tree.description} holds {len(present)} run folders ({', '.join(extra)} beyond run01 ... "
            f"{expected[-1]}); expected num_runs={num_runs} (pass num_runs=None to load all)"
        )
    return expected


def _image_files(tree: _Tree, run: str, kind: str, num_classes: int | None, note: str) -> list[str]:
    """The relative names of ``run/kind/<stem>NN.png``, NN = 01..n, checked to be exactly those."""
    stem = "class" if kind == TRAIN_DIR else "item"
    folder = f"{run}/{kind}/"
    pngs = [rel for rel in tree.files if rel.startswith(folder) and rel.endswith(".png")]
    count = len(pngs) if num_classes is None else num_classes
    expected = [f"{folder}{stem}{k:02d}.png" for k in range(1, count + 1)]
    if not pngs or sorted(pngs) != expected:
        shown = ", ".join(sorted(p[len(folder) :] for p in pngs)[:5]) + (" ..." if len(pngs) > 5 else "")
        raise DatasetError(
            f"{tree.where(folder)} holds {len(pngs)} PNGs ({shown or 'none'}); expected "
            f"{len(expected) or 'at least one'}: {stem}01.png ... {stem}{max(count, 1):02d}.png" + note
        )
    return expected


def _parse_labels(tree: _Tree, run: str, train: Sequence[str], test: Sequence[str]) -> np.ndarray:
    rel = f"{run}/{LABELS_FILE}"
    where = tree.where(rel)
    if rel not in tree.files:
        raise DatasetError(f"{where} is missing; expected {len(test)} lines {_LINE_FORMAT}")
    try:
        text = tree.files[rel]().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{where} is not text ({err}); expected lines {_LINE_FORMAT}") from err
    class_index = {name: k for k, name in enumerate(train)}
    labels: dict[str, int] = {}

    def resolve(token: str, kind: str, lineno: int, line: str) -> str:
        parts = PurePosixPath(token.replace("\\", "/")).parts
        if parts and _RUN_RE.fullmatch(parts[0]):
            if parts[0] != run:
                raise DatasetError(f"{where} line {lineno}: {token!r} names {parts[0]}, not {run}")
            parts = parts[1:]
        if len(parts) != 2 or parts[0] != kind or not _FILE_RE[kind].fullmatch(parts[1]):
            raise DatasetError(f"{where} line {lineno}: expected {_LINE_FORMAT}, got {line!r}")
        name = f"{run}/{kind}/{parts[1]}"
        if name not in (class_index if kind == TRAIN_DIR else test):
            raise DatasetError(f"{where} line {lineno}: {token} does not exist (no {tree.where(name)})")
        return name

    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        tokens = line.split()
        if len(tokens) != 2:
            raise DatasetError(f"{where} line {lineno}: expected {_LINE_FORMAT}, got {line!r}")
        item = resolve(tokens[0], TEST_DIR, lineno, line)
        target = resolve(tokens[1], TRAIN_DIR, lineno, line)
        if item in labels:
            raise DatasetError(f"{where} line {lineno}: {tokens[0]} is listed twice")
        labels[item] = class_index[target]
    if missing := [t.rsplit("/", 1)[1] for t in test if t not in labels]:
        raise DatasetError(
            f"{where} gives no class for {', '.join(missing)}; expected one line {_LINE_FORMAT} "
            f"for each of the {len(test)} test items"
        )
    return np.array([labels[t] for t in test], dtype=np.int32)


def _decode(tree: _Tree, names: Sequence[str], size: int, resample: str) -> np.ndarray:
    images = []
    for name in names:
        try:
            images.append(_decode_png(tree.files[name](), size, resample))
        except (OSError, ValueError, SyntaxError, zipfile.BadZipFile) as err:  # PIL's errors for damaged PNGs
            raise DatasetError(f"could not decode {tree.where(name)}: {err}") from err
    return np.stack(images)


def load_lake_runs(
    path: str | os.PathLike,
    *,
    image_size: int = 28,
    resample: str = "lanczos",
    num_runs: int | None = NUM_RUNS,
    num_classes: int | None = NUM_CLASSES,
) -> list[LakeRun]:
    """Read the one-shot runs from ``all_runs.zip`` (runs at its top or under one folder, e.g.
    ``all_runs/``) or from a folder holding ``run01/`` ... (or its parent).

    ``num_runs`` runs ``run01 ...`` must be present, and no others (``None``: whatever runs are
    present, at least one), each with ``num_classes`` training images ``class01.png ...`` and as
    many test items ``item01.png ...`` (``None``: whatever is there, the same number of each).
    Images are decoded as the Omniglot loader does (``image_size`` square, ``resample`` one of
    ``"lanczos"``, ``"bilinear"``, ``"nearest"``, ink 255). Raises ``DatasetError`` naming the file
    when anything is missing, malformed or undecodable. Returns the runs in order.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
    image_size = _optional_count("image_size", image_size)
    if image_size is None:
        raise ValueError("image_size must be a positive int, got None")
    num_runs = _optional_count("num_runs", num_runs)
    num_classes = _optional_count("num_classes", num_classes)
    tree = _open_tree(Path(path).expanduser())
    runs = []
    for run in _run_names(tree, num_runs):
        train = _image_files(tree, run, TRAIN_DIR, num_classes, f" (num_classes={num_classes})" if num_classes else "")
        test = _image_files(tree, run, TEST_DIR, len(train), f", one per {TRAIN_DIR}/class*.png")
        labels = _parse_labels(tree, run, train, test)
        runs.append(
            LakeRun(run, _decode(tree, train, image_size, resample), _decode(tree, test, image_size, resample), labels)
        )
    return runs


# ----------------------------------------------------------------------------- tasks


def lake_run_task(run: LakeRun) -> Task:
    """The run as a ``ways``-way 1-shot ``Task`` (no task axis): support ``x: float32 [20, S, S, 1]``
    in [0, 1] (the training images), ``y: int32 [20] = arange(20)``; query the test items with
    their labels. Pixels are scaled as ``maml_jax.data.episodes`` does."""
    import jax.numpy as jnp

    def batch(images: np.ndarray, labels: np.ndarray) -> Batch:
        x = jnp.asarray(images, dtype=jnp.float32)[..., None] / 255.0
        return Batch(x, jnp.asarray(labels, dtype=jnp.int32))

    ways = run.train_images.shape[0]
    return Task(batch(run.train_images, np.arange(ways)), batch(run.test_images, run.test_labels))


def lake_runs_tasks(runs: Sequence[LakeRun]) -> Task:
    """All runs as one batch of tasks with a leading task axis (``[runs, 20, S, S, 1]`` ...), e.g.
    for a ``jax.vmap``-ed evaluation."""
    import jax

    if not runs:
        raise ValueError("no runs")
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[lake_run_task(r) for r in runs])


# ----------------------------------------------------------------------------- synthetic fixture


def _stroke_image(strokes: np.ndarray, shift: tuple[int, int], mode: str) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 255)
    draw = ImageDraw.Draw(im)
    dx, dy = shift
    for polyline in strokes:  # black ink on white, like the original drawings
        draw.line([(float(x) + dx, float(y) + dy) for x, y in polyline], fill=0, width=9, joint="curve")
    buf = io.BytesIO()
    im.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def write_lake_runs_fixture(
    dest: str | os.PathLike,
    *,
    num_runs: int = 2,
    num_classes: int = 20,
    seed: int = 0,
    as_zip: bool = False,
) -> Path:
    """For tests and demos: write a synthetic copy of the runs in the original format into the
    folder ``dest``, as ``dest/all_runs/runNN/...`` or, with ``as_zip``, ``dest/all_runs.zip``
    (members under ``all_runs/``). Returns that folder or zip, ready for ``load_lake_runs``.

    Each class is a random pattern of two thick polylines (105x105, black on white; training
    images 1-bit, test items grayscale, as both occur in Omniglot); its test item is the same
    pattern shifted by up to 2 pixels. The test items are shuffled: item ``i`` shows the class
    given by a seeded permutation, recorded in ``class_labels.txt``. Raw-pixel nearest neighbour
    classifies every item correctly. Deterministic in ``seed``.
    """
    if num_runs <= 0 or num_classes <= 0:
        raise ValueError(f"num_runs and num_classes must be positive, got {num_runs}, {num_classes}")
    members: dict[str, bytes] = {}
    for r in range(1, num_runs + 1):
        run = f"run{r:02d}"
        rng = np.random.default_rng([seed, r])
        strokes = rng.uniform(12, IMAGE_SIZE - 12, size=(num_classes, 2, 3, 2))  # 2 polylines of 3 points
        order = rng.permutation(num_classes)  # item i+1 shows class order[i]
        shifts = rng.integers(-2, 3, size=(num_classes, 2))
        lines = []
        for k in range(num_classes):
            members[f"{run}/{TRAIN_DIR}/class{k + 1:02d}.png"] = _stroke_image(strokes[k], (0, 0), "1")
        for i, k in enumerate(order):
            item = f"{run}/{TEST_DIR}/item{i + 1:02d}.png"
            members[item] = _stroke_image(strokes[k], (int(shifts[i, 0]), int(shifts[i, 1])), "L")
            lines.append(f"{item} {run}/{TRAIN_DIR}/class{k + 1:02d}.png\n")
        members[f"{run}/{LABELS_FILE}"] = "".join(lines).encode()

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if as_zip:
        out = dest / ZIP_NAME
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for rel, data in members.items():
                zf.writestr(f"{TOP_FOLDER}/{rel}", data)
        return out
    out = dest / TOP_FOLDER
    for rel, data in members.items():
        file = out / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
    return out
