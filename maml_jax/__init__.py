"""maml_jax: gradient-based meta-learning (MAML and its family) as pure JAX functions."""

from maml_jax.core import batched_meta_loss, inner_adapt, map_tasks, mean_over_tasks, meta_loss
from maml_jax.evaluate import adaptation_curve, mean_ci95
from maml_jax.inner_updates import sgd
from maml_jax.losses import cross_entropy_loss, mse_loss
from maml_jax.models import Model, mlp
from maml_jax.train import NonFiniteLossError, TrainState, init_train_state, make_train_step
from maml_jax.types import Batch, Task
from maml_jax.validation import HyperparameterError, ShapeError

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "HyperparameterError",
    "Model",
    "NonFiniteLossError",
    "ShapeError",
    "Task",
    "TrainState",
    "adaptation_curve",
    "batched_meta_loss",
    "cross_entropy_loss",
    "init_train_state",
    "inner_adapt",
    "make_train_step",
    "map_tasks",
    "mean_ci95",
    "mean_over_tasks",
    "meta_loss",
    "mlp",
    "mse_loss",
    "sgd",
]
