"""Inner-gradient clipping (``inner_updates.clip_by_global_norm``, ``config.inner_grad_clip``)
against closed forms and finite differences in float64, and the meta-gradient clipping of
``config.outer_grad_clip``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from run_files import metric_rows
from test_core_math import fd_grad, flat_grad, linear_loss, linear_task, regression_task, small_model

from maml_jax import HyperparameterError, adaptation_curve, inner_adapt, meta_loss, mse_loss
from maml_jax.algorithms.maml import maml
from maml_jax.config import Config, ConfigError
from maml_jax.experiment import make_optimizer
from maml_jax.inner_updates import clip_by_global_norm, sgd


def _support_grad_norm(theta, task):
    return float(jnp.linalg.norm(jax.grad(lambda t: linear_loss(t, task.support)[0])(theta)))


@pytest.mark.usefixtures("x64")
def test_clipped_step_and_meta_gradient_closed_form():
    """One clipped step on linear regression: with g = H_s θ − b and ‖g‖ > c,
    θ' = θ − α c g/‖g‖, and dθ'/dθ = I − α c (I/‖g‖ − g gᵀ/‖g‖³) H_s, so the meta-gradient
    is (dθ'/dθ)ᵀ ∇L_q(θ')."""
    task = linear_task(jax.random.PRNGKey(3))
    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    alpha = 0.2
    xs, ys = task.support
    xq, yq = task.query
    h_s = xs.T @ xs / xs.shape[0]
    g = xs.T @ (xs @ theta - ys) / xs.shape[0]
    norm = jnp.linalg.norm(g)
    c = 0.25 * float(norm)  # binds
    theta_prime = theta - alpha * c * g / norm
    jac = jnp.eye(4) - alpha * c * (jnp.eye(4) / norm - jnp.outer(g, g) / norm**3) @ h_s
    expected = jac.T @ (xq.T @ (xq @ theta_prime - yq) / xq.shape[0])

    rule = clip_by_global_norm(sgd(alpha), c)
    adapted, _ = inner_adapt(theta, task.support, linear_loss, num_inner_steps=1, inner_update_fn=rule)
    np.testing.assert_allclose(adapted, theta_prime, rtol=1e-12)
    np.testing.assert_allclose(jnp.linalg.norm(adapted - theta), alpha * c, rtol=1e-12)
    got = jax.grad(lambda t: meta_loss(t, task, linear_loss, num_inner_steps=1, inner_update_fn=rule)[0])(theta)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    # and the clipping matters: the unclipped meta-gradient is different
    plain = jax.grad(lambda t: meta_loss(t, task, linear_loss, num_inner_steps=1, inner_lr=alpha)[0])(theta)
    assert np.abs(plain - expected).max() > 1e-3


@pytest.mark.usefixtures("x64")
def test_inside_the_ball_clipping_is_exactly_sgd_to_second_order():
    task = linear_task(jax.random.PRNGKey(3))
    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    c = 10 * _support_grad_norm(theta, task)
    rule = clip_by_global_norm(sgd(0.2), c)
    clipped = lambda t: meta_loss(t, task, linear_loss, num_inner_steps=3, inner_update_fn=rule)[0]
    plain = lambda t: meta_loss(t, task, linear_loss, num_inner_steps=3, inner_lr=0.2)[0]
    np.testing.assert_array_equal(jax.grad(clipped)(theta), jax.grad(plain)(theta))
    np.testing.assert_array_equal(jax.hessian(clipped)(theta), jax.hessian(plain)(theta))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("num_steps", [1, 3])
def test_clipped_second_order_meta_gradient_matches_finite_differences(num_steps):
    model, params = small_model("tanh")
    task = regression_task(jax.random.PRNGKey(0))
    loss = mse_loss(model.apply)
    g0 = jax.grad(lambda p: loss(p, task.support)[0])(params)
    norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g0))))
    rule = clip_by_global_norm(sgd(0.3), 0.5 * norm)  # binds at the first step at least
    f = lambda p: meta_loss(p, task, loss, num_inner_steps=num_steps, inner_update_fn=rule)[0]
    np.testing.assert_allclose(flat_grad(f, params), fd_grad(f, params), rtol=1e-6, atol=1e-8)


def test_zero_gradient_gives_no_nan_and_bad_max_norm_is_rejected():
    rule = clip_by_global_norm(sgd(0.1), 1.0)
    params = {"w": jnp.ones(3)}
    zero = {"w": jnp.zeros(3)}
    np.testing.assert_array_equal(rule(params, zero, 0)["w"], params["w"])
    d = jax.grad(lambda w: jnp.sum(rule({"w": w}, {"w": w - w}, 0)["w"]))(jnp.ones(3))
    assert np.isfinite(np.asarray(d)).all()
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(HyperparameterError, match="max_norm"):
            clip_by_global_norm(sgd(0.1), bad)
    # numpy scalars are numbers too; a c beyond float32's range never clips (no OverflowError)
    np.testing.assert_array_equal(
        clip_by_global_norm(sgd(0.1), np.float32(1e9))(params, params, 0)["w"], np.float32(0.9)
    )
    np.testing.assert_array_equal(
        jax.jit(clip_by_global_norm(sgd(0.1), 1e200))(params, params, 0)["w"], np.float32(0.9)
    )


def test_the_clip_bounds_every_inner_step_of_a_diverging_task():
    """SGD with too large a step diverges on a steep quadratic; clipped, each step moves by at
    most α·c, so K steps stay within K·α·c of the start."""
    task = linear_task(jax.random.PRNGKey(0))
    task = task._replace(support=task.support._replace(x=task.support.x * 30.0))
    theta = jnp.zeros(4)
    one = jax.tree.map(lambda a: a[None], task)  # a batch of one task
    plain = adaptation_curve(theta, one, linear_loss, num_inner_steps=10, inner_lr=0.5)
    assert plain["loss"][0, -1] > 1e6 * plain["loss"][0, 0]
    clipped = adaptation_curve(theta, one, linear_loss, num_inner_steps=10, inner_lr=0.5, inner_grad_clip=1.0)
    assert np.isfinite(clipped["loss"]).all() and clipped["loss"][0, -1] < 1e3 * clipped["loss"][0, 0]
    adapted, _ = inner_adapt(
        theta, task.support, linear_loss, num_inner_steps=10, inner_update_fn=clip_by_global_norm(sgd(0.5), 1.0)
    )
    assert float(jnp.linalg.norm(adapted - theta)) <= 10 * 0.5 * 1.0 + 1e-5
    with pytest.raises(HyperparameterError, match="inner_update_fn"):
        adaptation_curve(theta, one, linear_loss, num_inner_steps=1, inner_update_fn=sgd(0.1), inner_grad_clip=1.0)


def test_maml_algorithm_with_inner_grad_clip_is_meta_loss_with_the_clipped_rule():
    task = linear_task(jax.random.PRNGKey(3))
    theta = jnp.array([0.3, -0.2, 0.5, 0.1])
    c = 0.3 * _support_grad_norm(theta, task)
    algo = maml(linear_loss, num_inner_steps=2, inner_lr=0.2, inner_grad_clip=c)
    (loss, _), grads = algo.meta_grad(theta, task, jnp.int32(0))
    rule = clip_by_global_norm(sgd(0.2), c)
    (want, _), want_grads = jax.value_and_grad(meta_loss, has_aux=True)(
        theta, task, linear_loss, num_inner_steps=2, inner_update_fn=rule
    )
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(grads, want_grads, rtol=1e-5)
    unclipped = maml(linear_loss, num_inner_steps=2, inner_lr=0.2).meta_grad(theta, task, jnp.int32(0))[1]
    assert np.abs(np.asarray(unclipped - grads)).max() > 1e-3


def test_outer_grad_clip_clips_before_adam_and_is_absent_by_default():
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50
    opt = make_optimizer(Config(outer_lr=0.1, outer_grad_clip=5.0))
    updates, _ = opt.update(grads, opt.init(params), params)
    ref = optax.adam(0.1)
    want, _ = ref.update({"w": grads["w"] / 10}, ref.init(params), params)
    np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
    # without the option, the optimizer (and so a checkpoint's state tree) is Adam's alone
    plain = make_optimizer(Config(outer_lr=0.1))
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(ref.init(params))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"inner_grad_clip": -1.0}, "inner_grad_clip"),
        ({"outer_grad_clip": float("nan")}, "outer_grad_clip"),
        ({"inner_grad_clip": 1.0, "algorithm": "anil"}, "inner_grad_clip applies"),
    ],
)
def test_config_rejects_bad_clip_settings(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Config(**overrides).validate()


def test_train_with_both_clips_then_eval_and_plot_with_another_inner_clip(tmp_path, capsys):
    """End to end through ``maml-jax``: the inner clip reaches training (the meta-loss differs
    from an unclipped run); ``eval`` restores the clipped run's Adam-after-clip state from its
    checkpoint; ``eval --inner-grad-clip`` writes its own files, where a clip far above every
    gradient reproduces no clipping and a binding one changes the figures; ``plot`` still
    finds the run's own evaluation among them and writes its inner-steps figure."""
    import json

    from test_algorithm_runs import TINY_SINUSOID

    from maml_jax.cli import main

    def train(name, *flags):
        assert main(["train", "sinusoid", "--workdir", str(tmp_path / name), *flags, *TINY_SINUSOID]) == 0
        return metric_rows(tmp_path / name)

    clipped = train("clipped", "--config.inner_grad_clip=0.01", "--config.outer_grad_clip=1")
    plain = train("plain")
    assert clipped[-1]["meta_loss"] != pytest.approx(plain[-1]["meta_loss"], rel=1e-3)
    workdir = tmp_path / "clipped"
    assert json.loads((workdir / "eval.json").read_text())["inner_grad_clip"] == 0.01

    (workdir / "maml" / "params.msgpack").unlink()  # eval now restores the checkpoint's train state
    (workdir / "eval.json").unlink()  # and plot falls back to the eval-step files

    def mse(name):
        return json.loads((workdir / name).read_text())["results"]["maml"]["by_shots"]["5"]["mse"]["2"][0]

    for clip in (None, "0", "1e9", "0.001"):
        assert main(["eval", "--run-dir", str(workdir), *([] if clip is None else ["--inner-grad-clip", clip])]) == 0
    assert mse("eval-step3-clip0.json") == pytest.approx(mse("eval-step3-clip1e+09.json"), rel=1e-6)
    assert abs(mse("eval-step3-clip0.001.json") - mse("eval-step3-clip0.json")) > 1e-4
    assert abs(mse("eval-step3.json") - mse("eval-step3-clip0.json")) > 1e-4  # the run's own clip, 0.01
    # plot's evaluation of the run is eval-step3.json (the run's own clip), not a -clip<C> file
    from maml_jax.plotting import _latest_eval

    assert _latest_eval(workdir) == json.loads((workdir / "eval-step3.json").read_text())
    capsys.readouterr()
    assert main(["plot", str(workdir), "--out", str(tmp_path / "fig")]) == 0
    written = capsys.readouterr().out.split()
    # learning curves and the inner-steps figure (there is an evaluation); no sinusoid figure,
    # which needs eval.json
    expected = [tmp_path / f"fig_{name}.{ext}" for name in ("curves", "inner_steps") for ext in ("png", "pdf")]
    assert written == [str(p) for p in expected]
    assert all(p.is_file() and p.stat().st_size > 0 for p in expected)
    assert main(["eval", "--run-dir", str(workdir), "--inner-grad-clip", "-1"]) == 2
    assert "inner_grad_clip" in capsys.readouterr().err
