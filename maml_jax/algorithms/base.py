"""The one interface every algorithm of the family implements.

An algorithm is three pure functions over ``meta_params`` (a pytree: the model's parameters
plus whatever the algorithm meta-learns beside them, e.g. Meta-SGD's step sizes):

* ``init(model_params) -> meta_params``;
* ``meta_grad(meta_params, task, step) -> ((loss, metrics), grads)``: one task's meta-loss
  and the meta-gradient *estimate* with the structure of ``meta_params`` (exact backprop for
  MAML, ``stop_gradient`` for FOMAML, ``meta_params − adapted`` for Reptile, an implicit
  gradient for iMAML, ...). ``step`` is the outer iteration (traced int32 scalar) for
  schedules such as MAML++'s annealing; most algorithms ignore it;
* ``evaluate(meta_params, task, num_inner_steps) -> metrics``: one task's query metrics after
  adapting with ``num_inner_steps`` steps at meta-test (``num_inner_steps`` is static).
  Metrics follow ``core.meta_loss``: ``query_loss`` and the task loss's aux as ``query_<name>``.

Optionally, ``meta_loss(meta_params, task, step) -> (loss, metrics)``: one task's
differentiable meta-loss, given when ``meta_grad`` is exactly its gradient (MAML, FOMAML,
MAML++ when nothing anneals, i.e. ``first_order_iters`` 0 and ``msl_anneal_iters`` 0 or the
multi-step loss off, and every ``from_meta_loss`` variant); ``None`` otherwise. With it,
``batched_meta_grad`` under ``vmap`` differentiates the task-mean loss once instead of mapping per-task gradients.

``batched_meta_grad`` averages ``meta_grad`` over a task batch, and
``train.make_train_step_from_grads`` turns it into an optax train step, so that every
algorithm trains with the same outer loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from maml_jax.core import TaskMap, map_tasks, mean_over_tasks
from maml_jax.types import Metrics, Params, Task
from maml_jax.validation import check_task

MetaGradFn = Callable[[Params, Task, jax.Array], tuple[tuple[jax.Array, Metrics], Params]]
EvaluateFn = Callable[[Params, Task, int], Metrics]
MetaLossFn = Callable[[Params, Task, jax.Array], tuple[jax.Array, Metrics]]


class Algorithm(NamedTuple):
    name: str
    init: Callable[[Params], Params]
    meta_grad: MetaGradFn
    evaluate: EvaluateFn
    meta_loss: MetaLossFn | None = None  # set only when meta_grad is its exact gradient


def batched_meta_grad(
    algorithm: Algorithm, meta_params: Params, tasks: Task, step: jax.Array, task_map: TaskMap = "vmap"
) -> tuple[tuple[jax.Array, Metrics], Params]:
    """Task means of ``algorithm.meta_grad`` over ``tasks`` ``[tasks, n, *features]``:
    ``((mean loss, mean metrics), mean grads)``.

    ``task_map="map"`` takes each task's gradient inside a loop over the tasks and adds it to
    a running sum (``core.mean_over_tasks``: one task's activations and gradient live at a
    time). ``task_map="vmap"`` with an ``algorithm.meta_loss`` differentiates the
    vmapped mean loss instead: ∇(1/T Σ_i L_i) = 1/T Σ_i ∇L_i, the same gradient, but the
    terms of θ that every task shares (the first inner step's forward pass from θ) reach θ
    as one contraction over the whole batch, ``[T·n, a]ᵀ[T·n, b]``, not T per-task ones
    summed afterwards."""
    check_task(tasks, task_axis=True)
    mean = lambda tree: jax.tree.map(lambda a: jnp.mean(a, axis=0), tree)  # noqa: E731
    if task_map == "vmap" and algorithm.meta_loss is not None:

        def mean_loss(p):
            losses, metrics = jax.vmap(lambda t: algorithm.meta_loss(p, t, step))(tasks)
            return jnp.mean(losses), mean(metrics)

        return jax.value_and_grad(mean_loss, has_aux=True)(meta_params)
    return mean_over_tasks(lambda t: algorithm.meta_grad(meta_params, t, step), tasks, task_map)


def batched_evaluate(
    algorithm: Algorithm, meta_params: Params, tasks: Task, num_inner_steps: int, task_map: TaskMap = "vmap"
) -> Metrics:
    """``algorithm.evaluate`` on every task of a batch; metrics stacked ``[tasks]``."""
    check_task(tasks, task_axis=True)
    return map_tasks(lambda t: algorithm.evaluate(meta_params, t, num_inner_steps), tasks, task_map)


def from_meta_loss(
    name: str,
    loss_fn: Callable[[Params, Task, int], tuple[jax.Array, Metrics]],
    num_inner_steps: int,
    init: Callable[[Params], Params] = lambda params: params,
    evaluate_loss_fn: Callable[[Params, Task, int], tuple[jax.Array, Metrics]] | None = None,
) -> Algorithm:
    """An ``Algorithm`` whose meta-gradient is exact backprop of a differentiable meta-loss
    ``loss_fn(meta_params, task, num_steps) -> (loss, metrics)`` (``core.meta_loss`` with the
    variant's inner update bound): ``meta_grad`` differentiates it at ``num_inner_steps``,
    ``evaluate`` returns its metrics at the requested number of steps, or those of
    ``evaluate_loss_fn`` when given (the same loss without training-only switches such as
    ``first_order`` and ``remat``, which change how it is differentiated, not its value)."""

    def task_loss(meta_params, task, step):
        del step
        return loss_fn(meta_params, task, num_inner_steps)

    def meta_grad(meta_params, task, step):
        return jax.value_and_grad(task_loss, has_aux=True)(meta_params, task, step)

    eval_loss = loss_fn if evaluate_loss_fn is None else evaluate_loss_fn

    def evaluate(meta_params, task, num_steps):
        return eval_loss(meta_params, task, num_steps)[1]

    return Algorithm(name, init, meta_grad, evaluate, task_loss)
