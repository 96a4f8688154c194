"""A/B the speed ideas in ``experiments/results/bench/tried_2026-1*.md`` that were not kept.

    python experiments/speed_variants.py VARIANT WORKLOAD [--iters N] [--conv-impl lax] [--cpu-devices N]

Patches one piece of the library in this process, then prints the benchmark's it/s
(``bench.measure``, 2 warm-up steps). Run variants alternately with ``base`` on a quiet
machine and compare medians. ``VARIANT`` is one of, or several joined by ``+``:

* ``base``: nothing patched.
* ``vjpconv``: stride-1 convolutions as ``lax.conv`` with a custom VJP: the input gradient is a
  convolution again and the weight gradient 9 matmuls over shifted views, each rule calling
  the custom functions so that second-order terms stay in the family. No forward mode
  (``custom_vjp``), so iMAML cannot use it.
* ``shiftconv``: every convolution as 9 accumulated matmuls over the shifted views, without
  stacking them into one patch tensor (less copying, but 9 matmuls with ``K = C``).
* ``wino``: stride-1 convolutions with at least 8 input channels as Winograd's F(2x2, 3x3)
  (``winograd_conv``: 16 batched ``[n·tiles, C] @ [C, F]`` matmuls between input, kernel and
  output transforms, 2.25x fewer multiplies); the RGB input layer and strided layers stay
  patches (with 3 channels the transforms cost more than they save).
* ``winofwd``: as ``wino`` for the forward values only (``winograd_primal_conv``, a custom JVP
  whose tangent is the patch convolution's, so every gradient is computed as in ``base``).
* ``chunkconvN``: every convolution in ``lax.map`` over groups of N images (the largest divisor
  of the batch up to N), each group's patch convolution under ``jax.checkpoint``
  (``chunked_conv``), in place of either patch form. N = 1 is the library's
  ``conv_impl="patches_per_image"``, the default for miniimagenet-5w1s on CPU since it was
  measured this way (so ``base`` is that now; pass ``--conv-impl patches`` for the plain patch
  convolution); N = 3 was no faster than ``patches`` on miniimagenet-5w1s, N = 5 and 15 not on
  omniglot-5w1s (``results/bench/patches_per_image_epyc512.md``).
* ``chunkkbN``: as ``chunkconvN``, but each layer's group is the most images whose patch matrix
  fits in N KiB (``budget_chunk``), so that the small late layers run in larger groups than the
  first two (``chunkkb1024``: 1 image at 84x84x3 and 42x42x32, 2 at 21x21x32, 9 at 10x10x32,
  rounded down to a divisor of the batch). ``chunkkb2048`` was 7% slower than ``chunkconv1`` on
  miniimagenet-5w1s (``results/bench/zen3_miniimagenet_ab.md``).
* ``fusedblock``: every conv4 block (conv → transductive BatchNorm → ReLU → pool) one image at a
  time (``per_image_block``, ``PerImageConv4``): the BatchNorm statistics from a first map over
  the images, then each image's convolution recomputed, normalised, rectified and pooled in a
  second, so that no block's full-size activations are written out whole. 38% slower than
  ``chunkconv1`` on miniimagenet-5w1s (same file).
* ``firstwhole``: the RGB input layer (fewer than 8 input channels) as one ``"patches"``
  convolution over the whole batch, the later layers as the bench picks (per image on two CPU
  devices): the per-image loop at the input layer writes its ``[n, 84, 84, 32]`` output into a
  zero-filled loop buffer (``wrapped_broadcast`` in ``profile_miniimagenet-5w1s_zen3_2devices.md``)
  and runs 75 iterations of a ``K = 27`` matmul; its whole-batch patch matrix is 57 MB. 9% slower
  on miniimagenet-5w1s (``results/bench/tried_2026-12-07.md``).
* ``firstchunkN``: as ``firstwhole`` but the input layer in ``chunked_conv`` groups of N images;
  ``firstchunk15`` 14% slower (same file).
* ``biasinloop``: the convolution's bias added inside the per-image loop of
  ``patches_per_image`` (``BiasInLoopConv3x3``), each image's output as it leaves its matmul,
  instead of in a separate pass over the loop's whole output (``conv_0/add`` over
  ``f32[75,84,84,32]``, 2.8% of the MiniImageNet step's op time in the Zen3 profile). +1.1% by
  the medians of 10 alternated rounds, within noise (``results/bench/tried_2026-12-07.md``).
* ``nocse``: ``chunkconv1`` with ``jax.checkpoint(..., prevent_cse=False)``; 5% slower (same file).
* ``splitmap``: ``batched_meta_grad`` of MAML with ``task_map="map"`` split in three
  (``split_meta_grad``): every task's first inner step from the shared θ at once (``vmap``: one
  convolution over all ``T·n`` support images instead of T over ``n``), the later inner steps and
  the query gradient per task in ``lax.map``, then the first step's VJP of those per-task
  gradients batched again. The same meta-gradient (tested in float64). 16% slower on
  omniglot-5w1s, noise (+2%) on miniimagenet-5w1s (``results/bench/zen3_splitmap_ab.md``).
* ``unrolledrng``: JAX's threefry PRNG lowered on CPU with its 20 rounds unrolled, as on GPU,
  instead of the rolled ``while`` loop JAX picks for CPU (``unrolled_threefry_on_cpu``): the same
  random bits, so the same tasks.
* ``bn1pass``: BatchNorm's variance as ``E[x²] − E[x]²`` (one read of the activations for both
  moments instead of two).
* ``pairmax``: 2x2 max-pool as ``maximum`` of the four strided views.
* ``relupool``: ReLU after the max-pool instead of before (exact: ReLU is monotone);
  miniimagenet-5w1s only (the Omniglot net has no max-pool, so it would lose its ReLUs).
* ``mapbN``: ``lax.map(..., batch_size=N)`` over tasks where the workload uses ``map``.
* ``unrollN``: the task map as ``lax.scan(..., unroll=N)`` where the workload uses ``map``: N
  tasks per loop iteration, whose independent kernels XLA:CPU may run concurrently.
  Both keep the stacked task mean of ``stackmean`` (they were timed before the running sum), so
  compare them with ``stackmean``, not ``base``.
* ``fixedbatch``: every step trains on one task batch drawn once, as ``torch_peers.py`` times
  its peers, instead of sampling a new batch on device (the sampler's share of the step); the
  same as the bench's ``--fixed-tasks``.
  For the sinusoid run it under ``taskset -c 0`` with ``--iters 4000``: the bench's one-CPU
  default is not applied here.
* ``onedraw``: the sinusoid sampler draws its points and targets from one ``[tasks, 2(shots +
  query)]`` uniform block (targets through ``erfinv``) instead of four ``jax.random`` calls, each
  a rolled threefry loop on CPU. Same distributions, other numbers.
* ``chunkdraw``: a chunk's tasks for all its steps drawn before its ``lax.scan``, in one batched
  call of the sampler over the steps' keys ``fold_in(rng, step + i)``, instead of one call per
  step inside the scan body. The same keys, so the same tasks and the same trajectory.
* ``flatadam``: the benchmark's Adam wrapped in ``optax.flatten`` (one moment vector instead of
  one per parameter leaf: fewer, larger update kernels).
* ``cfconv``: each convolution's patch matrix built transposed (from the input in
  ``[C, n, H, W]``), so that the kernel gradient is a matmul form XLA:CPU gives to YNNPACK.
* ``tjvppatch``, ``tjvpinput``: the patch convolution as ``transposed_kgrad_conv``, a custom JVP
  whose kernel gradient is ``P_T @ g`` with the transposed patch matrix built by
  ``two_step_transpose`` of the patch matrix (``tjvppatch``) or from the input in ``[C, n, H, W]``
  (``tjvpinput``), instead of JAX's contraction of the patch rows (an XLA:CPU transpose and a
  matmul; ``results/bench/tried_2026-12-05.md``). Forward mode kept.
* ``blaskgrad``: the patch convolution as ``blas_kgrad.blas_kgrad_conv``, whose kernel gradient
  ``Pᵀ g`` is a BLAS ``gemm`` (SciPy's OpenBLAS, one thread) reading the patch matrix in place
  through an XLA FFI call, instead of XLA:CPU's transpose and matmul. A ``custom_vjp``: no
  forward mode (iMAML).
* ``stackmean``: ``batched_meta_grad`` with ``task_map="map"`` as the library had it before
  ``core.mean_over_tasks``: ``lax.map`` stacks every task's gradient ``[tasks, ...]``, then
  ``jnp.mean(axis=0)`` (a reduction XLA:CPU gives to YNNPACK), instead of a running sum in the
  loop.
* ``slicepool``: 2x2 max-pool windows as four strided slices stacked last instead of a
  reshape and transpose (the same values, gradients and tie-breaking).
* ``bf16model``: the whole conv4 in bfloat16 through the library's own
  ``precision.mixed_precision`` (``--config.compute_dtype=bfloat16``).
* ``bf16dot``: only the convolutions' patch matmuls in bfloat16 (inputs and output; BatchNorm,
  ReLU, pooling and the loss stay float32). The output is bf16 so that the cotangents of the
  backward matmuls are bf16 too; with ``preferred_element_type=float32`` JAX's transpose rules
  give mixed float32 x bfloat16 matmuls, which XLA:CPU runs in float32.
* ``bf16vjp``: the patch matmul as ``bf16_matmul``, a custom VJP with bf16 inputs and a float32
  result whose VJP is two more of itself, so that JAX emits only bf16 x bf16 → float32 matmuls
  at every derivative order (XLA:CPU still runs the kernel gradient, which contracts the patch
  rows, in float32). No forward mode (iMAML).
* ``scanall``: every inner step in the ``lax.scan``, the first included (``scan_all_inner_adapt``),
  instead of ``core.inner_adapt``'s first step on its own: one copy of the inner step in the
  program instead of two. Shorter compiles; on miniimagenet-5w1s slower in 8 of 11 alternated
  rounds, on omniglot-20w1s faster in 4 of 7, within noise (``results/bench/inner_loop_zen3.md``).
* ``unrollinner``: the inner loop unrolled, through the bench's own ``inner_unroll=True`` (as
  ``bench --inner-unroll`` and ``--config.inner_unroll=true``). Its 7 alternated rounds on
  miniimagenet-5w1s ran an earlier form, ``scanall``'s scan with ``unroll=True`` (the same
  straight-line steps), and were all faster than ``base`` (same file). Kept as an option. From
  87d983b until ef51a7e it was a no-op: it was then ``functools.partial(bench.maml, unroll=True)``,
  and ``bench._setup`` passes ``unroll=False`` itself, which overrode the partial's
  (``results/bench/tried_2026-12-07_unroll.md``).
* ``unrollinnerN``: ``inner_unroll=N``: the K - 1 later inner steps in a loop that runs N of them
  per trip (``lax.scan``'s ``unroll=N``), a middle way between the loop and ``unrollinner``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import types
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import SymbolicZero

from maml_jax import bench, core
from maml_jax.host import request_cpu_devices
from maml_jax.precision import mixed_precision

conv4 = importlib.import_module("maml_jax.models.conv4")  # the module (maml_jax.models.conv4 is also a function)


def _lax_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _flip_t(k):
    """The kernel whose convolution with the output gradient is the input gradient."""
    return jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)


@jax.custom_vjp
def vjp_conv(x, k):
    """3x3 stride-1 padding-1 convolution ``[n, H, W, C] x [3, 3, C, F] -> [n, H, W, F]``."""
    return _lax_conv(x, k)


@jax.custom_vjp
def conv_weight_grad(x, g):
    """``[3, 3, C, F]``: the kernel gradient of ``vjp_conv`` for output gradient ``g``."""
    c = x.shape[-1]
    g2 = g.reshape(-1, g.shape[-1])
    views = [v.reshape(-1, c).T @ g2 for v in conv4.shifted_views(x, 1)]
    return jnp.stack(views).reshape(3, 3, c, -1)


vjp_conv.defvjp(
    lambda x, k: (vjp_conv(x, k), (x, k)),
    lambda res, g: (vjp_conv(g, _flip_t(res[1])), conv_weight_grad(res[0], g)),
)
conv_weight_grad.defvjp(
    lambda x, g: (conv_weight_grad(x, g), (x, g)),
    lambda res, kbar: (vjp_conv(res[1], _flip_t(kbar)), vjp_conv(res[0], kbar)),
)


def bf16_conv(plain_conv: Callable, x, k, stride, impl):
    """``plain_conv`` (``conv4.conv3x3``) run in bfloat16: ``x [n, H, W, C]`` float32 →
    ``[n, H', W', F]`` float32, rounded through bf16."""
    y = plain_conv(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), stride, impl)
    return y.astype(jnp.float32)


@jax.custom_vjp
def bf16_matmul(a, b):
    """``a [m, k] @ b [k, n]`` float32 → float32 with bf16 inputs and float32 accumulation (the
    fast path of AVX512_BF16 CPUs). Its VJP is two more of these (the cotangent rounded to bf16
    too), and the ``fwd`` rule calls this function, so every derivative order stays bf16 x bf16
    → float32. A ``custom_vjp``: no forward mode (iMAML)."""
    return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(a, b):
    return bf16_matmul(a, b), (a, b)


def _bf16_matmul_bwd(res, g):
    a, b = res
    return bf16_matmul(g, b.T), bf16_matmul(a.T, g)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def bf16_matmul_conv(x, k, stride, impl):
    """``conv4.conv3x3`` (patches) with its matmul as ``bf16_matmul``."""
    patches = conv4.patches3x3(x, stride)
    rows, cols = patches.reshape(-1, patches.shape[-1]), k.reshape(patches.shape[-1], -1)
    return bf16_matmul(rows, cols).reshape(*patches.shape[:3], -1)


def patches_transposed(x, stride):
    """``[9·C, n·H'·W']``: ``conv4.patches3x3`` of ``x [n, H, W, C]`` transposed, built from the
    input in ``[C, n, H, W]`` (row ``(3i + j)·C + c``)."""
    n, h, w, c = x.shape
    ho, wo = conv4.conv_out_size(h, stride), conv4.conv_out_size(w, stride)
    xp = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1)))
    views = [
        jax.lax.slice(
            xp, (0, 0, i, j), (c, n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1), (1, 1, stride, stride)
        )
        for i in range(3)
        for j in range(3)
    ]
    return jnp.stack(views, 0).reshape(9 * c, n * ho * wo)


def channels_first_conv(x, k, stride, impl):
    """``conv4.conv3x3`` with the patch matrix built transposed (``patches_transposed``) and the
    output as ``k^T [F, 9·C] @ patches^T``: the kernel
    gradient then contracts the patch matrix's last axis (XLA's ``nt`` form) instead of its
    first (``tn``, which XLA:CPU does not give to YNNPACK). NHWC in and out."""
    n, h, w, _ = x.shape
    ho, wo = conv4.conv_out_size(h, stride), conv4.conv_out_size(w, stride)
    patches_t = patches_transposed(x, stride)
    return (k.reshape(patches_t.shape[0], -1).T @ patches_t).reshape(-1, n, ho, wo).transpose(1, 2, 3, 0)


def two_step_transpose(a):
    """``a [R, K] → [K, R]`` as two transposes kept apart by ``lax.optimization_barrier``: first
    within blocks of ``r2`` rows (``[R/r2, K, r2]``), then of the blocks (a plain ``a.T`` when no
    block size in the list divides ``R``)."""
    rows, cols = a.shape
    r2 = next((d for d in (196, 147, 100, 75, 64, 49, 32, 16) if rows % d == 0 and rows > d), None)
    if r2 is None:
        return a.T
    blocks = jax.lax.optimization_barrier(a.reshape(rows // r2, r2, cols).transpose(0, 2, 1))
    return blocks.transpose(1, 0, 2).reshape(cols, rows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def transposed_kgrad_conv(x, k, stride, build):
    """``conv4.conv3x3`` (patches) whose tangent in the kernel is ``dot_general(P_T, dk)``
    contracting ``P_T``'s first axis, ``P_T [9·C, n·H'·W']`` the transposed patch matrix; JAX's
    transpose of it, the kernel gradient, is then ``P_T @ g`` (a matmul whose long operand is
    contracted on its last axis) instead of contracting the rows of ``P``. ``build``: ``"patches"``
    (``two_step_transpose`` of the patch matrix) or ``"input"`` (``patches_transposed``). A
    ``custom_jvp``, so forward mode (iMAML) still works."""
    return conv4.patch_conv(x, k, stride)


def _transposed_kgrad_conv_jvp(stride, build, primals, tangents):
    x, k = primals
    dx, dk = tangents
    y = transposed_kgrad_conv(x, k, stride, build)
    terms = []
    if type(dx) is not SymbolicZero:
        terms.append(transposed_kgrad_conv(dx, k, stride, build))
    if type(dk) is not SymbolicZero:
        if build == "patches":
            p = conv4.patches3x3(x, stride)
            p_t = two_step_transpose(p.reshape(-1, p.shape[-1]))
        else:
            p_t = patches_transposed(x, stride)
        t = jax.lax.dot_general(p_t, dk.reshape(p_t.shape[0], -1), (((0,), (0,)), ((), ())))
        terms.append(t.reshape(y.shape))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


transposed_kgrad_conv.defjvp(_transposed_kgrad_conv_jvp, symbolic_zeros=True)


def load_blas_kgrad() -> types.ModuleType:
    """``experiments/blas_kgrad.py`` (registers its FFI target on import, so load it only for
    ``blaskgrad``)."""
    spec = importlib.util.spec_from_file_location("blas_kgrad", Path(__file__).with_name("blas_kgrad.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slice_window_max_pool(x):
    """``conv4.max_pool2x2`` with the 2x2 windows gathered as the four strided views
    ``x[:, di::2, dj::2]`` stacked last, in the library's order ``2·di + dj`` (so argmax ties break
    alike), instead of a reshape and a 6-axis transpose."""
    x = x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    x = jnp.stack([x[:, di::2, dj::2] for di in (0, 1) for dj in (0, 1)], axis=-1)
    mask = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(x), axis=-1), 4, dtype=x.dtype)
    return jnp.sum(x * mask, axis=-1)


def _pairwise_max_pool(x):
    n, h, w, f = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]), jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def shift_conv(x, k, stride):
    """``conv4.conv3x3`` as 9 accumulated matmuls ``Σ_ij view_ij [n·H'·W', C] @ k[i, j] [C, F]``
    over the shifted (strided) views of the padded input, instead of one matmul with the views
    stacked into a ``[n·H'·W', 9·C]`` patch tensor."""
    views = conv4.shifted_views(x, stride)
    n, ho, wo, c = views[0].shape
    out = 0.0
    for v, tap in zip(views, k.reshape(9, c, -1), strict=True):  # tap 3i + j is k[i, j]
        out = out + v.reshape(n * ho * wo, c) @ tap
    return out.reshape(n, ho, wo, -1)


def chunked_conv(x, k, stride, chunk, prevent_cse=True):
    """``conv4.conv3x3`` of ``x [n, H, W, C]`` in ``lax.map`` over groups of ``b`` images (``b`` the
    largest divisor of ``n`` up to ``chunk``), each group's patch convolution under
    ``jax.checkpoint``: the group's patch tensor (``[b·H'·W', 9·C]``) is built, used and
    dropped while it is still in cache, and rebuilt per group for the gradients, instead of one
    ``[n·H'·W', 9·C]`` tensor that goes out to memory and is kept for the backward pass.
    ``prevent_cse=False`` drops the checkpoint's optimisation barriers (JAX documents that as safe
    inside a loop such as ``lax.map``)."""
    n = x.shape[0]
    b = max(d for d in range(1, min(chunk, n) + 1) if n % d == 0)
    if b == n:
        return conv4.patch_conv(x, k, stride)
    group = jax.checkpoint(lambda xi, k_: conv4.patch_conv(xi, k_, stride), prevent_cse=prevent_cse)
    out = jax.lax.map(lambda xi: group(xi, k), x.reshape(n // b, b, *x.shape[1:]))
    return out.reshape(n, *out.shape[2:])


def input_layer_conv(first: Callable, min_channels: int = 8) -> Callable:
    """A ``conv4.conv3x3`` that runs ``first(x, k, stride)`` on layers with fewer than
    ``min_channels`` input channels (the RGB input layer) and the library's own on the rest."""
    plain = conv4.conv3x3

    def conv3x3(x, k, stride, impl):
        return first(x, k, stride) if x.shape[-1] < min_channels else plain(x, k, stride, impl)

    return conv3x3


def budget_chunk(x_shape: tuple[int, ...], stride: int, budget_bytes: int, itemsize: int = 4) -> int:
    """The most images of ``x [n, H, W, C]`` whose ``[b·H'·W', 9·C]`` patch matrix fits in
    ``budget_bytes`` (at least 1): ``chunkkbN``'s group size, chosen per layer."""
    _, h, w, c = x_shape
    one = conv4.conv_out_size(h, stride) * conv4.conv_out_size(w, stride) * 9 * c * itemsize
    return max(1, budget_bytes // one)


def _winograd_rows(a, axis, transform):
    """Apply a 4-tap Winograd transform along ``axis`` of ``a`` tiled with stride 2: output row
    ``r`` of tile ``t`` is ``Σ_k transform[r][k] · a[2t + k]`` (``a`` holds ``2·tiles + 2`` rows)."""
    tiles = (a.shape[axis] - 2) // 2
    taps = [jax.lax.slice_in_dim(a, k, k + 2 * tiles - 1, 2, axis) for k in range(4)]
    return [sum(c * t for c, t in zip(row, taps, strict=True) if c) for row in transform]


_WINO_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # Lavin & Gray (2016), F(2, 3)
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINO_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def winograd_conv(x, k):
    """``conv4.conv3x3`` with stride 1 as Winograd's F(2x2, 3x3) (Lavin & Gray, 2016, eq. 8):
    ``Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`` per 2x2 output tile, the channel sum as 16 matmuls
    ``[n·tiles, C] @ [C, F]`` (one batched ``dot_general``). 2.25x fewer multiplies than the
    patch matmul, at the cost of the input, kernel and output transforms (adds and slices).
    ``x [n, H, W, C]``, ``k [3, 3, C, F]`` → ``[n, H, W, F]``."""
    n, h, w, c = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    d = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))  # [n, 2th+2, 2tw+2, C]
    v = [col for row in _winograd_rows(d, 1, _WINO_BT) for col in _winograd_rows(row, 2, _WINO_BT)]
    v = jnp.stack(v).reshape(16, n * th * tw, c)
    g = jnp.asarray(_WINO_G, k.dtype)
    u = jnp.einsum("ai,ijcf,bj->abcf", g, k, g).reshape(16, c, -1)
    m = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, n, th, tw, -1)
    rows = [sum(a * m[i] for i, a in enumerate(r) if a) for r in _WINO_AT]  # each [4, n, th, tw, F]
    y = jnp.stack([jnp.stack([sum(a * row[j] for j, a in enumerate(r) if a) for r in _WINO_AT]) for row in rows])
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, -1)  # [n, th, 2, tw, 2, F]
    return y[:, :h, :w]


@jax.custom_jvp
def winograd_primal_conv(x, k):
    """``winograd_conv`` for the primal value only: its tangent (and so every gradient, by JAX's
    transpose of the tangent) is the patch convolution's, ``conv(dx, k) + conv(x, dk)``, so the
    long-contraction kernel gradient and the transposed transforms of ``winograd_conv`` never run."""
    return winograd_conv(x, k)


@winograd_primal_conv.defjvp
def _winograd_primal_conv_jvp(primals, tangents):
    (x, k), (dx, dk) = primals, tangents
    return winograd_primal_conv(x, k), conv4.patch_conv(dx, k, 1) + conv4.patch_conv(x, dk, 1)


def unrolled_threefry_on_cpu() -> None:
    """Lower JAX's ``threefry2x32`` on CPU with the rule of the other platforms: the 20 rounds
    unrolled (inlined here; JAX emits them as an out-of-line function elsewhere, which timed the
    same), instead of the CPU rule's ``while`` loop of 5 iterations. The same integer arithmetic,
    so the same bits. Process-wide: it replaces JAX's registered CPU lowering (a private module)."""
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32

    rule = threefry2x32._threefry2x32_lowering_rule  # the default platforms' (unrolled) rule
    mlir.register_lowering(threefry2x32.threefry2x32_p, rule, platform="cpu")


def one_pass_batch_norm(x, scale, bias, eps=conv4.BN_EPS):
    """``conv4.batch_norm`` with the variance as ``E[x²] − E[x]²``: both moments from one read of ``x``."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean)
    return (x - mean) * (scale * jax.lax.rsqrt(var + eps)) + bias


def per_image_block(x, kernel, conv_bias, scale, bias, stride: int, pool: bool, eps: float = conv4.BN_EPS):
    """One conv4 block, conv 3x3 (+ bias) → transductive BatchNorm → ReLU (→ 2x2 max-pool), of
    ``x [n, H, W, C]`` one image at a time, so that the block's full-size activations
    ``[n, H', W', F]`` are never written out whole: a first ``lax.map`` over the images gives each
    image's channel means and summed squared deviations ``[n, F]``, combined into the batch's
    (Chan et al.'s pairwise formula: ``var = (Σ M2ᵢ + Σ cᵢ (meanᵢ − mean)²) / N``); a second
    recomputes each image's convolution and normalises, rectifies and pools it. Both maps'
    bodies are under ``jax.checkpoint``, so the backward pass recomputes per image too.
    ``→ [n, H'', W'', F]``, the same as the layered block up to float rounding."""
    n = x.shape[0]

    def conv_one(image, k, b):
        return conv4.patch_conv(image[None], k, stride)[0] + b  # [H', W', F]

    def moments(image, k, b):
        y = conv_one(image, k, b)
        m = jnp.mean(y, axis=(0, 1))
        return m, jnp.sum(jnp.square(y - m), axis=(0, 1))

    def block(image, k, b, mean, mult, shift):
        z = jax.nn.relu((conv_one(image, k, b) - mean) * mult + shift)
        return conv4.max_pool2x2(z[None])[0] if pool else z

    stats, body = jax.checkpoint(moments), jax.checkpoint(block)
    means, m2s = jax.lax.map(lambda image: stats(image, kernel, conv_bias), x)
    count = conv4.conv_out_size(x.shape[1], stride) * conv4.conv_out_size(x.shape[2], stride)
    mean = jnp.mean(means, axis=0)
    var = (jnp.sum(m2s, axis=0) + count * jnp.sum(jnp.square(means - mean), axis=0)) / (n * count)
    mult = scale * jax.lax.rsqrt(var + eps)
    return jax.lax.map(lambda image: body(image, kernel, conv_bias, mean, mult, bias), x)


def per_image_conv_with_bias(x, kernel, bias, stride: int):
    """``conv3x3(x, kernel, stride, "patches_per_image") + bias`` with the bias added inside the
    per-image loop (each image's ``[H', W', F]`` output as it leaves its matmul) instead of in a
    second pass over the loop's whole ``[n, H', W', F]`` output; the bias enters float32-wide
    like the kernel, so that its gradient is summed over the images in float32."""
    wide = jnp.promote_types(kernel.dtype, jnp.float32)
    k, b = kernel.astype(wide), bias.astype(wide)
    one = jax.checkpoint(
        lambda image, k_, b_: conv4.patch_conv(image[None], k_.astype(image.dtype), stride)[0] + b_.astype(image.dtype)
    )
    return jax.lax.map(lambda image: one(image, k, b), x)


class BiasInLoopConv3x3(conv4._Conv3x3):
    """``conv4._Conv3x3`` (same fields and parameters) whose ``patches_per_image`` form adds the
    bias inside the per-image loop (``per_image_conv_with_bias``), for the ``biasinloop`` variant."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.xavier_uniform(), (3, 3, x.shape[-1], self.filters))
        bias = self.param("bias", nn.initializers.zeros, (self.filters,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        if self.impl != "patches_per_image":
            return conv4.conv3x3(x, kernel, self.stride, self.impl) + bias
        return per_image_conv_with_bias(x, kernel, bias, self.stride)


class _NamedParams(nn.Module):
    """Parameters ``(name, initializer, shape)`` under this module's name, returned in order."""

    specs: tuple

    @nn.compact
    def __call__(self):
        return tuple(self.param(name, init, shape) for name, init, shape in self.specs)


class PerImageConv4(conv4._Conv4):
    """``conv4._Conv4`` (transductive BN, float32) with every block as ``per_image_block``: the same
    fields, parameter tree and function, for the ``fusedblock`` variant."""

    @nn.compact
    def __call__(self, x, step=0):
        if self.bn != "transductive":
            raise ValueError("fusedblock needs bn='transductive'")
        for i in range(4):
            xavier, zeros, ones = nn.initializers.xavier_uniform(), nn.initializers.zeros, nn.initializers.ones
            kernel, conv_bias = _NamedParams(
                (("kernel", xavier, (3, 3, x.shape[-1], self.filters)), ("bias", zeros, (self.filters,))),
                name=f"conv_{i}",
            )()
            scale, bias = _NamedParams(
                (("scale", ones, (self.filters,)), ("bias", zeros, (self.filters,))), name=f"bn_{i}"
            )()
            x = per_image_block(x, kernel, conv_bias, scale, bias, self.stride, self.pool)
        x = x.reshape(x.shape[0], -1)
        if not self.head:
            return x
        return nn.Dense(self.ways, kernel_init=nn.initializers.xavier_uniform(), name="head")(x)


def _one_draw_mlp_tasks(key, w):
    """``bench._mlp_tasks`` from one uniform draw: ``x ~ U(-5, 5)``, ``y = √2 erfinv(u) ~ N(0, 1)``."""
    n, ns = w["shots"] + w["query"], w["shots"]
    u = jax.random.uniform(key, (w["tasks"], 2 * n, 1), minval=jnp.nextafter(-1.0, 0.0), maxval=1.0)
    x, y = 5.0 * u[:, :n], jnp.sqrt(2.0) * jax.scipy.special.erfinv(u[:, n:])
    return bench.Task(bench.Batch(x[:, :ns], y[:, :ns]), bench.Batch(x[:, ns:], y[:, ns:]))


def chunk_drawn_train_chunk(train_step: Callable, sample_fn: Callable, length: int) -> Callable:
    """``train.make_sampling_train_chunk`` with the ``length`` steps' tasks drawn up front."""

    def chunk(state, data):
        keys = jax.vmap(lambda i: jax.random.fold_in(state.rng, state.step + i))(jnp.arange(length))
        tasks = jax.vmap(lambda key: sample_fn(key, data))(keys)
        return jax.lax.scan(train_step, state, tasks)

    return chunk


def split_meta_grad(task_loss_fn: Callable, num_inner_steps: int, inner_lr: float, meta_params, tasks):
    """``((loss, metrics), grads)`` of ``batched_meta_grad(maml(task_loss_fn, ...), ..., "map")``
    (second order, plain SGD inner steps, K >= 1) over ``tasks [T, n, ...]``, in three parts:

    1. ``θ¹_i = θ − α ∇L_support_i(θ)`` for every task at once (``vmap`` with θ shared), kept as a VJP;
    2. per task in ``lax.map``: the other K − 1 steps from ``θ¹_i``, the query loss ``L_i`` and
       ``g_i = ∇_{θ¹_i} L_i``, stacked ``[T, ...]``;
    3. ``∇θ = (1/T) Σ_i (∂θ¹_i/∂θ)ᵀ g_i``: the VJP of part 1 applied to ``g / T``, batched.
    Metrics as ``core.meta_loss``'s, task means."""
    count = jax.tree.leaves(tasks)[0].shape[0]

    def first_step(p, support):
        (loss, _), g = jax.value_and_grad(task_loss_fn, has_aux=True)(p, support)
        return jax.tree.map(lambda w, d: w - inner_lr * d, p, g), loss

    theta1, vjp, support_loss = jax.vjp(
        lambda p: jax.vmap(first_step, (None, 0))(p, tasks.support), meta_params, has_aux=True
    )

    def rest(args):
        p1, task = args

        def query_loss(p):
            adapted, _ = core.inner_adapt(
                p, task.support, task_loss_fn, num_inner_steps=num_inner_steps - 1, inner_lr=inner_lr
            )
            return task_loss_fn(adapted, task.query)

        (loss, aux), g = jax.value_and_grad(query_loss, has_aux=True)(p1)
        return loss, aux, g

    losses, aux, g1 = jax.lax.map(rest, (theta1, tasks))
    (grads,) = vjp(jax.tree.map(lambda g: g / count, g1))
    metrics = {"query_loss": jnp.mean(losses), **{f"query_{k}": jnp.mean(v) for k, v in aux.items()}}
    metrics["support_loss"] = jnp.mean(support_loss)
    return (metrics["query_loss"], metrics), grads


def split_map_grads() -> None:
    """``bench``'s ``batched_meta_grad`` of ``maml`` with ``task_map="map"`` as ``split_meta_grad``."""
    plain_maml, plain_grad = bench.maml, bench.batched_meta_grad

    def maml(loss_fn, **kwargs):
        other = sorted(k for k, v in kwargs.items() if k not in ("num_inner_steps", "inner_lr") and v)
        if other:
            raise ValueError(f"splitmap is plain second-order MAML with SGD inner steps; it cannot apply {other}")
        algorithm = plain_maml(loss_fn, **kwargs)
        return types.SimpleNamespace(plain=algorithm, loss_fn=loss_fn, kwargs=kwargs)

    def batched_meta_grad(spec, meta_params, tasks, step, task_map="vmap"):
        if task_map != "map":
            return plain_grad(spec.plain, meta_params, tasks, step, task_map)
        steps, alpha = spec.kwargs["num_inner_steps"], spec.kwargs["inner_lr"]
        return split_meta_grad(spec.loss_fn, steps, alpha, meta_params, tasks)

    bench.maml, bench.batched_meta_grad = maml, batched_meta_grad


def scan_all_inner_adapt(params, support, task_loss_fn, *, num_inner_steps, inner_update_fn, **switches):
    """``core.inner_adapt`` (as ``core.meta_loss`` calls it: ``inner_update_fn``, ``first_order``,
    ``remat``) with all K steps in one ``lax.scan``, the first included, instead of the first
    step on its own: one copy of the inner step in the program instead of two."""
    grad_fn = jax.value_and_grad(task_loss_fn, has_aux=True)
    if switches.get("remat") or switches.get("remat_policy") is not None or switches.get("unroll", 1) != 1:
        raise ValueError("scanall neither rematerialises nor unrolls")

    def one_step(p, step):
        (loss, _), grads = grad_fn(p, support)
        if switches.get("first_order"):
            grads = jax.lax.stop_gradient(grads)
        return inner_update_fn(p, grads, step), {"support_loss": loss}

    return jax.lax.scan(one_step, params, jnp.arange(num_inner_steps))


def _with_map(plain: Callable, mapped: Callable) -> Callable:
    """``map_tasks`` that runs ``task_map="map"`` as ``mapped(fn, tasks)``, other maps as ``plain``."""

    def map_tasks(fn, tasks, task_map="vmap"):
        return mapped(fn, tasks) if task_map == "map" else plain(fn, tasks, task_map)

    return map_tasks


def unrolled_map_tasks(plain: Callable, n: int) -> Callable:
    """``map_tasks`` with ``task_map="map"`` as ``lax.scan(..., unroll=n)``; other maps as ``plain``."""
    return _with_map(plain, lambda fn, tasks: jax.lax.scan(lambda c, t: (c, fn(t)), None, tasks, unroll=n)[1])


def _replace_task_map(make: Callable[[Callable], Callable]) -> None:
    """Swap the library's ``map_tasks`` (in ``core`` and ``algorithms.base``) for ``make(current)``,
    and ``batched_meta_grad``'s ``mean_over_tasks`` for the mean of its stacked outputs (what the
    library did when these variants were timed)."""
    core, base = importlib.import_module("maml_jax.core"), importlib.import_module("maml_jax.algorithms.base")
    core.map_tasks = base.map_tasks = make(core.map_tasks)
    base.mean_over_tasks = lambda fn, tasks, task_map="vmap": jax.tree.map(
        lambda a: jnp.mean(a, axis=0), base.map_tasks(fn, tasks, task_map)
    )


def stride1_conv(conv: Callable, other: Callable, min_channels: int = 0) -> Callable:
    """A ``conv4.conv3x3`` that runs ``conv(x, k)`` on stride-1 layers with at least
    ``min_channels`` input channels and ``other(x, k, stride, impl)`` on the rest."""

    def conv3x3(x, k, stride, impl):
        return conv(x, k) if stride == 1 and x.shape[-1] >= min_channels else other(x, k, stride, impl)

    return conv3x3


def _replace_patch_convs(conv: Callable) -> None:
    """``conv4.conv3x3`` as ``conv(x, k, stride)`` for both patch forms (``"lax"`` left as it is)."""
    plain = conv4.conv3x3
    patch_forms = ("patches", "patches_per_image")
    conv4.conv3x3 = lambda x, k, s, i: conv(x, k, s) if i in patch_forms else plain(x, k, s, i)


def inner_unroll_of(variants: list[str]) -> int | bool:
    """The bench's ``inner_unroll`` for the joined variants: ``True`` with ``unrollinner``, ``N``
    with ``unrollinnerN``, else ``False`` (the loop)."""
    for v in variants:
        if v == "unrollinner":
            return True
        if v.startswith("unrollinner") and v[11:].isdigit():
            return int(v[11:])
    return False


def patch(variant: str) -> None:
    """Apply one named variant to the library modules of this process."""
    if variant == "base":
        return
    if variant == "vjpconv":
        conv4.conv3x3 = stride1_conv(vjp_conv, conv4.conv3x3)
    elif variant == "shiftconv":
        conv4.conv3x3 = lambda x, k, stride, impl: shift_conv(x, k, stride)
    elif variant in ("wino", "winofwd"):
        conv = winograd_conv if variant == "wino" else winograd_primal_conv
        conv4.conv3x3 = stride1_conv(conv, conv4.conv3x3, min_channels=8)
    elif variant.startswith("chunkconv") and variant[9:].isdigit():
        chunk = int(variant[9:])
        _replace_patch_convs(lambda x, k, s: chunked_conv(x, k, s, chunk))
    elif variant.startswith("chunkkb") and variant[7:].isdigit():
        budget = int(variant[7:]) * 1024
        _replace_patch_convs(lambda x, k, s: chunked_conv(x, k, s, budget_chunk(x.shape, s, budget, x.dtype.itemsize)))
    elif variant == "fusedblock":
        conv4._Conv4 = PerImageConv4  # conv4.conv4 looks _Conv4 up at call time
    elif variant == "firstwhole":
        conv4.conv3x3 = input_layer_conv(conv4.patch_conv)
    elif variant.startswith("firstchunk") and variant[10:].isdigit():
        chunk = int(variant[10:])
        conv4.conv3x3 = input_layer_conv(lambda x, k, s: chunked_conv(x, k, s, chunk))
    elif variant == "biasinloop":
        conv4._Conv3x3 = BiasInLoopConv3x3  # _Conv4 looks _Conv3x3 up at call time
    elif variant == "nocse":
        _replace_patch_convs(lambda x, k, s: chunked_conv(x, k, s, 1, prevent_cse=False))
    elif variant == "splitmap":
        split_map_grads()
    elif variant == "scanall":
        importlib.import_module("maml_jax.core").inner_adapt = scan_all_inner_adapt  # meta_loss looks it up
    elif variant.startswith("unrollinner") and inner_unroll_of([variant]):
        pass  # no patch: main measures with bench's own inner_unroll (``inner_unroll_of``)
    elif variant == "unrolledrng":
        unrolled_threefry_on_cpu()
    elif variant == "bn1pass":
        conv4.batch_norm = one_pass_batch_norm
    elif variant == "pairmax":
        conv4.max_pool2x2 = _pairwise_max_pool
    elif variant == "relupool":
        no_relu = types.SimpleNamespace(**{k: getattr(nn, k) for k in dir(nn) if not k.startswith("__")})
        no_relu.relu = lambda x: x
        conv4.nn = no_relu  # _Conv4 looks nn.relu up at call time
        pool = conv4.max_pool2x2
        conv4.max_pool2x2 = lambda x: nn.relu(pool(x))
    elif variant.startswith("mapb") and variant[4:].isdigit():
        size = int(variant[4:])
        _replace_task_map(lambda plain: _with_map(plain, lambda fn, tasks: jax.lax.map(fn, tasks, batch_size=size)))
    elif variant.startswith("unroll") and variant[6:].isdigit():
        _replace_task_map(lambda plain: unrolled_map_tasks(plain, int(variant[6:])))
    elif variant == "fixedbatch":
        pass  # no patch: main measures with bench's own fixed_tasks=True (``--fixed-tasks``)
    elif variant == "onedraw":
        bench._mlp_tasks = _one_draw_mlp_tasks
    elif variant == "chunkdraw":
        bench.make_sampling_train_chunk = chunk_drawn_train_chunk
    elif variant == "bf16model":
        plain_conv4 = bench.conv4
        bench.conv4 = lambda *args, **kwargs: mixed_precision(plain_conv4(*args, **kwargs))
    elif variant == "bf16dot":
        conv4.conv3x3 = functools.partial(bf16_conv, conv4.conv3x3)
    elif variant == "cfconv":
        conv4.conv3x3 = channels_first_conv
    elif variant in ("tjvppatch", "tjvpinput"):
        build = "patches" if variant == "tjvppatch" else "input"
        conv4.conv3x3 = lambda x, k, stride, impl: transposed_kgrad_conv(x, k, stride, build)
    elif variant == "slicepool":
        conv4.max_pool2x2 = slice_window_max_pool
    elif variant == "stackmean":
        _replace_task_map(lambda plain: plain)
    elif variant == "blaskgrad":
        conv4.conv3x3 = load_blas_kgrad().blas_kgrad_conv
    elif variant == "bf16vjp":
        conv4.conv3x3 = bf16_matmul_conv
    elif variant == "flatadam":
        bench.optax = types.SimpleNamespace(adam=lambda lr: optax.flatten(optax.adam(lr)))
    else:
        raise SystemExit(f"unknown variant {variant!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant")
    ap.add_argument("workload", choices=sorted(bench.WORKLOADS))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--conv-impl", choices=bench.CONV_IMPLS, default=None, help="default: the bench's (default_conv_impl)"
    )
    ap.add_argument("--cpu-devices", type=int, default=1, help="CPU devices the task batch is split over")
    a = ap.parse_args()
    request_cpu_devices(a.cpu_devices)
    if "relupool" in a.variant.split("+") and bench.WORKLOADS[a.workload]["kind"] != "miniimagenet":
        ap.error("relupool needs a workload with max-pool (miniimagenet-5w1s)")
    for v in a.variant.split("+"):
        patch(v)
    variants = a.variant.split("+")
    r = bench.measure(
        a.workload,
        iters=a.iters,
        warmup=2,
        conv_impl=a.conv_impl,
        cpu_devices=a.cpu_devices,
        fixed_tasks="fixedbatch" in variants,
        inner_unroll=inner_unroll_of(variants),
    )
    print(a.variant, round(r["it_per_s"], 4), f"compile {r['compile_s']:.1f} s", flush=True)


if __name__ == "__main__":
    from maml_jax.host import reexec_with_malloc_hugepages

    reexec_with_malloc_hugepages()  # as python -m maml_jax.bench does, so that both time the same process
    main()
