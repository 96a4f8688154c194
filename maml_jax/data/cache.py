"""Where data sets live and how their decoded caches are written and read.

Data dir resolution: an explicit argument, else ``$MAML_JAX_DATA/<name>``, else
``<user cache>/maml_jax/<name>``. Caches are written atomically (``maml_jax.files``).
"""

from __future__ import annotations

import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

from maml_jax.files import atomic_write

ENV_DATA = "MAML_JAX_DATA"


class DatasetError(RuntimeError):
    """A data set is missing, incomplete or corrupt, or could not be downloaded."""


def default_data_dir(name: str = "omniglot") -> Path:
    """``$MAML_JAX_DATA/<name>`` if the variable is set, else ``<user cache>/maml_jax/<name>``
    (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    root = os.environ.get(ENV_DATA)
    if root:
        return Path(root).expanduser() / name
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "maml_jax" / name


def resolve_data_dir(data_dir: str | os.PathLike | None = None, name: str = "omniglot") -> Path:
    """The explicit ``data_dir``, else ``default_data_dir(name)``."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir(name)


def resolve_cache_dir(cache_dir: str | os.PathLike | None, data_dir: Path, name: str = "omniglot") -> Path:
    """The explicit ``cache_dir``, else ``data_dir`` when writable, else ``default_data_dir(name)``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if data_dir.is_dir() and os.access(data_dir, os.W_OK):
        return data_dir
    return default_data_dir(name)


def warn_at_caller(message: str) -> None:
    """``warnings.warn(message)`` reported at the first frame outside the ``maml_jax`` package,
    the user's line that called a loader, however deep inside the loaders the warning arose
    (a fixed ``stacklevel`` is right for one call path and off by a frame for the others)."""
    package = Path(__file__).resolve().parents[1]
    frame, level = sys._getframe(1), 2  # level 2: the function that called this one
    while frame.f_back is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` via ``atomic_write``; a cache that cannot be written only warns."""
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as err:
        warn_at_caller(f"could not write the cache {path} ({err}); pass a writable cache_dir")


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """All arrays of ``path``, or ``None`` (with a warning) when it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        warn_at_caller(f"ignoring unreadable cache {path} ({err}); rebuilding it")
        return None
