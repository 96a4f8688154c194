"""Bad input gets an error that names the problem."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maml_jax import (
    Batch,
    HyperparameterError,
    NonFiniteLossError,
    ShapeError,
    Task,
    batched_meta_loss,
    init_train_state,
    inner_adapt,
    make_train_step,
    meta_loss,
    mlp,
    mse_loss,
)
from maml_jax.config import Config, ConfigError, apply_overrides
from maml_jax.train import make_sampling_train_chunk, raise_if_nonfinite

MODEL = mlp((8,), 1)
PARAMS = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
LOSS = mse_loss(MODEL.apply)


def task(n_s=5, n_q=6, feat_s=1, feat_q=1):
    return Task(Batch(jnp.ones((n_s, feat_s)), jnp.ones((n_s, 1))), Batch(jnp.ones((n_q, feat_q)), jnp.ones((n_q, 1))))


def test_mismatched_feature_shapes():
    with pytest.raises(ShapeError, match=r"support.x has feature shape \(1,\) but query.x has \(2,\)"):
        meta_loss(PARAMS, task(feat_q=2), LOSS, num_inner_steps=1, inner_lr=0.1)


def test_wrong_rank():
    bad = Task(Batch(jnp.ones((5,)), jnp.ones((5,))), task().query)
    with pytest.raises(ShapeError, match=r"support.x has shape \(5,\).*expected rank >= 2"):
        meta_loss(PARAMS, bad, LOSS, num_inner_steps=1, inner_lr=0.1)
    with pytest.raises(ShapeError, match=r"support.x .* expected rank >= 3: \[tasks, examples, \*features\]"):
        batched_meta_loss(PARAMS, task(), LOSS, num_inner_steps=1, inner_lr=0.1)


def test_x_and_y_disagree_on_examples():
    bad = Task(Batch(jnp.ones((5, 1)), jnp.ones((4, 1))), task().query)
    with pytest.raises(ShapeError, match=r"support.x \(5, 1\) and support.y \(4, 1\)"):
        meta_loss(PARAMS, bad, LOSS, num_inner_steps=1, inner_lr=0.1)


def test_empty_support_set():
    with pytest.raises(ShapeError, match="support set is empty"):
        meta_loss(PARAMS, task(n_s=0), LOSS, num_inner_steps=1, inner_lr=0.1)


def test_task_counts_must_agree():
    t = task()
    batched = Task(
        jax.tree.map(lambda a: jnp.stack([a] * 3), t.support), jax.tree.map(lambda a: jnp.stack([a] * 2), t.query)
    )
    with pytest.raises(ShapeError, match="support has 3 tasks but query has 2"):
        batched_meta_loss(PARAMS, batched, LOSS, num_inner_steps=1, inner_lr=0.1)


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), np.float32(-1)])
def test_bad_learning_rates(lr):
    with pytest.raises(HyperparameterError, match="inner_lr must be"):
        inner_adapt(PARAMS, task().support, LOSS, num_inner_steps=1, inner_lr=lr)


@pytest.mark.parametrize("steps", [-1, 1.5, True])
def test_bad_step_counts(steps):
    with pytest.raises(HyperparameterError, match="num_inner_steps"):
        inner_adapt(PARAMS, task().support, LOSS, num_inner_steps=steps, inner_lr=0.1)


def test_nonfinite_loss_stops_training_at_the_bad_step_with_params_intact():
    optimizer = optax.adam(1e-2)
    f = functools.partial(batched_meta_loss, task_loss_fn=LOSS, num_inner_steps=1, inner_lr=0.1)
    good = jax.tree.map(lambda a: jnp.stack([a] * 2), task())

    sample = lambda key, data: good
    step_fn = make_train_step(f, optimizer)

    def poisoned(state, tasks):  # query targets become NaN from step 3 on
        nan_y = jnp.where(state.step >= 3, jnp.nan, 1.0)
        tasks = tasks._replace(query=tasks.query._replace(y=tasks.query.y * nan_y))
        return step_fn(state, tasks)

    state = init_train_state(PARAMS, optimizer, jax.random.PRNGKey(0))
    chunk = jax.jit(make_sampling_train_chunk(poisoned, sample, 5))
    new_state, metrics = chunk(state, None)
    assert list(np.asarray(metrics["finite"])) == [True, True, True, False, False]
    with pytest.raises(NonFiniteLossError, match="non-finite meta-loss or meta-gradient at step 3") as err:
        raise_if_nonfinite(0, metrics)
    assert err.value.step == 3
    # the parameters are those after the last good step (step 2): no NaN leaked into them
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(new_state.meta_params))
    after_three = jax.jit(make_sampling_train_chunk(poisoned, sample, 3))(state, None)[0]
    for a, b in zip(jax.tree.leaves(new_state.meta_params), jax.tree.leaves(after_three.meta_params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'inner_learning_rate'"):
        apply_overrides(Config(), {"inner_learning_rate": "0.1"})
    with pytest.raises(ConfigError, match=r"config.num_inner_steps: cannot read 'two' as int"):
        apply_overrides(Config(), {"num_inner_steps": "two"})
    with pytest.raises(ConfigError, match=r"config.num_inner_steps must be >= 0"):
        apply_overrides(Config(), {"num_inner_steps": "-1"})
    with pytest.raises(ConfigError, match=r"config.inner_lr must be finite and >= 0"):
        apply_overrides(Config(), {"inner_lr": "nan"})
    assert apply_overrides(Config(), {"eval_shots": "5,10", "first_order": "true"}).eval_shots == (5, 10)
    with pytest.raises(
        ConfigError, match=r"config.conv_impl must be 'auto' or one of \['lax', 'patches', 'patches_per_image'\]"
    ):
        apply_overrides(Config(), {"conv_impl": "fft"})
    for impl in ("auto", "patches_per_image"):
        assert apply_overrides(Config(), {"conv_impl": impl}).conv_impl == impl
