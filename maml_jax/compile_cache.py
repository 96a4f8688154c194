"""A persistent XLA compilation cache for ``maml-jax train`` and ``eval`` (``--compile-cache DIR``).

Every ``maml-jax train`` process compiles its meta-step and evaluation programs again: on a slow
2-core CPU the image meta-steps take 20-38 s each (README, Speed), paid again at every resume of
an interrupted run. JAX can keep compiled executables in a directory keyed by the program, the
compile options (``XLA_FLAGS`` included), the devices and the JAX/jaxlib versions, and load
them instead of compiling (``jax_compilation_cache_dir``). A loaded executable is the one that
was compiled, so results are bitwise those of a run without the cache (tested).

The cache is opt-in. ``enable_compile_cache`` may run at any time: JAX opens the cache
directory at the first compilation after it is set, and the function makes JAX reopen it when the
directory changes. In a multi-process job only process 0 writes entries; every process reads them.

Known limitation: on some CPUs (reported for AVX-512 Xeons) XLA:CPU refuses to load the
executables it wrote itself, because its loader checks LLVM tuning flags as if they were
instruction-set features (jax-ml/jax#38445, openxla/xla#44565): every program is then compiled
again. ``CacheUse`` notices programs compiled and saved although their entry was already in the
directory, and says so, instead of letting the cache fail silently.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MAML_JAX_COMPILE_CACHE"
_HIT = "/jax/compilation_cache/cache_hits"
_WRITE = "/jax/compilation_cache/cache_misses"  # recorded when a compiled program is saved
_SUFFIX = "-cache"  # jax._src.lru_cache stores an entry as <key>-cache


def enable_compile_cache(path: str | os.PathLike, min_compile_time_s: float = 0.0) -> Path:
    """Keep compiled XLA executables in ``path`` (created if missing) and load them from there,
    for every compilation of this process from now on.

    ``min_compile_time_s``: programs that compiled faster are not saved (JAX's default, 1 s, is
    meant for remote file systems; on a local disk saving everything costs a few ms each).
    Returns the resolved directory. Raises ``ValueError`` if ``min_compile_time_s`` is negative
    (or NaN), if ``path`` cannot be created or written, or if JAX's persistent cache is switched
    off (``JAX_ENABLE_COMPILATION_CACHE=false``), in which case the directory would be ignored."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if not min_compile_time_s >= 0:
        raise ValueError(f"min_compile_time_s must be >= 0, got {min_compile_time_s!r}")
    if not jax.config.jax_enable_compilation_cache:
        raise ValueError(
            "JAX's persistent compilation cache is switched off in this process (JAX_ENABLE_COMPILATION_CACHE"
            "=false or jax_enable_compilation_cache), so a cache directory would be ignored"
        )
    p = Path(path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"compile cache {p}: cannot create the directory ({err.strerror or err})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"compile cache {p}: the directory is not writable")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size threshold
    if jax.config.jax_compilation_cache_dir != str(p):
        jax.config.update("jax_compilation_cache_dir", str(p))
        # JAX opens the directory once, at the first compilation that uses it: forget a cache
        # opened earlier at another directory, so that the next compilation opens this one
        compilation_cache.reset_cache()
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
    cache; ``new_entries``: entries the directory gained; ``rejected``: ``saved - new_entries``,
    programs compiled and saved although their entry was already there (refused on loading, see
    the module docstring), or written by another process at the same time, or not written."""

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
        import jax

        line = f"compile cache {self.path}: {self.loaded} programs loaded, {self.saved} compiled and saved"
        if self.rejected:
            line += (
                f"; {self.rejected} of them were compiled again although an entry was already there: refused "
                "by XLA:CPU (on some CPUs it refuses its own entries, jax-ml/jax#38445; the cache then saves "
                "no time), written at the same time by another process, or not written (a full disk?)"
            )
        elif self.loaded == self.saved == 0:
            if jax.process_index() != 0:
                line += f" (process {jax.process_index()}: only process 0 writes entries)"
            else:
                line += " (no program went through the cache: can this backend serialize its executables?)"
        return line
