"""The MAML family as compositions of the core pieces; see ``algorithms.base.Algorithm``."""

from maml_jax.algorithms.anil import anil, boil, head_name, masked_maml
from maml_jax.algorithms.base import Algorithm, batched_evaluate, batched_meta_grad, from_meta_loss
from maml_jax.algorithms.imaml import hessian_vector_product, imaml, implicit_meta_gradient
from maml_jax.algorithms.maml import fomaml, maml
from maml_jax.algorithms.mamlpp import (
    cosine_outer_lr,
    maml_plus_plus,
    mamlpp_meta_loss,
    multi_step_loss_weights,
    per_step_lr_sgd,
    step_indexed_loss,
)
from maml_jax.algorithms.meta_lstm import meta_lstm, meta_lstm_loss, meta_lstm_update
from maml_jax.algorithms.meta_sgd import init_step_sizes, meta_sgd
from maml_jax.algorithms.protonets import protonets, prototypical_loss
from maml_jax.algorithms.reptile import minibatch_indices, reptile

__all__ = ["Algorithm", "batched_evaluate", "batched_meta_grad", "fomaml", "maml"]
__all__ += [
    "cosine_outer_lr",
    "maml_plus_plus",
    "mamlpp_meta_loss",
    "meta_lstm",
    "meta_lstm_loss",
    "meta_lstm_update",
    "multi_step_loss_weights",
    "per_step_lr_sgd",
    "protonets",
    "prototypical_loss",
    "step_indexed_loss",
]
__all__ += [
    "anil",
    "boil",
    "from_meta_loss",
    "head_name",
    "hessian_vector_product",
    "imaml",
    "implicit_meta_gradient",
    "init_step_sizes",
    "masked_maml",
    "meta_sgd",
    "minibatch_indices",
    "reptile",
]
