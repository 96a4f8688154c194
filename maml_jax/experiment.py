"""The generic entry point: ``train_and_evaluate(config, workdir)``.

Builds the model, task loss and task sampler a config names, meta-trains (and trains the
configured baselines with the same budget), evaluates on held-out tasks, and writes
everything to ``workdir`` (see ``maml_jax.rundir``). Re-running on an existing ``workdir``
resumes each model from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from maml_jax import checkpoint, parallel, rundir
from maml_jax.algorithms.base import Algorithm, batched_meta_grad
from maml_jax.algorithms.maml import maml
from maml_jax.algorithms.mamlpp import cosine_outer_lr
from maml_jax.algorithms.registry import build_algorithm
from maml_jax.config import Config, ConfigError, check_resume_compatible, config_from_dict
from maml_jax.core import resolve_task_map
from maml_jax.evaluate import adaptation_curve, algorithm_curve
from maml_jax.host import is_primary
from maml_jax.losses import cross_entropy_loss
from maml_jax.models import Model
from maml_jax.signals import stop_signal_handler
from maml_jax.task_families import TaskFamily, build_model, build_task_family, resolved_conv_impl
from maml_jax.train import (
    NonFiniteLossError,
    TrainState,
    init_train_state,
    make_sampling_train_chunk,
    make_train_step_from_grads,
    raise_if_nonfinite,
)

METHOD_NAMES = {
    "maml": "MAML",
    "fomaml": "FOMAML",
    "pretrained": "pretrained",
    "anil": "ANIL",
    "boil": "BOIL",
    "meta_sgd": "Meta-SGD",
    "maml++": "MAML++",
    "imaml": "iMAML",
    "protonets": "ProtoNets",
    "meta_lstm": "Meta-LSTM",
}


def main_label(config: Config) -> str:
    """The run-directory name of a config's meta-learned model: the algorithm's name
    (``fomaml`` for first-order MAML)."""
    if config.algorithm == "maml":
        return "fomaml" if config.first_order else "maml"
    return config.algorithm


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam at ``outer_lr``, cosine-annealed over ``num_iterations`` with ``cosine_outer_lr``;
    with ``outer_grad_clip`` > 0 the meta-gradient is first clipped to that global norm (the
    Meta-LSTM paper clips its meta-learner's gradients, Ravi & Larochelle 2017 §4). Without
    clipping the optimizer state is Adam's alone, so runs from before the option resume."""
    lr = cosine_outer_lr(config.outer_lr, config.num_iterations) if config.cosine_outer_lr else config.outer_lr
    if config.outer_grad_clip:
        return optax.chain(optax.clip_by_global_norm(config.outer_grad_clip), optax.adam(lr))
    return optax.adam(lr)


def config_algorithm(config: Config, model: Model, task_loss_fn) -> Algorithm | None:
    """The config's ``Algorithm``; ``None`` for MAML/FOMAML, whose training and evaluation
    use ``config.inner_lr`` / ``config.first_order`` directly (``train_model``)."""
    return None if config.algorithm == "maml" else build_algorithm(config, model, task_loss_fn)


class NonFiniteTrainingError(NonFiniteLossError):
    """``NonFiniteLossError`` plus the last good checkpoint (``None`` when none was saved yet)."""

    def __init__(self, err: NonFiniteLossError, checkpoint: Path | None, label: str):
        super().__init__(err.step, err.metrics)
        bad = [k for k, v in sorted(err.metrics.items()) if not np.isfinite(v)] or ["unknown"]
        where = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was saved yet"
        self.checkpoint = checkpoint
        self.args = (
            f"[{label}] training stopped: non-finite {', '.join(bad)} at step {err.step}; {where}. "
            f"{self.args[0]} (or set --config.skip_nonfinite=true to skip such batches)",
        )


@contextlib.contextmanager
def _stop_on_signals():
    """Within the block SIGINT/SIGTERM only set ``flag["signum"]`` (checked between chunks);
    the previous handlers come back afterwards. Off the main thread, signals are left alone."""
    flag: dict[str, int | None] = {"signum": None}

    def handler(signum, frame):
        flag["signum"] = signum

    with stop_signal_handler(handler):
        yield flag


def _log_row(label: str, step: int, pending: dict[str, np.ndarray]) -> dict[str, Any]:
    """Means over the finite steps of a log window (``pending``: metrics concatenated over the
    window's steps) plus ``skipped_steps``, the number of non-finite steps that were skipped."""
    finite = pending["finite"].astype(bool)
    row: dict[str, Any] = {"run": label, "step": step, "skipped_steps": int((~finite).sum())}
    for k, v in pending.items():
        if k != "finite":
            row[k] = float(np.mean(v[finite])) if finite.any() else float("nan")
    return row


def _concat(pending: dict[str, np.ndarray] | None, metrics: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if pending is None:
        return {k: np.asarray(v) for k, v in metrics.items()}
    return {k: np.concatenate([pending[k], np.asarray(metrics[k])]) for k in pending}


def _agreed_stop(signum: int | None) -> int | None:
    """The stop signal every process acts on after a chunk: in a multi-process job
    (``--distributed``) a signal that reached any process stops all of them at the same step,
    so that none goes on into a chunk (or a checkpoint save) that waits for the others."""
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    seen = np.asarray(multihost_utils.process_allgather(np.int32(signum or 0)))
    return int(seen.max()) or None


def _pending_to_json(pending: dict[str, np.ndarray] | None) -> dict | None:
    if pending is None:
        return None
    return {k: {"dtype": str(v.dtype), "values": v.tolist()} for k, v in pending.items()}


def _pending_from_json(obj: dict | None) -> dict[str, np.ndarray] | None:
    if not obj:
        return None
    return {k: np.asarray(v["values"], dtype=v["dtype"]) for k, v in obj.items()}


def device_mesh(config: Config) -> Mesh | None:
    """The 1-D mesh the task batch is sharded over (``None``: one device, no sharding)."""
    available = jax.device_count()
    n = config.num_devices or available
    if n == 1:
        return None
    if n > available:
        raise ConfigError(
            f"config.num_devices={n} but JAX sees {available} device(s) ({jax.default_backend()}); on CPU "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting"
        )
    if config.meta_batch_size % n:
        raise ConfigError(f"config.meta_batch_size={config.meta_batch_size} does not split evenly over {n} devices")
    return parallel.default_mesh(n)


def train_model(
    config: Config,
    workdir: Path,
    label: str,
    num_inner_steps: int,
    writer: rundir.MetricsWriter,
    family: TaskFamily,
    *,
    progress: bool = True,
    algorithm: Algorithm | None = None,
) -> Any:
    """Meta-train one model (``num_inner_steps=0`` is joint "pretraining"); returns its params.
    With ``algorithm``, it supplies the meta-parameters (``algorithm.init``) and the
    meta-gradient; otherwise MAML with ``config.inner_lr`` / ``config.first_order``.

    Resumes from the newest checkpoint in ``workdir/label`` (Orbax ``checkpoints/``, or a legacy
    ``checkpoint.msgpack``). Checkpoints every ``config.checkpoint_every`` steps and at the end,
    keeping the last ``config.checkpoint_keep`` and the best by score: the validation MSE
    (``config.validate_num_tasks`` held-out sinusoid tasks at each log row) when enabled, else
    the training meta-loss of the latest log row. On SIGINT/SIGTERM the chunk in progress is
    finished, checkpointed, and ``TrainingInterrupted`` raised.
    """
    key = jax.random.PRNGKey(config.seed)
    init_key, data_key = jax.random.split(key)
    params = family.model.init(init_key, family.example_x)
    if algorithm is not None:
        params = algorithm.init(params)
    optimizer = make_optimizer(config)
    state = init_train_state(params, optimizer, data_key)
    label_dir = Path(workdir) / label
    found = checkpoint.restore_latest(label_dir, state, keep=config.checkpoint_keep)
    last_ckpt, extra = None, {}
    if found is not None:
        state, extra, last_ckpt = found
    start = int(state.step)
    total = config.num_iterations
    if found is not None and writer.enabled:
        print(f"{label}: resuming from the checkpoint at step {start} of {total} ({label_dir / 'checkpoints'})")
    dropped = writer.drop_rows_after(label, start)
    if dropped:
        print(f"{label}: dropped {dropped} metric row(s) logged after step {start}, the checkpoint resumed from")
    if start >= total:
        params_path = label_dir / "params.msgpack"
        if not params_path.is_file() and writer.enabled:  # stopped after its last checkpoint, before these
            rundir.save_pytree(params_path, state.meta_params)
        return state.meta_params

    # MAML/FOMAML as an Algorithm too, so that every run goes through batched_meta_grad: with
    # task_map="map" it takes each task's meta-gradient inside the map, so only one task's
    # activations are live at a time (29x less memory on omniglot-5w1s) and XLA:CPU runs it
    # 1.6x faster; with "vmap" it differentiates the mean loss once (README, Speed).
    grad_algorithm = algorithm or maml(
        family.task_loss_fn,
        num_inner_steps=num_inner_steps,
        inner_lr=config.inner_lr,
        first_order=config.first_order,
        remat=config.remat,
        inner_grad_clip=config.inner_grad_clip,
        unroll=config.inner_unroll,
    )
    grads = functools.partial(batched_meta_grad, grad_algorithm, task_map=resolve_task_map(config.task_map))
    mesh = device_mesh(config)  # None: one device
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    else:
        train_step = make_train_step_from_grads(grads, optimizer)
    chunks: dict[int, Any] = {}  # compiled scans by length (normally one)

    def run_chunk(state: TrainState, length: int):
        if length not in chunks:
            if mesh is None:
                chunks[length] = jax.jit(make_sampling_train_chunk(train_step, family.sample_train, length))
            else:
                chunks[length] = parallel.make_sharded_train_chunk(grads, optimizer, family.sample_train, length, mesh)
        return chunks[length](state, family.train_data)

    def validate(params) -> dict[str, float]:
        if not config.validate_num_tasks:
            return {}
        seed = config.eval_seed + 2  # disjoint from the test tasks (eval_seed) and the lr tuning (+1)
        res = family.evaluate(
            params,
            inner_lr=config.inner_lr,
            seed=seed,
            num_tasks=config.validate_num_tasks,
            shots=[config.shots],
            algorithm=algorithm,
        )
        return {f"val_{family.metric}": res[config.shots][family.metric][max(config.eval_inner_steps)][0]}

    ckpt = checkpoint.Checkpointer(label_dir / checkpoint.CHECKPOINTS_DIR, keep=config.checkpoint_keep)
    score_key = f"val_{family.metric}" if config.validate_num_tasks else "meta_loss"
    bar = tqdm(
        total=total, initial=start, desc=label, disable=not (progress and writer.enabled), unit="it", dynamic_ncols=True
    )
    pending = _pending_from_json(extra.get("pending"))
    score = extra.get("score")
    t_log, steps_timed = time.perf_counter(), 0
    step = start

    def save(step: int) -> Path:
        return ckpt.save(step, state, {"pending": _pending_to_json(pending), "score": score}, score=score)

    try:
        with _stop_on_signals() as stop:
            while step < total:
                boundaries = [total, (step // config.log_every + 1) * config.log_every]
                boundaries.append((step // config.checkpoint_every + 1) * config.checkpoint_every)
                length = min(config.steps_per_call, min(boundaries) - step)
                state, metrics = run_chunk(state, length)
                metrics = jax.device_get(metrics)
                if not config.skip_nonfinite:
                    try:
                        raise_if_nonfinite(step, metrics)
                    except NonFiniteLossError as err:
                        raise NonFiniteTrainingError(err, last_ckpt, label) from None
                pending = _concat(pending, metrics)
                step += length
                steps_timed += length
                bar.update(length)
                if step % config.log_every == 0 or step == total:
                    now = time.perf_counter()
                    row = _log_row(label, step, pending)
                    row.update(validate(state.meta_params))
                    writer.write(row, timing={"steps_per_s": steps_timed / (now - t_log)})
                    score = row.get(score_key)
                    shown = {k: f"{row[k]:.4g}" for k in ("meta_loss", "query_accuracy", score_key) if k in row}
                    bar.set_postfix(shown)
                    pending, t_log, steps_timed = None, now, 0
                signum = _agreed_stop(stop["signum"])
                if step % config.checkpoint_every == 0 or step == total or signum is not None:
                    last_ckpt = save(step)
                if signum is not None:
                    raise checkpoint.TrainingInterrupted(signum, step, last_ckpt)
    finally:
        bar.close()
        ckpt.close()
    if writer.enabled:
        rundir.save_pytree(label_dir / "params.msgpack", state.meta_params)
    return state.meta_params


def tune_baseline_lr(config: Config, evaluate, params: Any, eval_shots: tuple[int, ...]) -> dict[int, float]:
    """Per K, the fine-tuning step size from ``config.baseline_lr_grid`` with the best mean
    post-update score (over the reported step counts > 0: the lowest MSE on the sinusoid, the
    highest accuracy on images) on 100 validation tasks drawn from a seed disjoint from the
    test tasks (the paper's "automatically tuned step size"). A step size whose score is not
    finite loses; if every one diverges, the first is kept and a warning says so."""
    scores: dict[int, list[float]] = {k: [] for k in eval_shots}
    post = [s for s in config.eval_inner_steps if s > 0] or [0]
    metric = "mse" if config.dataset == "sinusoid" else "accuracy"
    sign = 1.0 if metric == "mse" else -1.0  # minimise MSE, maximise accuracy
    for lr in config.baseline_lr_grid:
        res = evaluate(params, inner_lr=lr, seed=config.eval_seed + 1, num_tasks=100, shots=eval_shots)
        for k in eval_shots:
            score = float(np.mean([res[k][metric][s][0] for s in post]))
            score = sign * score if np.isfinite(score) else np.inf  # a diverging step size loses
            scores[k].append(score)
    for k, v in scores.items():
        if not np.isfinite(v).any():
            warnings.warn(
                f"baseline step size, K={k}: every value of baseline_lr_grid {config.baseline_lr_grid} diverged; "
                f"keeping {config.baseline_lr_grid[0]}",
                stacklevel=2,
            )
    return {k: config.baseline_lr_grid[int(np.argmin(v))] for k, v in scores.items()}


def _cell(summary: Sequence[float], scale: float, digits: int) -> str:
    """``mean ± ci95``, plus the median (and how many tasks ended non-finite) where a few tasks
    carry the mean (a non-finite value, or a CI wider than the mean: adaptation diverged on
    some tasks). ``summary``: ``(mean, ci95, median[, nonfinite])`` of ``summarize_curve``."""
    mean, ci, median = (scale * float(v) for v in summary[:3])
    cell = f"{mean:.{digits}f} ± {ci:.{digits}f}"
    if not (np.isfinite(mean) and np.isfinite(ci)) or ci > abs(mean):
        bad = int(summary[3]) if len(summary) > 3 else 0
        cell += f" (median {median:.{digits}f}" + (f"; {bad} non-finite)" if bad else ")")
    return cell


def format_table(results: dict[str, Any], steps: tuple[int, ...], metric: str, ways: int | None = None) -> str:
    """Markdown table: one row per (model, K), one column per inner-step count; a cell whose
    mean is carried by diverged tasks also gives the median."""
    name = {"mse": "MSE", "accuracy": "accuracy (%)"}.get(metric, metric)
    scale = 100.0 if metric == "accuracy" else 1.0
    digits = 2 if metric == "accuracy" else 3
    head = f"| method | {'K' if ways is None else 'ways-shots'} | "
    head += " | ".join(f"{name} after {s} step{'s' if s != 1 else ''}" for s in steps) + " |"
    lines = [head, "|" + " --- |" * (2 + len(steps))]
    for label, res in results.items():
        for k, metrics in res["by_shots"].items():
            cells = [_cell(metrics[metric][s], scale, digits) for s in steps]
            row = k if ways is None else f"{ways}-way {k}-shot"
            lines.append(
                f"| {METHOD_NAMES.get(label, label)} (α={res['inner_lr'][k]:g}) | {row} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def train_and_evaluate(config: Config, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train MAML (and baselines) for ``config``, evaluate, write ``workdir``; returns results."""
    config = config.validate()
    workdir = Path(workdir)
    if (workdir / "config.json").is_file():
        check_resume_compatible(json.loads((workdir / "config.json").read_text()), config, str(workdir))
    mesh = device_mesh(config)  # fails here, before anything is written, on a bad device count
    task_devices = [str(d) for d in (mesh.devices.flat if mesh is not None else jax.devices()[:1])]
    primary = is_primary()  # in a multi-process job only process 0 writes files (all write checkpoints)
    if primary:
        conv_impl = resolved_conv_impl(config) if config.model == "conv4" else None
        rundir.write_run_metadata(
            workdir, config.to_dict(), config.seed, task_devices, resolve_task_map(config.task_map), conv_impl
        )
    writer = rundir.MetricsWriter(workdir, enabled=primary)
    family = build_task_family(config)
    algorithms = {main_label(config): config_algorithm(config, family.model, family.task_loss_fn)}
    trained = {}
    try:
        for label, steps in [(main_label(config), config.num_inner_steps)] + [(name, 0) for name in config.baselines]:
            trained[label] = train_model(
                config, workdir, label, steps, writer, family, progress=progress, algorithm=algorithms.get(label)
            )
    finally:
        writer.close()

    evaluate = family.evaluate
    # regression evaluates several support sizes; classification its own ways-shots episodes
    eval_shots = config.eval_shots if config.dataset == "sinusoid" else (config.shots,)
    results: dict[str, Any] = {}
    for label, params in trained.items():
        if label == "pretrained":
            lrs = tune_baseline_lr(config, evaluate, params, eval_shots)
        else:
            lrs = {k: config.inner_lr for k in eval_shots}
        by_shots = {}
        for k in eval_shots:
            kw = dict(inner_lr=lrs[k], seed=config.eval_seed, num_tasks=config.eval_num_tasks, shots=[k])
            kw["algorithm"] = algorithms.get(label)
            by_shots.update(evaluate(params, **kw))
        results[label] = {"inner_lr": lrs, "by_shots": by_shots}
    ways = None if config.dataset == "sinusoid" else config.ways
    table = format_table(results, config.eval_inner_steps, family.metric, ways)
    if not primary:
        return {"results": results, "table": table, "workdir": str(workdir)}
    rundir.write_json(
        workdir / "eval.json",
        {
            "num_tasks": config.eval_num_tasks,
            "seed": config.eval_seed,
            "inner_grad_clip": config.inner_grad_clip,
            "results": results,
        },
    )
    (workdir / "eval.md").write_text(table + "\n")

    if config.dataset == "sinusoid" and config.algorithm == "maml":  # the figure adapts with SGD
        from maml_jax.plotting import sinusoid_figure  # matplotlib only when a figure is made

        sinusoid_figure(config, family.model, trained, results, workdir / "sinusoid_adaptation")
    return {"results": results, "table": table, "workdir": str(workdir)}


def load_trained(workdir: str | Path, label: str | None = None) -> tuple[Config, Model, Any, int]:
    """``(config, model, meta_params, step)`` of a run directory: the final parameters when the
    run finished, else those of its latest checkpoint (a partial run). ``label``: which model
    of the run (default: the meta-learned one, ``main_label``)."""
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir} is not a run directory (no config.json)")
    config = config_from_dict(json.loads((workdir / "config.json").read_text()))
    model = build_model(config)
    example = jnp.zeros((1, 1)) if config.model == "mlp" else jnp.zeros((config.ways, *_image_shape(config)))
    params = model.init(jax.random.PRNGKey(0), example)
    label = label or main_label(config)
    if label == main_label(config):
        algorithm = config_algorithm(config, model, None)  # only its init is used here
        params = params if algorithm is None else algorithm.init(params)
    state = init_train_state(params, make_optimizer(config), jax.random.PRNGKey(0))
    final = workdir / label / "params.msgpack"
    if final.exists():
        return config, model, rundir.load_pytree(final, params), config.num_iterations
    found = checkpoint.restore_latest(workdir / label, state, keep=config.checkpoint_keep)
    if found is not None:
        state = found[0]
        return config, model, state.meta_params, int(state.step)
    raise FileNotFoundError(f"{workdir / label} holds neither params.msgpack nor a checkpoint")


def _image_shape(config: Config) -> tuple[int, int, int]:
    return (28, 28, 1) if config.dataset == "omniglot" else (84, 84, 3)


def _label_algorithm(config: Config, label: str, model: Model, task_loss_fn) -> Algorithm | None:
    """The algorithm that adapts model ``label`` of a run (``None``: SGD at ``inner_lr``)."""
    return config_algorithm(config, model, task_loss_fn) if label == main_label(config) else None


def evaluate_run(
    workdir: str | Path,
    *,
    label: str | None = None,
    num_tasks: int | None = None,
    inner_grad_clip: float | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Meta-test evaluation of a (possibly unfinished) run with its own config; writes
    ``eval-step<N>.json`` / ``.md`` beside it and returns ``{"results", "table", "step"}``.
    ``label``: which model of the run (default: the meta-learned one). ``inner_grad_clip``
    replaces the run's own for the SGD adaptation at meta-test (0 = none); the files are then
    ``eval-step<N>-clip<c>.*``, so the run's own evaluation is not overwritten. ``data_dir``
    replaces the config's (a run moved to another machine, or data that moved)."""
    workdir = Path(workdir)
    config, _, params, step = load_trained(workdir, label)
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=str(data_dir)).validate()
    suffix = ""
    if inner_grad_clip is not None:
        config = dataclasses.replace(config, inner_grad_clip=float(inner_grad_clip)).validate()
        suffix = f"-clip{inner_grad_clip:g}"
    label = label or main_label(config)
    family = build_task_family(config)
    num_tasks = num_tasks or config.eval_num_tasks
    eval_shots = config.eval_shots if config.dataset == "sinusoid" else (config.shots,)
    by_shots = family.evaluate(
        params,
        inner_lr=config.inner_lr,
        seed=config.eval_seed,
        num_tasks=num_tasks,
        shots=eval_shots,
        algorithm=_label_algorithm(config, label, family.model, family.task_loss_fn),
    )
    results = {label: {"inner_lr": {k: config.inner_lr for k in eval_shots}, "by_shots": by_shots}}
    ways = None if config.dataset == "sinusoid" else config.ways
    table = format_table(results, config.eval_inner_steps, family.metric, ways)
    out = {
        "step": step,
        "num_tasks": num_tasks,
        "seed": config.eval_seed,
        "inner_grad_clip": config.inner_grad_clip,
        "results": results,
    }
    rundir.write_json(workdir / f"eval-step{step}{suffix}.json", out)
    (workdir / f"eval-step{step}{suffix}.md").write_text(table + "\n")
    return {"results": results, "table": table, "step": step}


def evaluate_lake_runs(workdir: str | Path, runs_path: str | Path, *, label: str | None = None) -> dict[str, Any]:
    """Lake et al. (2015) 20-way one-shot runs: adapt on each run's 20 training images with the
    run's inner step size for ``max(config.eval_inner_steps)`` steps, classify its 20 test
    images. Returns per-run accuracy and the mean; needs a 20-way Omniglot model."""
    from maml_jax.data.lake_runs import lake_runs_tasks, load_lake_runs

    config, model, params, step = load_trained(workdir, label)
    label = label or main_label(config)
    if config.dataset != "omniglot" or config.ways != 20:
        raise ConfigError(
            f"eval-lake-runs needs a 20-way Omniglot model; {workdir} was trained with "
            f"dataset={config.dataset!r}, ways={config.ways}"
        )
    runs = load_lake_runs(runs_path)
    steps = max(config.eval_inner_steps)
    loss = cross_entropy_loss(model.apply)
    algorithm = _label_algorithm(config, label, model, loss)
    if algorithm is None:
        curve = jax.jit(
            lambda p, t: adaptation_curve(
                p, t, loss, num_inner_steps=steps, inner_lr=config.inner_lr, inner_grad_clip=config.inner_grad_clip
            )
        )
    else:
        curve = jax.jit(lambda p, t: algorithm_curve(algorithm, p, t, [steps]))
    accuracy = np.asarray(curve(params, lake_runs_tasks(runs))["accuracy"][:, -1])
    per_run = {r.name: float(a) for r, a in zip(runs, accuracy, strict=True)}
    return {
        "mean_accuracy": float(accuracy.mean()),
        "mean_error": float(1 - accuracy.mean()),
        "inner_steps": steps,
        "model_step": step,
        "runs": per_run,
    }
