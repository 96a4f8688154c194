"""Sinusoid regression tasks (Finn et al. 2017, §5.1).

A task is y = A sin(x − φ) with amplitude A ~ U[0.1, 5.0], phase φ ~ U[0, π] and inputs
x ~ U[−5, 5]. Everything is a pure function of a PRNG key, so sampling runs inside ``jit``
and the same key always gives the same tasks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from maml_jax.types import Batch, Task

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, jnp.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidParams(NamedTuple):
    """Per-task function parameters, each ``[tasks]``."""

    amplitude: jax.Array
    phase: jax.Array


def sample_functions(key: jax.Array, num_tasks: int) -> SinusoidParams:
    ka, kp = jax.random.split(key)
    amplitude = jax.random.uniform(ka, (num_tasks,), minval=AMPLITUDE_RANGE[0], maxval=AMPLITUDE_RANGE[1])
    phase = jax.random.uniform(kp, (num_tasks,), minval=PHASE_RANGE[0], maxval=PHASE_RANGE[1])
    return SinusoidParams(amplitude, phase)


def evaluate_functions(fns: SinusoidParams, x: jax.Array) -> jax.Array:
    """``x: [tasks, n, 1] -> y: [tasks, n, 1]``."""
    return fns.amplitude[:, None, None] * jnp.sin(x - fns.phase[:, None, None])


def sample_inputs(key: jax.Array, num_tasks: int, num_points: int) -> jax.Array:
    return jax.random.uniform(key, (num_tasks, num_points, 1), minval=INPUT_RANGE[0], maxval=INPUT_RANGE[1])


def sample_tasks(key: jax.Array, num_tasks: int, num_support: int, num_query: int) -> Task:
    """Training tasks: support ``[tasks, num_support, 1]`` and query ``[tasks, num_query, 1]``,
    inputs drawn independently from U[−5, 5]."""
    kf, ks, kq = jax.random.split(key, 3)
    fns = sample_functions(kf, num_tasks)
    xs = sample_inputs(ks, num_tasks, num_support)
    xq = sample_inputs(kq, num_tasks, num_query)
    return Task(Batch(xs, evaluate_functions(fns, xs)), Batch(xq, evaluate_functions(fns, xq)))


def sample_eval_tasks(
    key: jax.Array, num_tasks: int, num_support: int, num_grid: int = 100
) -> tuple[Task, SinusoidParams]:
    """Evaluation tasks: random support points and a query grid of ``num_grid`` evenly spaced
    points over [−5, 5] (``[tasks, num_grid, 1]``). Also returns the true functions."""
    kf, ks = jax.random.split(key)
    fns = sample_functions(kf, num_tasks)
    xs = sample_inputs(ks, num_tasks, num_support)
    grid = jnp.linspace(*INPUT_RANGE, num_grid)[None, :, None]
    xq = jnp.broadcast_to(grid, (num_tasks, num_grid, 1))
    return Task(Batch(xs, evaluate_functions(fns, xs)), Batch(xq, evaluate_functions(fns, xq))), fns
