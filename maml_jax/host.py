"""The host CPUs that JAX's CPU backend runs on.

XLA:CPU sizes its intra-op thread pool from the process's CPU affinity mask when the backend
is created. For a tiny program such as the sinusoid MLP's meta-step (about 125 fusions, plus its dots
and copies, of a few microseconds each) handing kernels to other threads costs more than it saves: on a
2-core machine, one core ran the sinusoid benchmark about 1.4x faster than two (README,
Speed). ``limit_cpus`` restricts the process to fewer CPUs; it must run before JAX creates
its backends (the first computation or ``jax.devices()``). Linux only (``os.sched_setaffinity``).

``request_cpu_devices`` makes the CPU platform expose several XLA devices (``jax_num_cpu_devices``)
so that a task batch can be split over them (``parallel``, ``--config.num_devices``): on the
Omniglot workloads, whose per-task kernels are too small to keep two cores busy one task at a
time, two devices working on half the tasks each ran up to 1.2x faster (README, Speed).
"""

from __future__ import annotations

import os


def available_cpus() -> list[int] | None:
    """The CPUs this process may run on (its affinity mask); ``None`` where the platform
    does not say (no ``os.sched_getaffinity``, e.g. macOS)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module
        return False
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def limit_cpus(n: int) -> list[int]:
    """Restrict the calling thread (and the threads and processes it starts later) to the first
    ``n`` CPUs of its affinity mask, so that XLA:CPU's thread pool has ``n`` threads.

    Returns the CPUs kept. Raises ``ValueError`` for ``n`` outside ``1..available``,
    ``RuntimeError`` if JAX's backends already exist (the pool size is fixed by then, and
    pinning its threads onto fewer cores would only slow it down) or the platform cannot set
    an affinity mask."""
    cpus = available_cpus()
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("limiting the CPUs needs os.sched_setaffinity (Linux); run without --cpus")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(cpus):
        raise ValueError(f"cpus must be an integer in 1..{len(cpus)} (the CPUs this process may use), got {n!r}")
    if _backends_initialized():
        raise RuntimeError(
            "limit_cpus must run before JAX creates its backends (before the first computation or "
            "jax.devices()): XLA:CPU sizes its thread pool then"
        )
    keep = cpus[:n]
    os.sched_setaffinity(0, keep)
    return keep


def request_cpu_devices(n: int) -> int:
    """Ask for ``n`` XLA CPU devices (``jax_num_cpu_devices``); returns how many the CPU platform
    has. Takes effect only before JAX creates its backends; afterwards the existing count is
    kept (and returned) rather than raising, so library code may call it unconditionally."""
    import jax

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of CPU devices must be an integer >= 1, got {n!r}")
    if not _backends_initialized():
        jax.config.update("jax_num_cpu_devices", n)
    return len(jax.devices("cpu"))


def init_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple[int, int]:
    """``jax.distributed.initialize`` with the given arguments (``None``: detected from the
    cluster: Cloud TPU, SLURM, Open MPI, ...; ``JAX_COORDINATOR_ADDRESS`` for the address).
    CPU processes exchange collectives through gloo. Must run before JAX creates its backends.
    Returns ``(process_index, process_count)``."""
    import jax

    if _backends_initialized():
        raise RuntimeError("init_distributed must run before JAX creates its backends (the first computation)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return jax.process_index(), jax.process_count()


def is_primary() -> bool:
    """True in process 0 of a multi-process job, and in a single-process one: the process that
    writes logs, metadata, parameters and results (Orbax checkpoints are written by all)."""
    import jax

    return jax.process_index() == 0
