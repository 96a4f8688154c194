"""The four-block CNN of Finn et al. (2017) §5.2 ("conv4") for Omniglot and MiniImageNet.

Each block is conv 3x3 → BatchNorm → ReLU (→ 2x2 max-pool on MiniImageNet), then a linear
head on the flattened features:

* ``omniglot``:      64 filters, stride 2, padding 1: ``[n, 28, 28, 1] → [n, 2, 2, 64] → [n, ways]``
* ``miniimagenet``:  32 filters, stride 1, padding 1, max-pool 2: ``[n, 84, 84, 3] → [n, 5, 5, 32] → [n, ways]``

Shapes and layer order match the common PyTorch ports (``shared/bench/torch_peers.py``):
symmetric padding 1 (the original TF code's stride-2 ``"SAME"`` pads only bottom/right; the
shapes are the same) and the head reads all flattened features (the TF code averages the
Omniglot 2x2 map instead).

BatchNorm keeps no running statistics: every forward normalises with the batch's own
mean/variance (the paper's transductive choice), with a learnable scale and bias. Nothing is
mutated, so ``apply(params, x)`` is a pure function that vmaps over per-task parameters.
``bn="per_step"`` (MAML++, Antoniou et al. 2019 §4 "per-step batch normalization weights and
biases"): the statistics are still the batch's own (transductive), computed afresh at every inner
step, and the scale/bias are indexed by the inner step, ``bn_{i}: {scale [S, F], bias [S, F]}``
with ``S = bn_steps``; ``apply(params, x, step=i)`` uses row ``min(i, S − 1)``. With all rows
equal it computes exactly what ``bn="transductive"`` does. ``bn="none"`` drops the normalisation.
``head=False`` drops the linear head: ``apply`` returns the flattened features ``[n, F·H'·W']``
(the embedding of Prototypical Networks).

``conv_impl`` picks how a convolution is expressed; all three give the same numbers:

* ``"lax"``: ``lax.conv_general_dilated``. Under ``jax.vmap`` with per-task weights it becomes
  a grouped convolution, which XLA:CPU runs slowly; on an NVIDIA H200 (cuDNN) the benchmark's
  image steps ran 1.6-4.1x slower with it than with ``"patches"``. Not measured on TPU.
* ``"patches"``: the 9 shifted (strided) views of the padded input stacked into
  ``[n·H'·W', 9·C]`` and one matmul with the kernel ``[9·C, F]``; under ``vmap`` a batched
  matmul, which is what XLA:CPU is fast at, and the faster choice on the H200 too.
* ``"patches_per_image"``: ``"patches"`` one image at a time, in a ``lax.map`` over the batch,
  each image's convolution under ``jax.checkpoint``: an image's ``[H'·W', 9·C]`` patch matrix
  is built, multiplied and dropped while it is still in cache, and rebuilt for the gradients,
  instead of one ``[n·H'·W', 9·C]`` matrix (152 MB for 75 images at 42x42x32) that is written
  out to memory and kept for the backward pass. Faster on XLA:CPU for MiniImageNet's large
  stride-1 layers with the tasks split over two CPU devices (miniimagenet-5w1s +17% by the medians
  of 6 alternated pairs on an AVX-512 EPYC, +13.5% by the medians of 4 rounds on a Zen3 EPYC
  without AVX-512; 2-9% slower on one device; README, Speed), slower for
  Omniglot's small strided ones, where a loop step per image costs
  more than the copying it saves. Not for GPUs or TPUs (a sequential loop over the images).

``resolve_conv_impl(conv_impl, dataset, backend, task_devices)`` turns a config's ``"auto"`` into
the choice measured fastest for the dataset, backend and number of devices the tasks are split over
(per image only with two or more CPU devices: with one it was slower).
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from maml_jax.models.base import Model
from maml_jax.validation import ShapeError

ConvImpl = Literal["lax", "patches", "patches_per_image"]
BNMode = Literal["transductive", "none", "per_step"]

CONV_IMPLS = ("lax", "patches", "patches_per_image")
BN_MODES = ("transductive", "none", "per_step")
DATASETS = {
    # filters, stride, max-pool
    "omniglot": (64, 2, False),
    "miniimagenet": (32, 1, True),
}
BN_EPS = 1e-5  # PyTorch's BatchNorm2d default


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int, impl: ConvImpl) -> jax.Array:
    """3x3 convolution with padding 1: ``x [n, H, W, C]``, ``kernel [3, 3, C, F]`` (HWIO)
    → ``[n, (H−1)//stride + 1, (W−1)//stride + 1, F]``."""
    if impl == "lax":
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    if impl == "patches_per_image":
        # the kernel enters the loop at least float32, so that its gradient, summed over the images
        # by the loop's transpose, accumulates in float32 even when the network computes in bf16
        wide = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
        one = jax.checkpoint(lambda image, k: patch_conv(image[None], k.astype(image.dtype), stride)[0])
        return jax.lax.map(lambda image: one(image, wide), x)
    return patch_conv(x, kernel, stride)


def patch_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """``conv3x3`` as one matmul of ``patches3x3(x) [n·H'·W', 9·C]`` with ``kernel [9·C, F]``
    (what ``"patches"`` runs; ``"patches_per_image"`` runs it per image)."""
    patches = patches3x3(x, stride)
    n, ho, wo, k = patches.shape
    return (patches.reshape(n * ho * wo, k) @ kernel.reshape(k, -1)).reshape(n, ho, wo, -1)


def resolve_conv_impl(conv_impl: str, dataset: str, backend: str | None = None, task_devices: int = 1) -> ConvImpl:
    """``conv_impl`` itself, or for ``"auto"``: ``"patches_per_image"`` for ``miniimagenet`` on the
    CPU backend (``backend``, default ``jax.default_backend()``) with the task batch split over
    ``task_devices`` >= 2 XLA CPU devices, ``"patches"`` otherwise: Omniglot everywhere, every
    dataset on a GPU or TPU, and MiniImageNet on one CPU device, where per image was 2-9% slower
    in 3 alternated pairs (``experiments/results/bench/patches_per_image_epyc512.md``)."""
    if conv_impl == "auto":
        on_cpu = (backend or jax.default_backend()) == "cpu"
        split = task_devices >= 2
        return "patches_per_image" if on_cpu and split and dataset == "miniimagenet" else "patches"
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be 'auto' or one of {list(CONV_IMPLS)}, got {conv_impl!r}")
    return conv_impl


def conv_out_size(size: int, stride: int) -> int:
    """``H' = (H − 1)//stride + 1``: the output height (or width) of a 3x3 convolution padded by 1."""
    return (size - 1) // stride + 1


def shifted_views(x: jax.Array, stride: int) -> list[jax.Array]:
    """The 9 views ``[n, H', W', C]`` of ``x [n, H, W, C]`` padded by 1 that the taps ``(i, j)``
    of a 3x3 kernel with ``stride`` see, in the order ``3i + j``."""
    n, h, w, c = x.shape
    ho, wo = conv_out_size(h, stride), conv_out_size(w, stride)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [
        jax.lax.slice(
            xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c), (1, stride, stride, 1)
        )
        for i in range(3)
        for j in range(3)
    ]


def patches3x3(x: jax.Array, stride: int) -> jax.Array:
    """``[n, H', W', 9·C]``: the ``shifted_views`` side by side, channel ``(3i + j)·C + c``, so
    that a 3x3 convolution is one matmul with the kernel reshaped to ``[9·C, F]``."""
    views = shifted_views(x, stride)
    n, ho, wo, c = views[0].shape
    return jnp.stack(views, axis=3).reshape(n, ho, wo, 9 * c)


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = BN_EPS) -> jax.Array:
    """Normalise ``x [n, H, W, F]`` per channel with its own batch statistics (biased
    variance over ``n, H, W``), then ``· scale[F] + bias[F]``."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * (scale * jax.lax.rsqrt(var + eps)) + bias


def max_pool2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, floor mode: ``[n, H, W, F] → [n, H//2, W//2, F]``.

    Written as an argmax one-hot mask times the window, so the gradient goes to one element
    per window. (``jnp.max``'s derivative finds the maximum by ``x == max(x)``, and jitted
    float64 second-order meta-gradients through it came out wrong on XLA:CPU; pinned by
    ``tests/test_conv4.py``. ``lax.reduce_window`` is right but slower on CPU.)
    """
    n, h, w, f = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, f)
    x = x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, f, 4)
    mask = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(x), axis=-1), 4, dtype=x.dtype)
    return jnp.sum(x * mask, axis=-1)


class _Conv3x3(nn.Module):
    filters: int
    stride: int
    impl: str

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.xavier_uniform(), (3, 3, x.shape[-1], self.filters))
        bias = self.param("bias", nn.initializers.zeros, (self.filters,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        return conv3x3(x, kernel, self.stride, self.impl) + bias


class _BatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return batch_norm(x, *nn.dtypes.promote_dtype(scale, bias, dtype=x.dtype))


class _PerStepBatchNorm(nn.Module):
    steps: int

    @nn.compact
    def __call__(self, x, step):
        scale = self.param("scale", nn.initializers.ones, (self.steps, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.steps, x.shape[-1]))
        row = jnp.minimum(jnp.asarray(step, jnp.int32), self.steps - 1)
        return batch_norm(x, *nn.dtypes.promote_dtype(scale[row], bias[row], dtype=x.dtype))


class _Conv4(nn.Module):
    ways: int
    filters: int
    stride: int
    pool: bool
    conv_impl: str
    bn: str
    bn_steps: int = 1
    head: bool = True

    @nn.compact
    def __call__(self, x, step=0):
        for i in range(4):
            x = _Conv3x3(self.filters, self.stride, self.conv_impl, name=f"conv_{i}")(x)
            if self.bn == "transductive":
                x = _BatchNorm(name=f"bn_{i}")(x)
            elif self.bn == "per_step":
                x = _PerStepBatchNorm(self.bn_steps, name=f"bn_{i}")(x, step)
            x = nn.relu(x)
            if self.pool:
                x = max_pool2x2(x)
        x = x.reshape(x.shape[0], -1)
        if not self.head:
            return x
        return nn.Dense(self.ways, kernel_init=nn.initializers.xavier_uniform(), name="head")(x)


def conv4(
    ways: int,
    *,
    dataset: str = "omniglot",
    conv_impl: ConvImpl = "patches",
    bn: BNMode = "transductive",
    bn_steps: int = 1,
    head: bool = True,
) -> Model:
    """conv4 ``[n, H, W, C] → [n, ways]`` (NHWC); ``dataset`` picks filters/stride/pooling.

    ``bn="per_step"`` keeps ``bn_steps`` rows of BN scale/bias and ``apply(params, x, step)``
    picks row ``min(step, bn_steps − 1)`` (``step`` may be traced); other modes ignore ``step``.
    ``head=False``: no ``head`` parameters and ``apply`` returns features ``[n, F·H'·W']``.

    Parameters: ``conv_{i}: {kernel [3, 3, C_in, F], bias [F]}`` and ``bn_{i}: {scale [F],
    bias [F]}`` for blocks ``i = 0..3``, ``head: {kernel [F·H'·W', ways], bias [ways]}``; with
    ``bn="none"`` there are no ``bn_{i}``, with ``bn="per_step"`` they are ``{scale [S, F],
    bias [S, F]}`` (``S = bn_steps``). The same tree for every ``conv_impl``.
    Glorot-uniform weights and zero biases (the original TF code's initialisers).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {list(CONV_IMPLS)}, got {conv_impl!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {list(BN_MODES)}, got {bn!r}")
    if isinstance(bn_steps, bool) or not isinstance(bn_steps, int) or bn_steps < 1:
        raise ValueError(f"bn_steps must be an int >= 1, got {bn_steps!r}")
    if int(ways) < 1:
        raise ValueError(f"ways must be >= 1, got {ways!r}")
    filters, stride, pool = DATASETS[dataset]
    module = _Conv4(int(ways), filters, stride, pool, conv_impl, bn, bn_steps, head)

    def check(x):
        if jnp.ndim(x) != 4:
            raise ShapeError(f"conv4 input x has shape {jnp.shape(x)}; expected [n, H, W, C] (NHWC)")

    def init(key: jax.Array, example_x: jax.Array):
        check(example_x)
        return module.init(key, example_x)["params"]

    def apply(params, x: jax.Array, step: int | jax.Array = 0) -> jax.Array:
        check(x)
        return module.apply({"params": params}, x, step)

    return Model(init, apply)
