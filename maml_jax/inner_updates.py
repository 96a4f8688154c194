"""Inner-loop update rules: ``update(params, grads, step) -> params``.

Each factory captures its hyper-parameters and returns a pure function that
``core.inner_adapt`` applies once per inner step. Variants (Meta-SGD, per-step learning
rates, masks, ...) are further factories with the same signature.
"""

from __future__ import annotations

import jax

from maml_jax.types import InnerUpdateFn
from maml_jax.validation import check_learning_rate


def sgd(inner_lr) -> InnerUpdateFn:
    """Plain gradient descent, θ ← θ − α ∇L_support(θ) (Finn et al. 2017, Eq. 1)."""
    check_learning_rate(inner_lr, "inner_lr")

    def update(params, grads, step):
        del step
        return jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)

    return update
