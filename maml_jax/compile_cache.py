"""A persistent XLA compilation cache for ``maml-jax train`` and ``eval`` (``--compile-cache DIR``).

Every ``maml-jax train`` process compiles its meta-step and evaluation programs again: on a slow
2-core CPU the image meta-steps take 20-38 s each (README, Speed), paid again at every resume of
an interrupted run. JAX can keep compiled executables in a directory keyed by the program, the
compile options (``XLA_FLAGS`` included), the devices and the JAX/jaxlib versions, and load
them instead of compiling (``jax_compilation_cache_dir``). A loaded executable is the one that
was compiled, so results are bitwise those of a run without the cache (tested).

The cache is opt-in, and it must be switched on before the process compiles anything: JAX
decides once per process, at its first compilation, whether a cache is used.

Known limitation: on some CPUs (reported for AVX-512 Xeons) XLA:CPU refuses to load the
executables it wrote itself, because its loader checks LLVM tuning flags as if they were
instruction-set features (jax-ml/jax#38445, openxla/xla#44565): every program is then compiled
again. ``CacheUse`` notices this (a program compiled and saved although its entry was already in
the directory) and says so, instead of letting the cache fail silently.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MAML_JAX_COMPILE_CACHE"
_HIT = "/jax/compilation_cache/cache_hits"
_WRITE = "/jax/compilation_cache/cache_misses"  # recorded when a compiled program is saved
_SUFFIX = "-cache"  # jax._src.lru_cache stores an entry as <key>-cache


def _cache_already_decided() -> bool:
    """Whether this process has compiled with the cache setting fixed (JAX checks it once)."""
    try:
        from jax._src import compilation_cache
    except ImportError:  # pragma: no cover - a JAX without the module
        return False
    return bool(getattr(compilation_cache, "_cache_checked", False))


def enable_compile_cache(path: str | os.PathLike, min_compile_time_s: float = 0.0) -> Path:
    """Keep compiled XLA executables in ``path`` (created if missing) and load them from there.

    ``min_compile_time_s``: programs that compiled faster are not saved (JAX's default, 1 s, is
    meant for remote file systems; on a local disk saving everything costs a few ms each).
    Returns the resolved directory. Raises ``ValueError`` if ``path`` cannot be created or
    written, ``RuntimeError`` if this process has already compiled a program (JAX fixes the
    cache setting at its first compilation, so a later call would be silently ignored)."""
    import jax

    if not min_compile_time_s >= 0:
        raise ValueError(f"min_compile_time_s must be >= 0, got {min_compile_time_s!r}")
    p = Path(path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"compile cache {p}: cannot create the directory ({err.strerror or err})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"compile cache {p}: the directory is not writable")
    if _cache_already_decided():
        raise RuntimeError(
            "enable_compile_cache must run before this process compiles anything: JAX decides at its "
            "first compilation whether a persistent cache is used"
        )
    jax.config.update("jax_compilation_cache_dir", str(p))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size threshold
    return p


def cache_entries(path: str | os.PathLike) -> set[str]:
    """The keys of the executables stored in a cache directory."""
    return {f.name[: -len(_SUFFIX)] for f in Path(path).glob(f"*{_SUFFIX}")}


class CacheUse:
    """Counts, while active, the programs loaded from the persistent cache and those compiled and
    saved to it (a context manager around JAX's monitoring events)::

        with CacheUse(cache_dir) as use:
            train(...)
        print(use.summary())

    ``loaded``: programs taken from the cache; ``saved``: programs compiled and offered to the
    cache; ``new_entries``: entries the directory gained; ``rejected``: programs compiled and
    saved although their entry was already there (the cache did not load them, see the module
    docstring), ``saved - new_entries`` (so another process writing the same directory at the
    same time also counts)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.loaded = 0
        self.saved = 0
        self._before: set[str] = set()

    def _listen(self, event: str, **kwargs) -> None:
        if event == _HIT:
            self.loaded += 1
        elif event == _WRITE:
            self.saved += 1

    def __enter__(self) -> CacheUse:
        import jax

        self._before = cache_entries(self.path)
        jax.monitoring.register_event_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_listener(self._listen)

    @property
    def new_entries(self) -> int:
        return len(cache_entries(self.path) - self._before)

    @property
    def rejected(self) -> int:
        return max(self.saved - self.new_entries, 0)

    def summary(self) -> str:
        """One line for the end of a run."""
        line = f"compile cache {self.path}: {self.loaded} programs loaded, {self.saved} compiled and saved"
        if self.rejected:
            line += (
                f"; {self.rejected} of them were already in the cache but were compiled again: XLA:CPU "
                "refused its own entries (on some CPUs it does, jax-ml/jax#38445), so the cache cannot "
                "save time on this machine"
            )
        return line
