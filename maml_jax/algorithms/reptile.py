"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms", Alg. 1-2).

For each task, k steps of SGD (or Adam, as in the paper's experiments, with β1 = 0) on the
task's data in inner minibatches, from θ, give φ = U^k_τ(θ); the outer "gradient" is

    g = θ − φ,          so that  optax.sgd(ε):  θ ← θ − ε g = θ + ε (φ − θ)

(averaged over the task batch: the batched version, Algorithm 2). Nothing is differentiated:
the inner loop (``core.inner_adapt``) runs on ``stop_gradient(θ)``.

Minibatches: inner step t uses rows ``index[t]`` of the task's data, ``index: [k, batch]``
from consecutive random permutations of the n examples (each epoch sees every example once,
as the paper's ``_mini_batches``), drawn from ``fold_in(PRNGKey(seed), outer_step)`` (the same
permutation pattern for every task of a batch; the tasks' data differ). Adam's moments ride in
the ``lax.scan`` carry beside the parameters: ``{"params": θ, "mu": m, "nu": v}``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from maml_jax.algorithms.base import Algorithm
from maml_jax.core import inner_adapt
from maml_jax.types import Batch, Params, Task, TaskLossFn
from maml_jax.validation import HyperparameterError, check_learning_rate, check_num_steps

InnerOptimizer = Literal["sgd", "adam"]
InnerData = Literal["support", "support+query"]


def minibatch_indices(key: jax.Array, num_examples: int, num_steps: int, batch_size: int) -> jax.Array:
    """``int32 [num_steps, batch_size]``: consecutive random permutations of
    ``range(num_examples)``, cut into minibatches (every epoch covers each example once)."""
    epochs = -(-num_steps * batch_size // num_examples)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_examples))(jax.random.split(key, epochs))
    return perms.reshape(-1)[: num_steps * batch_size].reshape(num_steps, batch_size).astype(jnp.int32)


def _adam_update(inner_lr: float, b1: float, b2: float, eps: float):
    """Adam (Kingma & Ba 2015, Alg. 1) on the carry ``{"params", "mu", "nu"}``; the bias
    correction uses the inner step index t (0-based) as the step count t + 1."""

    def update(carry, grads, step):
        g = grads["params"]
        mu = jax.tree.map(lambda m, gi: b1 * m + (1 - b1) * gi, carry["mu"], g)
        nu = jax.tree.map(lambda v, gi: b2 * v + (1 - b2) * gi * gi, carry["nu"], g)
        t = (step + 1).astype(jnp.result_type(float))
        c1, c2 = 1 - b1**t, 1 - b2**t
        params = jax.tree.map(
            lambda p, m, v: p - inner_lr * (m / c1) / (jnp.sqrt(v / c2) + eps), carry["params"], mu, nu
        )
        return {"params": params, "mu": mu, "nu": nu}

    return update


def _sgd_update(inner_lr: float):
    def update(carry, grads, step):
        del step
        return {"params": jax.tree.map(lambda p, g: p - inner_lr * g, carry["params"], grads["params"])}

    return update


def reptile(
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float,
    inner_batch_size: int | None = None,
    inner_optimizer: InnerOptimizer = "sgd",
    adam_b1: float = 0.0,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    inner_data: InnerData = "support",
    seed: int = 0,
) -> Algorithm:
    """Reptile as an ``Algorithm``; ``meta_params`` are the model's parameters θ.

    Args:
      num_inner_steps: k inner steps per task at meta-training.
      inner_lr: the inner step size (SGD's α, or Adam's learning rate; the paper: Adam 0.001).
      inner_batch_size: examples per inner step (the paper: 10 on Omniglot); ``None`` uses the
        whole task data every step. May exceed n (minibatches then repeat examples).
      inner_optimizer: ``"sgd"`` or ``"adam"`` (moments reset for every task; β1 = 0 as in
        the paper's code).
      inner_data: train the inner loop on the ``"support"`` set, or on support and query
        together (``"support+query"``: all of a training task's examples, as in the paper).
      seed: seeds the minibatch permutations (folded with the outer step).

    ``meta_grad`` returns ``θ − φ`` and the query metrics of φ (``core.meta_loss``'s names);
    ``evaluate(θ, task, n)`` adapts on the support set with the same inner rule for n steps.
    """
    check_num_steps(num_inner_steps)
    check_learning_rate(inner_lr, "inner_lr")
    if inner_optimizer not in ("sgd", "adam"):
        raise HyperparameterError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
    if inner_data not in ("support", "support+query"):
        raise HyperparameterError(f"inner_data must be 'support' or 'support+query', got {inner_data!r}")
    if inner_batch_size is not None and (isinstance(inner_batch_size, bool) or int(inner_batch_size) < 1):
        raise HyperparameterError(f"inner_batch_size must be a positive int or None, got {inner_batch_size!r}")
    if not (0 <= adam_b1 < 1 and 0 <= adam_b2 < 1 and adam_eps > 0):
        raise HyperparameterError(
            f"need 0 <= adam_b1, adam_b2 < 1 and adam_eps > 0, got {adam_b1}, {adam_b2}, {adam_eps}"
        )
    if inner_optimizer == "adam":
        update = _adam_update(inner_lr, adam_b1, adam_b2, adam_eps)
    else:
        update = _sgd_update(inner_lr)

    def adapt(theta: Params, data: Batch, num_steps: int, key: jax.Array) -> tuple[Params, jax.Array]:
        """φ after ``num_steps`` inner steps on ``data`` and the loss before the first step."""
        carry = {"params": jax.lax.stop_gradient(theta)}
        if inner_optimizer == "adam":
            carry["mu"] = jax.tree.map(jnp.zeros_like, carry["params"])
            carry["nu"] = jax.tree.map(jnp.zeros_like, carry["params"])
        if inner_batch_size is None:
            loss_fn, takes_step = (lambda c, batch: task_loss_fn(c["params"], batch)), False
        else:
            index = minibatch_indices(key, data.x.shape[0], max(num_steps, 1), int(inner_batch_size))

            def loss_fn(c, batch, step):
                rows = index[step]
                return task_loss_fn(c["params"], Batch(batch.x[rows], batch.y[rows]))

            takes_step = True
        carry, trace = inner_adapt(
            carry,
            data,
            loss_fn,
            num_inner_steps=num_steps,
            inner_update_fn=update,
            first_order=True,
            loss_takes_step=takes_step,
        )
        return carry["params"], trace["support_loss"]

    def query_metrics(adapted, task, support_losses):
        loss, aux = task_loss_fn(adapted, task.query)
        metrics = {"query_loss": loss, **{f"query_{k}": v for k, v in aux.items()}}
        if support_losses.shape[0] > 0:
            metrics["support_loss"] = support_losses[0]
        return loss, metrics

    def meta_grad(meta_params, task: Task, step):
        data = task.support
        if inner_data == "support+query":
            data = jax.tree.map(lambda s, q: jnp.concatenate([s, q]), task.support, task.query)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        adapted, support_losses = adapt(meta_params, data, num_inner_steps, key)
        grads = jax.tree.map(lambda t, a: jax.lax.stop_gradient(t) - a, meta_params, adapted)
        return query_metrics(adapted, task, support_losses), grads

    def evaluate(meta_params, task: Task, num_steps):
        adapted, support_losses = adapt(meta_params, task.support, num_steps, jax.random.PRNGKey(seed))
        return query_metrics(adapted, task, support_losses)[1]

    return Algorithm("reptile", lambda params: params, meta_grad, evaluate)
