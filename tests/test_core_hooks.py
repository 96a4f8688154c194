"""``core.inner_adapt``'s additive hooks: a step-indexed task loss, a post-step function and an
update rule that reads the loss. Without them the results are exactly the plain MAML loop's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maml_jax import HyperparameterError, inner_adapt, mlp, mse_loss
from maml_jax.data import sinusoid


def setup():
    model = mlp((5,), 1, activation="tanh")
    tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(2), 1, 5, 6)
    task = jax.tree.map(lambda a: a[0], tasks)
    return mse_loss(model.apply), model.init(jax.random.PRNGKey(0), task.support.x), task


def test_hooks_off_and_trivial_hooks_reproduce_the_plain_loop():
    loss, params, task = setup()
    ref, ref_trace = inner_adapt(params, task.support, loss, num_inner_steps=3, inner_lr=0.1)
    seen = []

    def step_loss(p, b, step):
        seen.append(step)
        return loss(p, b)

    post = lambda p, step: (loss(p, task.query)[0], step)  # noqa: E731
    out, trace = inner_adapt(
        params, task.support, step_loss, num_inner_steps=3, inner_lr=0.1, loss_takes_step=True, post_step_fn=post
    )
    jax.tree.map(np.testing.assert_array_equal, out, ref)
    np.testing.assert_array_equal(trace["support_loss"], ref_trace["support_loss"])
    losses, steps = trace["post_step"]
    np.testing.assert_array_equal(steps, [0, 1, 2])
    # post_step sees the parameters *after* each step: its last entry is the final query loss
    np.testing.assert_allclose(losses[-1], loss(ref, task.query)[0], rtol=1e-6)
    assert seen and seen[0].dtype == jnp.int32


def test_update_takes_loss_receives_the_support_loss_before_the_step():
    loss, params, task = setup()

    def update(p, g, step, support_loss):
        # a loss-scaled step: the received loss must be the one inner_adapt reports
        return jax.tree.map(lambda a, b: a - 0.05 * support_loss * b, p, g)

    out, trace = inner_adapt(
        params, task.support, loss, num_inner_steps=2, inner_update_fn=update, update_takes_loss=True
    )
    p = params
    for _ in range(2):
        value, g = jax.value_and_grad(lambda q: loss(q, task.support)[0])(p)
        p = jax.tree.map(lambda a, b, v=value: a - 0.05 * v * b, p, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), out, p)
    with pytest.raises(HyperparameterError, match="update_takes_loss"):
        inner_adapt(params, task.support, loss, num_inner_steps=1, inner_lr=0.1, update_takes_loss=True)
