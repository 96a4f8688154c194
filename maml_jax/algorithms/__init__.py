"""The MAML family as compositions of the core pieces; see ``algorithms.base.Algorithm``."""

from maml_jax.algorithms.base import Algorithm, batched_evaluate, batched_meta_grad
from maml_jax.algorithms.maml import fomaml, maml

__all__ = ["Algorithm", "batched_evaluate", "batched_meta_grad", "fomaml", "maml"]
