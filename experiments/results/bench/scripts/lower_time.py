"""Seconds JAX takes to trace and lower a bench workload's train chunk (``lower_s`` of the
bench's ``compile_s``), three builds in one process, with JAX's direct-linearize path on (the
default) or off. Produced the table of ``tried_2026-12-07.md``; alternate the two settings.

    python experiments/results/bench/scripts/lower_time.py omniglot-5w1s on|off
"""

import sys
import time

import jax

from maml_jax import bench
from maml_jax.host import request_cpu_devices


def default_chunk(name: str):
    """``(jitted chunk, state)``: the one-step train chunk that ``python -m maml_jax.bench`` times
    for workload ``name`` with its defaults (CPU devices, task map, convolution); call it with
    ``data=None``. Also used by ``compile_split.py``."""
    devices = bench.DEFAULT_CPU_DEVICES[bench.WORKLOADS[name]["kind"]]
    request_cpu_devices(devices)  # takes effect before JAX starts; later calls keep the count
    conv = bench.default_conv_impl(name, cpu_devices=devices)
    chunk, state, _, _ = bench.build_chunk(name, bench.default_task_map(name), 1, conv, None, devices)
    return chunk, state


def main() -> None:
    name, setting = sys.argv[1], sys.argv[2]
    if setting not in ("on", "off"):
        raise SystemExit("usage: lower_time.py WORKLOAD on|off")
    jax.config.update("jax_use_direct_linearize", setting == "on")
    times = []
    for _ in range(3):
        chunk, state = default_chunk(name)
        t0 = time.perf_counter()
        chunk.lower(state, None)
        times.append(time.perf_counter() - t0)
    print(name, setting, " ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
