"""Meta-LSTM (Ravi & Larochelle 2017): gradient preprocessing, the update rule and its
meta-gradient in closed form (gradients through the learner's gradients dropped, float64), and
short training runs on the sinusoid and an Omniglot subset."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algo_harness import omniglot_problem, sinusoid_problem, train_briefly

from maml_jax import mlp, mse_loss
from maml_jax.algorithms import meta_lstm
from maml_jax.algorithms.meta_lstm import preprocess
from maml_jax.data import sinusoid
from maml_jax.validation import HyperparameterError


def test_preprocess_follows_andrychowicz_appendix_a():
    x = jnp.array([2.0, -3e-3, 1e-6, -1e-6, 0.0])
    out = preprocess(x, p=10.0)
    np.testing.assert_allclose(out[0], [math.log(2.0) / 10, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out[1], [math.log(3e-3) / 10, -1.0], rtol=1e-6)
    np.testing.assert_allclose(out[2], [-1.0, math.exp(10) * 1e-6], rtol=1e-5)
    np.testing.assert_allclose(out[3], [-1.0, -math.exp(10) * 1e-6], rtol=1e-5)
    np.testing.assert_allclose(out[4], [-1.0, 0.0])
    assert out.shape == (5, 2)


def _one_step_problem(**alg_kwargs):
    """A float64 sinusoid task, a tanh MLP's loss and parameters, Meta-LSTM with one step
    (i = 0.2, f = σ(2)) and its meta-parameters with the gate weights at zero, so the gates are
    the constants ``(i, f)``: ``(loss, task, params, alg, meta, i, f)``."""
    model = mlp((5,), 1, activation="tanh")
    loss = mse_loss(model.apply)
    tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(4), 1, 5, 6)
    task = jax.tree.map(lambda a: a[0].astype(jnp.float64), tasks)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(0), task.support.x))
    alg = meta_lstm(loss, num_inner_steps=1, init_lr=0.2, forget_bias=2.0, **alg_kwargs)
    meta = alg.init(params)
    meta["lstm"]["w_input"] = jnp.zeros_like(meta["lstm"]["w_input"])
    meta["lstm"]["w_forget"] = jnp.zeros_like(meta["lstm"]["w_forget"])
    return loss, task, params, alg, meta, 0.2, 1 / (1 + math.exp(-2.0))


def test_one_step_update_and_meta_gradient_in_closed_form(x64):
    """With the gate weights at zero the gates are constants i = σ(b_I), f = σ(b_F), so
    θ_1 = f·θ_0 − i·g with g = ∇L_support(θ_0), and (dropping ∂g/∂θ_0 as the paper does)
    ∂L_q/∂θ_0 = f·∇L_q(θ_1), ∂L_q/∂b_I = −i(1−i)·⟨∇L_q(θ_1), g⟩, ∂L_q/∂b_F = f(1−f)·⟨∇L_q(θ_1), θ_0⟩."""
    loss, task, params, alg, meta, i, f = _one_step_problem()

    (value, metrics), grads = jax.jit(alg.meta_grad)(meta, task, jnp.int32(0))

    g = jax.grad(lambda p: loss(p, task.support)[0])(params)
    theta1 = jax.tree.map(lambda t, gg: f * t - i * gg, params, g)
    q_loss, gq = jax.value_and_grad(lambda p: loss(p, task.query)[0])(theta1)
    np.testing.assert_allclose(value, q_loss, rtol=1e-10)
    np.testing.assert_allclose(metrics["support_loss"], loss(params, task.support)[0], rtol=1e-12)
    dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # noqa: E731
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, f * b, rtol=1e-8, atol=1e-14), grads["learner"], gq)
    np.testing.assert_allclose(grads["lstm"]["b_input"], -i * (1 - i) * dot(gq, g), rtol=1e-8)
    np.testing.assert_allclose(grads["lstm"]["b_forget"], f * (1 - f) * dot(gq, params), rtol=1e-8)
    # with w = 0 the first LSTM does not reach the output, so its parameters get no gradient
    assert float(jnp.abs(grads["lstm"]["cell"]["kernel"]).max()) == 0.0
    # ... and with w != 0 they do
    (_, _), grads_full = jax.jit(alg.meta_grad)(alg.init(params), task, jnp.int32(0))
    assert float(jnp.abs(grads_full["lstm"]["cell"]["kernel"]).max()) > 0.0


@pytest.mark.parametrize("clip_factor", [0.3, 10.0])
def test_clipped_learner_gradient_bounds_the_step_in_closed_form(x64, clip_factor):
    """``max_grad_norm=c``: with the gate weights at zero, θ_1 = f·θ_0 − i·g·min(1, c/‖g‖); a
    clip outside the gradient's norm changes nothing (exactly)."""
    loss, task, params, plain, meta, i, f = _one_step_problem()
    g = jax.grad(lambda p: loss(p, task.support)[0])(params)
    norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))
    c = clip_factor * norm
    clipped = _one_step_problem(max_grad_norm=c)[3]
    theta1 = jax.tree.map(lambda t, gg: f * t - i * gg * min(1.0, c / norm), params, g)
    value = jax.jit(clipped.meta_grad)(meta, task, jnp.int32(0))[0][0]
    np.testing.assert_allclose(value, loss(theta1, task.query)[0], rtol=1e-10)
    unclipped = jax.jit(plain.meta_grad)(meta, task, jnp.int32(0))[0][0]
    if clip_factor > 1:
        assert float(value) == float(unclipped)
    else:
        assert abs(float(value) - float(unclipped)) > 1e-6


def test_bad_max_grad_norm_is_an_error():
    with pytest.raises(HyperparameterError, match="max_norm"):
        meta_lstm(mse_loss(mlp((5,), 1).apply), num_inner_steps=1, max_grad_norm=-1.0)


def test_trains_sinusoid():
    problem = sinusoid_problem(num_inner_steps=2)
    alg = meta_lstm(problem.task_loss_fn, num_inner_steps=2, hidden=8, init_lr=0.05)
    result = train_briefly(alg, problem, steps=200, outer_lr=3e-3)
    assert result.improved(margin=0.3), result[:2]


@pytest.mark.slow  # about a minute on 2 busy CPU cores
def test_trains_omniglot_subset(omniglot_subset):
    problem = omniglot_problem(omniglot_subset)
    alg = meta_lstm(problem.task_loss_fn, num_inner_steps=1, hidden=4, init_lr=0.1)
    result = train_briefly(alg, problem, steps=100, outer_lr=1e-3)
    assert result.improved(margin=0.1), result[:2]
