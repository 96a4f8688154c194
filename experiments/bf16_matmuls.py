"""float32 against bfloat16 matmuls on this backend: ``python experiments/bf16_matmuls.py``.

Times ``jnp.dot`` (jitted, median of 5 calls after one warm-up) with float32 inputs and output,
bf16 inputs and output, and bf16 inputs with a float32 result (``preferred_element_type``), at a
square size, where a CPU
with AVX512_BF16 runs bf16 about twice as fast, and at the skinny shapes of conv4's patch
matmuls (``[n·H'·W', 9·C] @ [9·C, F]`` and the kernel gradient's ``[9·C, n·H'·W'] @ [n·H'·W', F]``),
which decide the image workloads' speed. Why ``speed_variants.py bf16dot`` is slower on the EPYC:
see ``results/bench/tried_2026-11-24.md``.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

SHAPES = {
    "square 2048": (2048, 2048, 2048),
    "miniimagenet layer 2, forward": (75 * 42 * 42, 9 * 32, 32),
    "miniimagenet layer 2, kernel gradient": (9 * 32, 75 * 42 * 42, 32),
    "omniglot layer 2, forward": (75 * 14 * 14, 9 * 64, 64),
}


def time_dot(m: int, k: int, n: int, dtype, out_dtype=None) -> float:
    """Median ms of one ``[m, k] @ [k, n]`` with inputs in ``dtype`` and the result in
    ``out_dtype`` (default: ``dtype``)."""
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=out_dtype))
    dot(a, b).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    for name, (m, k, n) in SHAPES.items():
        gflop = 2 * m * k * n / 1e9
        cells = []
        for label, dt, out in (
            ("f32", jnp.float32, None),
            ("bf16", jnp.bfloat16, None),
            ("bf16->f32", jnp.bfloat16, jnp.float32),
        ):
            ms = time_dot(m, k, n, dt, out)
            cells.append(f"{label} {ms:6.1f} ms {gflop / ms * 1e3:4.0f} GFLOP/s")
        print(f"{name} [{m}, {k}] @ [{k}, {n}]: " + ", ".join(cells))


if __name__ == "__main__":
    main()
