"""Figures. Matplotlib is imported here only, with the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from maml_jax.config import Config  # noqa: E402
from maml_jax.core import inner_adapt  # noqa: E402
from maml_jax.data import sinusoid  # noqa: E402
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
                p, _ = inner_adapt(params, support, loss_fn, num_inner_steps=steps, inner_lr=lr)
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
