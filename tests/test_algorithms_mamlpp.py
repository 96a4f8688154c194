"""MAML++: finite differences of the multi-step loss and LSLR meta-gradients (float64),
equivalences with MAML, the annealing schedules, derivative-order annealing without retracing,
per-step batch norm, and short training runs on the sinusoid and an Omniglot subset."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from algo_harness import omniglot_problem, sinusoid_problem, train_briefly

from maml_jax import meta_loss, mlp, mse_loss
from maml_jax.algorithms import (
    batched_meta_grad,
    cosine_outer_lr,
    maml,
    maml_plus_plus,
    mamlpp_meta_loss,
    multi_step_loss_weights,
    step_indexed_loss,
)
from maml_jax.data import sinusoid
from maml_jax.losses import cross_entropy_loss
from maml_jax.models import conv4
from maml_jax.types import Batch, Task
from maml_jax.validation import HyperparameterError


def tiny(dtype=jnp.float32, n_tasks=1):
    model = mlp((6,), 1, activation="tanh")
    tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(3), n_tasks, 5, 6)
    tasks = jax.tree.map(lambda a: a.astype(dtype), tasks)
    params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.PRNGKey(0), tasks.support.x[0]))
    loss = mse_loss(model.apply)
    return loss, params, tasks


def step_loss(loss):
    return lambda p, b, i: loss(p, b)


def first_task(tasks):
    return jax.tree.map(lambda a: a[0], tasks)


def directional_fd(f, x, v, eps=1e-5):
    plus = f(jax.tree.map(lambda a, d: a + eps * d, x, v))
    minus = f(jax.tree.map(lambda a, d: a - eps * d, x, v))
    return (plus - minus) / (2 * eps)


def test_meta_gradient_of_multi_step_loss_with_lslr_matches_finite_differences(x64):
    loss, params, tasks = tiny(jnp.float64)
    task = first_task(tasks)
    k = 3
    meta = {
        "params": params,
        "inner_lrs": jax.tree.map(lambda p: jnp.array([0.05, 0.11, 0.02], jnp.float64), params),
    }
    weights = jnp.array([0.2, 0.3, 0.5])

    @jax.jit
    def f(m):
        return mamlpp_meta_loss(m, task, step_loss(loss), num_inner_steps=k, step_weights=weights)[0]

    grads = jax.grad(f)(meta)
    leaves, treedef = jax.tree.flatten(meta)
    for seed in range(3):
        keys = list(jax.random.split(jax.random.PRNGKey(seed), len(leaves)))
        v = jax.tree.unflatten(
            treedef, [jax.random.normal(kk, a.shape, a.dtype) for kk, a in zip(keys, leaves, strict=True)]
        )
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v), strict=True))
        np.testing.assert_allclose(analytic, directional_fd(f, meta, v), rtol=1e-6)
    # the learned rates get a gradient of their own, per step
    assert float(jnp.abs(grads["inner_lrs"]["dense_0"]["kernel"]).min()) > 0


def test_multi_step_loss_with_all_weight_on_last_step_equals_maml(x64):
    loss, params, tasks = tiny(jnp.float64)
    task = first_task(tasks)
    last = jnp.array([0.0, 0.0, 1.0])
    (v, m), g = jax.value_and_grad(mamlpp_meta_loss, has_aux=True)(
        {"params": params}, task, step_loss(loss), num_inner_steps=3, inner_lr=0.07, step_weights=last
    )
    (rv, rm), rg = jax.value_and_grad(meta_loss, has_aux=True)(params, task, loss, num_inner_steps=3, inner_lr=0.07)
    np.testing.assert_allclose(v, rv, rtol=1e-12)
    np.testing.assert_allclose(m["query_loss"], rm["query_loss"], rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), g["params"], rg)
    # and uniform weights do not (the test can fail)
    v_uniform, _ = mamlpp_meta_loss(
        {"params": params}, task, step_loss(loss), num_inner_steps=3, inner_lr=0.07, step_weights=jnp.ones(3) / 3
    )
    assert abs(float(v_uniform - rv)) > 1e-6


def test_lslr_with_constant_rates_equals_maml_and_all_switches_off_is_maml(x64):
    loss, params, tasks = tiny(jnp.float64, n_tasks=3)
    ref = maml(loss, num_inner_steps=2, inner_lr=0.05)
    (rv, _), rg = batched_meta_grad(ref, params, tasks, jnp.int32(0))
    for lslr in (True, False):
        alg = maml_plus_plus(loss, num_inner_steps=2, inner_lr=0.05, multi_step_loss=False, learned_inner_lrs=lslr)
        meta = alg.init(params)
        assert ("inner_lrs" in meta) == lslr
        (v, _), g = batched_meta_grad(alg, meta, tasks, jnp.int32(0))
        np.testing.assert_allclose(v, rv, rtol=1e-12)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), g["params"], rg)
        ev = alg.evaluate(meta, first_task(tasks), 4)
        ref_ev = ref.evaluate(params, first_task(tasks), 4)
        np.testing.assert_allclose(ev["query_loss"], ref_ev["query_loss"], rtol=1e-12)


def test_multi_step_loss_weights_anneal_from_uniform_to_last_step():
    k, n = 5, 100
    w0 = multi_step_loss_weights(0, k, n)
    np.testing.assert_allclose(w0, np.full(k, 0.2), rtol=1e-6)
    mid = multi_step_loss_weights(30, k, n)
    assert float(mid[:-1].max()) < 0.2 < float(mid[-1])
    np.testing.assert_allclose(mid.sum(), 1.0, rtol=1e-6)
    late = multi_step_loss_weights(99, k, n)  # non-final weights at the floor 0.03/K
    np.testing.assert_allclose(late[:-1], 0.03 / k, rtol=1e-6)
    np.testing.assert_allclose(late[-1], 1 - 4 * 0.03 / k, rtol=1e-6)
    np.testing.assert_array_equal(multi_step_loss_weights(100, k, n), np.eye(k)[-1])
    np.testing.assert_array_equal(multi_step_loss_weights(jnp.int32(0), k, 0), np.eye(k)[-1])
    with pytest.raises(HyperparameterError):
        multi_step_loss_weights(0, 0, n)


def test_cosine_outer_lr_schedule():
    sched = cosine_outer_lr(1e-3, 100, min_lr=1e-5)
    np.testing.assert_allclose(sched(0), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(sched(50), (1e-3 + 1e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(sched(100), 1e-5, rtol=1e-5)
    np.testing.assert_allclose(sched(1000), 1e-5, rtol=1e-5)
    with pytest.raises(HyperparameterError):
        cosine_outer_lr(1e-3, 100, min_lr=1e-2)


def test_derivative_order_annealing_switches_without_retracing(x64):
    loss, params, tasks = tiny(jnp.float64, n_tasks=2)
    kwargs = dict(num_inner_steps=2, inner_lr=0.1, multi_step_loss=True, msl_anneal_iters=3, learned_inner_lrs=False)
    alg = maml_plus_plus(loss, first_order_iters=5, **kwargs)
    meta = alg.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grads(meta, step):
        return batched_meta_grad(alg, meta, tasks, step)

    refs = {fo: maml_plus_plus(loss, first_order_iters=1_000_000 if fo else 0, **kwargs) for fo in (True, False)}
    reference_jit = jax.jit(lambda step, fo: batched_meta_grad(refs[fo], meta, tasks, step), static_argnums=1)

    def reference(first_order, step):
        return reference_jit(jnp.int32(step), first_order)

    for step, first_order in ((0, True), (4, True), (5, False), (40, False)):
        (v, _), g = grads(meta, jnp.int32(step))
        (rv, _), rg = reference(first_order, step)
        np.testing.assert_allclose(v, rv, rtol=1e-12)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), g, rg)
    # first- and second-order gradients differ here, so the switch is observable
    (_, _), g_fo = reference(True, 40)
    (_, _), g_so = reference(False, 40)
    diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_fo, g_so))
    assert max(diff) > 1e-6
    # the multi-step loss is switched by the same traced step: weighted before step 3, last-only after
    (v0, m0), _ = grads(meta, jnp.int32(0))
    (v9, m9), _ = grads(meta, jnp.int32(9))
    assert abs(float(v0 - m0["query_loss"])) > 1e-6
    np.testing.assert_allclose(v9, m9["query_loss"], rtol=1e-12)


def test_per_step_bn_with_shared_rows_equals_transductive_bn():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 14, 14, 1))
    trans = conv4(5, conv_impl="lax")
    per_step = conv4(5, conv_impl="lax", bn="per_step", bn_steps=3)
    p = trans.init(jax.random.PRNGKey(1), x)
    p = {**p, "bn_0": {"scale": p["bn_0"]["scale"] * 1.7, "bias": p["bn_0"]["bias"] + 0.3}}
    tiled = {k: (jax.tree.map(lambda a: jnp.stack([a] * 3), v) if k.startswith("bn_") else v) for k, v in p.items()}
    assert jax.tree.map(jnp.shape, tiled) == jax.tree.map(jnp.shape, per_step.init(jax.random.PRNGKey(1), x))
    ref = trans.apply(p, x)
    for step in (0, 2, 7):
        np.testing.assert_array_equal(per_step.apply(tiled, x, step=step), ref)
    # rows differ -> steps differ; beyond the last row the last one is reused
    rows = jax.tree.map(lambda a: a, tiled)
    rows["bn_3"] = {"scale": tiled["bn_3"]["scale"].at[2].multiply(3.0), "bias": tiled["bn_3"]["bias"]}
    np.testing.assert_array_equal(per_step.apply(rows, x, step=0), ref)
    assert float(jnp.abs(per_step.apply(rows, x, step=2) - ref).max()) > 1e-3
    np.testing.assert_array_equal(per_step.apply(rows, x, step=jnp.int32(9)), per_step.apply(rows, x, step=2))


def test_mamlpp_with_per_step_bn_gives_each_step_its_own_bn_gradient(x64):
    """Each BN row's meta-gradient is the derivative of the meta-loss in that row alone (float64
    finite differences, one row perturbed at a time), and the two rows' gradients differ."""
    model = conv4(3, conv_impl="lax", bn="per_step", bn_steps=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 4, 4, 1), jnp.float64)
    y = jnp.tile(jnp.arange(3), (1, 2))
    tasks = Task(Batch(x, y), Batch(x + 0.1, y))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x[0]))
    loss = step_indexed_loss(cross_entropy_loss, model.apply)
    alg = maml_plus_plus(loss, num_inner_steps=2, inner_lr=0.1, loss_takes_step=True)
    meta = alg.init(params)

    @jax.jit
    def f(m):
        return batched_meta_grad(alg, m, tasks, jnp.int32(0))[0][0]

    g = jax.grad(f)(meta)
    scale_grad = g["params"]["bn_1"]["scale"]
    assert scale_grad.shape == (2, 64) and g["inner_lrs"]["bn_1"]["scale"].shape == (2,)
    v = jax.random.normal(jax.random.PRNGKey(2), (64,), jnp.float64)
    for row in (0, 1):

        def along_row(t, row=row):
            scale = meta["params"]["bn_1"]["scale"].at[row].add(t * v)
            bn_1 = {**meta["params"]["bn_1"], "scale": scale}
            return f({**meta, "params": {**meta["params"], "bn_1": bn_1}})

        fd = (along_row(1e-5) - along_row(-1e-5)) / 2e-5
        assert abs(float(fd)) > 1e-6  # the row matters to the meta-loss
        np.testing.assert_allclose(jnp.vdot(scale_grad[row], v), fd, rtol=1e-6)
    assert float(jnp.abs(scale_grad[0] - scale_grad[1]).max()) > 1e-6


def test_mamlpp_trains_sinusoid():
    problem = sinusoid_problem(num_inner_steps=2)
    alg = maml_plus_plus(problem.task_loss_fn, num_inner_steps=2, inner_lr=0.01, msl_anneal_iters=100)
    result = train_briefly(alg, problem, steps=300, optimizer=optax.adam(cosine_outer_lr(3e-3, 300, 1e-4)))
    assert result.improved(margin=0.3), (result.before, result.after)


@pytest.mark.slow  # ~2 min on 2 busy CPU cores (compiles both derivative orders and both losses)
def test_mamlpp_with_every_switch_trains_omniglot_subset(omniglot_subset):
    k = 2
    problem = omniglot_problem(omniglot_subset, num_inner_steps=k)
    model = conv4(5, bn="per_step", bn_steps=k)
    problem = problem._replace(init_params=model.init(jax.random.PRNGKey(0), problem.eval_tasks.support.x[0]))
    alg = maml_plus_plus(
        step_indexed_loss(cross_entropy_loss, model.apply),
        num_inner_steps=k,
        inner_lr=0.4,
        msl_anneal_iters=50,
        first_order_iters=50,
        loss_takes_step=True,
    )
    result = train_briefly(alg, problem, steps=150, optimizer=optax.adam(cosine_outer_lr(1e-3, 150, 1e-4)))
    assert result.improved(margin=0.1), (result.before, result.after)  # measured 0.526 -> 0.670
