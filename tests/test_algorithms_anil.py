"""ANIL (head-only inner loop) and BOIL (body-only inner loop) via parameter masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algo_harness import omniglot_problem, sinusoid_problem, train_briefly
from jax.flatten_util import ravel_pytree
from test_core_math import fd_grad, regression_task, small_model

from maml_jax import HyperparameterError, inner_adapt, mlp, mse_loss
from maml_jax.algorithms import anil, boil, head_name, maml, masked_maml
from maml_jax.inner_updates import mask_from_names, masked, sgd
from maml_jax.models import conv4


def setup(activation="tanh"):
    model, params = small_model(activation)
    return mse_loss(model.apply), params, regression_task(jax.random.PRNGKey(0))


def jit_meta_grad(alg, params, task):
    return jax.jit(alg.meta_grad)(params, task, jnp.int32(0))


def test_mask_from_names_and_head_name():
    params = mlp((6, 6), 1).init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    mask = mask_from_names(params, lambda name: name.startswith("dense_2/"))
    assert mask == {
        "dense_0": {"bias": False, "kernel": False},
        "dense_1": {"bias": False, "kernel": False},
        "dense_2": {"bias": True, "kernel": True},
    }
    assert head_name(params) == "dense_2"
    conv = jax.eval_shape(lambda: conv4(5).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
    assert head_name(conv) == "head"
    with pytest.raises(HyperparameterError, match="head="):
        head_name({"encoder": {}, "decoder": {}})
    with pytest.raises(HyperparameterError, match="Python bools"):
        masked(sgd(0.1), jax.tree.map(lambda _: jnp.bool_(True), params))


@pytest.mark.usefixtures("x64")
def test_all_true_mask_equals_maml():
    loss, params, task = setup()
    everything = masked_maml(loss, num_inner_steps=2, inner_lr=0.3, adapt=lambda name: True)
    (value, _), grads = jit_meta_grad(everything, params, task)
    (ref_value, _), ref_grads = jit_meta_grad(maml(loss, num_inner_steps=2, inner_lr=0.3), params, task)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads, ref_grads)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("inside", [True, False], ids=["anil", "boil"])
def test_frozen_layers_never_change_during_adaptation(inside):
    loss, params, task = setup()
    adapt = lambda name: name.startswith("dense_2/") == inside
    update = masked(sgd(0.3), mask_from_names(params, adapt))
    adapted, _ = inner_adapt(params, task.support, loss, num_inner_steps=3, inner_update_fn=update)
    for layer in params:
        changed = [
            bool(jnp.any(a != b)) for a, b in zip(*map(jax.tree.leaves, (adapted[layer], params[layer])), strict=True)
        ]
        assert all(changed) if (layer == "dense_2") == inside else not any(changed), layer


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("make", [anil, boil], ids=["anil", "boil"])
def test_second_order_meta_gradient_matches_finite_differences(make):
    loss, params, task = setup()
    alg = make(loss, num_inner_steps=2, inner_lr=0.3)
    _, grads = jit_meta_grad(alg, params, task)
    numeric = fd_grad(lambda p: alg.meta_grad(p, task, jnp.int32(0))[0][0], params)
    np.testing.assert_allclose(np.asarray(ravel_pytree(grads)[0]), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.usefixtures("x64")
def test_first_order_anil_body_gradient_is_the_query_gradient_at_the_adapted_head():
    """Body parameters are not adapted, so with the inner gradients held constant the body's
    meta-gradient is exactly ∂L_query/∂body at (θ_body, θ'_head); the head's is ∂L_query/∂head."""
    loss, params, task = setup()
    alg = anil(loss, num_inner_steps=2, inner_lr=0.3, first_order=True)
    (value, _), grads = jit_meta_grad(alg, params, task)
    update = masked(sgd(0.3), mask_from_names(params, lambda n: n.startswith("dense_2/")))
    adapted, _ = inner_adapt(params, task.support, loss, num_inner_steps=2, inner_update_fn=update)
    (ref_value, _), ref_grads = jax.value_and_grad(loss, has_aux=True)(adapted, task.query)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads, ref_grads)
    # and second-order ANIL differs from it in the body (the head's adaptation depends on the body)
    _, exact = jit_meta_grad(anil(loss, num_inner_steps=2, inner_lr=0.3), params, task)
    assert float(jnp.abs(exact["dense_0"]["kernel"] - grads["dense_0"]["kernel"]).max()) > 1e-4


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("make", [anil, boil], ids=["anil", "boil"])
def test_zero_inner_steps_gives_the_plain_loss(make):
    loss, params, task = setup()
    (value, _), grads = jit_meta_grad(make(loss, num_inner_steps=0, inner_lr=0.3), params, task)
    (ref, _), ref_grads = jax.value_and_grad(loss, has_aux=True)(params, task.query)
    np.testing.assert_allclose(value, ref, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), grads, ref_grads)


def test_unknown_head_raises():
    params = mlp((4,), 1).init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    alg = anil(lambda p, b: (jnp.sum(p["dense_1"]["bias"]), {}), num_inner_steps=1, inner_lr=0.1, head="nope")
    task = regression_task(jax.random.PRNGKey(0))
    with pytest.raises(HyperparameterError, match="nope"):
        alg.meta_grad(params, task, jnp.int32(0))


@pytest.mark.parametrize("make,inner_lr", [(anil, 0.05), (boil, 0.01)], ids=["anil", "boil"])
def test_improves_the_sinusoid(make, inner_lr):
    problem = sinusoid_problem()
    result = train_briefly(make(problem.task_loss_fn, num_inner_steps=1, inner_lr=inner_lr), problem, steps=300)
    assert result.improved(margin=0.1), result[:2]


@pytest.mark.slow
@pytest.mark.parametrize("make", [anil, boil], ids=["anil", "boil"])
def test_improves_omniglot(make, omniglot_subset):
    problem = omniglot_problem(omniglot_subset)
    result = train_briefly(make(problem.task_loss_fn, num_inner_steps=1, inner_lr=0.4), problem, steps=200)
    assert result.improved(margin=0.05), result[:2]
