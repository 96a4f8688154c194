"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning", Eq. 2-3): per-parameter inner step sizes α, meta-learned with the initialisation,

    θ'_i = θ − α ⊙ ∇_θ L_support_i(θ),        (θ, α) ← (θ, α) − β ∇_(θ,α) Σ_i L_query_i(θ'_i).

``meta_params = {"model": θ, "inner_lr": α}`` where α has the structure and shapes of θ; the
inner rule is ``inner_updates.meta_sgd(α)`` inside ``core.meta_loss`` and the meta-gradient is
backprop through it, w.r.t. both θ and α. The paper initialises α ~ U[0.005, 0.1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maml_jax.algorithms.base import Algorithm, from_meta_loss
from maml_jax.core import meta_loss
from maml_jax.inner_updates import meta_sgd as meta_sgd_update
from maml_jax.types import Params, TaskLossFn
from maml_jax.validation import HyperparameterError, check_learning_rate, check_num_steps

PAPER_INIT_RANGE = (0.005, 0.1)


def init_step_sizes(
    params: Params, init: float | tuple[float, float] = PAPER_INIT_RANGE, key: jax.Array | None = None
) -> Params:
    """α with the structure of ``params``: the constant ``init``, or U[lo, hi] per entry when
    ``init = (lo, hi)`` (``key`` defaults to ``PRNGKey(0)``)."""
    if isinstance(init, tuple):
        if len(init) != 2 or not 0 <= init[0] <= init[1]:
            raise HyperparameterError(f"init_inner_lr range must be (lo, hi) with 0 <= lo <= hi, got {init}")
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(0) if key is None else key, max(len(leaves), 1))
        alphas = [
            jax.random.uniform(k, jnp.shape(p), jnp.result_type(p), init[0], init[1])
            for k, p in zip(keys, leaves, strict=False)
        ]
        return jax.tree.unflatten(treedef, alphas)
    check_learning_rate(init, "init_inner_lr")
    return jax.tree.map(lambda p: jnp.full(jnp.shape(p), init, jnp.result_type(p)), params)


def meta_sgd(
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    init_inner_lr: float | tuple[float, float] = PAPER_INIT_RANGE,
    seed: int = 0,
    first_order: bool = False,
) -> Algorithm:
    """Meta-SGD as an ``Algorithm``: ``init(θ) = {"model": θ, "inner_lr": α₀}`` with α₀ from
    ``init_step_sizes(θ, init_inner_lr, PRNGKey(seed))``. ``first_order`` stops the gradient
    of the inner gradients (α still gets its meta-gradient, −∇L_query(θ')·∇L_support(θ))."""
    check_num_steps(num_inner_steps)
    if not isinstance(init_inner_lr, tuple):
        check_learning_rate(init_inner_lr, "init_inner_lr")

    def init(params):
        return {"model": params, "inner_lr": init_step_sizes(params, init_inner_lr, jax.random.PRNGKey(seed))}

    def loss(meta_params, task, num_steps):
        return meta_loss(
            meta_params["model"],
            task,
            task_loss_fn,
            num_inner_steps=num_steps,
            inner_update_fn=meta_sgd_update(meta_params["inner_lr"]),
            first_order=first_order,
        )

    return from_meta_loss("meta_sgd", loss, num_inner_steps, init)
