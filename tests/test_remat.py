"""remat (jax.checkpoint around the scanned inner step) changes memory, not numbers."""

import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import pytest
from run_files import metric_rows

from maml_jax.core import batched_meta_loss, inner_adapt
from maml_jax.data import sinusoid
from maml_jax.losses import mse_loss
from maml_jax.models import mlp
from maml_jax.validation import HyperparameterError


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize(
    "policy", [None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable], ids=["nothing_saveable", "dots"]
)
def test_meta_gradient_equal_with_and_without_remat(x64, first_order, policy):
    model = mlp((16, 16), 1, activation="tanh")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((5, 1)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)  # flax initialises float32
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(1), 3, 5, 5)
    loss = functools.partial(
        batched_meta_loss,
        tasks=tasks,
        task_loss_fn=mse_loss(model.apply),
        num_inner_steps=4,
        inner_lr=0.05,
        first_order=first_order,
    )
    (l0, _), g0 = jax.value_and_grad(loss, has_aux=True)(params)
    (l1, _), g1 = jax.jit(jax.value_and_grad(functools.partial(loss, remat=True, remat_policy=policy), has_aux=True))(
        params
    )
    assert jnp.allclose(l0, l1, rtol=1e-12)
    chex.assert_tree_all_finite(g0)  # assert_trees_all_close takes NaN == NaN
    chex.assert_trees_all_close(g1, g0, rtol=1e-10, atol=1e-12)
    assert max(float(abs(a).max()) for a in jax.tree.leaves(g0)) > 1e-3


def _primitive_names(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in _sub_jaxprs(eqn.params.values()):
            names |= _primitive_names(sub)
    return names


def _sub_jaxprs(values):
    """The jaxprs held in an equation's params (scan's ``jaxpr``, cond's ``branches``, ...);
    written out because ``jax.extend.core.jaxprs_in_params`` is newer than our jax floor."""
    for v in values:
        if isinstance(v, jax.extend.core.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jax.extend.core.Jaxpr):
            yield v
        elif isinstance(v, tuple | list):
            yield from _sub_jaxprs(v)


@pytest.mark.parametrize("remat", [False, True])
def test_remat_puts_the_inner_steps_under_checkpoint(remat):
    """The equality test above would pass if ``remat`` were ignored; this one would not: the
    meta-gradient's program holds a ``checkpoint`` (``remat2``) exactly when asked for."""
    model = mlp((8,), 1)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((5, 1)))
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(1), 2, 5, 5)
    loss = functools.partial(
        batched_meta_loss, tasks=tasks, task_loss_fn=mse_loss(model.apply), num_inner_steps=3, inner_lr=0.05
    )
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(p, remat=remat)[0]))(params).jaxpr
    assert ("remat2" in _primitive_names(jaxpr)) == remat


def test_remat_policy_without_remat_is_an_error():
    model = mlp((4,), 1)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 1)))
    task = sinusoid.sample_tasks(jax.random.PRNGKey(1), 1, 2, 2)
    with pytest.raises(HyperparameterError, match="remat"):
        inner_adapt(
            params,
            jax.tree.map(lambda x: x[0], task.support),
            mse_loss(model.apply),
            num_inner_steps=1,
            inner_lr=0.1,
            remat_policy=jax.checkpoint_policies.nothing_saveable,
        )


def test_config_remat_trains_the_same_numbers(tmp_path, monkeypatch):

    from maml_jax.cli import main
    from maml_jax.config import Config, ConfigError, apply_overrides

    flags = ["--no-progress", "--config.num_iterations=100", "--config.steps_per_call=50", "--config.log_every=50"]
    flags += [
        "--config.eval_num_tasks=10",
        "--config.baselines=",
        "--config.eval_shots=5",
        "--config.eval_inner_steps=0",
    ]
    flags += ["--config.num_inner_steps=3"]
    losses, wrapped = [], []
    real_checkpoint = jax.checkpoint

    def counting_checkpoint(fn, **kwargs):  # core wraps its inner step in jax.checkpoint iff remat
        wrapped.append(fn)
        return real_checkpoint(fn, **kwargs)

    # core calls jax.checkpoint through the jax module, so this is the one global to patch
    monkeypatch.setattr(jax, "checkpoint", counting_checkpoint)
    for remat in ("false", "true"):
        work = tmp_path / remat
        wrapped.clear()
        assert main(["train", "sinusoid", "--workdir", str(work), *flags, f"--config.remat={remat}"]) == 0
        assert bool(wrapped) == (remat == "true"), "config.remat did not reach core.inner_adapt"
        losses.append([r["meta_loss"] for r in metric_rows(work)])
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    with pytest.raises(ConfigError, match="remat"):
        apply_overrides(Config(), {"remat": "true", "algorithm": "anil"})


def test_config_first_order_reaches_training(tmp_path):
    """``--config.first_order=true`` trains FOMAML: other meta-losses than MAML from the same
    seed, and the run's model is labelled ``fomaml``."""
    import json

    from maml_jax.cli import main

    flags = ["--no-progress", "--config.num_iterations=100", "--config.steps_per_call=50", "--config.log_every=50"]
    flags += ["--config.eval_num_tasks=10", "--config.baselines=", "--config.eval_shots=5"]
    flags += ["--config.eval_inner_steps=0,1", "--config.num_inner_steps=2"]
    losses, labels = [], []
    for first_order in ("false", "true"):
        work = tmp_path / first_order
        assert main(["train", "sinusoid", "--workdir", str(work), *flags, f"--config.first_order={first_order}"]) == 0
        losses.append([r["meta_loss"] for r in metric_rows(work)])
        labels.append(set(json.loads((work / "eval.json").read_text())["results"]))
    assert labels == [{"maml"}, {"fomaml"}]
    assert losses[0][0] != pytest.approx(losses[1][0], rel=1e-4)  # the 50-step means part once updates differ
