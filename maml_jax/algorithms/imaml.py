"""iMAML (Rajeswaran, Finn, Kakade & Levine 2019, "Meta-Learning with Implicit Gradients").

Inner problem (Eq. 4), the proximally regularised support loss, solved approximately by K
steps of gradient descent from θ (``inner_updates.proximal`` around ``core.inner_adapt``)::

    φ(θ) ≈ argmin_φ  L_support(φ) + λ/2 ‖φ − θ‖²

At its minimum dφ/dθ = (I + H/λ)^{-1} with H = ∇²L_support(φ) (Lemma 1), so the
meta-gradient is the implicit gradient (Eq. 7)::

    g = (I + H/λ)^{-1} ∇L_query(φ),

obtained (Algorithm 2) by ``cg_iters`` conjugate-gradient iterations on
((1 + cg_damping) I + H/λ) v = ∇L_query(φ), each needing one Hessian-vector product
(``jax.jvp`` of ``jax.grad``, forward-over-reverse). Nothing is differentiated through the
inner loop (it runs on ``stop_gradient(θ)``), so memory does not grow with K.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from maml_jax.algorithms.base import Algorithm
from maml_jax.core import inner_adapt, meta_loss
from maml_jax.inner_updates import proximal, sgd
from maml_jax.types import Batch, InnerUpdateFn, Params, TaskLossFn
from maml_jax.validation import HyperparameterError, check_learning_rate, check_num_steps


def hessian_vector_product(task_loss_fn: TaskLossFn, params: Params, batch: Batch, vector: Params) -> Params:
    """H v with H = ∇²_params L(params; batch), as the directional derivative of ∇L along v."""
    grad_fn = jax.grad(lambda p: task_loss_fn(p, batch)[0])
    return jax.jvp(grad_fn, (params,), (vector,))[1]


def _vdot(a: Params, b: Params) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def conjugate_gradient(operator: Callable[[Params], Params], b: Params, *, iters: int, tol: float = 0.0) -> Params:
    """Solve ``operator(x) = b`` (symmetric positive definite) by ``iters`` conjugate-gradient
    iterations from x₀ = 0 (Nocedal & Wright, Algorithm 5.2) over pytrees. Iterations after the
    residual falls to ``tol · ‖b‖`` (or exactly 0) leave x unchanged, so there is no 0/0; the
    loop length is fixed, so it vmaps over tasks (``jax.scipy.sparse.linalg.cg`` does not under
    ``vmap`` here: it calls ``device_put`` on traced values)."""
    x = jax.tree.map(jnp.zeros_like, b)
    rs = _vdot(b, b)
    stop = tol**2 * rs

    def body(_, carry):
        x, r, p, rs = carry
        ap = operator(p)
        active = rs > stop
        alpha = jnp.where(active, rs / jnp.where(active, _vdot(p, ap), 1.0), 0.0)
        x = jax.tree.map(lambda xi, pi: xi + alpha * pi, x, p)
        r = jax.tree.map(lambda ri, api: ri - alpha * api, r, ap)
        rs_new = _vdot(r, r)
        beta = jnp.where(active, rs_new / jnp.where(active, rs, 1.0), 0.0)
        p = jax.tree.map(lambda ri, pi: ri + beta * pi, r, p)
        return x, r, p, rs_new

    return jax.lax.fori_loop(0, iters, body, (x, b, b, rs))[0]


def implicit_meta_gradient(
    task_loss_fn: TaskLossFn,
    adapted_params: Params,
    support: Batch,
    query_grad: Params,
    *,
    prox_lambda: float,
    cg_iters: int,
    cg_damping: float = 0.0,
    cg_tol: float = 0.0,
) -> Params:
    """v ≈ ((1 + cg_damping) I + H/λ)^{-1} ``query_grad`` by at most ``cg_iters`` CG iterations
    from v₀ = 0 (stopping early only when the residual drops below ``cg_tol`` ‖query_grad‖),
    H the support-loss Hessian at ``adapted_params``. All pytrees share ``adapted_params``'s
    structure. CG needs the operator symmetric positive definite: true when λ exceeds minus the
    smallest Hessian eigenvalue; damping helps when it is not."""
    check_num_steps(cg_iters, "cg_iters")
    check_learning_rate(cg_damping, "cg_damping")

    def operator(v):
        hv = hessian_vector_product(task_loss_fn, adapted_params, support, v)
        return jax.tree.map(lambda a, b: (1.0 + cg_damping) * a + b / prox_lambda, v, hv)

    return conjugate_gradient(operator, query_grad, iters=cg_iters, tol=cg_tol)


def imaml(
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float | None = None,
    inner_update_fn: InnerUpdateFn | None = None,
    prox_lambda: float = 1.0,
    cg_iters: int = 5,
    cg_damping: float = 0.0,
) -> Algorithm:
    """iMAML as an ``Algorithm``; ``meta_params`` are the model's parameters θ.

    Args:
      num_inner_steps: K gradient steps on the proximal objective (also at meta-test).
      inner_lr: step size of plain GD on the proximal objective; or give ``inner_update_fn``, any
        stateless ``(params, grads, step) -> params`` rule (it receives the proximal gradient
        ∇L_support(φ) + λ(φ − θ)). Exactly one of the two.
      prox_lambda: λ > 0, the proximal regularisation strength (the paper uses 0.5–2).
      cg_iters: conjugate-gradient iterations (the paper: 5).
      cg_damping: adds ``cg_damping · v`` to the operator, for stability when H is indefinite.

    ``meta_grad`` returns the query loss at φ (and ``core.meta_loss``'s metrics) with the
    implicit gradient; ``evaluate`` adapts with the same proximal inner loop.
    """
    check_num_steps(num_inner_steps)
    check_num_steps(cg_iters, "cg_iters")
    check_learning_rate(cg_damping, "cg_damping")
    check_learning_rate(prox_lambda, "prox_lambda")
    if not prox_lambda > 0:
        raise HyperparameterError(f"prox_lambda must be > 0, got {prox_lambda}")
    if (inner_lr is None) == (inner_update_fn is None):
        raise HyperparameterError("give exactly one of inner_lr and inner_update_fn")
    base = sgd(inner_lr) if inner_update_fn is None else inner_update_fn

    def adapt_kwargs(meta_params, num_steps):
        anchor = jax.lax.stop_gradient(meta_params)
        return {
            "num_inner_steps": num_steps,
            "inner_update_fn": proximal(base, anchor, prox_lambda),
            "first_order": True,
        }

    def meta_grad(meta_params, task, step):
        del step
        theta = jax.lax.stop_gradient(meta_params)
        adapted, trace = inner_adapt(theta, task.support, task_loss_fn, **adapt_kwargs(theta, num_inner_steps))
        (loss, aux), query_grad = jax.value_and_grad(task_loss_fn, has_aux=True)(adapted, task.query)
        grads = implicit_meta_gradient(
            task_loss_fn,
            adapted,
            task.support,
            query_grad,
            prox_lambda=prox_lambda,
            cg_iters=cg_iters,
            cg_damping=cg_damping,
        )
        metrics = {"query_loss": loss, **{f"query_{k}": v for k, v in aux.items()}}
        if num_inner_steps > 0:
            metrics["support_loss"] = trace["support_loss"][0]
        return (loss, metrics), grads

    def evaluate(meta_params, task, num_steps):
        theta = jax.lax.stop_gradient(meta_params)
        return meta_loss(theta, task, task_loss_fn, **adapt_kwargs(theta, num_steps))[1]

    return Algorithm("imaml", lambda params: params, meta_grad, evaluate)
