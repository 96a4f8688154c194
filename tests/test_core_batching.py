"""vmap against a loop, lax.map against vmap, jit against eager, determinism, one compile."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maml_jax import (
    batched_meta_loss,
    init_train_state,
    inner_adapt,
    make_train_step,
    mean_over_tasks,
    meta_loss,
    mlp,
    mse_loss,
)
from maml_jax.data import sinusoid
from maml_jax.validation import HyperparameterError


@pytest.fixture(scope="module")
def setup():
    model = mlp((16, 16), 1, activation="tanh")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(1), num_tasks=6, num_support=5, num_query=7)
    return model, params, tasks


def task_slice(tasks, i):
    return jax.tree.map(lambda a: a[i], tasks)


def test_vmap_over_tasks_equals_python_loop(setup):
    model, params, tasks = setup
    loss = mse_loss(model.apply)
    kw = dict(num_inner_steps=2, inner_lr=0.05)
    batched = lambda p: batched_meta_loss(p, tasks, loss, task_map="vmap", **kw)[0]
    looped = lambda p: sum(meta_loss(p, task_slice(tasks, i), loss, **kw)[0] for i in range(6)) / 6
    np.testing.assert_allclose(batched(params), looped(params), rtol=1e-6)
    chex.assert_trees_all_close(jax.grad(batched)(params), jax.grad(looped)(params), rtol=1e-5, atol=1e-6)


def test_lax_map_equals_vmap(setup):
    model, params, tasks = setup
    loss = mse_loss(model.apply)

    def grad(task_map):
        f = lambda p: batched_meta_loss(p, tasks, loss, task_map=task_map, num_inner_steps=2, inner_lr=0.05)[0]
        return jax.grad(f)(params)

    grads = {m: grad(m) for m in ("vmap", "map")}
    chex.assert_trees_all_close(grads["vmap"], grads["map"], rtol=1e-5, atol=1e-6)


def test_jit_equals_eager(setup):
    model, params, tasks = setup
    f = functools.partial(batched_meta_loss, task_loss_fn=mse_loss(model.apply), num_inner_steps=3, inner_lr=0.05)
    g = jax.value_and_grad(f, has_aux=True)
    (l_eager, m_eager), g_eager = g(params, tasks)
    (l_jit, m_jit), g_jit = jax.jit(g)(params, tasks)
    np.testing.assert_allclose(l_eager, l_jit, rtol=1e-6)
    chex.assert_trees_all_close(m_eager, m_jit, rtol=1e-5)
    chex.assert_trees_all_close(g_eager, g_jit, rtol=1e-5, atol=1e-6)


def _train(seed, steps, model, tasks_fn):
    optimizer = optax.adam(1e-3)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1)))
    state = init_train_state(params, optimizer, jax.random.PRNGKey(seed + 1))
    f = functools.partial(batched_meta_loss, task_loss_fn=mse_loss(model.apply), num_inner_steps=1, inner_lr=0.01)
    step = jax.jit(make_train_step(f, optimizer))
    for _ in range(steps):
        state, _ = step(state, tasks_fn(jax.random.fold_in(state.rng, state.step)))
    return state


def test_same_seed_gives_identical_training(setup):
    model, _, _ = setup
    tasks_fn = functools.partial(sinusoid.sample_tasks, num_tasks=4, num_support=5, num_query=5)
    a = _train(0, 15, model, tasks_fn)
    b = _train(0, 15, model, tasks_fn)
    c = _train(1, 15, model, tasks_fn)
    chex.assert_trees_all_equal(a.meta_params, b.meta_params)  # bitwise
    assert not np.array_equal(a.meta_params["dense_0"]["kernel"], c.meta_params["dense_0"]["kernel"])


def test_train_step_compiles_once(setup):
    model, params, tasks = setup
    optimizer = optax.adam(1e-3)
    f = functools.partial(batched_meta_loss, task_loss_fn=mse_loss(model.apply), num_inner_steps=1, inner_lr=0.01)
    step = jax.jit(chex.assert_max_traces(make_train_step(f, optimizer), n=1))
    state = init_train_state(params, optimizer, jax.random.PRNGKey(0))
    for i in range(4):
        new_tasks = sinusoid.sample_tasks(jax.random.PRNGKey(i), num_tasks=6, num_support=5, num_query=7)
        state, metrics = step(state, new_tasks)
    assert int(state.step) == 4 and bool(metrics["finite"])


def test_auto_task_map_is_map_on_the_cpu_and_vmap_on_accelerators():
    from maml_jax.core import resolve_task_map
    from maml_jax.validation import HyperparameterError

    assert resolve_task_map("auto", "cpu") == "map"
    assert resolve_task_map("auto", "gpu") == "vmap" and resolve_task_map("auto", "tpu") == "vmap"
    assert resolve_task_map("auto") == ("map" if jax.default_backend() == "cpu" else "vmap")
    assert [resolve_task_map(m, "gpu") for m in ("vmap", "map")] == ["vmap", "map"]  # explicit choices kept
    with pytest.raises(HyperparameterError, match="'vmap', 'map' or 'auto'"):
        resolve_task_map("pmap")


def test_mean_over_tasks_is_the_task_mean_of_a_loop_in_both_maps(x64):
    tasks = {"x": jax.random.normal(jax.random.PRNGKey(3), (5, 4, 3)), "n": jnp.arange(5)}

    def fn(task):  # a pytree of float and integer leaves, one scalar
        return {"g": jnp.sin(task["x"]) * task["n"], "s": jnp.sum(task["x"] ** 2), "count": task["n"] * 2}

    outs = [fn(task_slice(tasks, i)) for i in range(5)]
    want = jax.tree.map(lambda *leaves: np.mean(np.stack(leaves), axis=0), *outs)
    for task_map in ("map", "vmap"):
        got = jax.jit(mean_over_tasks, static_argnums=(0, 2))(fn, tasks, task_map)
        chex.assert_trees_all_close(got, want, rtol=1e-13, atol=0)
        assert jnp.issubdtype(got["count"].dtype, jnp.floating)  # integers averaged as floats
        np.testing.assert_allclose(got["count"], 4.0)
    with pytest.raises(HyperparameterError, match="task_map"):
        mean_over_tasks(fn, tasks, "pmap")


def test_mean_over_tasks_traces_the_task_function_once():
    """The running-sum loop needs the output shapes before its body is traced; both come from one
    trace of the per-task function (JAX's share of the compile of a second-order step is mostly
    that trace), also when the function closes over a traced value, as a meta-gradient closes over
    the meta-parameters."""
    tasks = {"x": jnp.arange(12.0).reshape(4, 3)}
    traces = []

    def mean_of(w, tasks):
        def fn(task):
            traces.append(1)
            return {"g": jnp.sin(task["x"] * w).sum(), "n": task["x"] * w}

        return mean_over_tasks(fn, tasks, "map")

    got = jax.jit(mean_of)(2.0, tasks)
    assert len(traces) == 1
    np.testing.assert_allclose(got["n"], np.mean(np.arange(12.0).reshape(4, 3) * 2.0, axis=0), rtol=1e-6)
    traces.clear()
    jax.jit(jax.grad(lambda w: mean_of(w, tasks)["g"]))(2.0)
    assert len(traces) == 1


@pytest.mark.parametrize("num_steps", [1, 3])
def test_inner_adapt_traces_the_task_loss_once_per_form(setup, num_steps):
    """The task loss is traced once for the first inner step, once for the scan body of the
    others (none when there is only one step: no empty scan) and once for the query loss."""
    model, params, tasks = setup
    task = task_slice(tasks, 0)
    calls = []

    def loss(p, batch):
        calls.append(1)
        return mse_loss(model.apply)(p, batch)

    f = lambda p: meta_loss(p, task, loss, num_inner_steps=num_steps, inner_lr=0.05)
    jax.jit(jax.grad(f, has_aux=True))(params)
    assert len(calls) == (2 if num_steps == 1 else 3)
    _, trace = inner_adapt(params, task.support, mse_loss(model.apply), num_inner_steps=num_steps, inner_lr=0.05)
    assert trace["support_loss"].shape == (num_steps,)
    np.testing.assert_allclose(trace["support_loss"][0], mse_loss(model.apply)(params, task.support)[0], rtol=1e-6)


def test_mean_over_tasks_sums_bf16_in_float32():
    # 300 tasks of bf16 ones: a bf16 running sum sticks at 256 (spacing 2 there), so its mean
    # would be 256/300; like jnp.mean, the sum runs in float32 and the result is cast to bf16.
    tasks = {"x": jnp.ones((300, 3), jnp.bfloat16)}
    for task_map in ("map", "vmap"):
        got = jax.jit(mean_over_tasks, static_argnums=(0, 2))(lambda t: t["x"] * 1, tasks, task_map)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.ones(3, np.float32))
