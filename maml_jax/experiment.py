"""The generic entry point: ``train_and_evaluate(config, workdir)``.

Builds the model, task loss and task sampler a config names, meta-trains (and trains the
configured baselines with the same budget), evaluates on held-out tasks, and writes
everything to ``workdir`` (see ``maml_jax.rundir``). Re-running on an existing ``workdir``
resumes each model from its last checkpoint.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from maml_jax import rundir
from maml_jax.config import Config
from maml_jax.core import batched_meta_loss
from maml_jax.data import sinusoid
from maml_jax.evaluate import adaptation_curve, summarize_curve
from maml_jax.losses import mse_loss
from maml_jax.models import Model, mlp
from maml_jax.train import (
    TrainState,
    init_train_state,
    make_sampling_train_chunk,
    make_train_step,
    raise_if_nonfinite,
)

METHOD_NAMES = {"maml": "MAML", "fomaml": "FOMAML", "pretrained": "pretrained"}


def build_model(config: Config) -> Model:
    return mlp(config.hidden_sizes, 1, activation=config.activation, kernel_init=config.kernel_init)


def train_model(
    config: Config,
    workdir: Path,
    label: str,
    num_inner_steps: int,
    writer: rundir.MetricsWriter,
    *,
    progress: bool = True,
) -> Any:
    """Meta-train one model (``num_inner_steps=0`` is joint "pretraining"); returns its params.

    Resumes from ``workdir/label/checkpoint.msgpack`` when present.
    """
    model = build_model(config)
    key = jax.random.PRNGKey(config.seed)
    init_key, data_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, 1)))
    optimizer = optax.adam(config.outer_lr)
    state = init_train_state(params, optimizer, data_key)
    ckpt = Path(workdir) / label / "checkpoint.msgpack"
    if ckpt.exists():
        state = rundir.load_pytree(ckpt, state)
    start = int(state.step)
    total = config.num_iterations
    if start >= total:
        return state.meta_params

    objective = functools.partial(
        batched_meta_loss,
        task_loss_fn=mse_loss(model.apply),
        num_inner_steps=num_inner_steps,
        inner_lr=config.inner_lr,
        first_order=config.first_order,
        task_map=config.task_map,
    )
    train_step = make_train_step(objective, optimizer)
    sample = functools.partial(
        sinusoid.sample_tasks, num_tasks=config.meta_batch_size, num_support=config.shots, num_query=config.queries
    )
    chunks: dict[int, Any] = {}  # compiled scans by length (normally one)

    def run_chunk(state: TrainState, length: int):
        if length not in chunks:
            chunks[length] = jax.jit(make_sampling_train_chunk(train_step, sample, length))
        return chunks[length](state)

    bar = tqdm(total=total, initial=start, desc=label, disable=not progress, unit="it", dynamic_ncols=True)
    pending: list[dict] = []
    t_log = time.perf_counter()
    step = start
    while step < total:
        boundaries = [total, (step // config.log_every + 1) * config.log_every]
        boundaries.append((step // config.checkpoint_every + 1) * config.checkpoint_every)
        length = min(config.steps_per_call, min(boundaries) - step)
        state, metrics = run_chunk(state, length)
        raise_if_nonfinite(step, metrics)
        pending.append(jax.device_get(metrics))
        step += length
        bar.update(length)
        if step % config.log_every == 0 or step == total:
            now = time.perf_counter()
            row = {k: float(np.mean(np.concatenate([p[k] for p in pending]))) for k in pending[0] if k != "finite"}
            steps_done = sum(len(p["meta_loss"]) for p in pending)
            row.update(run=label, step=step, steps_per_s=steps_done / (now - t_log))
            writer.write(row)
            bar.set_postfix(meta_loss=f"{row['meta_loss']:.4f}")
            pending, t_log = [], now
        if step % config.checkpoint_every == 0 or step == total:
            rundir.save_pytree(ckpt, state)
    bar.close()
    rundir.save_pytree(Path(workdir) / label / "params.msgpack", state.meta_params)
    return state.meta_params


def make_sinusoid_eval(config: Config, model: Model):
    """Returns ``evaluate(params, *, inner_lr, seed, num_tasks, shots)`` ->
    ``{K: {"mse": {steps: (mean, ci95)}}}`` for each K in ``shots``, on ``num_tasks`` tasks whose
    query set is a grid of ``config.eval_grid_points`` points over [−5, 5]. One compiled curve
    per K; the step size is a traced argument, so a learning-rate sweep does not recompile."""
    max_steps = max(config.eval_inner_steps)

    @jax.jit
    def curve(params, tasks, inner_lr):
        return adaptation_curve(
            params, tasks, mse_loss(model.apply), num_inner_steps=max_steps, inner_lr=inner_lr, task_map="vmap"
        )

    def evaluate(params, *, inner_lr: float, seed: int, num_tasks: int, shots: Sequence[int]):
        out = {}
        for k in shots:
            tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(seed), num_tasks, k, config.eval_grid_points)
            out[k] = {"mse": summarize_curve(curve(params, tasks, inner_lr), config.eval_inner_steps)["loss"]}
        return out

    return evaluate


def tune_baseline_lr(config: Config, evaluate, params: Any) -> dict[int, float]:
    """Per K, the fine-tuning step size from ``config.baseline_lr_grid`` with the lowest mean
    post-update MSE (over the reported step counts > 0) on 100 validation tasks drawn from a
    seed disjoint from the test tasks (the paper's "automatically tuned step size")."""
    scores: dict[int, list[float]] = {k: [] for k in config.eval_shots}
    post = [s for s in config.eval_inner_steps if s > 0] or [0]
    for lr in config.baseline_lr_grid:
        res = evaluate(params, inner_lr=lr, seed=config.eval_seed + 1, num_tasks=100, shots=config.eval_shots)
        for k in config.eval_shots:
            score = float(np.mean([res[k]["mse"][s][0] for s in post]))
            scores[k].append(score if np.isfinite(score) else np.inf)  # a diverging step size loses
    return {k: config.baseline_lr_grid[int(np.argmin(v))] for k, v in scores.items()}


def format_table(results: dict[str, Any], steps: tuple[int, ...]) -> str:
    head = "| method | K | " + " | ".join(f"MSE after {s} step{'s' if s != 1 else ''}" for s in steps) + " |"
    lines = [head, "|" + " --- |" * (2 + len(steps))]
    for label, res in results.items():
        for k, metrics in res["by_shots"].items():
            cells = [f"{metrics['mse'][s][0]:.3f} ± {metrics['mse'][s][1]:.3f}" for s in steps]
            lines.append(
                f"| {METHOD_NAMES.get(label, label)} (α={res['inner_lr'][k]:g}) | {k} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def train_and_evaluate(config: Config, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train MAML (and baselines) for ``config``, evaluate, write ``workdir``; returns results."""
    config = config.validate()
    workdir = Path(workdir)
    rundir.write_run_metadata(workdir, config.to_dict(), config.seed)
    writer = rundir.MetricsWriter(workdir)
    model = build_model(config)
    main_label = "fomaml" if config.first_order else "maml"
    trained = {main_label: train_model(config, workdir, main_label, config.num_inner_steps, writer, progress=progress)}
    for name in config.baselines:
        trained[name] = train_model(config, workdir, name, 0, writer, progress=progress)

    evaluate = make_sinusoid_eval(config, model)
    results: dict[str, Any] = {}
    for label, params in trained.items():
        if label == "pretrained":
            lrs = tune_baseline_lr(config, evaluate, params)
        else:
            lrs = {k: config.inner_lr for k in config.eval_shots}
        by_shots = {}
        for k in config.eval_shots:
            kw = dict(inner_lr=lrs[k], seed=config.eval_seed, num_tasks=config.eval_num_tasks, shots=[k])
            by_shots.update(evaluate(params, **kw))
        results[label] = {"inner_lr": lrs, "by_shots": by_shots}
    table = format_table(results, config.eval_inner_steps)
    rundir.write_json(
        workdir / "eval.json", {"num_tasks": config.eval_num_tasks, "seed": config.eval_seed, "results": results}
    )
    (workdir / "eval.md").write_text(table + "\n")

    from maml_jax.plotting import sinusoid_figure  # matplotlib only when a figure is made

    sinusoid_figure(config, model, trained, results, workdir / "sinusoid_adaptation")
    return {"results": results, "table": table, "workdir": str(workdir)}
