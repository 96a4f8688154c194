"""Reptile (Nichol et al. 2018): closed forms of its outer "gradient" θ − φ, the Adam inner
loop against optax, minibatching, the outer update θ + ε(φ − θ), and training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from algo_harness import omniglot_problem, sinusoid_problem, train_briefly
from test_core_math import regression_task, small_model

from maml_jax import HyperparameterError, Task, init_train_state, inner_adapt, mse_loss
from maml_jax.algorithms import batched_meta_grad, minibatch_indices, reptile
from maml_jax.train import make_train_step_from_grads

x64 = pytest.mark.usefixtures("x64")


def setup():
    model, params = small_model("tanh")
    return mse_loss(model.apply), params, regression_task(jax.random.PRNGKey(0))


def meta_grad(alg, params, task, step=0):
    return jax.jit(alg.meta_grad)(params, task, jnp.int32(step))


@x64
def test_one_step_on_the_query_set_is_the_scaled_query_gradient():
    """θ − (θ − α∇L_q(θ)) = α∇L_q(θ)."""
    loss, params, task = setup()
    on_query = Task(task.query, task.query)
    (_, metrics), grads = meta_grad(reptile(loss, num_inner_steps=1, inner_lr=0.1), params, on_query)
    (q_loss, _), q_grad = jax.value_and_grad(loss, has_aux=True)(params, task.query)
    chex.assert_trees_all_close(grads, jax.tree.map(lambda g: 0.1 * g, q_grad), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(metrics["support_loss"], q_loss, rtol=1e-12)


@x64
def test_k_full_batch_sgd_steps_give_theta_minus_the_adapted_params():
    loss, params, task = setup()
    (value, metrics), grads = meta_grad(reptile(loss, num_inner_steps=4, inner_lr=0.2), params, task)
    adapted, _ = inner_adapt(params, task.support, loss, num_inner_steps=4, inner_lr=0.2)
    chex.assert_trees_all_close(grads, jax.tree.map(lambda t, a: t - a, params, adapted), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(value, loss(adapted, task.query)[0], rtol=1e-12)
    # "support+query" trains on all of the task's examples
    all_data = jax.tree.map(lambda s, q: jnp.concatenate([s, q]), task.support, task.query)
    alg = reptile(loss, num_inner_steps=4, inner_lr=0.2, inner_data="support+query")
    adapted_all, _ = inner_adapt(params, all_data, loss, num_inner_steps=4, inner_lr=0.2)
    chex.assert_trees_all_close(
        meta_grad(alg, params, task)[1], jax.tree.map(lambda t, a: t - a, params, adapted_all), rtol=1e-10, atol=1e-14
    )


@x64
def test_zero_inner_steps_gives_the_plain_loss_and_a_zero_update():
    loss, params, task = setup()
    (value, _), grads = meta_grad(reptile(loss, num_inner_steps=0, inner_lr=0.1), params, task)
    np.testing.assert_allclose(value, loss(params, task.query)[0], rtol=1e-12)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@x64
@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_adam_inner_loop_matches_optax_adam(b1):
    loss, params, task = setup()
    alg = reptile(loss, num_inner_steps=3, inner_lr=0.01, inner_optimizer="adam", adam_b1=b1)
    _, grads = meta_grad(alg, params, task)
    opt = optax.adam(0.01, b1=b1, b2=0.999, eps=1e-8)
    p, state = params, opt.init(params)
    for _ in range(3):
        g = jax.grad(lambda q: loss(q, task.support)[0])(p)
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
    chex.assert_trees_all_close(grads, jax.tree.map(lambda t, a: t - a, params, p), rtol=1e-9, atol=1e-14)


def test_minibatch_indices_cover_every_example_once_per_epoch():
    index = np.asarray(minibatch_indices(jax.random.PRNGKey(0), 6, 5, 4))  # 20 draws = 3 epochs + 2
    assert index.shape == (5, 4)
    flat = index.ravel()
    for epoch in range(3):
        assert sorted(flat[6 * epoch : 6 * epoch + 6]) == list(range(6))


@x64
def test_minibatches_of_one_example_take_one_per_example_gradient_and_full_size_batches_equal_full_batch():
    loss, params, task = setup()
    n = task.support.x.shape[0]
    _, grads = meta_grad(reptile(loss, num_inner_steps=1, inner_lr=0.1, inner_batch_size=1), params, task, step=5)
    candidates = [
        jax.grad(lambda p, i=i: loss(p, jax.tree.map(lambda a: a[i : i + 1], task.support))[0])(params)
        for i in range(n)
    ]
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])  # noqa: E731
    errors = [np.abs(flat(grads) - 0.1 * flat(c)).max() for c in candidates]
    assert min(errors) < 1e-12 and sorted(errors)[1] > 1e-6  # exactly one example's gradient
    full = meta_grad(reptile(loss, num_inner_steps=3, inner_lr=0.1), params, task)[1]
    shuffled = meta_grad(reptile(loss, num_inner_steps=3, inner_lr=0.1, inner_batch_size=n), params, task, step=3)[1]
    chex.assert_trees_all_close(shuffled, full, rtol=1e-9, atol=1e-13)


@x64
def test_outer_sgd_moves_theta_toward_the_mean_adapted_params():
    """optax.sgd(ε) on the batched estimate: θ ← θ + ε · mean_i(φ_i − θ) (Algorithm 2)."""
    loss, params, task = setup()
    tasks = jax.tree.map(lambda *a: jnp.stack(a), task, regression_task(jax.random.PRNGKey(1)))
    alg = reptile(loss, num_inner_steps=2, inner_lr=0.1)
    opt = optax.sgd(0.5)
    step = make_train_step_from_grads(lambda p, t, s: batched_meta_grad(alg, p, t, s), opt)
    new, _ = jax.jit(step)(init_train_state(params, opt, jax.random.PRNGKey(0)), tasks)
    adapted = [
        inner_adapt(params, t.support, loss, num_inner_steps=2, inner_lr=0.1)[0]
        for t in (task, regression_task(jax.random.PRNGKey(1)))
    ]
    expected = jax.tree.map(lambda t, a, b: t + 0.5 * ((a - t) + (b - t)) / 2, params, *adapted)
    chex.assert_trees_all_close(new.meta_params, expected, rtol=1e-10, atol=1e-14)


def test_bad_hyperparameters_raise():
    loss = lambda p, b: (0.0, {})  # noqa: E731
    with pytest.raises(HyperparameterError, match="inner_optimizer"):
        reptile(loss, num_inner_steps=1, inner_lr=0.1, inner_optimizer="rmsprop")
    with pytest.raises(HyperparameterError, match="inner_batch_size"):
        reptile(loss, num_inner_steps=1, inner_lr=0.1, inner_batch_size=0)
    with pytest.raises(HyperparameterError, match="inner_data"):
        reptile(loss, num_inner_steps=1, inner_lr=0.1, inner_data="query")


def test_reptile_improves_the_sinusoid():
    problem = sinusoid_problem(num_inner_steps=5)
    alg = reptile(problem.task_loss_fn, num_inner_steps=5, inner_lr=0.02)
    result = train_briefly(alg, problem, steps=300, outer_lr=1.0, optimizer="sgd")
    assert result.improved(margin=0.1), result[:2]


@pytest.mark.slow
def test_reptile_with_adam_and_minibatches_improves_omniglot(omniglot_subset):
    """The paper's Omniglot recipe, shrunk: inner Adam (β1 = 0), batches of 10 drawn from all of
    the task's examples, outer SGD with ε = 1."""
    problem = omniglot_problem(omniglot_subset, num_inner_steps=5)
    alg = reptile(
        problem.task_loss_fn,
        num_inner_steps=5,
        inner_lr=1e-3,
        inner_optimizer="adam",
        inner_batch_size=10,
        inner_data="support+query",
    )
    result = train_briefly(alg, problem, steps=200, outer_lr=1.0, optimizer="sgd")
    assert result.improved(margin=0.05), result[:2]
