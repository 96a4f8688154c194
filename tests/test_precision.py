"""Mixed precision (maml_jax.precision): bf16 compute, float32 parameters, loss and inner loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from run_files import metric_rows

from maml_jax.core import batched_meta_loss
from maml_jax.data import sinusoid
from maml_jax.losses import mse_loss
from maml_jax.models import conv4, mlp
from maml_jax.precision import mixed_precision
from maml_jax.train import init_train_state, make_train_step
from maml_jax.validation import HyperparameterError


def _objective(model):
    return functools.partial(batched_meta_loss, task_loss_fn=mse_loss(model.apply), num_inner_steps=2, inner_lr=0.01)


def test_bf16_compute_keeps_float32_loss_params_and_gradients():
    model = mlp((32, 32), 1)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((5, 1)))
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(1), 4, 5, 5)
    (l32, _), g32 = jax.jit(jax.value_and_grad(_objective(model), has_aux=True))(params, tasks)
    bf16 = mixed_precision(model)
    assert bf16.apply(params, tasks.query.x[0]).dtype == jnp.float32
    (l16, _), g16 = jax.jit(jax.value_and_grad(_objective(bf16), has_aux=True))(params, tasks)
    assert l16.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    assert l16 == pytest.approx(float(l32), rel=3e-2)
    num = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True))
    norms = [sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(g)) ** 0.5 for g in (g16, g32)]
    assert num / (norms[0] * norms[1]) > 0.99  # the same direction, to bf16 precision


def test_tiny_model_trains_in_bf16():
    model = mixed_precision(mlp((32, 32), 1))
    optimizer = optax.adam(1e-2)
    state = init_train_state(model.init(jax.random.PRNGKey(0), jnp.zeros((5, 1))), optimizer, jax.random.PRNGKey(1))
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(2), 8, 5, 5)  # a fixed batch: the loss must fall
    step = jax.jit(make_train_step(_objective(model), optimizer))
    losses = []
    for _ in range(60):
        state, metrics = step(state, tasks)
        losses.append(float(metrics["meta_loss"]))
    assert all(jnp.isfinite(jnp.array(losses)))
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.meta_params))


@pytest.mark.slow
def test_conv4_bf16_apply_matches_float32():
    model = conv4(3, dataset="omniglot")
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(1), x)
    out32, out16 = jax.jit(model.apply)(params, x), jax.jit(mixed_precision(model).apply)(params, x)
    assert out16.dtype == jnp.float32 and out16.shape == out32.shape
    assert jnp.allclose(out16, out32, atol=0.1 * float(jnp.abs(out32).max()))


def test_integer_compute_dtype_is_an_error():
    with pytest.raises(HyperparameterError, match="floating"):
        mixed_precision(mlp((4,), 1), jnp.int32)


def test_config_compute_dtype_runs_the_model_in_bf16_and_trains(tmp_path):
    from maml_jax.cli import main
    from maml_jax.config import Config, ConfigError, apply_overrides
    from maml_jax.task_families import build_model

    config = apply_overrides(Config(), {"compute_dtype": "bfloat16"})
    model = build_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((5, 1)))
    jaxpr = str(jax.make_jaxpr(model.apply)(params, jnp.zeros((5, 1))))
    assert "bf16" in jaxpr and model.apply(params, jnp.zeros((5, 1))).dtype == jnp.float32
    assert "bf16" not in str(jax.make_jaxpr(build_model(Config()).apply)(params, jnp.zeros((5, 1))))
    with pytest.raises(ConfigError, match="compute_dtype"):
        apply_overrides(Config(), {"compute_dtype": "float16"})

    workdir = tmp_path / "run"
    argv = ["train", "sinusoid", "--workdir", str(workdir), "--no-progress", "--config.compute_dtype=bfloat16"]
    argv += ["--config.num_iterations=300", "--config.steps_per_call=100", "--config.log_every=100"]
    argv += ["--config.eval_num_tasks=20", "--config.baselines=", "--config.eval_shots=10"]
    assert main(argv) == 0

    rows = metric_rows(workdir)
    losses = [r["meta_loss"] for r in rows if r.get("run") == "maml"]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
