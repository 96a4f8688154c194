"""Peak memory and time of one omniglot-5w1s meta-step versus the number of inner steps.

    python experiments/memory_vs_steps.py [--steps 1,5,10,25,50] [--variants ...] [--task-map vmap|map]
        [--conv-impl patches|lax|patches_per_image] [--json]

For each variant and K, compiles the train step of ``maml_jax.bench``'s ``omniglot-5w1s``
workload (conv4, 32 tasks, 5 support + 75 query images 28x28, Adam; second order unless
stated) with ``num_inner_steps=K`` and reads XLA's ``compiled.memory_analysis()``:

* ``temp``: the scratch buffers the program allocates (activations kept for the backward pass,
  residuals of the inner ``lax.scan``); this is what grows with K;
* ``peak`` = temp + argument + output − alias bytes (arguments and outputs live at the same time
  except the donated train state, which aliases its output).

Then times ``--time-iters`` calls after one warm-up call (seconds per meta-step). Variants:
``maml`` (plain backprop through the inner loop), ``remat`` (``jax.checkpoint`` around each
inner step, policy ``nothing_saveable``), ``fomaml`` (first order), ``imaml`` (implicit
gradient, 5 CG iterations), and ``maml-per-task`` / ``remat-per-task`` / ``fomaml-per-task``: the same
meta-gradient taken per task inside the task map (``algorithms.batched_meta_grad``) instead of
by differentiating through the map, so that only one task's activations are live at a time. Each K restarts from the
same parameters and task batch. Numbers are per process on XLA:CPU; on GPU/TPU the same
script reports the accelerator's buffers.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import optax

from maml_jax import bench
from maml_jax.algorithms import batched_meta_grad, imaml, maml
from maml_jax.losses import cross_entropy_loss
from maml_jax.models import conv4
from maml_jax.train import make_train_step_from_grads

VARIANTS = ("maml", "remat", "fomaml", "imaml", "maml-per-task", "remat-per-task", "fomaml-per-task")
MIB = 2**20


def make_step(variant: str, num_inner_steps: int, task_map: str, conv_impl: str = bench.CONV_IMPLS[0]):
    """``(train_step, state, tasks)`` of omniglot-5w1s with ``num_inner_steps`` for ``variant``."""
    if variant in ("maml", "remat", "fomaml"):
        kwargs = {"maml": {}, "remat": {"remat": True}, "fomaml": {"first_order": True}}[variant]
        _, state, tasks, build_step = bench.build(
            "omniglot-5w1s", task_map, conv_impl, per_task_grads=False, num_inner_steps=num_inner_steps, **kwargs
        )
        return build_step(task_map, jit=False), state, tasks
    w = bench.WORKLOADS["omniglot-5w1s"]
    _, state, tasks, _ = bench.build("omniglot-5w1s", task_map, conv_impl)
    loss_fn = cross_entropy_loss(conv4(w["ways"], dataset="omniglot", conv_impl=conv_impl).apply)
    if variant == "imaml":
        algorithm = imaml(loss_fn, num_inner_steps=num_inner_steps, inner_lr=w["alpha"])
    else:  # the MAML meta-gradient taken per task inside the task map, not through it
        remat, first_order = variant == "remat-per-task", variant == "fomaml-per-task"
        algorithm = maml(
            loss_fn, num_inner_steps=num_inner_steps, inner_lr=w["alpha"], remat=remat, first_order=first_order
        )
    meta_grad = functools.partial(batched_meta_grad, algorithm, task_map=task_map)
    return make_train_step_from_grads(meta_grad, optax.adam(1e-3)), state, tasks


def measure(variant: str, k: int, task_map: str, time_iters: int, conv_impl: str = bench.CONV_IMPLS[0]) -> dict:
    step, state, tasks = make_step(variant, k, task_map, conv_impl)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, tasks).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    temp, arg, out, alias = (
        m.temp_size_in_bytes,
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.alias_size_in_bytes,
    )
    result = {
        "variant": variant,
        "inner_steps": k,
        "temp_mib": temp / MIB,
        "peak_mib": (temp + arg + out - alias) / MIB,
        "argument_mib": arg / MIB,
        "output_mib": out / MIB,
        "alias_mib": alias / MIB,
        "compile_s": compile_s,
        "task_map": task_map,
        "conv_impl": conv_impl,
        "backend": jax.default_backend(),
    }
    if time_iters > 0:
        state, _ = compiled(state, tasks)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(time_iters):
            state, _ = compiled(state, tasks)
        jax.block_until_ready(state)
        result["s_per_step"] = (time.perf_counter() - t0) / time_iters
    return result


def table(results: list[dict]) -> str:
    rows = ["| variant | inner steps | temp MiB | peak MiB | s / meta-step | compile s |", "|" + " --- |" * 6]
    for r in results:
        t = f"{r['s_per_step']:.2f}" if "s_per_step" in r else "-"
        rows.append(
            f"| {r['variant']} | {r['inner_steps']} | {r['temp_mib']:.0f} | {r['peak_mib']:.0f} | {t} | "
            f"{r['compile_s']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="1,5,10,25,50", help="comma-separated inner step counts K")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--task-map", choices=["vmap", "map"], help="default: bench.default_task_map (map on CPU)")
    ap.add_argument("--conv-impl", default=bench.CONV_IMPLS[0], choices=bench.CONV_IMPLS)
    ap.add_argument("--time-iters", type=int, default=2, help="timed calls per point (0: memory only)")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    a = ap.parse_args(argv)
    a.task_map = a.task_map or bench.default_task_map("omniglot-5w1s")
    variants = [v for v in a.variants.split(",") if v]
    results = []
    for variant in variants:
        for k in (int(s) for s in a.steps.split(",")):
            r = measure(variant, k, a.task_map, a.time_iters, a.conv_impl)
            results.append(r)
            print(json.dumps(r) if a.json else f"{variant} K={k}: peak {r['peak_mib']:.0f} MiB", flush=True)
    if not a.json:
        print(f"\nomniglot-5w1s, task_map={a.task_map}, conv {a.conv_impl}, {jax.default_backend()}\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
