"""Shared helpers for the algorithm tests: two tiny meta-learning problems and a short trainer.

Every algorithm of the family (``maml_jax.algorithms``) must improve the post-adaptation
metric of both problems within a few hundred meta-steps, at sizes that take seconds on CPU:

* ``sinusoid_problem()``: Finn et al. (2017) §5.1 regression, a narrow MLP, K=5 support points;
  the metric is the query MSE on a fixed grid after adaptation (lower is better).
* ``omniglot_problem(subset)``: N-way K-shot classification on a few Omniglot characters shrunk
  to 14x14, conv4 (``maml_jax.models.conv4``); the metric is the query accuracy after adaptation
  on *held-out* characters (higher is better). ``subset`` comes from the session fixture
  ``omniglot_subset`` in ``tests/conftest.py`` (built by ``load_omniglot_subset``).

``train_briefly(algorithm, problem, steps=...)`` meta-trains with
``train.make_train_step_from_grads`` (one ``lax.scan`` over all steps, one compile) and returns
the metric before and after, so a test reads::

    result = train_briefly(reptile(...), sinusoid_problem(), steps=300, outer_lr=1.0, optimizer="sgd")
    assert result.improved(margin=0.3)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maml_jax.algorithms import Algorithm, batched_evaluate, batched_meta_grad
from maml_jax.data import episodes, sinusoid
from maml_jax.losses import cross_entropy_loss, mse_loss
from maml_jax.models import conv4, mlp
from maml_jax.train import init_train_state, make_sampling_train_chunk, make_train_step_from_grads
from maml_jax.types import Params, Task, TaskLossFn

SHARED_OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


class Problem(NamedTuple):
    """A tiny meta-learning problem.

    ``sample_fn(key, data) -> Task [meta_batch, n, ...]`` draws one training batch (``data`` is
    passed through so images are an argument, not a constant baked into the program);
    ``eval_tasks`` is a fixed ``Task [tasks, n, ...]``; ``metric`` names the entry of
    ``Algorithm.evaluate``'s metrics to compare (``higher_is_better`` says which way is good).
    ``head`` is the name of the last Dense layer in ``init_params`` (for ANIL/BOIL masks).
    """

    name: str
    task_loss_fn: TaskLossFn
    init_params: Params
    sample_fn: Callable[[jax.Array, Any], Task]
    data: Any
    eval_tasks: Task
    metric: str
    higher_is_better: bool
    head: str
    num_inner_steps: int  # inner steps to use at training and evaluation


class TrainResult(NamedTuple):
    """Mean post-adaptation metric on the problem's eval tasks before and after training."""

    before: float
    after: float
    meta_params: Params
    meta_losses: np.ndarray  # [steps]
    higher_is_better: bool

    def improved(self, margin: float = 0.0) -> bool:
        """True when ``after`` beats ``before`` by more than ``margin`` (absolute, in metric units
        for accuracy; relative, a fraction of ``before``, for a loss)."""
        if self.higher_is_better:
            return self.after > self.before + margin
        return self.after < self.before * (1.0 - margin)


def sinusoid_problem(
    *,
    hidden: tuple[int, ...] = (32, 32),
    meta_batch: int = 4,
    num_support: int = 5,
    num_query: int = 10,
    num_eval_tasks: int = 50,
    num_inner_steps: int = 1,
    seed: int = 0,
) -> Problem:
    """Sinusoid regression with a ``1-hidden-...-1`` ReLU MLP (PyTorch-style init); the head
    is ``dense_{len(hidden)}``. Eval: ``num_eval_tasks`` tasks, K=``num_support``, 100-point grid."""
    model = mlp(hidden, 1, kernel_init="torch_default")
    eval_tasks, _ = sinusoid.sample_eval_tasks(jax.random.PRNGKey(10_000 + seed), num_eval_tasks, num_support)
    params = model.init(jax.random.PRNGKey(seed), eval_tasks.support.x[0])

    def sample_fn(key, data):
        del data
        return sinusoid.sample_tasks(key, meta_batch, num_support, num_query)

    return Problem(
        "sinusoid",
        mse_loss(model.apply),
        params,
        sample_fn,
        None,
        eval_tasks,
        "query_loss",
        False,
        f"dense_{len(hidden)}",
        num_inner_steps,
    )


class OmniglotSubset(NamedTuple):
    """``train``/``test``: ``uint8 [classes, 20, size, size]`` of disjoint characters."""

    train: np.ndarray
    test: np.ndarray


def _shrink(images: np.ndarray, factor: int) -> np.ndarray:
    """Mean-pool ``[..., H, W]`` by ``factor`` (28 → 14 with 2)."""
    if factor == 1:
        return images
    *lead, h, w = images.shape
    pooled = images.reshape(*lead, h // factor, factor, w // factor, factor).astype(np.float32).mean((-3, -1))
    return np.round(pooled).astype(np.uint8)


def load_omniglot_subset(
    cache_dir: str | os.PathLike,
    *,
    num_train_classes: int = 30,
    num_test_classes: int = 10,
    image_size: int = 14,
    data_dir: str | os.PathLike = SHARED_OMNIGLOT,
) -> OmniglotSubset:
    """The first ``num_train_classes`` characters of the paper split's train subset and the
    first ``num_test_classes`` of its test subset, shrunk from 28 px to ``image_size`` (28 must
    be a multiple). The decoded 28 px cache already in ``data_dir`` (if any) is copied into
    ``cache_dir`` first, so nothing is decoded twice; raises ``DatasetError`` when the data are
    missing."""
    from maml_jax.data import omniglot

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = omniglot.cache_path(Path(data_dir))
    target = omniglot.cache_path(cache_dir)
    if source.is_file() and not target.is_file():
        shutil.copyfile(source, target)
    if 28 % image_size:
        raise ValueError(f"image_size must divide 28, got {image_size}")
    factor = 28 // image_size
    train, _ = omniglot.load_split_arrays("train", data_dir=data_dir, cache_dir=cache_dir)
    test, _ = omniglot.load_split_arrays("test", data_dir=data_dir, cache_dir=cache_dir)
    return OmniglotSubset(_shrink(train[:num_train_classes], factor), _shrink(test[:num_test_classes], factor))


def omniglot_problem(
    subset: OmniglotSubset,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 5,
    meta_batch: int = 4,
    num_eval_tasks: int = 20,
    num_inner_steps: int = 1,
    conv_impl: str = "lax",
    seed: int = 0,
) -> Problem:
    """``ways``-way ``shots``-shot Omniglot with conv4 (transductive BN, head ``"head"``);
    training tasks from ``subset.train``, ``num_eval_tasks`` fixed eval tasks from the held-out
    ``subset.test`` characters. ``conv_impl="lax"`` by default: on XLA:CPU it compiles about 3x
    faster than ``"patches"`` (10 s vs 32 s for a 20-step MAML scan, measured here), which is
    what a short test pays for; ``"patches"`` runs each step about 2x faster."""
    model = conv4(ways, conv_impl=conv_impl)
    train_images = jnp.asarray(subset.train)
    eval_tasks = episodes.sample_episodes(
        jax.random.PRNGKey(10_000 + seed), jnp.asarray(subset.test), num_eval_tasks, ways, shots, queries
    )
    params = model.init(jax.random.PRNGKey(seed), eval_tasks.support.x[0])

    def sample_fn(key, images):
        return episodes.sample_episodes(key, images, meta_batch, ways, shots, queries)

    return Problem(
        "omniglot",
        cross_entropy_loss(model.apply),
        params,
        sample_fn,
        train_images,
        eval_tasks,
        "query_accuracy",
        True,
        "head",
        num_inner_steps,
    )


def make_evaluate(algorithm: Algorithm, problem: Problem, num_inner_steps: int) -> Callable[[Params], float]:
    """``meta_params -> mean of problem.metric`` over ``problem.eval_tasks`` after
    ``num_inner_steps`` adaptation steps (jitted once)."""
    fn = jax.jit(
        lambda p: jnp.mean(batched_evaluate(algorithm, p, problem.eval_tasks, num_inner_steps)[problem.metric])
    )
    return lambda meta_params: float(fn(meta_params))


def train_briefly(
    algorithm: Algorithm,
    problem: Problem,
    *,
    steps: int = 300,
    outer_lr: float = 1e-3,
    optimizer: str | optax.GradientTransformation = "adam",
    eval_inner_steps: int | None = None,
    seed: int = 0,
) -> TrainResult:
    """Meta-train ``algorithm`` on ``problem`` for ``steps`` outer steps (``optax.adam`` or
    ``optax.sgd`` at ``outer_lr``, or a given optimiser) and measure ``problem.metric`` after
    ``eval_inner_steps`` (default ``problem.num_inner_steps``) adaptation steps before and after.

    The whole run is one jitted ``lax.scan`` (``train.make_sampling_train_chunk``); raises
    ``AssertionError`` if a step was non-finite.
    """
    if isinstance(optimizer, str):
        optimizer = {"adam": optax.adam, "sgd": optax.sgd}[optimizer](outer_lr)
    k = problem.num_inner_steps if eval_inner_steps is None else eval_inner_steps
    meta_params = algorithm.init(problem.init_params)
    evaluate = make_evaluate(algorithm, problem, k)
    before = evaluate(meta_params)
    train_step = make_train_step_from_grads(lambda p, t, s: batched_meta_grad(algorithm, p, t, s), optimizer)
    chunk = jax.jit(make_sampling_train_chunk(train_step, problem.sample_fn, steps))
    state, metrics = chunk(init_train_state(meta_params, optimizer, jax.random.PRNGKey(seed)), problem.data)
    assert bool(np.all(jax.device_get(metrics["finite"]))), f"{algorithm.name}: non-finite meta-loss or gradient"
    after = evaluate(state.meta_params)
    return TrainResult(before, after, state.meta_params, np.asarray(metrics["meta_loss"]), problem.higher_is_better)
