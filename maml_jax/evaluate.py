"""Meta-test evaluation: adapt on each task's support set, score on its query set.

Results are reported as mean ± 95% confidence half-width, 1.96·σ/√n over tasks (σ the
population standard deviation of the per-task values), as in Finn et al. (2017).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maml_jax.core import TaskMap, inner_adapt, map_tasks
from maml_jax.inner_updates import sgd
from maml_jax.types import InnerUpdateFn, Params, Task, TaskLossFn
from maml_jax.validation import HyperparameterError


def mean_ci95(values) -> tuple[float, float]:
    """``(mean, 1.96 * std / sqrt(n))`` of a 1-D array of per-task values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    return float(v.mean()), float(1.96 * v.std() / np.sqrt(v.size))


def adaptation_curve(
    meta_params: Params,
    tasks: Task,
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float | None = None,
    task_map: TaskMap = "vmap",
    inner_update_fn: InnerUpdateFn | None = None,
    inner_grad_clip: float = 0.0,
) -> dict[str, jax.Array]:
    """Query metrics after 0, 1, ..., K inner steps for every task, adapting with SGD at
    ``inner_lr`` or with ``inner_update_fn`` (exactly one of the two, as in ``inner_adapt``).
    ``inner_grad_clip`` > 0 clips each SGD step's gradient to that global norm
    (``inner_updates.clip_by_global_norm``).

    ``tasks``: ``[tasks, n, *features]``. Returns ``{"loss": [tasks, K+1], <aux>: [tasks, K+1]}``
    where column k holds the query metric after k steps.
    """

    if inner_grad_clip:
        if inner_update_fn is not None:
            raise HyperparameterError("inner_grad_clip clips plain SGD at inner_lr; wrap inner_update_fn yourself")
        inner_update_fn, inner_lr = sgd(inner_lr, inner_grad_clip), None

    def query_metrics(p, query):
        loss, aux = task_loss_fn(p, query)
        return {"loss": loss, **aux}

    def one(task):
        adapted, trace = inner_adapt(
            meta_params,
            task.support,
            task_loss_fn,
            num_inner_steps=num_inner_steps,
            inner_lr=inner_lr,
            inner_update_fn=inner_update_fn,
            step_metrics_fn=lambda p: query_metrics(p, task.query),
        )
        final = query_metrics(adapted, task.query)
        if num_inner_steps == 0:
            return jax.tree.map(lambda f: f[None], final)
        return jax.tree.map(lambda s, f: jnp.concatenate([s, f[None]]), trace["step_metrics"], final)

    return map_tasks(one, tasks, task_map)


def algorithm_curve(
    algorithm, meta_params: Params, tasks: Task, steps: Sequence[int], task_map: TaskMap = "vmap"
) -> dict[str, jax.Array]:
    """Query metrics of any ``algorithms.Algorithm`` after each step count in ``steps``:
    ``{name: [tasks, len(steps)]}`` (column i after ``steps[i]`` steps; ``query_`` prefixes
    dropped, so the names match ``adaptation_curve``). Each count adapts from scratch with
    ``algorithm.evaluate``, which is what makes it algorithm-agnostic."""
    from maml_jax.algorithms.base import batched_evaluate  # algorithms import core; avoid a cycle

    columns = [batched_evaluate(algorithm, meta_params, tasks, int(k), task_map) for k in steps]
    names = [n for n in columns[0] if n.startswith("query_")]
    return {n.removeprefix("query_"): jnp.stack([c[n] for c in columns], axis=1) for n in names}


def summarize_curve(
    curve: dict[str, jax.Array], steps: Sequence[int], columns: Sequence[int] | None = None
) -> dict[str, dict[int, tuple[float, float, float, int]]]:
    """``{metric: {k: (mean, ci95, median, nonfinite)}}`` for each requested step count ``k``.
    The median (a NaN counted as +inf) and ``nonfinite``, the number of tasks whose value is
    inf or NaN, show when a mean is carried by a few tasks whose adaptation diverged.
    ``columns[i]`` is the step count of curve column ``i`` (default: column k holds step count k)."""
    curve = jax.device_get(curve)
    index = {int(k): i for i, k in enumerate(columns)} if columns is not None else {int(k): int(k) for k in steps}

    def summary(v: np.ndarray) -> tuple[float, float, float, int]:
        return (*mean_ci95(v), float(np.median(np.where(np.isnan(v), np.inf, v))), int((~np.isfinite(v)).sum()))

    return {name: {int(k): summary(np.asarray(values[:, index[k]])) for k in steps} for name, values in curve.items()}
