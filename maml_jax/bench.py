"""Meta-train step throughput: ``python -m maml_jax.bench --workload sinusoid``.

Prints one JSON line per workload: ``{"workload", "it_per_s", "compile_s", ...}``. Shapes
match ``shared/bench/torch_peers.py`` exactly (second-order MAML, Adam outer update, fixed
random data, since timing does not depend on values). One iteration is one call of the
jitted train step, parameters and optimizer state carried from call to call.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import optax

from maml_jax.core import batched_meta_loss
from maml_jax.losses import mse_loss
from maml_jax.models import mlp
from maml_jax.train import init_train_state, make_train_step
from maml_jax.types import Batch, Task

WORKLOADS = {
    "sinusoid": dict(kind="mlp", tasks=25, ways=1, shots=10, query=10, steps=1, alpha=0.01),
}


def build(name: str, task_map: str):
    w = WORKLOADS[name]
    key = jax.random.PRNGKey(0)
    k_init, kxs, kxq, kys, kyq = jax.random.split(key, 5)
    if w["kind"] != "mlp":
        raise NotImplementedError(name)
    model = mlp((40, 40), 1)
    xs = jax.random.uniform(kxs, (w["tasks"], w["shots"], 1), minval=-5, maxval=5)
    xq = jax.random.uniform(kxq, (w["tasks"], w["query"], 1), minval=-5, maxval=5)
    tasks = Task(
        Batch(xs, jax.random.normal(kys, xs.shape)),
        Batch(xq, jax.random.normal(kyq, xq.shape)),
    )
    loss_fn = mse_loss(model.apply)
    objective = functools.partial(
        batched_meta_loss, task_loss_fn=loss_fn, num_inner_steps=w["steps"], inner_lr=w["alpha"], task_map=task_map
    )
    optimizer = optax.adam(1e-3)
    state = init_train_state(model.init(k_init, xs[0]), optimizer, key)
    step = jax.jit(make_train_step(objective, optimizer), donate_argnums=0)
    return step, state, tasks


def measure(name: str, iters: int, warmup: int, task_map: str = "vmap", windows: int = 5) -> dict:
    """Compile, warm up, then time ``iters`` steps split into ``windows`` equal windows;
    ``it_per_s`` is the median window rate (robust to a noisy neighbour on a shared CPU)."""
    step, state, tasks = build(name, task_map)
    t0 = time.perf_counter()
    compiled = step.lower(state, tasks).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    for _ in range(warmup):
        state, metrics = compiled(state, tasks)
    jax.block_until_ready(state)
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
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maml_jax.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="sinusoid", choices=sorted(WORKLOADS) + ["all"])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--task-map", default="vmap", choices=["vmap", "map"])
    a = ap.parse_args(argv)
    if a.iters <= 0 or a.warmup < 0:
        ap.error("--iters must be > 0 and --warmup >= 0")
    names = sorted(WORKLOADS) if a.workload == "all" else [a.workload]
    for name in names:
        print(json.dumps(measure(name, a.iters, a.warmup, a.task_map)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
