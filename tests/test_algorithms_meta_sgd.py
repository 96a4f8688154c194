"""Meta-SGD (Li et al. 2017): exact meta-gradient w.r.t. θ and α, equivalence with MAML, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algo_harness import omniglot_problem, sinusoid_problem, train_briefly
from jax.flatten_util import ravel_pytree
from test_core_math import fd_grad, regression_task, small_model

from maml_jax import HyperparameterError, mse_loss
from maml_jax.algorithms import init_step_sizes, maml, meta_sgd


def meta_sgd_setup(num_steps, init=(0.05, 0.3)):
    model, params = small_model("tanh")
    loss = mse_loss(model.apply)
    alg = meta_sgd(loss, num_inner_steps=num_steps, init_inner_lr=init, seed=3)
    return alg, alg.init(params), regression_task(jax.random.PRNGKey(0)), loss


def jit_meta_grad(alg, meta_params, task):
    return jax.jit(alg.meta_grad)(meta_params, task, jnp.int32(0))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("num_steps", [1, 2])
def test_meta_gradient_wrt_init_and_step_sizes_matches_finite_differences(num_steps):
    alg, meta_params, task, _ = meta_sgd_setup(num_steps)
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(meta_params))
    f = lambda mp: alg.meta_grad(mp, task, jnp.int32(0))[0][0]
    _, grads = jit_meta_grad(alg, meta_params, task)
    for part in ("model", "inner_lr"):
        analytic = np.asarray(ravel_pytree(grads[part])[0])
        numeric = fd_grad(lambda p, part=part: f({**meta_params, part: p}), meta_params[part])
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
        assert np.abs(analytic).max() > 1e-3  # non-trivial


@pytest.mark.usefixtures("x64")
def test_constant_step_sizes_equal_maml():
    alg, meta_params, task, loss = meta_sgd_setup(3, init=0.2)
    (value, metrics), grads = jit_meta_grad(alg, meta_params, task)
    (ref_value, ref_metrics), ref_grads = jit_meta_grad(
        maml(loss, num_inner_steps=3, inner_lr=0.2), meta_params["model"], task
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads["model"], ref_grads)
    np.testing.assert_allclose(
        alg.evaluate(meta_params, task, 5)["query_loss"],
        maml(loss, num_inner_steps=3, inner_lr=0.2).evaluate(meta_params["model"], task, 5)["query_loss"],
        rtol=1e-12,
    )


@pytest.mark.usefixtures("x64")
def test_zero_inner_steps_gives_the_plain_loss_and_no_step_size_gradient():
    alg, meta_params, task, loss = meta_sgd_setup(0)
    (value, _), grads = jit_meta_grad(alg, meta_params, task)
    np.testing.assert_allclose(value, loss(meta_params["model"], task.query)[0], rtol=1e-12)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["inner_lr"]))


@pytest.mark.usefixtures("x64")
def test_init_step_sizes_constant_range_and_errors():
    _, params = small_model("relu")
    const = init_step_sizes(params, 0.01)
    assert jax.tree.structure(const) == jax.tree.structure(params)
    assert all(
        bool(jnp.all(a == 0.01)) and a.shape == p.shape
        for a, p in zip(*map(jax.tree.leaves, (const, params)), strict=True)
    )
    drawn = jnp.concatenate([a.ravel() for a in jax.tree.leaves(init_step_sizes(params, (0.005, 0.1)))])
    assert float(drawn.min()) >= 0.005 and float(drawn.max()) <= 0.1 and float(drawn.std()) > 0.01
    with pytest.raises(HyperparameterError):
        init_step_sizes(params, (0.1, 0.01))
    with pytest.raises(HyperparameterError):
        meta_sgd(None, num_inner_steps=1, init_inner_lr=-1.0)


def test_meta_sgd_improves_the_sinusoid():
    problem = sinusoid_problem()
    alg = meta_sgd(problem.task_loss_fn, num_inner_steps=1, init_inner_lr=0.01)
    result = train_briefly(alg, problem, steps=300, outer_lr=1e-3)
    assert result.improved(margin=0.1), result[:2]


@pytest.mark.slow
def test_meta_sgd_improves_omniglot(omniglot_subset):
    problem = omniglot_problem(omniglot_subset)
    alg = meta_sgd(problem.task_loss_fn, num_inner_steps=1, init_inner_lr=0.4)
    result = train_briefly(alg, problem, steps=200, outer_lr=1e-3)
    assert result.improved(margin=0.05), result[:2]
