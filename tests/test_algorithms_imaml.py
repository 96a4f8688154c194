"""iMAML (Rajeswaran et al. 2019): Hessian-vector products, the CG solve against the dense
solve, the implicit gradient against unrolled differentiation of the proximal inner problem,
memory independent of the number of inner steps, and training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algo_harness import omniglot_problem, sinusoid_problem, train_briefly
from jax.flatten_util import ravel_pytree
from test_core_math import regression_task, small_model

from maml_jax import Batch, HyperparameterError, Task, meta_loss, mlp, mse_loss
from maml_jax.algorithms import hessian_vector_product, imaml, implicit_meta_gradient, maml
from maml_jax.inner_updates import proximal, sgd


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def dense_hessian(loss, params, batch):
    vec, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda v: loss(unravel(v), batch)[0])(vec))


@pytest.mark.usefixtures("x64")
def test_hessian_vector_product_matches_the_dense_hessian():
    model, params = small_model("tanh")
    loss, task = mse_loss(model.apply), regression_task(jax.random.PRNGKey(0))
    v = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(7), p.shape, p.dtype), params)
    hv = jax.jit(hessian_vector_product, static_argnums=0)(loss, params, task.support, v)
    np.testing.assert_allclose(flat(hv), dense_hessian(loss, params, task.support) @ flat(v), rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("cg_damping", [0.0, 0.5])
def test_implicit_gradient_matches_the_dense_solve(cg_damping):
    """v = ((1 + damping) I + H/λ)^{-1} ∇L_query(φ) with H the support Hessian at φ = the iMAML
    adapted parameters, on a 61-parameter tanh MLP; CG run to convergence."""
    model, params = small_model("tanh")
    loss, task = mse_loss(model.apply), regression_task(jax.random.PRNGKey(0))
    h = dense_hessian(loss, params, task.support)
    lam = max(1.0, -2.0 * float(np.linalg.eigvalsh(h).min()))  # operator positive definite
    n = h.shape[0]
    alg = imaml(loss, num_inner_steps=3, inner_lr=0.1, prox_lambda=lam, cg_iters=3 * n, cg_damping=cg_damping)
    (value, metrics), grads = jax.jit(alg.meta_grad)(params, task, jnp.int32(0))
    # the adapted parameters: 3 steps of GD on the proximal objective, from θ
    phi = params
    for _ in range(3):
        g = jax.grad(lambda p: loss(p, task.support)[0])(phi)
        phi = jax.tree.map(lambda p, gi, t: p - 0.1 * (gi + lam * (p - t)), phi, g, params)
    (q_loss, _), q_grad = jax.value_and_grad(loss, has_aux=True)(phi, task.query)
    np.testing.assert_allclose(value, q_loss, rtol=1e-12)
    h_phi = dense_hessian(loss, phi, task.support)
    exact = np.linalg.solve((1 + cg_damping) * np.eye(n) + h_phi / lam, flat(q_grad))
    np.testing.assert_allclose(flat(grads), exact, rtol=1e-6, atol=1e-9)
    assert np.abs(exact - flat(q_grad)).max() > 1e-3  # the correction is not negligible


def linear_regression_loss(params, batch):
    """½ mean (x·w − y)²: quadratic in w with Hessian XᵀX/n."""
    return 0.5 * jnp.mean((batch.x @ params["w"] - batch.y) ** 2), {}


def quadratic_task(key, dim=5, n_support=3, n_query=8):
    ks = jax.random.split(key, 4)
    xs, xq = jax.random.normal(ks[0], (n_support, dim)), jax.random.normal(ks[1], (n_query, dim))
    w = jax.random.normal(ks[2], (dim,))
    return Task(Batch(xs, xs @ w + 0.1), Batch(xq, xq @ w + 0.3 * jax.random.normal(ks[3], (n_query,))))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_implicit_gradient_equals_unrolled_differentiation_of_the_converged_proximal_problem(lam):
    """On a quadratic support loss, K → ∞ GD steps reach φ*(θ) = argmin L_s(φ) + λ/2‖φ − θ‖²
    exactly; backprop through those unrolled steps (anchor included) gives dφ*/dθ = λ(H + λI)^{-1},
    which is what the implicit gradient computes without unrolling."""
    task = quadratic_task(jax.random.PRNGKey(0))
    theta = {"w": jax.random.normal(jax.random.PRNGKey(1), (5,))}
    steps, lr = 400, 0.2
    alg = imaml(linear_regression_loss, num_inner_steps=steps, inner_lr=lr, prox_lambda=lam, cg_iters=5)
    (value, _), grads = jax.jit(alg.meta_grad)(theta, task, jnp.int32(0))

    def unrolled(t):
        update = proximal(sgd(lr), t, lam)  # the anchor is θ itself, so it is differentiated too
        return meta_loss(t, task, linear_regression_loss, num_inner_steps=steps, inner_update_fn=update)[0]

    ref_value, ref_grads = jax.jit(jax.value_and_grad(unrolled))(theta)
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    np.testing.assert_allclose(grads["w"], ref_grads["w"], rtol=1e-8, atol=1e-12)
    # closed form: φ* = (H + λI)^{-1}(Xᵀy/n + λθ), g = λ(H + λI)^{-1} ∇L_q(φ*)
    x, y = np.asarray(task.support.x), np.asarray(task.support.y)
    h = x.T @ x / len(x)
    phi = np.linalg.solve(h + lam * np.eye(5), x.T @ y / len(x) + lam * np.asarray(theta["w"]))
    xq, yq = np.asarray(task.query.x), np.asarray(task.query.y)
    q_grad = xq.T @ (xq @ phi - yq) / len(xq)
    np.testing.assert_allclose(grads["w"], lam * np.linalg.solve(h + lam * np.eye(5), q_grad), rtol=1e-8)


@pytest.mark.usefixtures("x64")
def test_large_lambda_approaches_the_plain_query_gradient_like_maml_with_a_tiny_step():
    """λ → ∞ pins φ to θ: the implicit gradient tends to ∇L_query(θ), as does MAML's as α → 0."""
    task = quadratic_task(jax.random.PRNGKey(2))
    theta = {"w": jnp.ones(5)}
    _, g_imaml = imaml(linear_regression_loss, num_inner_steps=3, inner_lr=1e-6, prox_lambda=1e6).meta_grad(
        theta, task, jnp.int32(0)
    )
    _, g_maml = maml(linear_regression_loss, num_inner_steps=1, inner_lr=1e-8).meta_grad(theta, task, jnp.int32(0))
    _, g_plain = jax.value_and_grad(linear_regression_loss, has_aux=True)(theta, task.query)
    np.testing.assert_allclose(g_imaml["w"], g_maml["w"], rtol=1e-4)
    np.testing.assert_allclose(g_imaml["w"], g_plain["w"], rtol=1e-4)


@pytest.mark.usefixtures("x64")
def test_zero_inner_steps_gives_the_plain_loss():
    model, params = small_model("tanh")
    loss, task = mse_loss(model.apply), regression_task(jax.random.PRNGKey(0))
    alg = imaml(loss, num_inner_steps=0, inner_lr=0.1, prox_lambda=1.0)
    np.testing.assert_allclose(alg.evaluate(params, task, 0)["query_loss"], loss(params, task.query)[0], rtol=1e-12)
    (value, _), _ = alg.meta_grad(params, task, jnp.int32(0))
    np.testing.assert_allclose(value, loss(params, task.query)[0], rtol=1e-12)


def test_memory_does_not_grow_with_the_number_of_inner_steps():
    model = mlp((16, 16), 1)
    task = regression_task(jax.random.PRNGKey(0), 10, 10)
    params = model.init(jax.random.PRNGKey(0), task.support.x)
    loss = mse_loss(model.apply)

    def temp_bytes(make, steps):
        alg = make(loss, num_inner_steps=steps, inner_lr=0.01)
        analysis = jax.jit(alg.meta_grad).lower(params, task, jnp.int32(0)).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    assert temp_bytes(imaml, 50) <= temp_bytes(imaml, 2) * 1.05 + 1024
    assert temp_bytes(maml, 50) > 5 * temp_bytes(maml, 2)  # unrolled MAML stores every step


@pytest.mark.usefixtures("x64")
def test_a_given_inner_update_rule_receives_the_proximal_gradient():
    task = quadratic_task(jax.random.PRNGKey(3))
    theta = {"w": jnp.ones(5)}
    by_lr = imaml(linear_regression_loss, num_inner_steps=4, inner_lr=0.1, prox_lambda=2.0)
    by_rule = imaml(linear_regression_loss, num_inner_steps=4, inner_update_fn=sgd(0.1), prox_lambda=2.0)
    (v1, m1), g1 = by_lr.meta_grad(theta, task, jnp.int32(0))
    (v2, m2), g2 = by_rule.meta_grad(theta, task, jnp.int32(0))
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    np.testing.assert_allclose(g1["w"], g2["w"], rtol=1e-12)
    np.testing.assert_allclose(by_rule.evaluate(theta, task, 4)["query_loss"], v1, rtol=1e-12)


def test_bad_hyperparameters_raise():
    with pytest.raises(HyperparameterError, match="prox_lambda"):
        imaml(linear_regression_loss, num_inner_steps=1, inner_lr=0.1, prox_lambda=0.0)
    with pytest.raises(HyperparameterError, match="exactly one"):
        imaml(linear_regression_loss, num_inner_steps=1)
    with pytest.raises(HyperparameterError, match="cg_iters"):
        implicit_meta_gradient(linear_regression_loss, {}, None, {}, prox_lambda=1.0, cg_iters=-1)


def test_imaml_improves_the_sinusoid():
    problem = sinusoid_problem(num_inner_steps=5)
    alg = imaml(problem.task_loss_fn, num_inner_steps=5, inner_lr=0.02, prox_lambda=10.0, cg_iters=5)
    result = train_briefly(alg, problem, steps=300, outer_lr=3e-3)
    assert result.improved(margin=0.1), result[:2]


@pytest.mark.slow
def test_imaml_improves_omniglot(omniglot_subset):
    problem = omniglot_problem(omniglot_subset, num_inner_steps=3)
    alg = imaml(problem.task_loss_fn, num_inner_steps=3, inner_lr=0.2, prox_lambda=1.0, cg_iters=3, cg_damping=0.1)
    result = train_briefly(alg, problem, steps=200)
    assert result.improved(margin=0.05), result[:2]
