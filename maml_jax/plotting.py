"""Figures. Matplotlib is imported here only, with the non-interactive Agg backend.

``sinusoid_figure`` (Finn et al. 2017, Fig. 2), ``learning_curves_figure``,
``inner_steps_figure`` and ``plot_runs`` (``maml-jax plot RUN...``) write PNG and PDF."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, StrMethodFormatter  # noqa: E402

from maml_jax.config import Config  # noqa: E402
from maml_jax.core import inner_adapt  # noqa: E402
from maml_jax.data import sinusoid  # noqa: E402
from maml_jax.inner_updates import sgd  # noqa: E402
from maml_jax.losses import mse_loss  # noqa: E402
from maml_jax.models import Model  # noqa: E402
from maml_jax.types import Batch  # noqa: E402


def sinusoid_figure(
    config: Config,
    model: Model,
    trained: dict[str, Any],
    results: dict[str, Any],
    path_stem: Path,
    *,
    shots: tuple[int, ...] = (5, 10),
    task_index: int = 0,
) -> list[Path]:
    """Finn et al. (2017) Fig. 2 style: for one held-out task, the true function, the model
    before adaptation, after 1 and after 10 gradient steps, and the K support points; one row
    per trained model, one column per K. Writes ``path_stem``.png and .pdf."""
    loss_fn = mse_loss(model.apply)
    shots = tuple(k for k in shots if k in config.eval_shots) or tuple(config.eval_shots[:2])
    fig, axes = plt.subplots(len(trained), len(shots), figsize=(4.2 * len(shots), 3.2 * len(trained)), squeeze=False)
    for row, (label, params) in enumerate(trained.items()):
        for col, k in enumerate(shots):
            tasks, fns = sinusoid.sample_eval_tasks(jax.random.PRNGKey(config.eval_seed), task_index + 1, k, 200)
            support = Batch(tasks.support.x[task_index], tasks.support.y[task_index])
            grid, truth = tasks.query.x[task_index], tasks.query.y[task_index]
            lr = results[label]["inner_lr"][k]
            ax = axes[row, col]
            ax.plot(grid[:, 0], truth[:, 0], color="tab:red", lw=2, label="ground truth")
            for steps, style in ((0, ":"), (1, "--"), (10, "-")):
                # clipped like the run's evaluation when it clips its inner gradients
                rule = sgd(lr, config.inner_grad_clip)
                p, _ = inner_adapt(params, support, loss_fn, num_inner_steps=steps, inner_update_fn=rule)
                ax.plot(
                    grid[:, 0],
                    model.apply(p, grid)[:, 0],
                    style,
                    color="tab:green" if steps else "tab:cyan",
                    label="pre-update" if steps == 0 else f"{steps} grad step{'s' if steps > 1 else ''}",
                )
            ax.scatter(
                support.x[:, 0],
                support.y[:, 0],
                marker="^",
                color="purple",
                zorder=5,
                label=f"{k} points used for grad",
            )
            ax.set_title(f"{label}, K={k}")
            ax.set_ylim(float(jnp.min(truth)) - 2.0, float(jnp.max(truth)) + 2.0)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    paths = [Path(f"{path_stem}.png"), Path(f"{path_stem}.pdf")]
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _latest_eval(run: Path) -> dict | None:
    """``eval.json`` of a finished run, else the ``eval-step<N>.json`` with the largest N (not
    the ``eval-step<N>-clip<C>.json`` of a re-evaluation with another inner clip)."""
    if (run / "eval.json").is_file():
        return json.loads((run / "eval.json").read_text())
    steps = [p for p in run.glob("eval-step*.json") if p.stem.removeprefix("eval-step").isdigit()]
    partial = sorted(steps, key=lambda p: int(p.stem.removeprefix("eval-step")))
    return json.loads(partial[-1].read_text()) if partial else None


def _save(fig, path_stem: Path) -> list[Path]:
    fig.tight_layout()
    paths = [Path(f"{path_stem}.png"), Path(f"{path_stem}.pdf")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def learning_curves_figure(runs: Sequence[Path], path_stem: Path) -> list[Path]:
    """Learning curves of several run directories on one figure: one panel per logged metric
    (training meta-loss, query accuracy, validation metric, whichever were logged), one line per
    (run, model), x = meta-iteration. Reads ``metrics.jsonl``. Writes ``path_stem``.png/.pdf."""
    series: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for run in map(Path, runs):
        rows = _read_jsonl(run / "metrics.jsonl")
        for label in dict.fromkeys(r["run"] for r in rows):
            mine = [r for r in rows if r["run"] == label]
            for key in ("meta_loss", "query_accuracy", "val_mse", "val_accuracy"):
                if any(key in r for r in mine):
                    pts = [(r["step"], r[key]) for r in mine if key in r]
                    series.setdefault(key, []).append((f"{run.name}/{label}", *map(list, zip(*pts, strict=True))))
    if not series:
        raise ValueError(f"no metrics rows in {[str(r) for r in runs]}")
    fig, axes = plt.subplots(1, len(series), figsize=(4.8 * len(series), 3.6), squeeze=False)
    for ax, (key, lines) in zip(axes[0], series.items(), strict=True):
        for name, steps, values in lines:
            ax.plot(steps, values, label=name, lw=1.5)
        ax.set_xlabel("meta-iteration")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # 5-digit steps: few, legible ticks
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.set_ylabel(key.replace("_", " "))
        if key in ("meta_loss", "val_mse"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path_stem)


def inner_steps_figure(runs: Sequence[Path], path_stem: Path) -> list[Path]:
    """Meta-test metric (MSE or accuracy, mean ± 95% CI over tasks) against the number of inner
    gradient steps, one line per (run, model, K), from each run's evaluation JSON."""
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    metric, line = None, 0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run in map(Path, runs):
        ev = _latest_eval(run)
        if ev is None:
            continue
        for label, res in ev["results"].items():
            color, line = colors[line % len(colors)], line + 1  # one colour per (run, model)
            for i, (k, by_metric) in enumerate(res["by_shots"].items()):
                metric = "mse" if "mse" in by_metric else "accuracy"
                points = sorted((int(s), v[0], v[1]) for s, v in by_metric[metric].items())
                steps, mean, ci = (np.array(c) for c in zip(*points, strict=True))
                scale = 100.0 if metric == "accuracy" else 1.0
                ax.errorbar(
                    steps,
                    scale * mean,
                    yerr=scale * ci,
                    color=color,
                    ls=("-", "--", ":", "-.")[i % 4],
                    marker="os^v"[i % 4],
                    capsize=3,
                    label=f"{run.name}/{label} K={k}",
                )
    if metric is None:
        plt.close(fig)
        raise ValueError(f"no evaluation results (eval.json or eval-step*.json) in {[str(r) for r in runs]}")
    ax.set_xlabel("inner gradient steps at meta-test")
    ax.set_ylabel("query MSE (log scale)" if metric == "mse" else "query accuracy (%)")
    if metric == "mse":
        ax.set_yscale("log")  # a diverging fine-tuning run would flatten every other line
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines stay visible
    return _save(fig, path_stem)


def plot_runs(runs: Sequence[str | Path], path_stem: str | Path) -> list[Path]:
    """``maml-jax plot``: learning curves of all ``runs``, the metric against inner steps of
    those that were evaluated, and the sinusoid adaptation figure of the first finished
    sinusoid run. Writes ``<path_stem>_curves``, ``_inner_steps``, ``_sinusoid`` (.png and
    .pdf); returns the paths written."""
    from maml_jax.experiment import load_trained

    runs = [Path(r) for r in runs]
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{run} is not a run directory with metrics (no {run / 'metrics.jsonl'})")
    stem = Path(path_stem)
    paths = learning_curves_figure(runs, Path(f"{stem}_curves"))
    if any(_latest_eval(r) for r in runs):
        paths += inner_steps_figure(runs, Path(f"{stem}_inner_steps"))
    for run in runs:
        run_config = json.loads((run / "config.json").read_text())
        sgd_run = run_config.get("algorithm", "maml") == "maml"  # the figure adapts with SGD
        if (run / "eval.json").is_file() and run_config["dataset"] == "sinusoid" and sgd_run:
            results = json.loads((run / "eval.json").read_text())["results"]
            trained, config, model = {}, None, None
            for label in results:
                config, model, params, _ = load_trained(run, label)
                trained[label] = params
            for res in results.values():
                res["inner_lr"] = {int(k): v for k, v in res["inner_lr"].items()}
            paths += sinusoid_figure(config, model, trained, results, Path(f"{stem}_sinusoid"))
            break
    return paths
