"""Run in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before
jax is imported): task-parallel meta-gradients and training over 1, 2, 4, 8 CPU devices equal
the single-device ones, and a task batch that does not split evenly over the devices is refused.
Prints one JSON line of max abs differences and of the errors raised for uneven batches; used
by test_parallel.py."""

import functools
import json
import sys

import jax
import optax

from maml_jax.core import batched_meta_loss
from maml_jax.data import sinusoid
from maml_jax.losses import mse_loss
from maml_jax.models import mlp
from maml_jax.parallel import (
    default_mesh,
    loss_to_meta_grad,
    make_sharded_train_chunk,
    make_sharded_train_step,
    replicate,
    shard_meta_grad,
)
from maml_jax.train import init_train_state, make_sampling_train_chunk, make_train_step


def max_diff(a, b) -> float:
    return max(float(abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def uneven_split_error(meta_grad, params, num_devices: int, num_tasks: int) -> dict | None:
    """The error ``shard_meta_grad`` over ``num_devices`` raises for ``num_tasks`` tasks
    (``{"type", "message"}``), or ``None`` when it computes a result."""
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(3), num_tasks, 5, 5)
    try:
        jax.block_until_ready(shard_meta_grad(meta_grad, default_mesh(num_devices))(params, tasks, 0))
    except Exception as err:  # reported, whatever it is, for the test to check
        return {"type": type(err).__name__, "message": str(err)}
    return None


def main(task_map: str, counts: list[int]) -> None:
    model = mlp((16, 16), 1)
    loss_fn = mse_loss(model.apply)
    objective = functools.partial(
        batched_meta_loss, task_loss_fn=loss_fn, num_inner_steps=2, inner_lr=0.01, task_map=task_map
    )
    optimizer = optax.adam(1e-2)
    params = model.init(jax.random.PRNGKey(0), jax.numpy.zeros((5, 1)))
    state0 = init_train_state(params, optimizer, jax.random.PRNGKey(1))
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(2), 8, 5, 5)
    sample = lambda key, data: sinusoid.sample_tasks(key, 8, 5, 5)  # noqa: E731
    meta_grad = loss_to_meta_grad(objective)

    (_, _), ref_grads = jax.jit(meta_grad)(params, tasks, 0)
    step = jax.jit(make_train_step(objective, optimizer))
    ref_state = state0
    for _ in range(3):
        ref_state, _ = step(ref_state, tasks)
    ref_chunk, _ = jax.jit(make_sampling_train_chunk(make_train_step(objective, optimizer), sample, 3))(state0, None)

    out = {"devices": jax.device_count()}
    # "devices/tasks": 3 tasks over 2 devices, 12 over 8 (more tasks than devices); the even
    # splits are the comparisons below
    out["uneven"] = {f"{d}/{t}": uneven_split_error(meta_grad, params, d, t) for d, t in ((2, 3), (8, 12))}
    for n in counts:
        mesh = default_mesh(n)
        (_, _), grads = jax.jit(shard_meta_grad(meta_grad, mesh))(params, tasks, 0)
        sstep = make_sharded_train_step(meta_grad, optimizer, mesh)
        state = replicate(state0, mesh)
        for _ in range(3):
            state, metrics = sstep(state, tasks)
        chunk_state, _ = make_sharded_train_chunk(meta_grad, optimizer, sample, 3, mesh)(replicate(state0, mesh), None)
        out[n] = {
            "grads": max_diff(grads, ref_grads),
            "train": max_diff(state.meta_params, ref_state.meta_params),
            "chunk": max_diff(chunk_state.meta_params, ref_chunk.meta_params),
            "moved": max_diff(state.meta_params, params),
            "step": int(state.step),
            "shards": len(state.meta_params["dense_0"]["kernel"].sharding.device_set),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], [int(n) for n in sys.argv[2].split(",")])
