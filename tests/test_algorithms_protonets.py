"""Prototypical Networks: the logits against a brute-force formula, 100% on linearly separable toy
data after training a linear embedding, and a short Omniglot-subset run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algo_harness import Problem, omniglot_problem, train_briefly

from maml_jax.algorithms import batched_evaluate, protonets, prototypical_loss
from maml_jax.models import conv4
from maml_jax.types import Batch, Task
from maml_jax.validation import HyperparameterError, ShapeError

WAYS = 3
MEANS = jnp.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])  # separable in the first two features


def linear_embed(params, x):
    return x @ params["w"]


def toy_tasks(key, num_tasks, shots=2, queries=4):
    """``[tasks, ...]`` 3-way tasks in 6-D: classes differ in dims 0-1 (std 0.3), dims 2-5 are
    large nuisance noise (std 4) that a random embedding mixes in."""

    def one(k):
        k_perm, k_s, k_q = jax.random.split(k, 3)
        means = jnp.pad(MEANS[jax.random.permutation(k_perm, WAYS)], ((0, 0), (0, 4)))
        scale = jnp.array([0.3, 0.3, 4.0, 4.0, 4.0, 4.0])

        def draw(kk, n):
            y = jnp.repeat(jnp.arange(WAYS), n)
            return Batch(means[y] + scale * jax.random.normal(kk, (WAYS * n, 6)), y)

        return Task(draw(k_s, shots), draw(k_q, queries))

    return jax.vmap(one)(jax.random.split(key, num_tasks))


def test_logits_are_negative_squared_distances_to_class_means():
    key = jax.random.PRNGKey(0)
    task = jax.tree.map(lambda a: a[0], toy_tasks(key, 1))
    params = {"w": jax.random.normal(key, (6, 4))}
    loss, metrics = prototypical_loss(params, task, linear_embed, ways=WAYS, embed_jointly=False)
    zs, zq = task.support.x @ params["w"], task.query.x @ params["w"]
    protos = np.stack([np.asarray(zs)[np.asarray(task.support.y) == k].mean(0) for k in range(WAYS)])
    logits = -((np.asarray(zq)[:, None] - protos[None]) ** 2).sum(-1)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    expected = -logp[np.arange(len(task.query.y)), np.asarray(task.query.y)].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["query_accuracy"], (logits.argmax(1) == np.asarray(task.query.y)).mean())
    # a linear embedding of a joint batch is the same as separate embeddings
    joint, _ = prototypical_loss(params, task, linear_embed, ways=WAYS)
    np.testing.assert_allclose(joint, loss, rtol=1e-6)


def test_reaches_100_percent_on_linearly_separable_toy_data():
    init = {"w": jax.random.normal(jax.random.PRNGKey(1), (6, 4))}
    problem = Problem(
        "toy",
        None,
        init,
        lambda key, data: toy_tasks(key, 8),
        None,
        toy_tasks(jax.random.PRNGKey(123), 50),
        "query_accuracy",
        True,
        "",
        0,
    )
    alg = protonets(linear_embed, ways=WAYS)
    result = train_briefly(alg, problem, steps=100, outer_lr=0.05)
    assert result.before < 0.9, result.before  # the nuisance dimensions hurt at first
    assert result.after == 1.0, result.after
    # evaluate ignores the number of inner steps
    a = batched_evaluate(alg, result.meta_params, problem.eval_tasks, 0)["query_accuracy"]
    b = batched_evaluate(alg, result.meta_params, problem.eval_tasks, 5)["query_accuracy"]
    np.testing.assert_array_equal(a, b)


def test_bad_input_is_named():
    with pytest.raises(HyperparameterError, match="ways"):
        protonets(linear_embed, ways=0)
    task = jax.tree.map(lambda a: a[0], toy_tasks(jax.random.PRNGKey(0), 1))
    onehot = lambda b: Batch(b.x, jax.nn.one_hot(b.y, WAYS))  # noqa: E731
    bad = Task(onehot(task.support), onehot(task.query))
    with pytest.raises(ShapeError, match="integer labels"):
        prototypical_loss({"w": jnp.eye(6)}, bad, linear_embed, ways=WAYS)


@pytest.mark.slow  # about a minute on 2 busy CPU cores
def test_improves_omniglot(omniglot_subset):
    problem = omniglot_problem(omniglot_subset)
    embed = conv4(5, head=False)
    problem = problem._replace(init_params=embed.init(jax.random.PRNGKey(0), problem.eval_tasks.support.x[0]))
    alg = protonets(embed.apply, ways=5)
    result = train_briefly(alg, problem, steps=150, outer_lr=1e-3)
    assert result.improved(margin=0.1), result[:2]
