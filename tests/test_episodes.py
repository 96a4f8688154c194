"""N-way K-shot episode sampling: shapes, determinism, label semantics, validation, speed."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maml_jax.data.episodes import sample_episodes, sample_task, step_key


def coded_images(num_classes: int, per_class: int, size: int = 6, channels: int | None = None) -> np.ndarray:
    """``uint8 [classes, per_class, size, size(, channels)]`` whose pixel (0, 0) is the class and
    pixel (0, 1) the image index, so every sampled example says where it came from."""
    shape = (num_classes, per_class, size, size) + ((channels,) if channels else ())
    images = np.full(shape, 7, np.uint8)
    images[:, :, 0, 0] = np.arange(num_classes)[:, None, *([None] if channels else [])]
    images[:, :, 0, 1] = np.arange(per_class)[None, :, *([None] if channels else [])]
    return images


def origins(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(class, image index) of each example of ``x: [..., H, W, C]``."""
    pixels = np.rint(np.asarray(x)[..., 0, :2, 0] * 255).astype(int)
    return pixels[..., 0], pixels[..., 1]


def test_shapes_dtypes_and_scaling():
    gray = coded_images(10, 20)
    tasks = sample_episodes(jax.random.PRNGKey(0), gray, num_tasks=3, ways=5, shots=2, queries=4)
    assert tasks.support.x.shape == (3, 10, 6, 6, 1) and tasks.support.x.dtype == jnp.float32
    assert tasks.query.x.shape == (3, 20, 6, 6, 1) and tasks.query.y.shape == (3, 20)
    assert tasks.support.y.dtype == tasks.query.y.dtype == jnp.int32
    np.testing.assert_allclose(tasks.support.x[..., 2:, :, 0], 7 / 255)
    assert 0.0 <= float(tasks.query.x.min()) and float(tasks.query.x.max()) <= 1.0
    rgb = coded_images(10, 20, size=5, channels=3)
    tasks = sample_episodes(jax.random.PRNGKey(0), rgb, num_tasks=2, ways=3, shots=1, queries=2)
    assert tasks.support.x.shape == (2, 3, 5, 5, 3) and tasks.query.x.shape == (2, 6, 5, 5, 3)
    single = sample_task(jax.random.PRNGKey(0), gray, ways=5, shots=1, queries=3)
    assert single.support.x.shape == (5, 6, 6, 1) and single.query.y.shape == (15,)


def test_labels_classes_and_support_query_disjointness():
    ways, shots, queries = 5, 2, 3
    tasks = sample_episodes(jax.random.PRNGKey(1), coded_images(12, 8), 50, ways, shots, queries)
    np.testing.assert_array_equal(tasks.support.y, np.tile(np.repeat(np.arange(ways), shots), (50, 1)))
    np.testing.assert_array_equal(tasks.query.y, np.tile(np.repeat(np.arange(ways), queries), (50, 1)))
    s_cls, s_idx = origins(tasks.support.x)
    q_cls, q_idx = origins(tasks.query.x)
    for t in range(50):
        label_class = s_cls[t].reshape(ways, shots)[:, 0]
        assert len(set(label_class)) == ways  # distinct classes
        assert (s_cls[t].reshape(ways, shots) == label_class[:, None]).all()  # one class per label
        assert (q_cls[t].reshape(ways, queries) == label_class[:, None]).all()  # query shares the map
        for w in range(ways):
            picked = list(s_idx[t].reshape(ways, shots)[w]) + list(q_idx[t].reshape(ways, queries)[w])
            assert len(set(picked)) == shots + queries  # support and query images are distinct


def test_class_order_is_random_and_classes_are_uniform():
    tasks = sample_episodes(jax.random.PRNGKey(2), coded_images(3, 2), 300, ways=3, shots=1, queries=1)
    orders = {tuple(row) for row in origins(tasks.support.x)[0]}
    assert len(orders) == 6  # every permutation of the 3 classes serves as the label order
    tasks = sample_episodes(jax.random.PRNGKey(3), coded_images(10, 2), 2000, ways=2, shots=1, queries=1)
    counts = np.bincount(origins(tasks.support.x)[0].ravel(), minlength=10)
    assert counts.min() > 320 and counts.max() < 480  # 400 expected, sd ~ 19


def test_determinism_and_batch_size_independence():
    images = coded_images(30, 20)
    sample = sample_episodes  # task i of a batch must not depend on the batch size or the split
    key = step_key(seed=0, step=17)
    a = sample(key, images, num_tasks=4, ways=5, shots=1, queries=15)
    b = sample(key, images, num_tasks=4, ways=5, shots=1, queries=15)
    eight = sample(key, images, num_tasks=8, ways=5, shots=1, queries=15)
    tail = sample(key, images, num_tasks=4, ways=5, shots=1, queries=15, first_task=4)
    other = sample(step_key(seed=0, step=18), images, num_tasks=4, ways=5, shots=1, queries=15)
    for x, y in [(a, b), (a, jax.tree.map(lambda v: v[:4], eight)), (tail, jax.tree.map(lambda v: v[4:], eight))]:
        jax.tree.map(np.testing.assert_array_equal, x, y)
    one = jax.jit(sample_task, static_argnums=(2, 3, 4))(jax.random.fold_in(key, 6), images, 5, 1, 15)
    jax.tree.map(np.testing.assert_array_equal, one, jax.tree.map(lambda v: v[6], eight))
    assert not np.array_equal(a.support.x, other.support.x)
    assert not np.array_equal(a.support.x[0], a.support.x[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ways=11), "ways=11 exceeds the 10 classes"),
        (dict(shots=15, queries=6), "shots \\+ queries = 15 \\+ 6 exceeds the 20 images per class"),
        (dict(ways=0), "ways must be positive"),
        (dict(shots=-1), "shots must be positive"),
        (dict(queries=0), "queries must be positive"),
        (dict(num_tasks=0), "num_tasks must be positive"),
        (dict(shots=1.5), "shots must be a Python int"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
    args = dict(num_tasks=2, ways=5, shots=1, queries=5) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_episodes(jax.random.PRNGKey(0), coded_images(10, 20), **args)


def test_invalid_image_rank():
    with pytest.raises(ValueError, match=r"expected \[classes, images_per_class, H, W\]"):
        sample_episodes(jax.random.PRNGKey(0), np.zeros((10, 20, 28), np.uint8), 2, 5, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("ways", [5, 20])
def test_benchmark_omniglot_sampling_speed(ways):
    """Episodes per second, Omniglot-sized (4800 rotated train classes x 20 x 28 x 28), 1-shot
    15-query, meta-batch 32, on the default device. Run: pytest -m slow -s tests/test_episodes.py"""
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (4800, 20, 28, 28), dtype=np.uint8))

    @functools.partial(jax.jit, static_argnames="w")
    def sample(step, images, w):
        return sample_episodes(step_key(0, step), images, num_tasks=32, ways=w, shots=1, queries=15)

    jax.block_until_ready(sample(0, images, ways))
    steps, start = 100, time.perf_counter()
    for step in range(steps):
        tasks = sample(step, images, ways)
    jax.block_until_ready(tasks)
    seconds = time.perf_counter() - start
    print(
        f"\n{ways}-way 1-shot 15-query, meta-batch 32 on {jax.devices()[0].platform}: "
        f"{steps / seconds:.1f} batches/s = {32 * steps / seconds:.0f} episodes/s"
    )
    assert tasks.query.x.shape == (32, ways * 15, 28, 28, 1)
