"""N-way K-shot classification episodes drawn from a class-indexed image array.

``images`` is ``uint8 [classes, images_per_class, H, W]`` (grayscale, e.g. Omniglot) or
``uint8 [classes, images_per_class, H, W, C]`` (e.g. mini-ImageNet), ideally already a device
array. An episode (a ``Task``) picks ``ways`` classes without replacement, in random order (the
order is the label: the class drawn first is label 0), and ``shots + queries`` distinct images
of each::

    support.x: float32 [tasks, ways*shots, H, W, C]    support.y: int32 [tasks, ways*shots]
    query.x:   float32 [tasks, ways*queries, H, W, C]  query.y:   int32 [tasks, ways*queries]

Pixels are scaled to [0, 1]; a channel axis is added to grayscale images. Examples are grouped
by class (label 0's shots first). Task ``i`` of a batch is drawn from ``fold_in(key, i)``
alone, so with ``key = step_key(seed, step)`` task ``i`` of step ``step`` is the same whatever
the batch size, or however the batch is split (``first_task``). ``sample_episodes`` is jitted
with ``num_tasks``, ``ways``, ``shots`` and ``queries`` static (and inlines into an enclosing
``jit``)::

    images = jax.device_put(train_images)  # once
    tasks = sample_episodes(step_key(seed, step), images, num_tasks=32, ways=5, shots=1, queries=15)
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

from maml_jax.types import Batch, Task


def step_key(seed: int, step: int | jax.Array) -> jax.Array:
    """The key of training step ``step``: ``fold_in(PRNGKey(seed), step)``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def _positive_int(name: str, value: int) -> int:
    try:
        value = operator.index(value)  # ints and numpy integers; rejects floats and traced values
    except TypeError:
        raise ValueError(f"{name} must be a Python int, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_episode_args(images_shape: tuple[int, ...], ways: int, shots: int, queries: int) -> None:
    """Raise ``ValueError`` naming the argument when the episode cannot be drawn from ``images``."""
    if len(images_shape) not in (4, 5):
        raise ValueError(
            f"images has shape {images_shape}; expected [classes, images_per_class, H, W] or "
            "[classes, images_per_class, H, W, C]"
        )
    ways, shots, queries = (_positive_int(n, v) for n, v in (("ways", ways), ("shots", shots), ("queries", queries)))
    num_classes, per_class = images_shape[:2]
    if ways > num_classes:
        raise ValueError(f"ways={ways} exceeds the {num_classes} classes in images {images_shape}")
    if shots + queries > per_class:
        raise ValueError(
            f"shots + queries = {shots} + {queries} exceeds the {per_class} images per class in images {images_shape}"
        )


def sample_task(key: jax.Array, images: jax.Array, ways: int, shots: int, queries: int) -> Task:
    """One episode without the task axis: support ``[ways*shots, H, W, C]``, query
    ``[ways*queries, H, W, C]``."""
    check_episode_args(tuple(images.shape), ways, shots, queries)
    num_classes, per_class = images.shape[:2]
    class_key, image_key = jax.random.split(key)
    # ``ways`` distinct classes in uniformly random order (that order is the label): the indices of
    # the ``ways`` largest of iid uniforms. Same distribution as ``choice(replace=False)``, which
    # sorts a full permutation and measured 45x slower on CPU for 4800 classes.
    classes = jax.lax.top_k(jax.random.uniform(class_key, (num_classes,)), ways)[1]
    # [ways, shots + queries] distinct images per class: the first entries of a random permutation
    # (argsort of 32-bit random keys; a tie, ~per_class² / 2^33, only breaks by index).
    picks = jnp.argsort(jax.random.bits(image_key, (ways, per_class)), axis=-1)[:, : shots + queries]
    x = jnp.asarray(images)[classes[:, None], picks].astype(jnp.float32) / 255.0
    if x.ndim == 4:  # grayscale: [ways, shots + queries, H, W] -> [..., H, W, 1]
        x = x[..., None]
    features = x.shape[2:]
    labels = jnp.arange(ways, dtype=jnp.int32)
    support = Batch(x[:, :shots].reshape(ways * shots, *features), jnp.repeat(labels, shots))
    query = Batch(x[:, shots:].reshape(ways * queries, *features), jnp.repeat(labels, queries))
    return Task(support, query)


@functools.partial(jax.jit, static_argnames=("num_tasks", "ways", "shots", "queries"))
def sample_episodes(
    key: jax.Array,
    images: jax.Array,
    num_tasks: int,
    ways: int,
    shots: int,
    queries: int,
    *,
    first_task: int | jax.Array = 0,
) -> Task:
    """``num_tasks`` episodes (see the module docstring for shapes); task ``j`` of the batch is
    ``sample_task(fold_in(key, first_task + j), ...)``."""
    num_tasks = _positive_int("num_tasks", num_tasks)
    check_episode_args(tuple(images.shape), ways, shots, queries)
    images = jnp.asarray(images)
    task_ids = first_task + jnp.arange(num_tasks)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, task_ids)
    return jax.vmap(lambda k: sample_task(k, images, ways, shots, queries))(keys)
