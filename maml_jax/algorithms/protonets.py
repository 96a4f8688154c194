"""Prototypical Networks (Snell, Swersky & Zemel 2017) as an ``Algorithm``: the metric-based
baseline. No inner loop: a task is solved by comparing query embeddings with class prototypes.

    c_k = (1/|S_k|) Σ_{(x, y) ∈ S, y = k} f_θ(x)                 (Eq. 1, prototypes)
    p(y = k | x) = softmax_k(−‖f_θ(x) − c_k‖²)                     (Eq. 2, squared Euclidean)
    J(θ) = −log p(y = y_q | x_q), averaged over the query set      (Algorithm 1)

``meta_params`` are the embedding's parameters (e.g. ``conv4(..., head=False)``); the
meta-gradient is ∇_θ J, and ``evaluate`` ignores ``num_inner_steps``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from maml_jax.algorithms.base import Algorithm, from_meta_loss
from maml_jax.types import Metrics, Params, Task
from maml_jax.validation import HyperparameterError, ShapeError, check_task

EmbedFn = Callable[[Params, jax.Array], jax.Array]  # (params, x [n, *features]) -> [n, d]


def prototypical_loss(
    params: Params, task: Task, embed_fn: EmbedFn, *, ways: int, embed_jointly: bool = True
) -> tuple[jax.Array, Metrics]:
    """One task's query cross-entropy with logits ``−‖f(x_q) − c_k‖²``.

    ``task.support.y`` / ``task.query.y``: integer labels in ``[0, ways)``. ``embed_jointly``:
    embed support and query in one batch ``[n_s + n_q, ...]`` (as the authors' code does; with
    transductive batch norm the statistics are the episode's); otherwise separately.
    Returns ``(loss, {"query_loss", "query_accuracy"})``.
    """
    check_task(task)
    s, q = task.support, task.query
    if s.y.ndim != 1 or q.y.ndim != 1:
        raise ShapeError(f"ProtoNets needs integer labels [n]; got support.y {s.y.shape}, query.y {q.y.shape}")
    if embed_jointly:
        z = embed_fn(params, jnp.concatenate([s.x, q.x]))
        zs, zq = z[: s.x.shape[0]], z[s.x.shape[0] :]
    else:
        zs, zq = embed_fn(params, s.x), embed_fn(params, q.x)
    onehot = jax.nn.one_hot(s.y, ways, dtype=zs.dtype)  # [n_s, ways]
    prototypes = (onehot.T @ zs) / jnp.maximum(onehot.sum(0), 1.0)[:, None]  # [ways, d]
    logits = -jnp.sum(jnp.square(zq[:, None, :] - prototypes[None]), axis=-1)  # [n_q, ways]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, q.y).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == q.y)
    return loss, {"query_loss": loss, "query_accuracy": accuracy}


def protonets(embed_fn: EmbedFn, *, ways: int, embed_jointly: bool = True) -> Algorithm:
    """Prototypical Networks over ``embed_fn(params, x) -> [n, d]`` for ``ways``-way tasks.
    ``meta_params`` are the embedding's parameters; ``step`` and ``num_inner_steps`` are ignored."""
    if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
        raise HyperparameterError(f"ways must be an int >= 1, got {ways!r}")

    def loss(params, task, num_steps):
        del num_steps  # no inner loop
        return prototypical_loss(params, task, embed_fn, ways=ways, embed_jointly=embed_jointly)

    return from_meta_loss("protonets", loss, 0)
