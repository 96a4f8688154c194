"""Inner-loop update rules: ``update(params, grads, step) -> params``.

Each factory captures its hyper-parameters and returns a pure function that
``core.inner_adapt`` applies once per inner step. Variants (Meta-SGD, per-step learning
rates, masks, ...) are further factories with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from maml_jax.types import InnerUpdateFn
from maml_jax.validation import HyperparameterError, check_learning_rate, check_max_norm


def sgd(inner_lr, max_grad_norm: float = 0.0) -> InnerUpdateFn:
    """Plain gradient descent, θ ← θ − α ∇L_support(θ) (Finn et al. 2017, Eq. 1); with
    ``max_grad_norm`` > 0 each gradient is first clipped to that global norm
    (``clip_by_global_norm``, the ``inner_grad_clip`` of a config)."""
    check_learning_rate(inner_lr, "inner_lr")

    def update(params, grads, step):
        del step
        return jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)

    return clip_by_global_norm(update, max_grad_norm) if max_grad_norm else update


def meta_sgd(step_sizes) -> InnerUpdateFn:
    """Meta-SGD (Li et al. 2017, Eq. 2): θ ← θ − α ⊙ ∇L_support(θ), with ``step_sizes`` α a
    pytree of the same structure and shapes as the parameters (learned, so usually traced)."""

    def update(params, grads, step):
        del step
        return jax.tree.map(lambda p, a, g: p - a * g, params, step_sizes, grads)

    return update


def clip_by_global_norm(update_fn: InnerUpdateFn, max_norm: float) -> InnerUpdateFn:
    """Rescale each inner gradient to global norm at most ``max_norm`` before ``update_fn``:
    g ← g · min(1, c / ‖g‖₂), ‖g‖₂ over all leaves (optax's ``clip_by_global_norm``, applied
    per task and per inner step). Gradients already inside the ball pass through unchanged,
    values and derivatives alike (the scale is exactly 1 there); outside it the
    rescaling is differentiated like any other op, so second-order MAML sees it.

    Plain SGD with a fixed α has no stability guarantee: a task whose support loss is steep
    (e.g. a large-amplitude sinusoid with bunched support points) can overshoot and diverge
    over many steps. Clipping bounds each step's length by α·c. The norm is taken over every
    leaf of ``grads``, frozen ones included, so wrap it around ``masked`` only if that is
    what you mean. A gradient whose squared norm overflows its dtype (‖g‖ > ~1.8e19 in
    float32) gets a zero step rather than a NaN one."""
    check_max_norm(max_norm)

    def update(params, grads, step, *loss):
        sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
        # c/‖g‖ only where ‖g‖ > c; elsewhere rsqrt sees 1, so neither it nor its derivative is
        # evaluated at 0 (a zero gradient would otherwise give 0·inf = NaN in the meta-gradient)
        # c and c² in the gradient's dtype: a c beyond its range saturates, c² is inf, no clipping
        c = jnp.asarray(min(float(max_norm), float(jnp.finfo(sq.dtype).max)), sq.dtype)
        out = sq > jnp.square(c)
        scale = jnp.where(out, c * jax.lax.rsqrt(jnp.where(out, sq, 1.0)), 1.0)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        return update_fn(params, grads, step, *loss)

    return update


def _path_name(path) -> str:
    """``(DictKey('head'), DictKey('kernel'))`` → ``"head/kernel"``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def mask_from_names(params, predicate: Callable[[str], bool]):
    """A mask pytree of Python bools with the structure of ``params``: ``predicate(name)`` for
    each leaf, where ``name`` is its "/"-joined path (``"head/kernel"``, ``"conv_0/bias"``,
    ``"dense_2/kernel"``). Built from shapes only, so it is static under ``jit`` (big_vision's
    name-pattern masks)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(predicate(_path_name(path))), params)


def masked(update_fn: InnerUpdateFn, mask) -> InnerUpdateFn:
    """Apply ``update_fn`` only to the leaves where ``mask`` (a pytree of Python bools, e.g. from
    ``mask_from_names``) is True; the other leaves are returned unchanged (frozen during the
    inner loop), so their inner gradients are dead code that XLA removes. ANIL (Raghu et al.
    2020) adapts the head only, BOIL (Oh et al. 2021) the body only."""
    for leaf in jax.tree.leaves(mask):
        if not isinstance(leaf, bool):
            raise HyperparameterError(f"mask leaves must be Python bools (static), got {type(leaf).__name__}")

    def update(params, grads, step):
        new = update_fn(params, grads, step)
        return jax.tree.map(lambda m, n, p: n if m else p, mask, new, params)

    return update


def proximal(update_fn: InnerUpdateFn, anchor, prox_lambda: float) -> InnerUpdateFn:
    """The inner update on the proximal objective L(φ) + λ/2 ‖φ − anchor‖² (iMAML, Rajeswaran
    et al. 2019, Eq. 4): ``update_fn`` receives the gradient ∇L(φ) + λ (φ − anchor)."""
    check_learning_rate(prox_lambda, "prox_lambda")

    def update(params, grads, step):
        grads = jax.tree.map(lambda g, p, a: g + prox_lambda * (p - a), grads, params, anchor)
        return update_fn(params, grads, step)

    return update
