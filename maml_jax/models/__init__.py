"""Models as functional ``(init, apply)`` pairs; parameters are always passed explicitly."""

from maml_jax.models.base import Model
from maml_jax.models.conv4 import conv4
from maml_jax.models.mlp import mlp

__all__ = ["Model", "conv4", "mlp"]
