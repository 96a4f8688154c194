"""Data types shared by every module: a labelled batch and a task (support + query).

Shapes follow one convention throughout the library:

* a single task's batch: ``x: [examples, *features]``, ``y: [examples, *targets]``;
* a meta-batch of tasks adds a leading task axis: ``[tasks, examples, *features]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any  # a pytree of arrays (e.g. flax ``params`` dict)
PyTree = Any
Metrics = dict[str, jax.Array]


class Batch(NamedTuple):
    """Inputs and targets of one task split: ``x: [n, *features]``, ``y: [n, *targets]``."""

    x: jax.Array
    y: jax.Array


class Task(NamedTuple):
    """One few-shot task: the support set adapts, the query set scores the adaptation."""

    support: Batch
    query: Batch


# task_loss_fn(params, batch) -> (scalar loss, aux metrics dict)
TaskLossFn = Callable[[Params, Batch], tuple[jax.Array, Metrics]]
# inner_update_fn(params, grads, step_index) -> new params
InnerUpdateFn = Callable[[Params, Params, jax.Array], Params]
