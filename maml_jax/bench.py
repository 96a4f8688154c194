"""Meta-train step throughput: ``python -m maml_jax.bench --workload sinusoid``.

Prints one JSON line per workload: ``{"workload", "it_per_s", "compile_s", ...}``. Shapes
match ``shared/bench/torch_peers.py`` exactly (second-order MAML, Adam outer update, fixed
random data, since timing does not depend on values). One iteration is one call of the
jitted train step, parameters and optimizer state carried from call to call.

Workloads: ``sinusoid`` (MLP 1-40-40-1) and the conv4 image workloads ``omniglot-5w1s``,
``omniglot-20w1s``, ``miniimagenet-5w1s`` (cross-entropy). ``--conv-impl`` and ``--task-map``
default to the fastest choice measured on a 2-core CPU (``DEFAULT_TASK_MAP``): ``patches``
everywhere (``lax`` was 8-20x slower in every combination), ``map`` for omniglot-5w1s and
``vmap`` for the others (differences of 5-50%, on a noisy machine). On GPU/TPU measure
``lax``/``vmap`` too. ``--tasks`` overrides the task count (for smoke tests only: the result is
then not the benchmark shape). ``flops_per_step`` is XLA's count for the vmapped step,
whichever ``--task-map`` is timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from maml_jax.core import batched_meta_loss
from maml_jax.losses import cross_entropy_loss, mse_loss
from maml_jax.models import conv4, mlp
from maml_jax.train import init_train_state, make_train_step
from maml_jax.types import Batch, Task

# query = query examples per class (as in torch_peers.py); image shapes are NHWC
WORKLOADS = {
    "sinusoid": dict(kind="mlp", tasks=25, ways=1, shots=10, query=10, steps=1, alpha=0.01),
    "omniglot-5w1s": dict(kind="omniglot", tasks=32, ways=5, shots=1, query=15, steps=1, alpha=0.4),
    "omniglot-20w1s": dict(kind="omniglot", tasks=16, ways=20, shots=1, query=5, steps=5, alpha=0.1),
    "miniimagenet-5w1s": dict(kind="miniimagenet", tasks=4, ways=5, shots=1, query=15, steps=5, alpha=0.01),
}
IMAGE_SHAPES = {"omniglot": (28, 28, 1), "miniimagenet": (84, 84, 3)}
CONV_IMPLS = ("patches", "lax")  # first = default (fastest on a 2-core CPU)
DEFAULT_TASK_MAP = {"sinusoid": "vmap", "omniglot-5w1s": "map", "omniglot-20w1s": "vmap", "miniimagenet-5w1s": "vmap"}
DEFAULT_ITERS = {"mlp": (2000, 50), "omniglot": (20, 3), "miniimagenet": (10, 2)}  # (iters, warmup)


def _image_tasks(key: jax.Array, w: dict) -> Task:
    """Random images ``[tasks, ways·shots, H, W, C]`` / ``[tasks, ways·query, ...]``, labels
    ``[tasks, ways·shots]`` class-major (``0,0,…,1,1,…``) as in torch_peers.py."""
    shape = IMAGE_SHAPES[w["kind"]]
    ns, nq = w["ways"] * w["shots"], w["ways"] * w["query"]
    kxs, kxq = jax.random.split(key)
    labels = lambda per_class: jnp.broadcast_to(  # noqa: E731
        jnp.repeat(jnp.arange(w["ways"]), per_class), (w["tasks"], w["ways"] * per_class)
    )
    return Task(
        Batch(jax.random.normal(kxs, (w["tasks"], ns, *shape)), labels(w["shots"])),
        Batch(jax.random.normal(kxq, (w["tasks"], nq, *shape)), labels(w["query"])),
    )


def build(name: str, task_map: str, conv_impl: str = CONV_IMPLS[0], num_tasks: int | None = None):
    """``(jitted train step, train state, task batch, make_step)`` for workload ``name``;
    ``make_step(task_map)`` builds the same step with another task mapping."""
    w = dict(WORKLOADS[name], **({} if num_tasks is None else {"tasks": num_tasks}))
    key = jax.random.PRNGKey(0)
    k_init, kxs, kxq, kys, kyq = jax.random.split(key, 5)
    if w["kind"] == "mlp":
        model = mlp((40, 40), 1)
        xs = jax.random.uniform(kxs, (w["tasks"], w["shots"], 1), minval=-5, maxval=5)
        xq = jax.random.uniform(kxq, (w["tasks"], w["query"], 1), minval=-5, maxval=5)
        tasks = Task(
            Batch(xs, jax.random.normal(kys, xs.shape)),
            Batch(xq, jax.random.normal(kyq, xq.shape)),
        )
        loss_fn = mse_loss(model.apply)
    else:
        model = conv4(w["ways"], dataset=w["kind"], conv_impl=conv_impl)
        tasks = jax.jit(functools.partial(_image_tasks, w=w))(kxs)
        xs = tasks.support.x
        loss_fn = cross_entropy_loss(model.apply)
    optimizer = optax.adam(1e-3)
    example_x = xs[0]
    state = jax.jit(lambda k: init_train_state(model.init(k, example_x), optimizer, key))(k_init)

    def make_step(task_map: str):
        objective = functools.partial(
            batched_meta_loss, task_loss_fn=loss_fn, num_inner_steps=w["steps"], inner_lr=w["alpha"], task_map=task_map
        )
        return jax.jit(make_train_step(objective, optimizer), donate_argnums=0)

    return make_step(task_map), state, tasks, make_step


def _flops(analysis) -> float:
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def measure(
    name: str,
    iters: int,
    warmup: int,
    task_map: str | None = None,
    windows: int = 5,
    conv_impl: str = CONV_IMPLS[0],
    num_tasks: int | None = None,
) -> dict:
    """Compile, warm up, then time ``iters`` steps split into ``min(windows, iters)`` equal
    windows; ``it_per_s`` is the median window rate (robust to a noisy neighbour on a shared
    CPU). ``task_map=None`` takes the workload's default."""
    task_map = task_map or DEFAULT_TASK_MAP[name]
    step, state, tasks, make_step = build(name, task_map, conv_impl, num_tasks)
    t0 = time.perf_counter()
    lowered = step.lower(state, tasks)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # XLA's count on the vmapped program before optimisation (it counts a lax.map body once)
    flops = _flops((lowered if task_map == "vmap" else make_step("vmap").lower(state, tasks)).cost_analysis())
    for _ in range(warmup):
        state, metrics = compiled(state, tasks)
    jax.block_until_ready(state)
    windows = max(1, min(windows, iters))
    per_window = max(1, iters // windows)
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(per_window):
            state, metrics = compiled(state, tasks)
        jax.block_until_ready(state)
        rates.append(per_window / (time.perf_counter() - t0))
    return {
        "workload": name,
        "it_per_s": statistics.median(rates),
        "it_per_s_min": min(rates),
        "it_per_s_max": max(rates),
        "compile_s": compile_s,
        "flops_per_step": flops,
        "iters": per_window * windows,
        "task_map": task_map,
        "conv_impl": None if WORKLOADS[name]["kind"] == "mlp" else conv_impl,
        "tasks": int(tasks.query.x.shape[0]),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maml_jax.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="sinusoid", choices=sorted(WORKLOADS) + ["all"])
    ap.add_argument("--iters", type=int, default=None, help="default: 2000 sinusoid, 20 omniglot, 10 miniimagenet")
    ap.add_argument("--warmup", type=int, default=None, help="default: 50 sinusoid, 3 omniglot, 2 miniimagenet")
    ap.add_argument(
        "--task-map", default=None, choices=["vmap", "map"], help="default: the workload's (DEFAULT_TASK_MAP)"
    )
    ap.add_argument("--conv-impl", default=CONV_IMPLS[0], choices=CONV_IMPLS, help="conv4 convolution formulation")
    ap.add_argument("--tasks", type=int, default=None, help="override the task count (tests only; not the bench shape)")
    a = ap.parse_args(argv)
    if (a.iters is not None and a.iters <= 0) or (a.warmup is not None and a.warmup < 0):
        ap.error("--iters must be > 0 and --warmup >= 0")
    if a.tasks is not None and a.tasks <= 0:
        ap.error("--tasks must be > 0")
    names = sorted(WORKLOADS) if a.workload == "all" else [a.workload]
    for name in names:
        iters, warmup = DEFAULT_ITERS[WORKLOADS[name]["kind"]]
        iters, warmup = a.iters or iters, warmup if a.warmup is None else a.warmup
        result = measure(name, iters, warmup, a.task_map, conv_impl=a.conv_impl, num_tasks=a.tasks)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
