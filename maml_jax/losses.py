"""Task losses: build ``task_loss_fn(params, batch) -> (loss, aux)`` from a model's apply."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from maml_jax.types import Batch, Metrics, Params, TaskLossFn


def mse_loss(apply_fn: Callable[[Params, jax.Array], jax.Array]) -> TaskLossFn:
    """Mean squared error over examples (and output dims): ``mean((f(x) − y)²)``."""

    def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, Metrics]:
        pred = apply_fn(params, batch.x)
        return jnp.mean((pred - batch.y) ** 2), {}

    return loss_fn


def cross_entropy_loss(apply_fn: Callable[[Params, jax.Array], jax.Array]) -> TaskLossFn:
    """Softmax cross-entropy with integer labels ``y: [n]``; aux holds ``accuracy``."""

    def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, Metrics]:
        logits = apply_fn(params, batch.x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch.y)
        return loss, {"accuracy": accuracy}

    return loss_fn
