"""No recompilation after the first step: the jitted train step and the fused sampling chunk
trace once, however many times they are called (chex.assert_max_traces)."""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from maml_jax.core import batched_meta_loss
from maml_jax.data import sinusoid
from maml_jax.losses import cross_entropy_loss, mse_loss
from maml_jax.models import conv4, mlp
from maml_jax.train import init_train_state, make_sampling_train_chunk, make_train_step
from maml_jax.types import Batch, Task


def _sinusoid_step():
    model = mlp((8,), 1)
    objective = functools.partial(
        batched_meta_loss, task_loss_fn=mse_loss(model.apply), num_inner_steps=2, inner_lr=0.01
    )
    optimizer = optax.adam(1e-3)
    state = init_train_state(model.init(jax.random.PRNGKey(0), jnp.zeros((3, 1))), optimizer, jax.random.PRNGKey(1))
    return make_train_step(objective, optimizer), state


def sample(key, data):
    return sinusoid.sample_tasks(key, 2, 3, 3)


def test_train_step_traces_once():
    step, state = _sinusoid_step()
    step = jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=0)
    for i in range(4):  # new tasks, new state values each call
        state, metrics = step(state, sample(jax.random.PRNGKey(i), None))
    assert int(state.step) == 4 and bool(metrics["finite"])


def test_fused_chunk_traces_once():
    step, state = _sinusoid_step()
    chunk = jax.jit(make_sampling_train_chunk(chex.assert_max_traces(step, n=1), sample, 3), donate_argnums=0)
    for _ in range(3):
        state, metrics = chunk(state, None)
    assert int(state.step) == 9 and metrics["meta_loss"].shape == (3,)
    assert chunk._cache_size() == 1


@pytest.mark.slow
def test_conv4_train_step_traces_once():
    model = conv4(2, dataset="omniglot", conv_impl="patches")
    objective = functools.partial(
        batched_meta_loss, task_loss_fn=cross_entropy_loss(model.apply), num_inner_steps=1, inner_lr=0.1, task_map="map"
    )
    optimizer = optax.adam(1e-3)
    x = jnp.zeros((2, 2, 14, 14, 1))
    y = jnp.tile(jnp.arange(2), (2, 1))
    tasks = Task(Batch(x, y), Batch(x + 1, y))
    state = init_train_state(model.init(jax.random.PRNGKey(0), x[0]), optimizer, jax.random.PRNGKey(1))
    step = jax.jit(chex.assert_max_traces(make_train_step(objective, optimizer), n=1))
    for _ in range(3):
        state, _ = step(state, tasks)
    assert step._cache_size() == 1
