"""Time XLA:CPU's native convolution and its gradients in one jitted call vs inside ``lax.map``.

    python experiments/conv_grad_under_map.py [--tasks 4] [--images 75] [--size 42] [--channels 32]
        [--repeats 3] [--only FORM]

For ``tasks`` tasks of ``[images, size, size, channels]`` inputs and a 3x3 stride-1 padding-1
kernel ``[3, 3, channels, channels]``, it times four forms of ``lax.conv_general_dilated``
and the patch-matmul kernel gradient (``models.conv4.conv3x3`` with ``impl="patches"``), each
run once per task, either as ``tasks`` calls unrolled in one jitted function or as the body of
``lax.map`` over the tasks (how ``task_map="map"`` runs a meta-batch):

* ``forward``: ``conv(x, k)``;
* ``input_grad``: the VJP of ``conv`` with respect to ``x``;
* ``input_grad_explicit``: the same input gradient written as a forward convolution of ``g``
  with the flipped, in/out-swapped kernel (``HWIO`` again), as a custom VJP would write it;
* ``kernel_grad``: the VJP with respect to ``k`` (XLA's ``f01b_i01o->01bf`` convolution whose
  window is the whole input image);
* ``kernel_grad_patches``: the same gradient through the patch-matmul convolution.

Prints one JSON line per form: median milliseconds per call of each variant (``--repeats``
timed calls after one warm-up) and their ratio. This is why ``experiments/speed_variants.py
vjpconv`` routes every rule through custom functions: a native kernel-gradient convolution
left in a second-order step runs inside the task map. (In the compiled HLO, JAX's transpose
rule leaves the input-gradient convolution with ``dim_labels=b01f_01oi->b01f``; outside a loop
XLA:CPU rewrites it to the canonical ``01io`` form that its fast convolution path takes, inside
the ``lax.map`` loop body it does not.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp

from maml_jax.bench import median_call_ms
from maml_jax.models.conv4 import conv3x3


def _lax_conv(x, k):
    return conv3x3(x, k, 1, "lax")


def _patch_conv(x, k):
    return conv3x3(x, k, 1, "patches")


def forms() -> dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]]:
    """``{name: f(x [n, H, W, C], k [3, 3, C, C], g [n, H, W, C]) -> array}``."""
    return {
        "forward": lambda x, k, g: _lax_conv(x, k),
        "input_grad": lambda x, k, g: jax.vjp(lambda x_: _lax_conv(x_, k), x)[1](g)[0],
        "input_grad_explicit": lambda x, k, g: _lax_conv(g, jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)),
        "kernel_grad": lambda x, k, g: jax.vjp(lambda k_: _lax_conv(x, k_), k)[1](g)[0],
        "kernel_grad_patches": lambda x, k, g: jax.vjp(lambda k_: _patch_conv(x, k_), k)[1](g)[0],
    }


def variants(fn: Callable) -> tuple[Callable, Callable]:
    """``(unrolled, mapped)``: ``fn`` per task as separate calls in one jit, and under ``lax.map``."""
    unrolled = jax.jit(lambda xs, k, gs: jnp.stack([fn(xs[t], k, gs[t]) for t in range(xs.shape[0])]))
    mapped = jax.jit(lambda xs, k, gs: jax.lax.map(lambda xg: fn(xg[0], k, xg[1]), (xs, gs)))
    return unrolled, mapped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--images", type=int, default=75)
    ap.add_argument("--size", type=int, default=42)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=sorted(forms()), help="time one form only")
    a = ap.parse_args(argv)
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (a.tasks, a.images, a.size, a.size, a.channels)
    xs, gs = jax.random.normal(kx, shape), jax.random.normal(kg, shape)
    k = 0.1 * jax.random.normal(kk, (3, 3, a.channels, a.channels))
    for name, fn in forms().items():
        if a.only and name != a.only:
            continue
        unrolled, mapped = variants(fn)
        u, m = (median_call_ms(f, xs, k, gs, calls=a.repeats) for f in (unrolled, mapped))
        row = {"form": name, "unrolled_ms": round(u, 3), "map_ms": round(m, 3), "map_over_unrolled": round(m / u, 2)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
