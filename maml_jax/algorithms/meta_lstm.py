"""Meta-LSTM (Ravi & Larochelle 2017, "Optimization as a Model for Few-Shot Learning") as an
``Algorithm``: the inner update rule itself is learned, a coordinate-wise LSTM whose cell state
is the learner's parameters (§3.1, Eq. 2):

    c_t = f_t ⊙ c_{t−1} + i_t ⊙ c̃_t,  c_t = θ_t,  c̃_t = −∇_{θ_{t−1}} L_t
    i_t = σ(W_I · [h_t, θ_{t−1}, i_{t−1}] + b_I)      (input gate ~ learned step size)
    f_t = σ(W_F · [h_t, θ_{t−1}, f_{t−1}] + b_F)      (forget gate ~ learned shrinkage/decay)

``h_t`` is the output of a first, ordinary LSTM (§3.3, "a 2-layer LSTM") whose input is the
preprocessed gradient and loss (Andrychowicz et al. 2016, App. A, ``preprocess``). All weights
are shared across coordinates ("parameter sharing", §3.3); each coordinate has its own state.

It plugs into ``core.inner_adapt`` as an ``inner_update_fn`` (with ``update_takes_loss``): the
scan carry is ``{"learner": θ, "state": LSTM state}`` and the task loss reads ``"learner"``.
``meta_params = {"learner": θ_0 (= c_0, the learned initialisation), "lstm": update-rule
parameters}``. As in the paper (§3.2, Fig. 2's dashed lines), no gradient flows through the
learner's gradients and losses fed to the meta-learner (``stop_gradient``: no second
derivatives); the meta-gradient reaches the update rule through the gates and θ_0 through the
cell state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from maml_jax.algorithms.base import Algorithm, from_meta_loss
from maml_jax.core import inner_adapt
from maml_jax.inner_updates import clip_by_global_norm
from maml_jax.types import Metrics, Params, Task, TaskLossFn
from maml_jax.validation import HyperparameterError, check_max_norm, check_num_steps, check_task

PREPROCESS_P = 10.0


def preprocess(x: jax.Array, p: float = PREPROCESS_P) -> jax.Array:
    """Andrychowicz et al. (2016) App. A: ``x [...] → [..., 2]``,
    ``(log|x| / p, sign x)`` if ``|x| >= e^{−p}``, else ``(−1, e^p · x)``."""
    ax = jnp.abs(x)
    big = ax >= math.exp(-p)
    first = jnp.where(big, jnp.log(jnp.maximum(ax, math.exp(-p))) / p, -1.0)
    second = jnp.where(big, jnp.sign(x), math.exp(p) * x)
    return jnp.stack([first, second], axis=-1)


def init_meta_lstm_params(
    key: jax.Array, *, hidden: int = 20, init_lr: float = 0.01, forget_bias: float = 5.0, dtype=jnp.float32
) -> Params:
    """Update-rule parameters: ``cell: {kernel [4 + H, 4H], bias [4H]}`` (first LSTM, input
    ``[preprocess(g), preprocess(L)]``), ``w_input``/``w_forget: [H + 2]``, ``b_input``/``b_forget``
    scalars. Gate weights start near zero (U(−0.01, 0.01)), so at first every coordinate steps with
    ``σ(b_input) = init_lr`` and keeps ``σ(forget_bias)`` of itself (the paper starts f near 1, i small).
    """
    if not 0.0 < init_lr < 1.0:
        raise HyperparameterError(f"init_lr is a sigmoid gate value and must lie in (0, 1), got {init_lr}")
    if hidden < 1:
        raise HyperparameterError(f"hidden must be >= 1, got {hidden}")
    k1, k2, k3 = jax.random.split(key, 3)
    bound = 1.0 / math.sqrt(hidden)
    return {
        "cell": {
            "kernel": jax.random.uniform(k1, (4 + hidden, 4 * hidden), dtype, -bound, bound),
            "bias": jnp.zeros((4 * hidden,), dtype),
        },
        "w_input": jax.random.uniform(k2, (hidden + 2,), dtype, -0.01, 0.01),
        "w_forget": jax.random.uniform(k3, (hidden + 2,), dtype, -0.01, 0.01),
        "b_input": jnp.asarray(math.log(init_lr / (1.0 - init_lr)), dtype),
        "b_forget": jnp.asarray(forget_bias, dtype),
    }


def init_state(num_coords: int, hidden: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Per-coordinate state: first-LSTM ``h, c: [n, H]``, previous gates ``i, f: [n]`` (zeros)."""
    zeros = jnp.zeros((num_coords, hidden), dtype)
    return {"h": zeros, "c": zeros, "i": jnp.zeros((num_coords,), dtype), "f": jnp.zeros((num_coords,), dtype)}


def _lstm_cell(cell: Params, x: jax.Array, h: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Standard LSTM cell on ``x [n, 4]``, ``h, c [n, H]`` (gates i, f, g, o)."""
    z = jnp.concatenate([x, h], -1) @ cell["kernel"] + cell["bias"]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def meta_lstm_update(lstm: Params):
    """``inner_update_fn(carry, grads, step, loss) -> carry`` for ``core.inner_adapt`` with
    ``update_takes_loss=True``; ``carry = {"learner": θ, "state": init_state(...)}``. Applies
    Eq. 2 coordinate-wise to the flattened θ; gradient and loss inputs are ``stop_gradient``-ed."""

    def update(carry, grads, step, loss):
        del step
        theta, unravel = ravel_pytree(carry["learner"])
        g = jax.lax.stop_gradient(ravel_pytree(grads["learner"])[0])
        loss = jax.lax.stop_gradient(loss)
        st = carry["state"]
        x = jnp.concatenate([preprocess(g), jnp.broadcast_to(preprocess(loss), (g.shape[0], 2))], -1)
        h, c = _lstm_cell(lstm["cell"], x.astype(st["h"].dtype), st["h"], st["c"])
        gate = lambda prev, w, b: jax.nn.sigmoid(jnp.concatenate([h, theta[:, None], prev[:, None]], -1) @ w + b)  # noqa: E731
        f = gate(st["f"], lstm["w_forget"], lstm["b_forget"])
        i = gate(st["i"], lstm["w_input"], lstm["b_input"])
        theta = f * theta - i * g
        return {"learner": unravel(theta), "state": {"h": h, "c": c, "i": i, "f": f}}

    return update


def meta_lstm_loss(
    meta_params: Params,
    task: Task,
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    hidden: int,
    max_grad_norm: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """``L_query(θ_K)`` after ``num_inner_steps`` Meta-LSTM updates from θ_0 = ``meta_params["learner"]``.
    ``max_grad_norm`` > 0: each learner gradient is clipped to that global norm
    (``inner_updates.clip_by_global_norm``) before the update rule sees it, so a step moves θ by
    at most ``i·c`` per coordinate group however steep the support loss (not in the paper).
    Metrics as ``core.meta_loss``: ``query_loss``, ``query_<aux>``, ``support_loss`` (K > 0)."""
    check_task(task)
    theta0 = meta_params["learner"]
    flat, _ = ravel_pytree(theta0)
    carry = {"learner": theta0, "state": init_state(flat.shape[0], hidden, flat.dtype)}
    update = meta_lstm_update(meta_params["lstm"])
    if max_grad_norm:
        update = clip_by_global_norm(update, max_grad_norm)
    adapted, trace = inner_adapt(
        carry,
        task.support,
        lambda c, batch: task_loss_fn(c["learner"], batch),
        num_inner_steps=num_inner_steps,
        inner_update_fn=update,
        first_order=True,
        update_takes_loss=True,
    )
    loss, aux = task_loss_fn(adapted["learner"], task.query)
    metrics = {"query_loss": loss, **{f"query_{k}": v for k, v in aux.items()}}
    if num_inner_steps > 0:
        metrics["support_loss"] = trace["support_loss"][0]
    return loss, metrics


def meta_lstm(
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    hidden: int = 20,
    init_lr: float = 0.01,
    forget_bias: float = 5.0,
    key: jax.Array | int = 0,
    max_grad_norm: float = 0.0,
) -> Algorithm:
    """Meta-LSTM: ``meta_params = {"learner": θ_0, "lstm": init_meta_lstm_params(key, ...)}``;
    the meta-gradient is ∇ L_query(θ_K) w.r.t. both, with the learner's gradients and losses
    treated as constants (Ravi & Larochelle 2017 §3.2). ``max_grad_norm``: see ``meta_lstm_loss``."""
    check_num_steps(num_inner_steps)
    if max_grad_norm:
        check_max_norm(max_grad_norm)
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key

    def init(params):
        dtype = ravel_pytree(params)[0].dtype
        lstm = init_meta_lstm_params(key, hidden=hidden, init_lr=init_lr, forget_bias=forget_bias, dtype=dtype)
        return {"learner": params, "lstm": lstm}

    def loss(meta_params, task, k):
        return meta_lstm_loss(
            meta_params, task, task_loss_fn, num_inner_steps=k, hidden=hidden, max_grad_norm=max_grad_norm
        )

    return from_meta_loss("meta_lstm", loss, num_inner_steps, init)
