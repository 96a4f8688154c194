"""What a config's ``dataset`` means: model, task loss, training-task sampler and evaluator.

A ``TaskFamily`` is everything ``experiment.train_and_evaluate`` needs that differs between
sinusoid regression and few-shot classification; the training loop and the evaluation protocol
are the same code for all of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from maml_jax.algorithms.base import Algorithm
from maml_jax.config import Config, ConfigError
from maml_jax.core import resolve_task_map
from maml_jax.data import episodes, sinusoid
from maml_jax.evaluate import adaptation_curve, algorithm_curve, summarize_curve
from maml_jax.losses import cross_entropy_loss, mse_loss
from maml_jax.models import Model, conv4, mlp
from maml_jax.models.conv4 import resolve_conv_impl
from maml_jax.precision import with_compute_dtype
from maml_jax.types import Params, Task, TaskLossFn

# evaluate(params, *, inner_lr, seed, num_tasks, shots) -> {K: {metric: {steps: (mean, ci95, median)}}}
Evaluator = Callable[..., dict[int, dict[str, dict[int, tuple[float, float, float]]]]]


class TaskFamily(NamedTuple):
    model: Model
    task_loss_fn: TaskLossFn
    example_x: jax.Array  # one support set ``[n, *features]``, for ``model.init``
    train_data: Any  # passed to ``sample_train`` (device arrays, or None)
    sample_train: Callable[[jax.Array, Any], Task]  # (key, train_data) -> [meta_batch, ...] tasks
    evaluate: Evaluator
    metric: str  # the headline metric: "mse" (lower is better) or "accuracy"


def resolved_conv_impl(config: Config) -> str:
    """The conv4 convolution a run of ``config`` uses: ``config.conv_impl`` with ``"auto"`` resolved
    for this backend and the devices the task batch is split over (``num_devices``, 0 = all)."""
    return resolve_conv_impl(config.conv_impl, config.dataset, task_devices=config.num_devices or jax.device_count())


def build_model(config: Config) -> Model:
    """The network a config names: the sinusoid MLP or the paper's conv4, computing in
    ``config.compute_dtype`` (float32 parameters and outputs either way)."""
    return with_compute_dtype(_build_float32_model(config), config.compute_dtype)


def _build_float32_model(config: Config) -> Model:
    if config.model == "mlp":
        return mlp(config.hidden_sizes, 1, activation=config.activation, kernel_init=config.kernel_init)
    # ProtoNets embeds with the body (no head); MAML++ may keep one BN row per inner step
    per_step = config.algorithm == "maml++" and config.mamlpp_per_step_bn
    return conv4(
        config.ways,
        dataset=config.dataset,
        conv_impl=resolved_conv_impl(config),
        bn="per_step" if per_step else "transductive",
        bn_steps=max(config.num_inner_steps, 1) if per_step else 1,
        head=config.algorithm != "protonets",
    )


def build_task_family(config: Config) -> TaskFamily:
    if config.dataset == "sinusoid":
        return _sinusoid_family(config)
    return _classification_family(config)


def _sinusoid_family(config: Config) -> TaskFamily:
    model = build_model(config)
    loss = mse_loss(model.apply)
    max_steps = max(config.eval_inner_steps)
    clip = config.inner_grad_clip

    @functools.partial(jax.jit, static_argnames=("algorithm",))
    def curve(params, tasks, inner_lr, algorithm=None):
        if algorithm is not None:
            return algorithm_curve(algorithm, params, tasks, config.eval_inner_steps, "vmap")
        return adaptation_curve(
            params, tasks, loss, num_inner_steps=max_steps, inner_lr=inner_lr, task_map="vmap", inner_grad_clip=clip
        )

    def evaluate(
        params: Params,
        *,
        inner_lr: float,
        seed: int,
        num_tasks: int,
        shots: Sequence[int],
        algorithm: Algorithm | None = None,
    ):
        """Query = a grid of ``config.eval_grid_points`` points over [−5, 5]; one compiled curve
        per K, the step size traced so that a step-size sweep does not recompile. With
        ``algorithm``, its own adaptation (``Algorithm.evaluate``) replaces SGD with ``inner_lr``."""
        out = {}
        columns = None if algorithm is None else config.eval_inner_steps
        for k in shots:
            tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(seed), num_tasks, k, config.eval_grid_points)
            curves = curve(params, tasks, inner_lr, algorithm)
            out[k] = {"mse": summarize_curve(curves, config.eval_inner_steps, columns)["loss"]}
        return out

    def sample(key, data):
        del data
        return sinusoid.sample_tasks(key, config.meta_batch_size, config.shots, config.queries)

    return TaskFamily(model, loss, jnp.zeros((config.shots, 1)), None, sample, evaluate, "mse")


def load_class_images(config: Config, subset: str) -> np.ndarray:
    """``uint8 [classes, images_per_class, H, W(, C)]`` of ``subset`` ("train" or "test")."""
    data_dir = config.data_dir or None
    if config.dataset == "omniglot":
        from maml_jax.data import omniglot

        images, _ = omniglot.load_split_arrays(
            subset, config.omniglot_split, data_dir, rotations=config.rotations and subset == "train"
        )
        return images
    from maml_jax.data import miniimagenet

    return miniimagenet.load_miniimagenet(subset, data_dir, check_counts=config.check_dataset_counts).images


def _classification_family(config: Config) -> TaskFamily:
    train_images = load_class_images(config, "train")
    if config.ways > train_images.shape[0]:
        raise ConfigError(f"config.ways = {config.ways} exceeds the {train_images.shape[0]} training classes")
    model = build_model(config)
    loss = cross_entropy_loss(model.apply)
    example = episodes.sample_task(jax.random.PRNGKey(0), train_images[: config.ways], config.ways, config.shots, 1)

    def sample(key, images):
        return episodes.sample_episodes(key, images, config.meta_batch_size, config.ways, config.shots, config.queries)

    test_images: list[jax.Array] = []  # loaded on first evaluation

    max_steps = max(config.eval_inner_steps)
    chunk = config.eval_batch_tasks

    @functools.partial(jax.jit, static_argnames=("first_task", "algorithm"))
    def curve(params, images, key, inner_lr, first_task, algorithm=None):
        tasks = episodes.sample_episodes(
            key, images, chunk, config.ways, config.shots, config.eval_queries, first_task=first_task
        )
        if algorithm is not None:
            return algorithm_curve(algorithm, params, tasks, config.eval_inner_steps, resolve_task_map(config.task_map))
        return adaptation_curve(
            params,
            tasks,
            loss,
            num_inner_steps=max_steps,
            inner_lr=inner_lr,
            task_map=resolve_task_map(config.task_map),
            inner_grad_clip=config.inner_grad_clip,
        )

    def evaluate(
        params: Params,
        *,
        inner_lr: float,
        seed: int,
        num_tasks: int,
        shots: Sequence[int],
        algorithm: Algorithm | None = None,
    ):
        """``num_tasks`` meta-test episodes from the test classes, task i drawn from
        ``fold_in(PRNGKey(seed), i)``; accuracy (and loss) after each inner step. With
        ``algorithm``, its own adaptation (``Algorithm.evaluate``) replaces SGD with ``inner_lr``."""
        if not test_images:
            test_images.append(jax.device_put(load_class_images(config, "test")))
        images = test_images[0]
        key = jax.random.PRNGKey(seed)
        parts = [curve(params, images, key, inner_lr, start, algorithm) for start in range(0, num_tasks, chunk)]
        curves = jax.tree.map(lambda *xs: jnp.concatenate(xs)[:num_tasks], *parts)
        columns = None if algorithm is None else config.eval_inner_steps
        return {config.shots: summarize_curve(curves, config.eval_inner_steps, columns)}

    return TaskFamily(model, loss, example.support.x, jax.device_put(train_images), sample, evaluate, "accuracy")
