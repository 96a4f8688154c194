"""MAML (Finn et al. 2017, Algorithm 1/2) and FOMAML (its §5.2 first-order approximation) as
``Algorithm``s: SGD inner update, meta-gradient by backprop through the inner ``lax.scan``
(``first_order=True``: the inner gradients are treated as constants)."""

from __future__ import annotations

import functools

from maml_jax.algorithms.base import Algorithm, from_meta_loss
from maml_jax.core import meta_loss
from maml_jax.inner_updates import sgd
from maml_jax.types import TaskLossFn
from maml_jax.validation import check_num_steps


def maml(
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float,
    first_order: bool = False,
    remat: bool = False,
    inner_grad_clip: float = 0.0,
    unroll: int | bool = 1,
) -> Algorithm:
    """``meta_params`` are the model's parameters; the meta-gradient is ∇_θ L_query(θ').
    ``remat`` rematerialises the inner steps and ``unroll`` unrolls their loop in training
    (``core.inner_adapt``; evaluation keeps the loop). ``inner_grad_clip`` > 0
    clips each inner gradient to that global norm (``inner_updates.clip_by_global_norm``), in
    training and in ``evaluate``; second order differentiates through the clipping. Through
    ``batched_meta_grad`` with ``task_map="map"`` each task's gradient is taken inside the
    task map, so only one task's activations are live at a time; with ``"vmap"`` the mean
    loss is differentiated once (``meta_loss`` of the ``Algorithm``)."""
    check_num_steps(num_inner_steps)
    update = sgd(inner_lr, inner_grad_clip)  # checks inner_lr

    def loss(meta_params, task, num_steps, train=True):
        switches = {"first_order": first_order, "remat": remat, "unroll": unroll} if train else {}
        return meta_loss(meta_params, task, task_loss_fn, num_inner_steps=num_steps, inner_update_fn=update, **switches)

    name = "fomaml" if first_order else "maml"
    return from_meta_loss(name, loss, num_inner_steps, evaluate_loss_fn=functools.partial(loss, train=False))


def fomaml(task_loss_fn: TaskLossFn, *, num_inner_steps: int, inner_lr: float) -> Algorithm:
    """First-order MAML: ``maml(..., first_order=True)``."""
    return maml(task_loss_fn, num_inner_steps=num_inner_steps, inner_lr=inner_lr, first_order=True)
