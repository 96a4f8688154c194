"""Task-parallel meta-training over a device mesh (data parallelism on the task axis).

The meta-batch ``[T, ...]`` of tasks is split over the ``D`` devices of a 1-D mesh (axis
``"tasks"``); every device holds a full copy of the meta-parameters and optimizer state
(replicated), computes the meta-gradient of its ``T/D`` tasks, and the gradients, loss and
metrics are averaged across devices with ``lax.pmean`` before the (replicated) optax update:

    g = (1/D) Σ_d (1/(T/D)) Σ_{i ∈ shard d} ∇_θ L_i(θ) = (1/T) Σ_i ∇_θ L_i(θ)

which is exactly the single-device meta-gradient of ``batched_meta_loss`` (a mean over tasks),
so 1, 2, 4, 8 devices train the same trajectory up to float summation order. Implemented with
``jax.shard_map`` so that the per-device program is the ordinary single-device step (its
``task_map``, ``lax.map`` or ``vmap``, runs over the local shard).

Multi-host (TPU pods, multi-GPU nodes): call ``jax.distributed.initialize()`` on every process
first (``host.init_distributed``, ``maml-jax train --distributed``); ``default_mesh()`` then
spans ``jax.devices()`` of all hosts and each process feeds the same global task batch (or
samples it on device from the same key, as the training chunk does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maml_jax.train import TrainState, make_sampling_train_chunk, make_train_step_from_grads
from maml_jax.types import Metrics, Params, Task
from maml_jax.validation import HyperparameterError, ShapeError

AXIS = "tasks"
MetaGradFn = Callable[[Params, Task, jax.Array], tuple[tuple[jax.Array, Metrics], Params]]


def default_mesh(num_devices: int | None = None, axis_name: str = AXIS) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` of ``jax.devices()`` (all by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise HyperparameterError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
    return Mesh(np.asarray(devices[:n]), (axis_name,))


def _check_divisible(tasks: Task, n: int) -> None:
    t = jax.tree.leaves(tasks)[0].shape[0]
    if t % n:
        raise ShapeError(f"the task batch ({t} tasks) must divide evenly over {n} devices")


def shard_meta_grad(meta_grad_fn: MetaGradFn, mesh: Mesh, axis_name: str = AXIS) -> MetaGradFn:
    """``meta_grad_fn(params, tasks [T, ...], step) -> ((loss, metrics), grads)`` computed with
    the tasks split over ``mesh`` and the results ``pmean``-ed: params/step replicated, tasks
    sharded on their leading axis. ``T`` must be a multiple of the mesh size."""

    def local(params, tasks, step):
        out = meta_grad_fn(params, tasks, step)
        # average floating leaves; integer/bool metrics (equal on every device) pass through
        mean = lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x  # noqa: E731
        return jax.tree.map(mean, out)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis_name), P()), out_specs=P(), check_vma=False)

    def fn(params, tasks, step):
        _check_divisible(tasks, mesh.shape[axis_name])
        return sharded(params, tasks, step)

    return fn


def loss_to_meta_grad(loss_fn: Callable[[Params, Task], tuple[jax.Array, Metrics]]) -> MetaGradFn:
    """``batched_meta_loss``-style ``loss_fn(params, tasks) -> (loss, metrics)`` as a
    meta-gradient estimator ``(params, tasks, step) -> ((loss, metrics), grads)``."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    return lambda params, tasks, step: grad_fn(params, tasks)


def make_sharded_train_step(
    meta_grad_fn: MetaGradFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    axis_name: str = AXIS,
) -> Callable[[TrainState, Task], tuple[TrainState, Metrics]]:
    """A jitted ``train_step(state, tasks)`` whose meta-gradient is computed task-parallel over
    ``mesh`` (default: all devices). ``meta_grad_fn`` as in ``make_train_step_from_grads``
    (``loss_to_meta_grad(objective)`` for a plain objective). The state stays replicated."""
    mesh = default_mesh(axis_name=axis_name) if mesh is None else mesh
    step = make_train_step_from_grads(shard_meta_grad(meta_grad_fn, mesh, axis_name), optimizer)
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P(axis_name))), out_shardings=replicated)


def make_sharded_train_chunk(
    meta_grad_fn: MetaGradFn,
    optimizer: optax.GradientTransformation,
    sample_fn: Callable[[jax.Array, Any], Task],
    length: int,
    mesh: Mesh | None = None,
    axis_name: str = AXIS,
    donate: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """``make_sampling_train_chunk`` with the task-parallel step: ``length`` steps in one
    jitted ``lax.scan``, each sampling its tasks on device and sharding them over ``mesh``.
    ``donate``: reuse the input state's buffers for the output (the caller must not read the
    state it passed in again)."""
    mesh = default_mesh(axis_name=axis_name) if mesh is None else mesh
    step = make_train_step_from_grads(shard_meta_grad(meta_grad_fn, mesh, axis_name), optimizer)
    replicated = NamedSharding(mesh, P())
    chunk = make_sampling_train_chunk(step, sample_fn, length)
    return jax.jit(chunk, out_shardings=replicated, donate_argnums=0 if donate else ())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place ``tree`` (e.g. a ``TrainState``) replicated on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))
