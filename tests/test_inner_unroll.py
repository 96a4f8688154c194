"""Unrolling the inner loop (``unroll``, ``config.inner_unroll``) changes the compiled program's
shape, not the meta-gradient."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest
from run_files import metric_rows

from maml_jax.algorithms import batched_meta_grad, maml
from maml_jax.core import batched_meta_loss
from maml_jax.data import sinusoid
from maml_jax.losses import mse_loss
from maml_jax.models import mlp


def problem():
    model = mlp((16, 16), 1, activation="tanh")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((5, 1)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)  # flax initialises float32
    return model, params, sinusoid.sample_tasks(jax.random.PRNGKey(1), 3, 5, 5)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("unroll", [True, 2])
def test_meta_gradient_equal_unrolled_and_looped(x64, first_order, unroll):
    model, params, tasks = problem()
    kw = dict(tasks=tasks, task_loss_fn=mse_loss(model.apply), num_inner_steps=4, inner_lr=0.1)
    kw["first_order"] = first_order
    looped = jax.value_and_grad(functools.partial(batched_meta_loss, **kw), has_aux=True)
    unrolled = jax.value_and_grad(functools.partial(batched_meta_loss, unroll=unroll, **kw), has_aux=True)
    want, got = looped(params), jax.jit(unrolled)(params)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
    assert float(sum(jnp.vdot(g, g) for g in jax.tree.leaves(want[1]))) > 1e-6  # not ~0
    # no while loop left in the meta-gradient when fully unrolled (the inner loop and its transpose)
    text = jax.jit(unrolled).lower(params).as_text()
    assert text.count("stablehlo.while") == (0 if unroll is True else 2)
    assert jax.jit(looped).lower(params).as_text().count("stablehlo.while") == 2


def test_maml_unrolls_in_training_only(x64):
    """``maml(..., unroll=True)``: the training meta-gradient is the looped one; ``evaluate`` keeps
    the loop (it may run more inner steps than training)."""
    model, params, tasks = problem()
    loss_fn = mse_loss(model.apply)
    looped, unrolled = (maml(loss_fn, num_inner_steps=3, inner_lr=0.1, unroll=u) for u in (1, True))
    want = batched_meta_grad(looped, params, tasks, 0, task_map="map")
    got = jax.jit(lambda p: batched_meta_grad(unrolled, p, tasks, 0, task_map="map"))(params)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
    task = jax.tree.map(lambda a: a[0], tasks)
    lowered = jax.jit(lambda p: unrolled.evaluate(p, task, 10)).lower(params).as_text()
    assert lowered.count("stablehlo.while") == 1


def test_config_inner_unroll_trains_the_same_numbers(tmp_path, monkeypatch):
    from maml_jax.cli import main
    from maml_jax.config import Config, ConfigError, apply_overrides

    flags = ["--no-progress", "--config.num_iterations=100", "--config.steps_per_call=50", "--config.log_every=50"]
    flags += ["--config.eval_num_tasks=10", "--config.baselines=", "--config.eval_shots=5"]
    flags += ["--config.eval_inner_steps=0", "--config.num_inner_steps=3"]
    unrolls, losses = [], []
    real_scan = jax.lax.scan

    def recording_scan(*args, **kwargs):  # core calls lax.scan through the jax module
        unrolls.append(kwargs.get("unroll", 1))
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(jax.lax, "scan", recording_scan)
    for flag in ("false", "true"):
        unrolls.clear()
        work = tmp_path / flag
        assert main(["train", "sinusoid", "--workdir", str(work), *flags, f"--config.inner_unroll={flag}"]) == 0
        assert any(u is True for u in unrolls) == (flag == "true"), "config.inner_unroll did not reach inner_adapt"
        losses.append([r["meta_loss"] for r in metric_rows(work)])
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    with pytest.raises(ConfigError, match="inner_unroll"):
        apply_overrides(Config(), {"inner_unroll": "true", "algorithm": "anil"})
