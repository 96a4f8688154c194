"""Outer loop: a train state, a jitted meta-train step and a chunked training loop.

``TrainState`` holds everything that evolves: the step, the meta-parameters, the optax state
and the base PRNG key (per-step keys are ``fold_in(rng, step)``, so a resumed run draws the
same tasks as an uninterrupted one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from maml_jax.types import Metrics, Params, Task


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    meta_params: Params
    opt_state: optax.OptState
    rng: jax.Array  # base key; never split in place


class NonFiniteLossError(FloatingPointError):
    """The meta-loss or its gradient became NaN/inf; ``step`` is the first bad step."""

    def __init__(self, step: int, metrics: dict):
        self.step, self.metrics = step, metrics
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        super().__init__(
            f"non-finite meta-loss or meta-gradient at step {step} ({shown}); the update of that "
            "step was skipped and the parameters are those after step "
            f"{step - 1}. Lower outer_lr/inner_lr, or check the data."
        )


def init_train_state(meta_params: Params, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), meta_params, optimizer.init(meta_params), rng)


def make_train_step(
    loss_fn: Callable[[Params, Task], tuple[jax.Array, Metrics]],
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, Task], tuple[TrainState, Metrics]]:
    """``train_step(state, tasks) -> (state, metrics)``: value_and_grad + optax update.

    ``loss_fn(meta_params, tasks) -> (loss, metrics)`` is typically ``batched_meta_loss`` with
    its keyword arguments bound. See ``make_train_step_from_grads`` for the rest."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    return make_train_step_from_grads(lambda params, tasks, step: grad_fn(params, tasks), optimizer)


def make_train_step_from_grads(
    meta_grad_fn: Callable[[Params, Task, jax.Array], tuple[tuple[jax.Array, Metrics], Params]],
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, Task], tuple[TrainState, Metrics]]:
    """``train_step(state, tasks) -> (state, metrics)`` from a meta-gradient estimator
    ``meta_grad_fn(meta_params, tasks, step) -> ((loss, metrics), grads)`` (e.g.
    ``algorithms.batched_meta_grad`` with the algorithm bound), followed by an optax update.

    A step whose loss or gradient is not finite leaves the parameters and optimizer state
    unchanged and reports ``metrics["finite"] = False``; the training loop turns that into
    ``NonFiniteLossError``. Not jitted here: wrap it in ``jax.jit`` (or a ``lax.scan``).
    """

    def train_step(state: TrainState, tasks: Task) -> tuple[TrainState, Metrics]:
        (loss, metrics), grads = meta_grad_fn(state.meta_params, tasks, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
        params = optax.apply_updates(state.meta_params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            state.step + 1,
            keep(params, state.meta_params),
            keep(opt_state, state.opt_state),
            state.rng,
        )
        return new_state, {**metrics, "meta_loss": loss, "grad_norm": grad_norm, "finite": finite}

    return train_step


def make_sampling_train_chunk(
    train_step: Callable[[TrainState, Task], tuple[TrainState, Metrics]],
    sample_fn: Callable[[jax.Array, Any], Task],
    length: int,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """``chunk(state, data)``: ``length`` train steps in one ``lax.scan``, the tasks of each
    step sampled on device by ``sample_fn(fold_in(state.rng, state.step), data)``; returns
    metrics stacked ``[length]``. ``data`` (e.g. the training images, or ``None``) is an
    argument rather than a closure so that it is not baked into the program. Jit it."""

    def chunk(state: TrainState, data: Any) -> tuple[TrainState, Metrics]:
        def body(state, _):
            tasks = sample_fn(jax.random.fold_in(state.rng, state.step), data)
            return train_step(state, tasks)

        return jax.lax.scan(body, state, None, length=length)

    return chunk


def raise_if_nonfinite(first_step: int, metrics: Metrics) -> None:
    """``metrics`` stacked over steps ``first_step, first_step+1, ...``; raises at the first
    step whose ``finite`` flag is False."""
    finite = jax.device_get(metrics["finite"])
    if finite.all():
        return
    i = int((~finite).argmax())
    at = {k: float(v[i]) for k, v in jax.device_get(metrics).items() if k != "finite"}
    raise NonFiniteLossError(first_step + i, at)
