"""Config name → ``Algorithm``: the one place where experiment configs meet the family.

``build_algorithm(config, model, task_loss_fn)`` reads ``config.algorithm`` and the options
whose prefix names it (``imaml_*``, ``mamlpp_*``, ...); every algorithm shares
``num_inner_steps``, ``inner_lr`` and ``first_order`` where they apply. Library code never
reads a config: only this function and the experiment entry point do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from maml_jax.algorithms.anil import anil, boil
from maml_jax.algorithms.base import Algorithm
from maml_jax.algorithms.imaml import imaml
from maml_jax.algorithms.maml import maml
from maml_jax.algorithms.mamlpp import maml_plus_plus, step_indexed_loss
from maml_jax.algorithms.meta_lstm import meta_lstm
from maml_jax.algorithms.meta_sgd import meta_sgd
from maml_jax.algorithms.protonets import protonets
from maml_jax.algorithms.reptile import reptile
from maml_jax.losses import cross_entropy_loss
from maml_jax.models import Model
from maml_jax.types import TaskLossFn

if TYPE_CHECKING:
    from maml_jax.config import Config

ALGORITHMS = ("maml", "anil", "boil", "meta_sgd", "maml++", "imaml", "reptile", "protonets", "meta_lstm")


def build_algorithm(config: Config, model: Model, task_loss_fn: TaskLossFn) -> Algorithm:
    """The ``Algorithm`` a config names, over ``model`` (``model.apply`` embeds for ProtoNets)."""
    name, k, lr, fo = config.algorithm, config.num_inner_steps, config.inner_lr, config.first_order
    if name == "maml":
        return maml(
            task_loss_fn, num_inner_steps=k, inner_lr=lr, first_order=fo, inner_grad_clip=config.inner_grad_clip
        )
    if name in ("anil", "boil"):
        return (anil if name == "anil" else boil)(task_loss_fn, num_inner_steps=k, inner_lr=lr, first_order=fo)
    if name == "meta_sgd":
        return meta_sgd(task_loss_fn, num_inner_steps=k, seed=config.seed, first_order=fo)
    if name == "maml++":
        per_step = config.mamlpp_per_step_bn
        return maml_plus_plus(
            step_indexed_loss(cross_entropy_loss, model.apply) if per_step else task_loss_fn,
            num_inner_steps=k,
            inner_lr=lr,
            multi_step_loss=config.mamlpp_multi_step_loss,
            msl_anneal_iters=config.mamlpp_msl_anneal_iters,
            learned_inner_lrs=config.mamlpp_learned_inner_lrs,
            first_order_iters=config.num_iterations if fo else config.mamlpp_first_order_iters,
            loss_takes_step=per_step,
        )
    if name == "imaml":
        return imaml(
            task_loss_fn,
            num_inner_steps=k,
            inner_lr=lr,
            prox_lambda=config.imaml_lambda,
            cg_iters=config.imaml_cg_iters,
        )
    if name == "reptile":
        return reptile(
            task_loss_fn,
            num_inner_steps=k,
            inner_lr=lr,
            inner_batch_size=config.reptile_inner_batch or None,
            inner_optimizer=config.reptile_inner_optimizer,
            seed=config.seed,
        )
    if name == "protonets":
        return protonets(model.apply, ways=config.ways)
    if name == "meta_lstm":
        return meta_lstm(
            task_loss_fn,
            num_inner_steps=k,
            hidden=config.meta_lstm_hidden,
            init_lr=lr,
            key=config.seed,
            max_grad_norm=config.inner_grad_clip,
        )
    raise ValueError(f"unknown algorithm {name!r}; known: {list(ALGORITHMS)}")
