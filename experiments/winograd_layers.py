"""Per-layer timing of the Winograd convolution against the patch convolution:
``python experiments/winograd_layers.py [--images 75]``.

For each stride-1 layer shape of the miniimagenet-5w1s conv4 (``[images, side, side, C]`` with
32 filters: 84x84x3, 42x42x32, 21x21x32, 10x10x32; 75 images is one task's query set) it times,
jitted, median of 5 calls after one warm-up, in ms: the forward ``conv(x, k)`` and the gradients
of ``Σ conv(x, k)²`` in ``x`` and ``k`` together, for the library's patch convolution
(``conv4.conv3x3``, ``"patches"``), ``speed_variants.winograd_conv`` (F(2x2, 3x3)) and
``speed_variants.winograd_primal_conv`` (Winograd value, patch-convolution gradients). Prints a
Markdown table. Why the variants were not kept: ``results/bench/tried_2026-12-06_winograd.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from maml_jax.models.conv4 import conv3x3

LAYERS = ((84, 3), (42, 32), (21, 32), (10, 32))


def load_speed_variants():
    path = Path(__file__).with_name("speed_variants.py")
    spec = importlib.util.spec_from_file_location("speed_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_ms(fn, *args, calls: int = 5) -> float:
    """Median wall time of ``calls`` calls of jitted ``fn`` after one warm-up call, in ms."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=75)
    a = ap.parse_args()
    sv = load_speed_variants()
    convs = {
        "patches": lambda x, k: conv3x3(x, k, 1, "patches"),
        "winograd": sv.winograd_conv,
        "winograd value only": sv.winograd_primal_conv,
    }
    print(f"{a.images} images, 32 filters, float32, {jax.devices()[0].device_kind}; ms, median of 5")
    print("| layer | " + " | ".join(f"{n} fwd | {n} grads" for n in convs) + " |")
    print("| --- " * (1 + 2 * len(convs)) + "|")
    for side, c in LAYERS:
        kx, kk = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (a.images, side, side, c))
        k = jax.random.normal(kk, (3, 3, c, 32)) / (3 * c**0.5)
        cells = []
        for conv in convs.values():
            fwd = jax.jit(conv)
            grads = jax.jit(jax.grad(lambda x_, k_, conv=conv: jnp.sum(conv(x_, k_) ** 2), argnums=(0, 1)))
            cells += [f"{median_ms(fwd, x, k):.1f}", f"{median_ms(grads, x, k):.1f}"]
        print(f"| {side}x{side}x{c} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
