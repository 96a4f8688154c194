"""Sinusoid task distribution, evaluation protocol, and a short training that must help."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maml_jax import adaptation_curve, batched_meta_loss, inner_adapt, mean_ci95, mlp, mse_loss
from maml_jax.data import sinusoid
from maml_jax.train import init_train_state, make_sampling_train_chunk, make_train_step


def test_task_distribution_ranges_and_shapes():
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(0), num_tasks=2000, num_support=10, num_query=7)
    assert tasks.support.x.shape == (2000, 10, 1) and tasks.query.y.shape == (2000, 7, 1)
    x = np.concatenate([tasks.support.x.ravel(), tasks.query.x.ravel()])
    assert -5 <= x.min() < -4.9 and 4.9 < x.max() <= 5
    fns = sinusoid.sample_functions(jax.random.PRNGKey(0), 20000)
    assert 0.1 <= fns.amplitude.min() < 0.15 and 4.95 < fns.amplitude.max() <= 5.0
    assert 0 <= fns.phase.min() < 0.01 and np.pi - 0.01 < fns.phase.max() <= np.pi
    np.testing.assert_allclose(fns.amplitude.mean(), 2.55, atol=0.05)
    # y really is A sin(x − φ) of one function per task
    eval_tasks, f = sinusoid.sample_eval_tasks(jax.random.PRNGKey(3), 4, 5, num_grid=100)
    np.testing.assert_allclose(
        eval_tasks.query.y[:, :, 0],
        f.amplitude[:, None] * np.sin(eval_tasks.query.x[:, :, 0] - f.phase[:, None]),
        atol=1e-5,
    )
    np.testing.assert_allclose(eval_tasks.query.x[0, :, 0], np.linspace(-5, 5, 100), atol=1e-6)


def test_sampling_is_deterministic_in_the_key():
    a = sinusoid.sample_tasks(jax.random.PRNGKey(7), 3, 4, 5)
    b = sinusoid.sample_tasks(jax.random.PRNGKey(7), 3, 4, 5)
    c = sinusoid.sample_tasks(jax.random.PRNGKey(8), 3, 4, 5)
    np.testing.assert_array_equal(a.support.x, b.support.x)
    assert not np.array_equal(a.support.x, c.support.x)


def test_mean_ci95_formula():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    mean, ci = mean_ci95(values)
    assert mean == 2.5
    assert ci == pytest.approx(1.96 * np.sqrt(1.25) / 2)  # population std sqrt(1.25), n = 4
    with pytest.raises(ValueError):
        mean_ci95([])


def test_adaptation_curve_columns_are_query_loss_after_k_steps():
    model = mlp((8, 8), 1)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    loss = mse_loss(model.apply)
    tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(1), 3, 5, num_grid=20)
    curve = adaptation_curve(params, tasks, loss, num_inner_steps=2, inner_lr=0.01)
    assert curve["loss"].shape == (3, 3)
    for i in range(3):
        task = jax.tree.map(lambda a, i=i: a[i], tasks)
        for k in range(3):
            adapted, _ = inner_adapt(params, task.support, loss, num_inner_steps=k, inner_lr=0.01)
            np.testing.assert_allclose(curve["loss"][i, k], loss(adapted, task.query)[0], rtol=1e-5)


def test_short_meta_training_improves_post_update_mse():
    """600 meta-steps (a few seconds) must lower the 1-step MSE on held-out tasks clearly."""
    model = mlp((40, 40), 1)
    loss = mse_loss(model.apply)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    optimizer = optax.adam(1e-3)
    objective = functools.partial(batched_meta_loss, task_loss_fn=loss, num_inner_steps=1, inner_lr=0.01)
    sample = lambda key, data: sinusoid.sample_tasks(key, num_tasks=25, num_support=10, num_query=10)
    chunk = jax.jit(make_sampling_train_chunk(make_train_step(objective, optimizer), sample, 600))
    state, metrics = chunk(init_train_state(params, optimizer, jax.random.PRNGKey(1)), None)
    tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(99), 200, 10)
    before = adaptation_curve(params, tasks, loss, num_inner_steps=1, inner_lr=0.01)["loss"][:, 1].mean()
    after = adaptation_curve(state.meta_params, tasks, loss, num_inner_steps=1, inner_lr=0.01)["loss"][:, 1].mean()
    assert after < 0.7 * before, (before, after)
    assert metrics["meta_loss"][-50:].mean() < metrics["meta_loss"][:50].mean()


def test_eval_table_gives_the_median_where_diverged_tasks_carry_the_mean():
    from maml_jax.experiment import format_table

    by_steps = {0: (3.0, 0.2, 2.9, 0), 1: (0.6, 0.06, 0.5, 0), 10: (float("inf"), float("nan"), 0.148, 2)}
    results = {"maml": {"inner_lr": {5: 0.01, 10: 0.01}, "by_shots": {5: {"mse": by_steps}}}}
    results["maml"]["by_shots"][10] = {"mse": {0: (3.0, 0.2, 2.9), 1: (0.3, 0.03, 0.3), 10: (5.64, 10.33, 0.1)}}
    rows = format_table(results, (0, 1, 10), "mse").splitlines()[2:]
    assert rows[0].endswith("| 3.000 ± 0.200 | 0.600 ± 0.060 | inf ± nan (median 0.148; 2 non-finite) |")
    assert rows[1].endswith("| 0.300 ± 0.030 | 5.640 ± 10.330 (median 0.100) |")


def test_summary_counts_diverged_tasks_and_ranks_nan_last():
    from maml_jax.evaluate import summarize_curve

    values = np.array([[0.1], [0.2], [np.nan], [np.inf], [0.3]])  # [tasks, steps]
    (mean, ci, median, nonfinite) = summarize_curve({"mse": values}, [0])["mse"][0]
    assert median == pytest.approx(0.3) and nonfinite == 2 and not np.isfinite(mean)
    assert summarize_curve({"mse": values[:2]}, [0])["mse"][0][2:] == (pytest.approx(0.15), 0)
