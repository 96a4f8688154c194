"""Per-layer timing of the Winograd convolution and of the per-image patch convolution against
the patch convolution: ``python experiments/winograd_layers.py [--images 75]``.

For each stride-1 layer shape of the miniimagenet-5w1s conv4 (``[images, side, side, C]`` with
32 filters: 84x84x3, 42x42x32, 21x21x32, 10x10x32; 75 images is one task's query set) it times,
jitted, median of 5 calls after one warm-up, in ms: the forward ``conv(x, k)`` and the gradients
of ``Σ conv(x, k)²`` in ``x`` and ``k`` together, for the library's patch convolution
(``conv4.conv3x3``, ``"patches"``), ``speed_variants.winograd_conv`` (F(2x2, 3x3)),
``speed_variants.winograd_primal_conv`` (Winograd value, patch-convolution gradients) and
``conv4.conv3x3`` with ``"patches_per_image"`` (one image at a time under ``jax.checkpoint``).
Prints a Markdown table. Why the Winograd variants were not kept:
``results/bench/tried_2026-12-06_winograd.md``; the per-image convolution, the CPU default for
MiniImageNet: ``results/bench/patches_per_image_epyc512.md``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from maml_jax.bench import median_call_ms
from maml_jax.models.conv4 import conv3x3

LAYERS = ((84, 3), (42, 32), (21, 32), (10, 32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=75)
    a = ap.parse_args()
    from speed_variants import winograd_conv, winograd_primal_conv  # a sibling: experiments/ is sys.path[0] when run

    convs = {
        "patches": lambda x, k: conv3x3(x, k, 1, "patches"),
        "winograd": winograd_conv,
        "winograd value only": winograd_primal_conv,
        "patches per image": lambda x, k: conv3x3(x, k, 1, "patches_per_image"),
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
            cells += [f"{median_call_ms(fwd, x, k, calls=5):.1f}", f"{median_call_ms(grads, x, k, calls=5):.1f}"]
        print(f"| {side}x{side}x{c} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
