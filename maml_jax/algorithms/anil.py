"""ANIL and BOIL: MAML with a parameter mask on the inner loop.

* ANIL, "Almost No Inner Loop" (Raghu et al. 2020, §4): only the head (the last linear layer)
  adapts, θ'_head = θ_head − α ∇_head L_support(θ), θ'_body = θ_body.
* BOIL, "Body Only update in Inner Loop" (Oh et al. 2021, §3): only the body adapts,
  θ'_body = θ_body − α ∇_body L_support(θ), θ'_head = θ_head.

Both meta-learn every parameter in the outer loop with the MAML meta-gradient (backprop
through the masked inner ``lax.scan``): ``inner_updates.masked(sgd(α), mask)`` plugged into
``core.meta_loss``. The mask is built from parameter names (``inner_updates.mask_from_names``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from maml_jax.algorithms.base import Algorithm, from_meta_loss
from maml_jax.core import meta_loss
from maml_jax.inner_updates import mask_from_names, masked, sgd
from maml_jax.types import Params, TaskLossFn
from maml_jax.validation import HyperparameterError, check_learning_rate, check_num_steps


def head_name(params: Params) -> str:
    """The top-level name of the model's last linear layer: ``"head"`` (``models.conv4``) or the
    highest-numbered ``dense_<i>`` (``models.mlp``). Raises ``HyperparameterError`` otherwise."""
    if not isinstance(params, dict) and not hasattr(params, "keys"):
        raise HyperparameterError(f"params must be a dict of layers to find the head, got {type(params).__name__}")
    names = list(params.keys())
    if "head" in names:
        return "head"
    dense = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"dense_(\d+)", n))]
    if not dense:
        raise HyperparameterError(f"cannot tell the head among layers {names}; pass head=<layer name>")
    return max(dense)[1]


def _masked_loss(task_loss_fn, inner_lr, first_order, adapt_for: Callable[[Params], Callable[[str], bool]]):
    """``(meta_params, task, num_steps) -> core.meta_loss`` with ``masked(sgd(inner_lr), mask)``,
    the mask built from ``meta_params``' names by the predicate ``adapt_for(meta_params)``."""

    def loss(meta_params, task, num_steps):
        update = masked(sgd(inner_lr), mask_from_names(meta_params, adapt_for(meta_params)))
        return meta_loss(
            meta_params, task, task_loss_fn, num_inner_steps=num_steps, inner_update_fn=update, first_order=first_order
        )

    return loss


def masked_maml(
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float,
    adapt: Callable[[str], bool],
    first_order: bool = False,
    name: str = "masked_maml",
) -> Algorithm:
    """MAML whose inner loop updates only the parameters whose "/"-joined name satisfies
    ``adapt(name)`` (e.g. ``lambda n: n.startswith("head/")``); the rest stay at θ during
    adaptation. ``meta_params`` are the model's parameters. With ``adapt`` always True this is
    exactly ``maml``."""
    check_num_steps(num_inner_steps)
    check_learning_rate(inner_lr, "inner_lr")
    return from_meta_loss(name, _masked_loss(task_loss_fn, inner_lr, first_order, lambda _: adapt), num_inner_steps)


def _head_predicate(head: str | None, inside: bool) -> Callable[[Params], Callable[[str], bool]]:
    """``params -> (name -> bool)``: is the leaf in (``inside``) or out of the head layer."""

    def for_params(params):
        top = head if head is not None else head_name(params)
        if top not in params:
            raise HyperparameterError(f"head {top!r} is not a layer of the parameters {list(params)}")
        return lambda name: (name.split("/")[0] == top) == inside

    return for_params


def anil(
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float,
    head: str | None = None,
    first_order: bool = False,
) -> Algorithm:
    """ANIL: adapt only the layer ``head`` (default ``head_name(params)``: ``"head"`` for conv4,
    the last ``dense_<i>`` for the MLP) in the inner loop; meta-learn everything."""
    check_num_steps(num_inner_steps)
    check_learning_rate(inner_lr, "inner_lr")
    loss = _masked_loss(task_loss_fn, inner_lr, first_order, _head_predicate(head, inside=True))
    return from_meta_loss("anil", loss, num_inner_steps)


def boil(
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float,
    head: str | None = None,
    first_order: bool = False,
) -> Algorithm:
    """BOIL: adapt every layer but ``head`` in the inner loop (the head is frozen there and
    meta-learned in the outer loop only)."""
    check_num_steps(num_inner_steps)
    check_learning_rate(inner_lr, "inner_lr")
    loss = _masked_loss(task_loss_fn, inner_lr, first_order, _head_predicate(head, inside=False))
    return from_meta_loss("boil", loss, num_inner_steps)
