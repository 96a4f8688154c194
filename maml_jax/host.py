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

``reexec_with_malloc_hugepages`` restarts the process (same PID, same arguments) with glibc's
``glibc.malloc.hugetlb=1`` tunable, which the program entry points (``maml-jax``, ``python -m
maml_jax``, ``python -m maml_jax.bench``) do first. XLA:CPU allocates each execution's temporary
buffer with ``malloc`` and frees it afterwards; glibc serves a block that large (551 MB per device
for the miniimagenet-5w1s step) with a fresh ``mmap`` every time, so each step faulted in about
270,000 zeroed 4 KiB pages, an eighth of the two cores' time spent in the kernel. With the tunable
glibc asks for transparent huge pages on such blocks (2 MiB pages, about 1,500 faults a step), where the
kernel's transparent huge pages are on ``madvise`` (with ``always`` they come anyway). The
allocator does not change what is computed, only where the memory comes from
(``experiments/results/bench/malloc_hugepages_zen3.md``).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping


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


MALLOC_HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
MALLOC_HUGEPAGES_OPT_OUT = "MAML_JAX_MALLOC_HUGEPAGES"  # set to 0 to keep the process's malloc as it is
MALLOC_HUGEPAGES_RESTARTED = "MAML_JAX_MALLOC_RESTARTED"  # set in the restarted process: never restart twice
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def with_malloc_hugepages(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` whose ``GLIBC_TUNABLES`` (a ``:``-separated list) also sets
    ``glibc.malloc.hugetlb=1``; returned unchanged where it already sets ``glibc.malloc.hugetlb``
    (to any value: the user's choice stands)."""
    out = dict(env)
    tunables = [t for t in out.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.split("=", 1)[0] == "glibc.malloc.hugetlb" for t in tunables):
        out["GLIBC_TUNABLES"] = ":".join([*tunables, MALLOC_HUGEPAGES_TUNABLE])
    return out


def _glibc_has_hugetlb_tunable() -> bool:
    """glibc 2.35 or later (the release that added ``glibc.malloc.hugetlb``)."""
    libc, version = platform.libc_ver()
    if libc != "glibc":
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _transparent_hugepages_on_madvise(setting: str = THP_SETTING) -> bool:
    """Whether the kernel's transparent huge pages are in ``[madvise]`` mode: the only one in which
    ``glibc.malloc.hugetlb=1`` changes anything (``never`` refuses huge pages, ``always`` gives them
    without being asked). False where the file is missing."""
    try:
        with open(setting) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def malloc_hugepages_wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``reexec_with_malloc_hugepages`` would restart the process: on Linux with glibc >= 2.35
    and transparent huge pages on ``madvise``, when ``GLIBC_TUNABLES`` does not set
    ``glibc.malloc.hugetlb`` yet, ``MAML_JAX_MALLOC_HUGEPAGES`` is not ``0`` and the process is not
    itself the restarted one."""
    env = os.environ if env is None else env
    if env.get(MALLOC_HUGEPAGES_OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if env.get(MALLOC_HUGEPAGES_RESTARTED) or with_malloc_hugepages(env) == dict(env):
        return False  # restarted already (glibc may drop GLIBC_TUNABLES, e.g. for setuid), or set by the user
    return sys.platform == "linux" and _glibc_has_hugetlb_tunable() and _transparent_hugepages_on_madvise()


def _restartable_command() -> list[str] | None:
    """``sys.orig_argv`` where running it again repeats this program: not in an interactive or
    IPython session, not a script read from stdin, and with ``sys.argv``'s arguments at its end
    (they differ under ``runpy`` or IPython's ``%run``); ``None`` otherwise."""
    argv = list(getattr(sys, "orig_argv", None) or [])
    if not argv or sys.flags.interactive or "IPython" in sys.modules or "-" in argv[1:2]:
        return None
    args = sys.argv[1:]
    if args and argv[-len(args) :] != args:
        return None
    return argv


def reexec_with_malloc_hugepages() -> None:
    """Replace this process by the same command line with ``GLIBC_TUNABLES`` set by
    ``with_malloc_hugepages`` (``os.execve``: same PID, nothing returns), where
    ``malloc_hugepages_wanted()`` and the command line can be run again (``_restartable_command``);
    return without doing anything otherwise. glibc reads its tunables only when a process starts,
    hence the restart. The entry points call it before any computation or output; importing
    ``maml_jax`` (JAX included) has happened by then and happens again in the new process, about a
    second. Never call it from library code."""
    argv = _restartable_command() if malloc_hugepages_wanted() else None
    if argv is None:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    env = {**with_malloc_hugepages(os.environ), MALLOC_HUGEPAGES_RESTARTED: "1"}
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
