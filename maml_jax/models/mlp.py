"""Fully connected network; the sinusoid model of Finn et al. (2017) §5.1 is 1-40-40-1 ReLU."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maml_jax.models.base import Model

ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh, "softplus": nn.softplus, "gelu": nn.gelu}
KERNEL_INITS = {
    # PyTorch nn.Linear default: weights and biases ~ U(−1/√fan_in, 1/√fan_in)
    "torch_default": nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    # flax default: LeCun normal (variance 1/fan_in), zero bias
    "lecun_normal": nn.initializers.lecun_normal(),
    # the original MAML TF code: truncated normal, stddev 0.01
    "truncated_normal_0.01": nn.initializers.truncated_normal(stddev=0.01),
    "he_normal": nn.initializers.he_normal(),
}


def _symmetric_uniform(bound: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class _MLP(nn.Module):
    features: Sequence[int]
    activation: str
    kernel_init: str

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        init = KERNEL_INITS[self.kernel_init]
        for i, width in enumerate(self.features):
            bias_init = nn.initializers.zeros
            if self.kernel_init == "torch_default":
                bias_init = _symmetric_uniform(1.0 / x.shape[-1] ** 0.5)
            x = nn.Dense(width, kernel_init=init, bias_init=bias_init, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = act(x)
        return x


def mlp(
    hidden_sizes: Sequence[int] = (40, 40),
    out_size: int = 1,
    *,
    activation: str = "relu",
    kernel_init: str = "lecun_normal",
) -> Model:
    """MLP ``[n, d_in] -> [n, out_size]`` with ``activation`` between the Dense layers."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if kernel_init not in KERNEL_INITS:
        raise ValueError(f"kernel_init must be one of {sorted(KERNEL_INITS)}, got {kernel_init!r}")
    module = _MLP(tuple(hidden_sizes) + (out_size,), activation, kernel_init)

    def init(key: jax.Array, example_x: jax.Array):
        return module.init(key, example_x)["params"]

    def apply(params, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x)

    return Model(init, apply)
