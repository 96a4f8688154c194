"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML", §4) as an ``Algorithm``.

Each of the paper's fixes is a separate switch of ``maml_plus_plus``; with all of them off it
is MAML. The inner loop is ``core.inner_adapt`` (one ``lax.scan``); the fixes are injected:

* **Multi-step loss (MSL)**, §4 "Multi-Step Loss Optimization": the meta-loss is
  ``Σ_i w_i(t) · L_query(θ_i)`` over the parameters θ_i after every inner step i = 1..K
  (``post_step_fn`` of ``inner_adapt``); the weights start uniform and anneal towards the last
  step over the first ``msl_anneal_iters`` outer iterations t, after which only the last step
  counts (``multi_step_loss_weights``, the authors' ``get_per_step_loss_importance_vector``).
* **LSLR**, "Learning Per-Layer Per-Step Learning Rates and Directions": one learned step size
  per parameter tensor and inner step, ``θ ← θ − α[leaf][i] · ∇L`` (``per_step_lr_sgd``),
  initialised to ``inner_lr`` and stored beside the model as ``meta_params["inner_lrs"]``.
* **Per-step batch norm** (BNWB + BNRS): give a step-indexed loss ``task_loss_fn(params,
  batch, step)`` with ``loss_takes_step=True``, e.g. ``step_indexed_loss(cross_entropy_loss,
  conv4(..., bn="per_step", bn_steps=K).apply)``: inner step i and the query after step i use
  BN row i (the authors' ``num_step``); statistics are the batch's own at every step. The BN
  scale/bias are adapted in the inner loop like every other parameter (as in this library's
  MAML); the authors' code leaves them out of the inner loop by default.
* **Derivative-order annealing (DA)**: first-order meta-gradients for outer iterations
  ``step < first_order_iters``, second order afterwards. The switch is a ``lax.cond`` on the
  traced ``step`` (not vmapped over tasks, so only one branch runs): one compilation, no
  retrace when it flips.
* **Cosine annealing of the outer learning rate** (CA): ``cosine_outer_lr``, an optax schedule
  to give to the outer optimiser (the authors use Adam with ``CosineAnnealingLR``).

Iteration counts are outer steps (the authors' code counts epochs of 500 iterations).
``meta_params = {"params": model params, "inner_lrs": {same tree, leaves [K]}}`` (no
``"inner_lrs"`` when LSLR is off).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from maml_jax.algorithms.base import Algorithm
from maml_jax.core import inner_adapt
from maml_jax.types import Batch, InnerUpdateFn, Metrics, Params, Task, TaskLossFn
from maml_jax.validation import HyperparameterError, check_learning_rate, check_num_steps, check_task

# step_loss_fn(params, batch, inner_step) -> (loss, aux)
StepLossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, Metrics]]

MSL_MIN_WEIGHT = 0.03  # the authors' floor for non-final weights, divided by K


def multi_step_loss_weights(step: jax.Array | int, num_inner_steps: int, anneal_iters: int) -> jax.Array:
    """Per-step query-loss weights ``w(t): [K]`` at outer iteration ``t = step`` (may be traced).

    From uniform ``1/K`` at t = 0, the non-final weights fall linearly by ``t / (K·N)`` to a floor
    of ``0.03/K`` and the final weight rises by ``(K−1)·t / (K·N)`` to at most
    ``1 − (K−1)·0.03/K`` (N = ``anneal_iters``); for ``t >= N`` all weight is on the last step.
    ``anneal_iters = 0``: last step only from the start. (Antoniou et al. 2019 §4, MSL.)
    """
    check_num_steps(num_inner_steps)
    check_num_steps(anneal_iters, "msl_anneal_iters")
    k = num_inner_steps
    if k < 1:
        raise HyperparameterError("the multi-step loss needs num_inner_steps >= 1")
    last = jax.nn.one_hot(k - 1, k)
    if anneal_iters == 0:
        return last
    t = jnp.asarray(step, jnp.float32)
    decay = 1.0 / k / anneal_iters
    floor = MSL_MIN_WEIGHT / k
    non_final = jnp.maximum(1.0 / k - t * decay, floor)
    final = jnp.minimum(1.0 / k + t * (k - 1) * decay, 1.0 - (k - 1) * floor)
    weights = jnp.concatenate([jnp.full((k - 1,), non_final), final[None]])
    return jnp.where(t < anneal_iters, weights, last)


def per_step_lr_sgd(inner_lrs: Params) -> InnerUpdateFn:
    """LSLR inner update: ``θ[leaf] ← θ[leaf] − inner_lrs[leaf][min(i, S−1)] · g[leaf]`` at inner step
    i, where ``inner_lrs`` has the parameters' tree with leaves ``[S]`` (one rate per tensor and step;
    steps past ``S`` reuse the last rate)."""

    def update(params, grads, step):
        def one(p, g, lrs):
            return p - lrs[jnp.minimum(step, lrs.shape[0] - 1)].astype(p.dtype) * g

        return jax.tree.map(one, params, grads, inner_lrs)

    return update


def step_indexed_loss(make_loss: Callable[[Callable], TaskLossFn], apply_fn: Callable) -> StepLossFn:
    """``(params, batch, step) -> (loss, aux)`` from a loss factory (``losses.mse_loss``,
    ``losses.cross_entropy_loss``) and a model ``apply_fn(params, x, step=...)`` such as
    ``conv4(..., bn="per_step").apply``."""

    def loss_fn(params, batch, step):
        return make_loss(lambda p, x: apply_fn(p, x, step=step))(params, batch)

    return loss_fn


def cosine_outer_lr(outer_lr: float, total_steps: int, min_lr: float = 1e-5) -> optax.Schedule:
    """Cosine annealing of the outer learning rate (MAML++ §4, CA):
    ``β(t) = min_lr + (outer_lr − min_lr) · ½(1 + cos(π · t / total_steps))`` for
    ``t <= total_steps``, ``min_lr`` afterwards (PyTorch's ``CosineAnnealingLR`` with
    ``T_max = total_steps``, ``eta_min = min_lr``). Use as ``optax.adam(cosine_outer_lr(...))``."""
    check_learning_rate(outer_lr, "outer_lr")
    check_learning_rate(min_lr, "min_lr")
    check_num_steps(total_steps, "total_steps")
    if outer_lr <= 0 or min_lr > outer_lr or total_steps < 1:
        raise HyperparameterError(
            f"need 0 <= min_lr <= outer_lr, outer_lr > 0 and total_steps >= 1; got {min_lr}, {outer_lr}, {total_steps}"
        )
    return optax.cosine_decay_schedule(outer_lr, total_steps, alpha=min_lr / outer_lr)


def mamlpp_meta_loss(
    meta_params: Params,
    task: Task,
    step_loss_fn: StepLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float | None = None,
    step_weights: jax.Array | None = None,
    first_order: bool = False,
) -> tuple[jax.Array, Metrics]:
    """One task's MAML++ meta-loss.

    ``meta_params["params"]`` is θ; with ``meta_params["inner_lrs"]`` the inner update is LSLR,
    otherwise SGD at ``inner_lr``. ``step_weights: [K]`` (``multi_step_loss_weights``) gives the
    multi-step loss ``Σ_i w_i L_query(θ_i, step=i−1)``; ``None`` gives ``L_query(θ_K, step=K−1)``.
    ``step_loss_fn(params, batch, step)`` receives the inner step index (for per-step BN).

    Returns ``(loss, metrics)``: ``query_loss`` and ``query_<aux>`` of the final parameters,
    ``multi_step_loss`` (= the returned loss) and ``support_loss`` before adaptation (K > 0).
    """
    check_task(task)
    k = num_inner_steps
    if "inner_lrs" in meta_params:
        adapt = {"inner_update_fn": per_step_lr_sgd(meta_params["inner_lrs"])}
    else:
        adapt = {"inner_lr": inner_lr}
    post = None
    if step_weights is not None:
        if step_weights.shape != (k,):
            raise HyperparameterError(f"step_weights has shape {step_weights.shape}; expected ({k},)")
        post = lambda p, i: step_loss_fn(p, task.query, i)  # noqa: E731
    adapted, trace = inner_adapt(
        meta_params["params"],
        task.support,
        step_loss_fn,
        num_inner_steps=k,
        first_order=first_order,
        loss_takes_step=True,
        post_step_fn=post,
        **adapt,
    )
    if post is None:
        loss, aux = step_loss_fn(adapted, task.query, jnp.int32(max(k - 1, 0)))
        total = loss
    else:
        losses, auxes = trace["post_step"]
        loss, aux = losses[-1], jax.tree.map(lambda a: a[-1], auxes)
        total = jnp.sum(step_weights.astype(losses.dtype) * losses)
    metrics = {"query_loss": loss, "multi_step_loss": total, **{f"query_{n}": v for n, v in aux.items()}}
    if k > 0:
        metrics["support_loss"] = trace["support_loss"][0]
    return total, metrics


def _branch(pred, true_fn, false_fn):
    """``lax.cond`` on a traced predicate; a plain ``if`` when the switch is static."""
    if isinstance(pred, bool):
        return true_fn() if pred else false_fn()
    return jax.lax.cond(pred, true_fn, false_fn)


def maml_plus_plus(
    task_loss_fn: TaskLossFn | StepLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float,
    multi_step_loss: bool = True,
    msl_anneal_iters: int = 0,
    learned_inner_lrs: bool = True,
    first_order_iters: int = 0,
    loss_takes_step: bool = False,
) -> Algorithm:
    """MAML++ with each fix a switch (see the module docstring).

    Args:
      task_loss_fn: ``(params, batch) -> (loss, aux)``; or, with ``loss_takes_step=True``,
        ``(params, batch, inner_step)`` for per-step BN (``step_indexed_loss``).
      num_inner_steps: K >= 1 at meta-training; ``evaluate`` takes its own count (LSLR and
        per-step BN reuse their last step beyond K).
      inner_lr: α (the initial value of every learned rate under LSLR).
      multi_step_loss: MSL with weights annealed over ``msl_anneal_iters`` outer iterations
        (0: last step only, i.e. MAML's loss).
      learned_inner_lrs: LSLR; ``meta_params["inner_lrs"]`` leaves ``[K]``.
      first_order_iters: DA; first-order meta-gradients while ``step < first_order_iters``.

    ``meta_grad(meta_params, task, step)`` returns the gradient of the (weighted) meta-loss with
    respect to ``{"params", "inner_lrs"}``. Without annealing (``msl_anneal_iters`` and
    ``first_order_iters`` 0, or MSL off) the ``Algorithm`` also carries that loss as
    ``meta_loss``, which ``batched_meta_grad`` differentiates under ``vmap``.
    """
    check_num_steps(num_inner_steps)
    if num_inner_steps < 1:
        raise HyperparameterError("MAML++ needs num_inner_steps >= 1")
    check_learning_rate(inner_lr, "inner_lr")
    check_num_steps(msl_anneal_iters, "msl_anneal_iters")
    check_num_steps(first_order_iters, "first_order_iters")
    k = num_inner_steps
    step_loss = task_loss_fn if loss_takes_step else (lambda p, b, i: task_loss_fn(p, b))

    def init(params):
        meta_params = {"params": params}
        if learned_inner_lrs:
            meta_params["inner_lrs"] = jax.tree.map(lambda p: jnp.full((k,), inner_lr, jnp.result_type(p)), params)
        return meta_params

    msl_switch = multi_step_loss and msl_anneal_iters > 0  # MSL weights anneal: flips at a step
    fo_switch = first_order_iters > 0  # DA: first order before a step

    def switched(step, make):
        """``make(first_order, use_msl)()`` for the DA and MSL switches at outer step ``step``:
        ``lax.cond`` on a traced ``step``, so only the active branch runs."""
        msl_on = (step < msl_anneal_iters) if msl_switch else False
        fo_on = (step < first_order_iters) if fo_switch else False
        return _branch(
            fo_on,
            lambda: _branch(msl_on, make(True, True), make(True, False)),
            lambda: _branch(msl_on, make(False, True), make(False, False)),
        )

    def loss_fn(first_order, use_msl, step):
        weights = multi_step_loss_weights(step, k, msl_anneal_iters) if use_msl else None
        return functools.partial(
            mamlpp_meta_loss,
            step_loss_fn=step_loss,
            num_inner_steps=k,
            inner_lr=inner_lr,
            step_weights=weights,
            first_order=first_order,
        )

    def task_meta_loss(meta_params, task, step):
        return switched(step, lambda fo, msl: lambda: loss_fn(fo, msl, step)(meta_params, task))

    def meta_grad(meta_params, task, step):
        # the switch outside the gradient: each branch keeps only its own residuals
        grad = lambda fo, msl: lambda: jax.value_and_grad(loss_fn(fo, msl, step), has_aux=True)(meta_params, task)  # noqa: E731
        return switched(step, grad)

    def evaluate(meta_params, task, num_steps):
        _, metrics = mamlpp_meta_loss(meta_params, task, step_loss, num_inner_steps=num_steps, inner_lr=inner_lr)
        return metrics

    # A meta-loss only when the DA/MSL switches are static: a lax.cond inside the gradient
    # computes the residuals of every branch (the sinusoid trained 25-40% slower so,
    # experiments/results/bench/tried_2026-11-24.md), so while a switch can flip,
    # batched_meta_grad keeps the per-task gradients, each behind the cond.
    static = not (msl_switch or fo_switch)
    return Algorithm("maml++", init, meta_grad, evaluate, task_meta_loss if static else None)
