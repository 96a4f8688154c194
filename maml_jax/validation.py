"""Trace-time input checks with messages that name the offending array.

They run on shapes (static under ``jit``), so they cost nothing at run time. Errors are
``ValueError`` subclasses so callers can catch bad input separately from bugs.
"""

from __future__ import annotations

import math
from numbers import Real

import chex
import jax
import numpy as np

from maml_jax.types import Batch, Task


class ShapeError(ValueError):
    """An input array has the wrong rank or shape."""


class HyperparameterError(ValueError):
    """A hyper-parameter is out of its valid range (negative, NaN, inf, ...)."""


def _check(assertion, *args, message: str) -> None:
    try:
        assertion(*args)
    except AssertionError as err:  # chex raises AssertionError; bad input is a ValueError here
        raise ShapeError(f"{message} ({err})") from None


def check_batch(batch: Batch, name: str, *, task_axis: bool = False) -> None:
    """``batch.x: [*lead, n, *features]`` and ``batch.y: [*lead, n, *targets]`` with ``n > 0``.

    ``lead`` is ``[tasks]`` when ``task_axis`` else empty.
    """
    lead = 1 if task_axis else 0
    x, y = jax.numpy.asarray(batch.x), jax.numpy.asarray(batch.y)
    layout = "[tasks, examples, *features]" if task_axis else "[examples, *features]"
    if x.ndim < lead + 2:
        raise ShapeError(f"{name}.x has shape {x.shape} (rank {x.ndim}); expected rank >= {lead + 2}: {layout}")
    if y.ndim < lead + 1:
        raise ShapeError(
            f"{name}.y has shape {y.shape}; expected {'[tasks, examples, ...]' if task_axis else '[examples, ...]'}"
        )
    _check(
        chex.assert_equal_shape_prefix,
        [x, y],
        lead + 1,
        message=f"{name}.x {x.shape} and {name}.y {y.shape} must agree on the leading "
        f"{'[tasks, examples]' if task_axis else '[examples]'} axes",
    )
    if x.shape[lead] == 0:
        raise ShapeError(f"{name} set is empty: {name}.x has shape {x.shape}; expected at least one example")


def check_task(task: Task, *, task_axis: bool = False) -> None:
    """Support and query are non-empty and share feature shapes (and the task count)."""
    check_batch(task.support, "support", task_axis=task_axis)
    check_batch(task.query, "query", task_axis=task_axis)
    lead = 1 if task_axis else 0
    sx, qx = task.support.x, task.query.x
    if tuple(sx.shape[lead + 1 :]) != tuple(qx.shape[lead + 1 :]):
        raise ShapeError(
            f"support.x has feature shape {tuple(sx.shape[lead + 1 :])} but query.x has "
            f"{tuple(qx.shape[lead + 1 :])}; expected query.x of shape "
            f"{(*qx.shape[: lead + 1], *sx.shape[lead + 1 :])}"
        )
    if tuple(task.support.y.shape[lead + 1 :]) != tuple(task.query.y.shape[lead + 1 :]):
        raise ShapeError(
            f"support.y has target shape {tuple(task.support.y.shape[lead + 1 :])} but query.y has "
            f"{tuple(task.query.y.shape[lead + 1 :])}"
        )
    if task_axis and sx.shape[0] != qx.shape[0]:
        raise ShapeError(f"support has {sx.shape[0]} tasks but query has {qx.shape[0]} (axis 0 of .x)")


def check_learning_rate(value, name: str) -> None:
    """A concrete learning rate must be finite and >= 0; traced (learned) rates are not checked."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, Real) and not isinstance(value, bool):
        values = [float(value)]
    else:
        try:
            values = np.asarray(jax.device_get(value), dtype=np.float64).ravel().tolist()
        except (TypeError, ValueError):
            raise HyperparameterError(f"{name} must be a number, got {value!r}") from None
    for v in values:
        if not math.isfinite(v):
            raise HyperparameterError(f"{name} must be finite, got {v}")
        if v < 0:
            raise HyperparameterError(f"{name} must be >= 0, got {v}")


def check_num_steps(value, name: str = "num_inner_steps") -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise HyperparameterError(f"{name} must be a Python int (it sets the scan length), got {value!r}")
    if value < 0:
        raise HyperparameterError(f"{name} must be >= 0, got {value}")


def check_max_norm(max_norm) -> None:
    """``HyperparameterError`` unless ``max_norm`` is a finite number > 0 (a clip radius)."""
    if isinstance(max_norm, (bool, np.bool_)) or not isinstance(max_norm, (Real, np.floating, np.integer)):
        raise HyperparameterError(f"max_norm must be a number > 0, got {max_norm!r}")
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise HyperparameterError(f"max_norm must be finite and > 0, got {max_norm!r}")
