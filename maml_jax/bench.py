"""Meta-train step throughput: ``python -m maml_jax.bench --workload sinusoid``.

Prints one JSON line per workload: ``{"workload", "it_per_s", "compile_s", "lower_s", ...}``. Shapes
match ``shared/bench/torch_peers.py`` exactly (second-order MAML, Adam outer update, random
data, since timing does not depend on values). ``it_per_s`` is meta-steps per second. The timed
program is the training path the library runs (``train.make_sampling_train_chunk``): one
compiled call runs ``--steps-per-call N`` train steps in a ``lax.scan``, each sampling its task
batch on device (random images/points of the workload's exact shapes) from
``fold_in(rng, step)``, parameters and optimizer state carried from step to step, and the
meta-gradient from ``algorithms.batched_meta_grad`` (each task's inside the task map with
``map``, the mean loss's with ``vmap``), as ``maml-jax train`` does.
``--fixed-tasks`` instead trains every step on one batch drawn before timing, which is how
``torch_peers.py`` times the peers (the same chunk, with the batch as its data; the sampler's
share of the step, about 10% for the sinusoid and at most 6% for the images on a 2-core EPYC, drops out).
``DEFAULT_STEPS_PER_CALL``: 100 for sinusoid (per-call dispatch is a large part of a ~0.3 ms
step, 3,102 it/s on an AVX-512 EPYC in ``experiments/results/bench/epyc512_rounds3_4a993ec.md``;
fusing measured ~1.9x), 1 for the image workloads (a step takes seconds on CPU; 5 per call ran
omniglot-20w1s no faster, ``experiments/results/bench/tried_2026-12-07.md``).

``--all --compare-peers`` also runs each PyTorch peer of ``torch_peers.py`` (``--peers-python``
of the peers' venv, ``--l2l-src`` for learn2learn) on each workload and prints a table of ours
vs each peer with ratios, the FLOPs per step and the fraction of a measured matmul peak
(``matmul_peak_gflops``: a 2048x2048 float32 matmul in JAX); ``--json`` prints JSON lines
instead of the table. ``--rounds R`` measures ours and the peers alternately R times and
reports medians (a shared machine's noise moves single runs by ±20%). With ``--compare-peers`` or
several workloads, each measurement's rates go to stderr as it finishes (``[bench] ...`` lines),
so a long run shows its progress; stdout holds only the JSON lines or the table.

Run as ``python -m maml_jax.bench`` (or ``maml-jax bench``), the process first restarts itself with
glibc's huge-page malloc (``host.reexec_with_malloc_hugepages``; ``MAML_JAX_MALLOC_HUGEPAGES=0``
opts out), as ``maml-jax train`` does. The peers' processes inherit that environment, so both sides
get it: it ran our miniimagenet-5w1s step 1.21x faster and the peers 1.19-1.25x on a Zen3 EPYC
(``experiments/results/bench/malloc_hugepages_zen3.md``). ``glibc_tunables`` in the JSON says what ran.

``--cpu-devices N`` splits the task batch over N XLA CPU devices of this process
(``jax_num_cpu_devices``; ``parallel.shard_meta_grad``, the path of ``--config.num_devices``),
each device's share of the tasks running concurrently with the other's. ``DEFAULT_CPU_DEVICES``:
2 for the image workloads, whose per-task kernels leave part of two cores idle when the tasks run
one after the other (on 2 cores, alternated runs: omniglot-20w1s +10% and +22%, omniglot-5w1s +13%
and -1%; miniimagenet-5w1s +11% by the medians of 7 alternated pairs on an AVX-512 EPYC at 7275acf,
two devices faster in 5 of them, where earlier, shorter A/Bs had shown no gain,
``experiments/results/bench/miniimagenet_2devices_epyc512.md``), 1 for the sinusoid; ignored off CPU.
``cpu_devices`` in the JSON says how many the task batch was split over.

``--cpus N`` runs JAX on N CPUs (``host.limit_cpus``; ``DEFAULT_CPUS``: 1 for the sinusoid,
whose step of ~125 tiny fusions (plus dots and copies) loses more to cross-thread handoffs than it gains from a
second core, all for the image workloads); ``cpus`` in the JSON says how many were used. With
``--compare-peers`` or several workloads a pinned workload runs in a child process, so the
peers and the peak matmul keep every CPU.

Workloads: ``sinusoid`` (MLP 1-40-40-1) and the conv4 image workloads ``omniglot-5w1s``,
``omniglot-20w1s``, ``miniimagenet-5w1s`` (cross-entropy). ``--conv-impl`` and ``--task-map``
default to the fastest choice measured on a 2-core CPU (``default_conv_impl``,
``DEFAULT_TASK_MAP``): ``patches_per_image`` for miniimagenet-5w1s (+17% over ``patches`` by the
medians of alternated runs on an AVX-512 EPYC, ``experiments/results/bench/patches_per_image_epyc512.md``)
and ``patches`` for the others (``lax`` was 8-20x slower in every combination), ``map`` for the image workloads
(with per-task gradients, 1.4-1.9x the ``vmap`` rate) and ``vmap`` for the sinusoid (1.3x the
``map`` rate). On an NVIDIA H200 ``patches`` with ``vmap`` was the fastest of the choices
measured (``experiments/accelerator_bench.py``; results in ``experiments/results/bench/h200``;
``map`` ran at 0.16-0.17x ``vmap`` there), so off the CPU backend the default task map is
``vmap`` for every workload (``default_task_map``); on TPU, unmeasured. ``--tasks`` overrides the task count
(for smoke tests only: the result is then not the benchmark shape). ``flops_per_step`` is
XLA's count for the vmapped step, whichever ``--task-map`` is timed, with every inner step
counted (``step_flops``). ``--compute-dtype bfloat16`` runs the network in bf16 with float32
parameters, loss and inner updates (``precision.mixed_precision``, the path of
``--config.compute_dtype=bfloat16``); it is for GPU/TPU (slower on XLA:CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from maml_jax import parallel
from maml_jax.algorithms import batched_meta_grad, maml
from maml_jax.core import batched_meta_loss
from maml_jax.host import available_cpus, limit_cpus, request_cpu_devices
from maml_jax.losses import cross_entropy_loss, mse_loss
from maml_jax.models import conv4, mlp
from maml_jax.models.conv4 import CONV_IMPLS as MODEL_CONV_IMPLS
from maml_jax.models.conv4 import resolve_conv_impl
from maml_jax.precision import COMPUTE_DTYPES, with_compute_dtype
from maml_jax.train import init_train_state, make_sampling_train_chunk, make_train_step, make_train_step_from_grads
from maml_jax.types import Batch, Task

# query = query examples per class (as in torch_peers.py); image shapes are NHWC
WORKLOADS = {
    "sinusoid": dict(kind="mlp", tasks=25, ways=1, shots=10, query=10, steps=1, alpha=0.01),
    "omniglot-5w1s": dict(kind="omniglot", tasks=32, ways=5, shots=1, query=15, steps=1, alpha=0.4),
    "omniglot-20w1s": dict(kind="omniglot", tasks=16, ways=20, shots=1, query=5, steps=5, alpha=0.1),
    "miniimagenet-5w1s": dict(kind="miniimagenet", tasks=4, ways=5, shots=1, query=15, steps=5, alpha=0.01),
}
IMAGE_SHAPES = {"omniglot": (28, 28, 1), "miniimagenet": (84, 84, 3)}
# conv4's convolutions, "patches" first: the default off CPU and for Omniglot
CONV_IMPLS = ("patches", *(c for c in MODEL_CONV_IMPLS if c != "patches"))
DEFAULT_TASK_MAP = {"sinusoid": "vmap", "omniglot-5w1s": "map", "omniglot-20w1s": "map", "miniimagenet-5w1s": "map"}


def default_conv_impl(name: str, backend: str | None = None, cpu_devices: int | None = None) -> str:
    """``conv4.resolve_conv_impl("auto", ...)`` for workload ``name`` split over ``cpu_devices``
    (default ``DEFAULT_CPU_DEVICES``): ``"patches_per_image"`` for miniimagenet-5w1s on the CPU
    backend (``backend``, default ``jax.default_backend()``) over two or more CPU devices,
    ``"patches"`` otherwise: the fastest measured on each."""
    kind = WORKLOADS[name]["kind"]
    devices = DEFAULT_CPU_DEVICES[kind] if cpu_devices is None else cpu_devices
    return resolve_conv_impl("auto", kind, backend, devices)


def default_task_map(name: str, backend: str | None = None) -> str:
    """``DEFAULT_TASK_MAP[name]`` on the CPU backend, ``"vmap"`` on a GPU or TPU (``backend``,
    default ``jax.default_backend()``): the fastest task map measured on each."""
    return DEFAULT_TASK_MAP[name] if (backend or jax.default_backend()) == "cpu" else "vmap"


DEFAULT_ITERS = {"mlp": (2000, 50), "omniglot": (20, 3), "miniimagenet": (10, 2)}  # (iters, warmup)
DEFAULT_STEPS_PER_CALL = {"mlp": 100, "omniglot": 1, "miniimagenet": 1}
# CPUs (affinity mask, host.limit_cpus) the JAX CPU backend runs a workload on; None: all.
# One core runs the tiny sinusoid step ~1.4x faster on a 2-core CPU (no cross-thread handoffs)
DEFAULT_CPUS = {"mlp": 1, "omniglot": None, "miniimagenet": None}
# XLA CPU devices the task batch is split over (see the module docstring); must divide the tasks
DEFAULT_CPU_DEVICES = {"mlp": 1, "omniglot": 2, "miniimagenet": 2}
PEERS = ("torchfunc", "loop", "l2l", "higher")
PEER_ITERS = {"mlp": (1000, 20), "omniglot": (5, 1), "miniimagenet": (5, 1)}  # (iters, warmup) of each peer


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


def _mlp_tasks(key: jax.Array, w: dict) -> Task:
    """Random points ``x ~ U(-5, 5)``, ``y ~ N(0, 1)``: ``[tasks, shots|query, 1]``."""
    kxs, kxq, kys, kyq = jax.random.split(key, 4)
    xs = jax.random.uniform(kxs, (w["tasks"], w["shots"], 1), minval=-5, maxval=5)
    xq = jax.random.uniform(kxq, (w["tasks"], w["query"], 1), minval=-5, maxval=5)
    return Task(Batch(xs, jax.random.normal(kys, xs.shape)), Batch(xq, jax.random.normal(kyq, xq.shape)))


def _workload(name: str, num_tasks: int | None) -> dict:
    """``WORKLOADS[name]``, with ``num_tasks`` tasks when given."""
    return dict(WORKLOADS[name], **({} if num_tasks is None else {"tasks": num_tasks}))


def sample_fn(name: str, num_tasks: int | None = None):
    """``sample(key, data=None) -> Task`` of workload ``name``'s exact shapes (jit-able)."""
    w = _workload(name, num_tasks)
    fn = _mlp_tasks if w["kind"] == "mlp" else _image_tasks
    return lambda key, data=None: fn(key, w)


def _setup(name: str, conv_impl: str, num_tasks: int | None, compute_dtype: str = "float32", **adapt_kwargs):
    """``(state, tasks, optimizer, make_grads, make_objective)`` of workload ``name``:
    ``make_grads(task_map)`` is the per-task meta-gradient (``batched_meta_grad``) and
    ``make_objective(task_map)`` the mapped mean loss (``batched_meta_loss``). ``compute_dtype``
    ``"bfloat16"`` runs the network in bf16 (``precision.mixed_precision``, as
    ``--config.compute_dtype=bfloat16``)."""
    w = _workload(name, num_tasks)
    k_init, k_tasks, k_state = jax.random.split(jax.random.PRNGKey(0), 3)
    if w["kind"] == "mlp":
        model = mlp((40, 40), 1)
    else:
        model = conv4(w["ways"], dataset=w["kind"], conv_impl=conv_impl)
    model = with_compute_dtype(model, compute_dtype)  # ValueError (HyperparameterError) for other names
    loss_fn = (mse_loss if w["kind"] == "mlp" else cross_entropy_loss)(model.apply)
    tasks = jax.jit(sample_fn(name, num_tasks))(k_tasks)
    optimizer = optax.adam(1e-3)
    example_x = tasks.support.x[0]
    state = jax.jit(lambda k: init_train_state(model.init(k, example_x), optimizer, k_state))(k_init)
    kwargs = {"num_inner_steps": w["steps"], "inner_lr": w["alpha"], **adapt_kwargs}

    def make_grads(task_map: str):
        return functools.partial(batched_meta_grad, maml(loss_fn, **kwargs), task_map=task_map)

    def make_objective(task_map: str):
        return functools.partial(batched_meta_loss, task_loss_fn=loss_fn, task_map=task_map, **kwargs)

    return state, tasks, optimizer, make_grads, make_objective


def build(
    name: str,
    task_map: str,
    conv_impl: str = CONV_IMPLS[0],
    num_tasks: int | None = None,
    per_task_grads: bool = True,
    **adapt_kwargs,
):
    """``(jitted train step, train state, task batch, make_step)`` for workload ``name``;
    ``make_step(task_map)`` builds the same step with another task mapping, unjitted when
    called as ``make_step(task_map, jit=False)``. ``adapt_kwargs`` (e.g. ``num_inner_steps``,
    ``first_order``, ``remat``) override the workload's.

    ``per_task_grads=True`` is what ``maml-jax train`` runs: ``batched_meta_grad`` of
    ``algorithms.maml`` (with ``map``, each task's meta-gradient inside the map); ``False``
    differentiates the mapped mean loss (``value_and_grad`` of ``batched_meta_loss``): the
    same gradient, but through ``lax.map`` it keeps every task's activations for the
    backward pass."""
    state, tasks, optimizer, make_grads, make_objective = _setup(name, conv_impl, num_tasks, **adapt_kwargs)
    make_step = _step_maker(optimizer, make_grads, make_objective, per_task_grads)
    return make_step(task_map), state, tasks, make_step


def _step_maker(optimizer, make_grads, make_objective, per_task_grads: bool = True):
    """``make_step(task_map, jit=True, mesh=None)`` of ``build``."""

    def make_step(task_map: str, jit: bool = True, mesh=None):
        """``mesh``: split each step's tasks over its devices (per-task gradients only)."""
        if per_task_grads:
            grads = make_grads(task_map)
            if mesh is not None:
                grads = parallel.shard_meta_grad(grads, mesh)
            step = make_train_step_from_grads(grads, optimizer)
        else:
            step = make_train_step(make_objective(task_map), optimizer)
        return jax.jit(step, donate_argnums=0) if jit else step

    return make_step


def build_chunk(
    name: str,
    task_map: str,
    steps_per_call: int,
    conv_impl: str = CONV_IMPLS[0],
    num_tasks=None,
    num_devices: int = 1,
    fixed_tasks: bool = False,
    compute_dtype: str = "float32",
    inner_unroll: int | bool = False,
):
    """``(jitted chunk(state, data) -> (state, metrics [steps_per_call]), state, tasks, make_step)``:
    ``steps_per_call`` train steps in one ``lax.scan``, tasks sampled on device each step and, with
    ``num_devices`` > 1, split over the first ``num_devices`` devices (state replicated) by
    ``parallel.make_sharded_train_chunk``, the chunk ``maml-jax train`` runs. The state is donated.
    Call it with ``data=None``; with ``fixed_tasks`` call it with ``data=tasks`` (replicated on the
    devices with the state): every step then trains on that one batch, as the PyTorch peers time
    it (no sampling in the timed step). ``inner_unroll``: ``core.inner_adapt``'s ``unroll``:
    ``True`` unrolls the inner loop (as ``--config.inner_unroll=true``), an int N runs N inner steps
    per loop trip; ``False`` keeps the loop."""
    state, tasks, optimizer, make_grads, make_objective = _setup(
        name, conv_impl, num_tasks, compute_dtype, unroll=inner_unroll
    )
    make_step = _step_maker(optimizer, make_grads, make_objective)
    sample = _given_tasks if fixed_tasks else sample_fn(name, num_tasks)
    if num_devices == 1:
        chunk = make_sampling_train_chunk(make_step(task_map, jit=False), sample, steps_per_call)
        return jax.jit(chunk, donate_argnums=0), state, tasks, make_step
    mesh = parallel.default_mesh(num_devices)
    grads = make_grads(task_map)
    chunk = parallel.make_sharded_train_chunk(grads, optimizer, sample, steps_per_call, mesh, donate=True)
    if fixed_tasks:  # the chunk's data, placed on the mesh like the state
        tasks = parallel.replicate(tasks, mesh)
    return chunk, parallel.replicate(state, mesh), tasks, make_step


def _given_tasks(key: jax.Array, tasks: Task) -> Task:
    """The ``sample_fn`` of a fixed batch: the tasks passed in as the chunk's data."""
    del key
    return tasks


def median_call_ms(fn: Callable, *args: Any, calls: int = 7) -> float:
    """Median wall milliseconds of ``calls`` calls of ``fn(*args)`` (results waited for with
    ``jax.block_until_ready``), after one call that compiles and warms up. ``fn`` is called as
    given: jit it first to time a compiled program."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def matmul_peak_gflops(n: int = 2048, iters: int = 10, windows: int = 5) -> float:
    """Achieved GFLOP/s of an ``n x n`` float32 matmul in JAX (``2 n^3`` FLOPs), median window."""
    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n))
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = mm(a, b)
        jax.block_until_ready(out)
        rates.append(2 * n**3 * iters / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def _flops(analysis) -> float:
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def xla_step_flops(name: str, conv_impl: str = CONV_IMPLS[0], num_tasks: int | None = None, **adapt_kwargs) -> float:
    """XLA's own FLOP count of one vmapped train step of workload ``name`` (before optimisation),
    ``adapt_kwargs`` as in ``build``. A loop body counts once: see ``step_flops``.

    The step is lowered for the CPU whatever the default backend: the count is of the program
    before any backend's optimisation, and on GPU JAX 0.11's cost analysis of a lowering has no
    ``flops`` entry (the H200 run printed NaN)."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without the CPU: count on the default backend
        cpu = None
    with jax.default_device(cpu):
        step, state, tasks, _ = build(name, "vmap", conv_impl, num_tasks, **adapt_kwargs)
        return _flops(step.lower(state, tasks).cost_analysis())


def step_flops(name: str, conv_impl: str = CONV_IMPLS[0], num_tasks: int | None = None) -> float:
    """FLOPs of one train step of workload ``name``, from XLA's cost analysis of the vmapped
    step (before optimisation).

    XLA counts a loop body once, whatever its trip count, so the step with K inner steps (the
    first, then a ``lax.scan`` of K − 1) reads as if it had two. Every inner step adds the
    same work (its forward and backward on the support set and, second order, their
    derivative in the meta-gradient), so the count is linear in K:
    ``F(K) = F(0) + K·(F(1) − F(0))`` with F(0) and F(1) counted exactly (with K ≤ 1 the
    scan is empty). ``patches_per_image`` is counted as ``patches``: the same convolutions, whose
    per-image loop XLA would count once (its recomputation for the gradients is not counted)."""
    conv_impl = "patches" if conv_impl == "patches_per_image" else conv_impl
    k = WORKLOADS[name]["steps"]
    if k <= 1:
        return xla_step_flops(name, conv_impl, num_tasks)
    f0, f1 = (xla_step_flops(name, conv_impl, num_tasks, num_inner_steps=n) for n in (0, 1))
    return f0 + k * (f1 - f0)


def check_task_split(name: str, num_tasks: int | None, cpu_devices: int) -> None:
    """``ValueError`` unless workload ``name``'s task batch (or ``num_tasks``) splits evenly
    over ``cpu_devices``."""
    tasks = WORKLOADS[name]["tasks"] if num_tasks is None else num_tasks
    if tasks % cpu_devices:
        raise ValueError(f"{name}: {tasks} tasks do not split evenly over {cpu_devices} CPU devices")


def measure(
    name: str,
    iters: int,
    warmup: int,
    task_map: str | None = None,
    windows: int = 5,
    conv_impl: str | None = None,
    num_tasks: int | None = None,
    steps_per_call: int | None = None,
    cpu_devices: int | None = None,
    fixed_tasks: bool = False,
    compute_dtype: str = "float32",
    inner_unroll: int | bool = False,
) -> dict:
    """Compile, warm up, then time about ``iters`` meta-steps: whole calls of the fused chunk
    (``steps_per_call`` steps each) in at most ``windows`` equal windows, so the count is rounded
    down to that (the result's ``"iters"`` is the number timed); ``it_per_s`` (meta-steps/s)
    is the median window rate (robust to a noisy neighbour on a shared CPU). ``task_map=None``
    / ``steps_per_call=None`` take the workload's defaults; ``steps_per_call`` is capped at
    ``iters``. ``cpu_devices``: split the tasks over that many CPU devices (default
    ``DEFAULT_CPU_DEVICES``; at most ``jax.device_count()``, which ``main`` raises with
    ``jax_num_cpu_devices``; 1 off CPU). ``fixed_tasks``: every step trains on one batch sampled
    before timing, as the PyTorch peers do, instead of sampling a new batch on device each step.
    ``compute_dtype="bfloat16"``: the network in bf16 (mixed precision; FLOPs counted as float32's).
    ``inner_unroll``: ``True`` or N, the inner loop unrolled (``build_chunk``)."""
    task_map = task_map or default_task_map(name)
    kind = WORKLOADS[name]["kind"]
    steps_per_call = min(iters, steps_per_call or DEFAULT_STEPS_PER_CALL[kind])
    n_dev = DEFAULT_CPU_DEVICES[kind] if cpu_devices is None else cpu_devices
    n_dev = min(n_dev, jax.device_count()) if jax.default_backend() == "cpu" else 1
    conv_impl = conv_impl or default_conv_impl(name, cpu_devices=n_dev)
    check_task_split(name, num_tasks, n_dev)
    chunk, state, tasks, _ = build_chunk(
        name, task_map, steps_per_call, conv_impl, num_tasks, n_dev, fixed_tasks, compute_dtype, inner_unroll
    )
    data = tasks if fixed_tasks else None
    t0 = time.perf_counter()
    lowered = chunk.lower(state, data)  # trace to a jaxpr, lower to StableHLO
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()  # XLA: HLO passes and code generation
    compile_s = time.perf_counter() - t0
    flops = step_flops(name, conv_impl, num_tasks)
    for _ in range(-(-warmup // steps_per_call)):
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    calls = max(1, iters // steps_per_call)
    windows = max(1, min(windows, calls))
    per_window = max(1, calls // windows)
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(per_window):
            state, metrics = compiled(state, data)
        jax.block_until_ready(state)
        rates.append(per_window * steps_per_call / (time.perf_counter() - t0))
    return {
        "workload": name,
        "it_per_s": statistics.median(rates),
        "it_per_s_min": min(rates),
        "it_per_s_max": max(rates),
        "compile_s": compile_s,  # lower + XLA compile
        "lower_s": lower_s,  # the tracing and lowering part of compile_s
        "flops_per_step": flops,
        "iters": per_window * windows * steps_per_call,
        "steps_per_call": steps_per_call,
        "task_map": task_map,
        "fixed_tasks": fixed_tasks,
        "conv_impl": None if WORKLOADS[name]["kind"] == "mlp" else conv_impl,
        "compute_dtype": compute_dtype,
        "inner_unroll": inner_unroll,
        "tasks": int(tasks.query.x.shape[0]),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "cpu_devices": n_dev,
        "device_kind": jax.devices()[0].device_kind,
        "cpus": len(available_cpus() or []) or os.cpu_count(),  # the CPUs this process may run on
        # None: the backend's default (TF32 tensor cores for float32 on recent NVIDIA GPUs)
        "matmul_precision": jax.config.jax_default_matmul_precision,
        "xla_flags": os.environ.get("XLA_FLAGS"),  # e.g. an LLVM optimisation level: another program
        # glibc.malloc.hugetlb=1 where the entry point restarted itself with it (maml_jax.host)
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def measure_in_child(name: str, iters: int, warmup: int, cpus: int, **kwargs) -> dict:
    """``measure`` in a fresh ``python -m maml_jax.bench`` limited to ``cpus`` CPUs (the
    affinity mask must be set before JAX creates its backend, so not in this process)."""
    cmd = [sys.executable, "-m", "maml_jax.bench", "--workload", name, "--cpus", str(cpus)]
    cmd += ["--iters", str(iters), "--warmup", str(warmup)]
    flags = [("--task-map", "task_map"), ("--tasks", "num_tasks"), ("--steps-per-call", "steps_per_call")]
    flags.append(("--conv-impl", "conv_impl"))
    for flag, key in [*flags, ("--cpu-devices", "cpu_devices")]:
        if kwargs.get(key) is not None:
            cmd += [flag, str(kwargs[key])]
    if kwargs.get("fixed_tasks"):
        cmd.append("--fixed-tasks")
    if not isinstance(kwargs.get("inner_unroll", False), bool):
        raise ValueError(f"a pinned child unrolls all or nothing (--inner-unroll); got {kwargs['inner_unroll']!r}")
    if kwargs.get("inner_unroll"):
        cmd.append("--inner-unroll")
    cmd += ["--compute-dtype", kwargs.get("compute_dtype") or COMPUTE_DTYPES[0]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def _combine_rounds(rounds: list[tuple[dict, dict[str, dict] | None]]) -> dict:
    """One result from ``[(ours, {peer: result} or None)]`` measured alternately: the last
    round's fields with ``it_per_s`` (ours and each peer's) the median over rounds, the
    per-round rates kept as ``it_per_s_rounds``; ``peers`` only where peers were run (not None)."""
    result = dict(rounds[-1][0])
    result["it_per_s_rounds"] = [ours["it_per_s"] for ours, _ in rounds]
    result["it_per_s"] = statistics.median(result["it_per_s_rounds"])
    if rounds[-1][1] is not None:
        result["peers"] = {}
        for p, last in rounds[-1][1].items():
            rates = [ran[p]["it_per_s"] for _, ran in rounds if p in ran]
            result["peers"][p] = dict(last, it_per_s=statistics.median(rates), it_per_s_rounds=rates)
    return result


def run_peers(
    name: str, python: str, script: str, peers=PEERS, iters=None, warmup=None, l2l_src=None, timeout=3600
) -> dict[str, dict]:
    """Run ``torch_peers.py`` (with the peers' ``python``) on workload ``name``; returns
    ``{peer: its JSON line}`` for the peers that ran (a missing peer prints nothing there)."""
    kind = WORKLOADS[name]["kind"]
    iters, warmup = iters or PEER_ITERS[kind][0], PEER_ITERS[kind][1] if warmup is None else warmup
    cmd = [python, script, "--workloads", name, "--peers", ",".join(peers), "--iters", str(iters)]
    env = dict(os.environ, **({"L2L_SRC": l2l_src} if l2l_src else {}))
    out = subprocess.run(cmd + ["--warmup", str(warmup)], capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode:
        print(f"warning: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["peer"]: r for r in results}


def progress(message: str) -> None:
    """One progress line on stderr (stdout keeps only the JSON lines or the table)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def round_progress(name: str, i: int, rounds: int, ours: dict, ran: dict[str, dict] | None) -> str:
    """What round ``i`` of ``rounds`` measured on workload ``name``: our rate and compile time, and
    each peer's rate where peers ran (``ran``: ``run_peers``'s result; empty: none of them ran)."""
    line = f"{name} round {i}/{rounds}: maml_jax {ours['it_per_s']:.3g} it/s (compile {ours['compile_s']:.1f} s)"
    if ran is not None:
        rates = ", ".join(f"{p} {r['it_per_s']:.3g}" for p, r in ran.items())
        line += f"; peers: {rates} it/s" if rates else "; no peer ran"
    return line


def peer_table(results: list[dict], peers=PEERS) -> str:
    """Markdown table: ours (meta-steps/s, CPUs used, compile s, GFLOP/step, % of matmul peak) and each
    peer's meta-steps/s with our ratio over it."""
    head = ["workload", "maml_jax it/s", "CPUs", "compile s", "GFLOP/step", "% matmul peak"]
    head += [f"{p} it/s (ours/{p})" for p in peers]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cpus = str(r.get("cpus", "")) + (f" ({r['cpu_devices']} devices)" if r.get("cpu_devices", 1) > 1 else "")
        cells = [r["workload"], f"{r['it_per_s']:.3g}", cpus, f"{r['compile_s']:.1f}"]
        cells.append(f"{r['flops_per_step'] / 1e9:.3g}")
        cells.append(f"{100 * r['peak_fraction']:.1f}%" if "peak_fraction" in r else "")
        for p in peers:
            peer = r.get("peers", {}).get(p)
            cells.append(f"{peer['it_per_s']:.3g} ({r['it_per_s'] / peer['it_per_s']:.1f}x)" if peer else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fastest_peer(result: dict) -> tuple[str, float] | None:
    """``(peer, its it/s)`` of the fastest peer in one result line of ``--compare-peers`` (each
    peer's median over the rounds), or None where no peer ran. The issue's goals are ours over it."""
    rates = {p: r["it_per_s"] for p, r in result.get("peers", {}).items() if r.get("it_per_s")}
    if not rates:
        return None
    best = max(rates, key=rates.get)
    return best, rates[best]


def _default_peers_script() -> str:
    return str(Path(__file__).resolve().parents[2] / "shared" / "bench" / "torch_peers.py")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maml_jax.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="sinusoid", choices=sorted(WORKLOADS) + ["all"])
    ap.add_argument("--all", action="store_true", help="every workload (= --workload all)")
    ap.add_argument("--iters", type=int, default=None, help="default: 2000 sinusoid, 20 omniglot, 10 miniimagenet")
    ap.add_argument("--warmup", type=int, default=None, help="default: 50 sinusoid, 3 omniglot, 2 miniimagenet")
    ap.add_argument(
        "--steps-per-call",
        type=int,
        default=None,
        help="train steps fused in one compiled call (lax.scan); default: 100 sinusoid, 1 images",
    )
    ap.add_argument(
        "--task-map",
        default=None,
        choices=["vmap", "map"],
        help="default: the workload's on CPU (DEFAULT_TASK_MAP), vmap on GPU/TPU",
    )
    ap.add_argument(
        "--conv-impl",
        default=None,
        choices=CONV_IMPLS,
        help="conv4 convolution formulation; default: patches_per_image for miniimagenet-5w1s on two or more "
        "CPU devices, patches otherwise (default_conv_impl)",
    )
    ap.add_argument(
        "--compute-dtype",
        default=COMPUTE_DTYPES[0],
        choices=COMPUTE_DTYPES,
        help="bfloat16: the network in bf16, parameters, loss and inner updates float32 (for GPU/TPU)",
    )
    ap.add_argument(
        "--fixed-tasks",
        action="store_true",
        help="train every step on one batch sampled before timing, as the PyTorch peers do "
        "(default: a new batch sampled on device each step, inside the timed step)",
    )
    ap.add_argument("--tasks", type=int, default=None, help="override the task count (tests only; not the bench shape)")
    ap.add_argument("--compare-peers", action="store_true", help="also run the PyTorch peers; print a table")
    ap.add_argument("--json", action="store_true", help="with --compare-peers: JSON lines instead of the table")
    ap.add_argument(
        "--peers-python",
        default=os.environ.get("MAML_PEERS_PYTHON", "/tmp/maml-peers/bin/python"),
        help="python of the peers' venv (shared/bench/setup_peers.sh); env MAML_PEERS_PYTHON",
    )
    ap.add_argument("--peers-script", default=_default_peers_script(), help="path of torch_peers.py")
    ap.add_argument("--l2l-src", default=os.environ.get("L2L_SRC"), help="learn2learn source dir (env L2L_SRC)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers of torch_peers.py")
    ap.add_argument("--peer-iters", type=int, default=None, help="default: 1000 sinusoid, 5 images")
    ap.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul that measures the peak")
    ap.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="run JAX on the first N CPUs of this process's affinity mask (Linux); 0: all; "
        "default: 1 for sinusoid (faster: no cross-thread handoffs for its tiny kernels), all for images",
    )
    ap.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="split the task batch over N XLA CPU devices (task-parallel); default: 2 for the image "
        "workloads, 1 for the sinusoid (DEFAULT_CPU_DEVICES); ignored off CPU",
    )
    ap.add_argument(
        "--inner-unroll",
        action="store_true",
        help="unroll the inner loop (no loop in the step; longer compile), as --config.inner_unroll=true",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --compare-peers: measure ours and the peers alternately R times and report "
        "medians (steadier ratios on a noisy machine)",
    )
    a = ap.parse_args(argv)
    if (a.iters is not None and a.iters <= 0) or (a.warmup is not None and a.warmup < 0):
        ap.error("--iters must be > 0 and --warmup >= 0")
    if a.tasks is not None and a.tasks <= 0:
        ap.error("--tasks must be > 0")
    if a.steps_per_call is not None and a.steps_per_call <= 0:
        ap.error("--steps-per-call must be > 0")
    if a.cpus is not None and a.cpus < 0 or a.rounds <= 0:
        ap.error("--cpus must be >= 0 (0: all CPUs) and --rounds > 0")
    if a.cpu_devices is not None and a.cpu_devices <= 0:
        ap.error("--cpu-devices must be > 0")
    peers = tuple(p for p in a.peers.split(",") if p)
    if a.compare_peers and not (Path(a.peers_python).exists() and Path(a.peers_script).exists()):
        print(
            f"warning: peers not found ({a.peers_python}, {a.peers_script}); pass --peers-python and "
            "--peers-script (shared/bench/setup_peers.sh makes the venv). Showing maml_jax only.",
            file=sys.stderr,
        )
        peers = ()
    names = sorted(WORKLOADS) if a.all or a.workload == "all" else [a.workload]
    cpus_of = {n: a.cpus if a.cpus is not None else DEFAULT_CPUS[WORKLOADS[n]["kind"]] for n in names}
    # a single workload without peers pins this process; otherwise pinned workloads run in a
    # child process, so that this one (the peak matmul, other workloads) keeps every CPU
    in_process = len(names) == 1 and not a.compare_peers
    if in_process and cpus_of[names[0]]:
        limit_cpus(cpus_of[names[0]])
    devices_of = {n: a.cpu_devices or DEFAULT_CPU_DEVICES[WORKLOADS[n]["kind"]] for n in names}
    for n in names:
        try:
            check_task_split(n, a.tasks, devices_of[n])
        except ValueError as err:
            ap.error(str(err))
    # before anything creates the backend (else the existing count stays; measure then uses at
    # most that many); the CPU platform only, a GPU/TPU run ignores it
    request_cpu_devices(max(devices_of.values()))
    peak = matmul_peak_gflops(a.peak_size) if a.compare_peers else None
    # a run of several measurements (a whole --all --compare-peers --rounds 3 takes over half an
    # hour on 2 cores) says on stderr what each one gave as it finishes
    verbose = a.compare_peers or len(names) > 1
    if peak is not None:
        progress(f"matmul peak {peak:.0f} GFLOP/s ({a.peak_size}x{a.peak_size} float32)")
    results = []
    for name in names:
        iters, warmup = DEFAULT_ITERS[WORKLOADS[name]["kind"]]
        iters, warmup = a.iters or iters, warmup if a.warmup is None else a.warmup
        kwargs = dict(task_map=a.task_map, conv_impl=a.conv_impl, num_tasks=a.tasks, steps_per_call=a.steps_per_call)
        kwargs["cpu_devices"] = devices_of[name]
        kwargs["fixed_tasks"] = a.fixed_tasks
        kwargs["compute_dtype"] = a.compute_dtype
        kwargs["inner_unroll"] = a.inner_unroll
        rounds = []
        num_rounds = a.rounds if a.compare_peers else 1
        for i in range(1, num_rounds + 1):
            if in_process or not cpus_of[name]:
                ours = measure(name, iters, warmup, **kwargs)
            else:
                ours = measure_in_child(name, iters, warmup, cpus_of[name], **kwargs)
            ran = None
            if a.compare_peers and peers:
                ran = run_peers(name, a.peers_python, a.peers_script, peers, a.peer_iters, l2l_src=a.l2l_src)
            rounds.append((ours, ran))
            if verbose:
                progress(round_progress(name, i, num_rounds, ours, ran))
        result = _combine_rounds(rounds)
        if a.compare_peers:
            result["matmul_peak_gflops"] = peak
            result["peak_fraction"] = result["flops_per_step"] * result["it_per_s"] / (peak * 1e9)
            if peers:
                result["ratios"] = {p: result["it_per_s"] / r["it_per_s"] for p, r in result["peers"].items()}
        results.append(result)
        if not a.compare_peers or a.json:
            print(json.dumps(result), flush=True)
    if a.compare_peers and not a.json:
        print(
            f"backend {jax.default_backend()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; matmul peak {peak:.0f} GFLOP/s ({a.peak_size}x{a.peak_size} float32, JAX); "
            + (
                "ours on one fixed task batch, as the peers"
                if a.fixed_tasks
                else "ours sampling tasks on device each step"
            )
        )
        print(peer_table(results, peers))
    return 0


if __name__ == "__main__":
    from maml_jax.host import reexec_with_malloc_hugepages

    reexec_with_malloc_hugepages()  # before any computation; the peers inherit the environment
    sys.exit(main())
