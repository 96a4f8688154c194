"""Meta-gradients against central finite differences and closed forms, in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from maml_jax import Batch, Task, inner_adapt, meta_loss, mlp, mse_loss

pytestmark = pytest.mark.usefixtures("x64")


def fd_grad(f, params, eps=1e-6):
    """Central finite differences of a scalar ``f`` w.r.t. every coordinate of ``params``."""
    flat, unravel = ravel_pytree(params)
    f_flat = jax.jit(lambda v: f(unravel(v)))
    basis = np.eye(flat.size)
    return np.array([(f_flat(flat + eps * e) - f_flat(flat - eps * e)) / (2 * eps) for e in basis])


def regression_task(key, n_support=6, n_query=7):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    xs = jax.random.uniform(k1, (n_support, 1), minval=-2, maxval=2)
    xq = jax.random.uniform(k2, (n_query, 1), minval=-2, maxval=2)
    ys = jnp.sin(2 * xs) + 0.1 * jax.random.normal(k3, xs.shape)
    yq = jnp.sin(2 * xq) + 0.1 * jax.random.normal(k4, xq.shape)
    return Task(Batch(xs, ys), Batch(xq, yq))


def small_model(activation):
    model = mlp((6, 6), 1, activation=activation)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 1)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)  # flax initialises float32
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(params))
    return model, params


def flat_grad(f, params):
    return np.asarray(ravel_pytree(jax.grad(f)(params))[0])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("num_steps", [1, 3])
def test_second_order_meta_gradient_matches_finite_differences(activation, num_steps):
    model, params = small_model(activation)
    task = regression_task(jax.random.PRNGKey(0))
    loss = mse_loss(model.apply)
    f = lambda p: meta_loss(p, task, loss, num_inner_steps=num_steps, inner_lr=0.3)[0]
    analytic = flat_grad(f, params)
    numeric = fd_grad(f, params)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_hessian_term_is_large_enough_that_first_order_would_fail(num_steps):
    """With tanh the second-order term is far above the FD tolerance, so a silently
    first-order implementation could not pass the test above."""
    model, params = small_model("tanh")
    task = regression_task(jax.random.PRNGKey(0))
    loss = mse_loss(model.apply)
    full = lambda p: meta_loss(p, task, loss, num_inner_steps=num_steps, inner_lr=0.3)[0]
    fo = lambda p: meta_loss(p, task, loss, num_inner_steps=num_steps, inner_lr=0.3, first_order=True)[0]
    diff = np.abs(flat_grad(full, params) - flat_grad(fo, params)).max()
    assert diff > 1e-2 * np.abs(flat_grad(full, params)).max()


def linear_task(key, dim=4, n_support=9, n_query=11):
    k = jax.random.split(key, 5)
    w_true = jax.random.normal(k[0], (dim,))
    xs, xq = jax.random.normal(k[1], (n_support, dim)), jax.random.normal(k[2], (n_query, dim))
    ys = xs @ w_true + 0.1 * jax.random.normal(k[3], (n_support,))
    yq = xq @ w_true + 0.1 * jax.random.normal(k[4], (n_query,))
    return Task(Batch(xs, ys), Batch(xq, yq))


def linear_loss(theta, batch):
    return 0.5 * jnp.mean((batch.x @ theta - batch.y) ** 2), {}


def test_linear_regression_closed_form():
    """θ' = θ − α∇L_s(θ) is affine in θ, so ∇_θ L_q(θ') = (I − αH_s)ᵀ ∇L_q(θ') exactly."""
    task = linear_task(jax.random.PRNGKey(3))
    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    alpha = 0.2
    xs, ys = task.support
    xq, yq = task.query
    n_s, n_q = xs.shape[0], xq.shape[0]
    h_s = xs.T @ xs / n_s
    theta_prime = theta - alpha * (xs.T @ (xs @ theta - ys) / n_s)
    grad_q = xq.T @ (xq @ theta_prime - yq) / n_q
    expected = (jnp.eye(4) - alpha * h_s).T @ grad_q

    adapted, _ = inner_adapt(theta, task.support, linear_loss, num_inner_steps=1, inner_lr=alpha)
    np.testing.assert_allclose(adapted, theta_prime, rtol=1e-12)
    got = jax.grad(lambda t: meta_loss(t, task, linear_loss, num_inner_steps=1, inner_lr=alpha)[0])(theta)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)

    # K steps: θ_K = A^K θ + c with A = I − αH_s, so the meta-gradient is (A^K)ᵀ ∇L_q(θ_K).
    k_steps = 4
    a = jnp.eye(4) - alpha * h_s
    theta_k = theta
    for _ in range(k_steps):
        theta_k = theta_k - alpha * (xs.T @ (xs @ theta_k - ys) / n_s)
    expected_k = jnp.linalg.matrix_power(a, k_steps).T @ (xq.T @ (xq @ theta_k - yq) / n_q)
    got_k = jax.grad(lambda t: meta_loss(t, task, linear_loss, num_inner_steps=k_steps, inner_lr=alpha)[0])(theta)
    np.testing.assert_allclose(got_k, expected_k, rtol=1e-12, atol=1e-14)


def test_first_order_gradient_is_query_gradient_at_adapted_params_and_difference_is_hessian_term():
    model, params = small_model("tanh")
    task = regression_task(jax.random.PRNGKey(5))
    loss = mse_loss(model.apply)
    alpha = 0.3
    adapted, _ = inner_adapt(params, task.support, loss, num_inner_steps=1, inner_lr=alpha)
    g_query = flat_grad(lambda p: loss(p, task.query)[0], adapted)

    fomaml = flat_grad(
        lambda p: meta_loss(p, task, loss, num_inner_steps=1, inner_lr=alpha, first_order=True)[0], params
    )
    np.testing.assert_allclose(fomaml, g_query, rtol=1e-12, atol=1e-14)

    maml = flat_grad(lambda p: meta_loss(p, task, loss, num_inner_steps=1, inner_lr=alpha)[0], params)
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda v: loss(unravel(v), task.support)[0])(flat)
    np.testing.assert_allclose(maml - fomaml, -alpha * hessian @ g_query, rtol=1e-9, atol=1e-12)


def test_zero_inner_steps_is_the_plain_query_loss():
    model, params = small_model("tanh")
    task = regression_task(jax.random.PRNGKey(6))
    loss = mse_loss(model.apply)
    adapted, trace = inner_adapt(params, task.support, loss, num_inner_steps=0, inner_lr=0.1)
    assert trace["support_loss"].shape == (0,)
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), adapted, params)
    assert all(jax.tree.leaves(chex_equal))
    ml = functools.partial(meta_loss, task=task, task_loss_fn=loss, num_inner_steps=0, inner_lr=0.1)
    np.testing.assert_allclose(ml(params)[0], loss(params, task.query)[0], rtol=1e-14)


def test_inner_adapt_records_support_loss_before_each_step():
    model, params = small_model("tanh")
    task = regression_task(jax.random.PRNGKey(7))
    loss = mse_loss(model.apply)
    _, trace = inner_adapt(params, task.support, loss, num_inner_steps=3, inner_lr=0.1)
    p = params
    for k in range(3):
        value, g = jax.value_and_grad(lambda q: loss(q, task.support)[0])(p)
        np.testing.assert_allclose(trace["support_loss"][k], value, rtol=1e-10)
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
    assert trace["support_loss"][2] < trace["support_loss"][0]
