"""The ``Algorithm`` interface: MAML through it equals the core's per-task meta-loss gradients, averaged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maml_jax import Task, batched_meta_loss, init_train_state, mlp, mse_loss
from maml_jax.algorithms import (
    anil,
    batched_evaluate,
    batched_meta_grad,
    fomaml,
    imaml,
    maml,
    maml_plus_plus,
    meta_lstm,
    reptile,
)
from maml_jax.core import meta_loss
from maml_jax.data import sinusoid
from maml_jax.train import make_train_step, make_train_step_from_grads


def setup():
    model = mlp((8, 8), 1)
    tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(1), 4, 5, 7)
    params = model.init(jax.random.PRNGKey(0), tasks.support.x[0])
    return mse_loss(model.apply), params, tasks


def per_task_mean_value_and_grad(params, tasks, loss, **kwargs):
    """The reference for ``batched_meta_grad``: a Python loop over the tasks of the per-task
    ``jax.value_and_grad`` of ``core.meta_loss``, then the task means of the losses, of every
    metric and of the gradients (no vmap, no lax.map, no mean-loss trick)."""
    one = jax.jit(jax.value_and_grad(lambda p, t: meta_loss(p, t, loss, **kwargs), has_aux=True))
    count = tasks.support.x.shape[0]
    per_task = [one(params, jax.tree.map(lambda a, i=i: a[i], tasks)) for i in range(count)]
    value = np.mean([float(v) for (v, _), _ in per_task])
    metrics = {name: np.mean([float(m[name]) for (_, m), _ in per_task]) for name in per_task[0][0][1]}
    grads = jax.tree.map(lambda *g: sum(g) / count, *[g for _, g in per_task])
    return value, metrics, grads


@pytest.mark.usefixtures("x64")
def test_batched_meta_grad_equals_the_mean_of_per_task_meta_loss_gradients():
    """For every task map (``vmap`` differentiates the mean loss once, ``map`` sums per-task
    gradients in a scan) ``batched_meta_grad`` of MAML is the task mean of ``core.meta_loss``'s
    per-task value and gradient, each taken on its own in a Python loop. In float64, so that
    the different summation orders agree to ~1e-12 and the tolerances stay tight (float32
    rounding alone differs by an ulp of the largest gradient entries, ~5e-7)."""
    loss, params, tasks = setup()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    tasks = jax.tree.map(lambda a: a.astype(jnp.float64), tasks)
    cases = [(False, False, "vmap"), (True, False, "vmap"), (False, True, "map"), (True, False, "map")]
    for first_order, remat, task_map in cases:
        alg = maml(loss, num_inner_steps=2, inner_lr=0.05, first_order=first_order, remat=remat)
        grad_fn = jax.jit(functools.partial(batched_meta_grad, alg, task_map=task_map))
        (value, metrics), grads = grad_fn(alg.init(params), tasks, jnp.int32(0))
        ref_value, ref_metrics, ref_grads = per_task_mean_value_and_grad(
            params, tasks, loss, num_inner_steps=2, inner_lr=0.05, first_order=first_order
        )
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        assert set(metrics) == set(ref_metrics) and "query_loss" in metrics
        for name, ref in ref_metrics.items():
            np.testing.assert_allclose(metrics[name], ref, rtol=1e-12, err_msg=name)
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads, ref_grads)
    assert fomaml(loss, num_inner_steps=1, inner_lr=0.1).name == "fomaml"


def test_train_step_from_grads_matches_make_train_step_and_evaluate_adapts():
    loss, params, tasks = setup()
    alg = maml(loss, num_inner_steps=1, inner_lr=0.05)
    opt = optax.adam(1e-2)
    state = init_train_state(params, opt, jax.random.PRNGKey(0))
    step_a = jax.jit(make_train_step_from_grads(lambda p, t, s: batched_meta_grad(alg, p, t, s), opt))
    step_b = jax.jit(make_train_step(lambda p, t: batched_meta_loss(p, t, loss, num_inner_steps=1, inner_lr=0.05), opt))
    (sa, ma), (sb, mb) = step_a(state, tasks), step_b(state, tasks)
    np.testing.assert_allclose(ma["meta_loss"], mb["meta_loss"], rtol=1e-6)
    assert int(sa.step) == 1 and bool(ma["finite"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), sa.meta_params, sb.meta_params)
    small = maml(loss, num_inner_steps=1, inner_lr=0.005)
    fit = Task(tasks.support, tasks.support)  # adaptation with a small step lowers the loss it descends
    before = batched_evaluate(small, params, fit, 0)["query_loss"]
    after = batched_evaluate(small, params, fit, 5)["query_loss"]
    assert before.shape == (4,) and float(after.mean()) < float(before.mean())


@pytest.mark.usefixtures("x64")
def test_vmap_batched_meta_grad_is_the_mean_of_per_task_gradients():
    """Under vmap, an algorithm with a ``meta_loss`` is differentiated through the task-mean
    loss once; that must be the mean of its per-task ``meta_grad``s (a Python loop) and equal
    the ``map`` path, which takes each task's gradient inside the map. Algorithms without an
    exact meta-loss (Reptile, iMAML) keep the per-task path."""
    loss, params, tasks = setup()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    tasks = jax.tree.map(lambda a: a.astype(jnp.float64), tasks)
    algorithms = [
        maml(loss, num_inner_steps=3, inner_lr=0.05),
        maml(loss, num_inner_steps=1, inner_lr=0.05, first_order=True),
        anil(loss, num_inner_steps=2, inner_lr=0.05),
        meta_lstm(loss, num_inner_steps=2),
        maml_plus_plus(loss, num_inner_steps=2, inner_lr=0.05),  # MSL on, no annealing: static
    ]
    step = jnp.int32(0)
    for alg in algorithms:  # every function jitted (eager dispatch made this test slow)
        assert alg.meta_loss is not None
        meta = alg.init(params)
        vmapped, mapped = (jax.jit(functools.partial(batched_meta_grad, alg, task_map=m)) for m in ("vmap", "map"))
        (value, metrics), grads = vmapped(meta, tasks, step)
        per_task_grad = jax.jit(alg.meta_grad)
        per_task = [per_task_grad(meta, jax.tree.map(lambda a, i=i: a[i], tasks), step) for i in range(4)]
        ref_value = np.mean([float(v) for (v, _), _ in per_task])
        ref_grads = jax.tree.map(lambda *g: sum(g) / 4, *[g for _, g in per_task])
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        for name, m in metrics.items():  # every metric the task mean of the per-task ones
            np.testing.assert_allclose(m, np.mean([float(ms[name]) for (_, ms), _ in per_task]), rtol=1e-12)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads, ref_grads)
        (_, _), by_map = mapped(meta, tasks, step)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads, by_map)
    assert reptile(loss, num_inner_steps=1, inner_lr=0.1).meta_loss is None
    assert imaml(loss, num_inner_steps=1, inner_lr=0.1).meta_loss is None
    # MAML++ while its first-order / multi-step-loss switches can flip (a lax.cond on the step)
    annealed = maml_plus_plus(loss, num_inner_steps=2, inner_lr=0.05, msl_anneal_iters=6, first_order_iters=2)
    assert annealed.meta_loss is None
