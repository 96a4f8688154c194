"""experiments/speed_variants.py and experiments/conv_grad_under_map.py: the variants they time
compute what the library computes (so a timing compares like with like)."""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from experiment_scripts import load

from maml_jax import algorithms, bench
from maml_jax.models.conv4 import conv3x3

speed_variants = load("speed_variants")
conv_grad_under_map = load("conv_grad_under_map")
matmul_forms = load("matmul_forms")
blas_kgrad = load("blas_kgrad")  # once: importing it registers an XLA FFI target


def hvp(f, v):
    """``k -> ∇(∇f(k) · v)``: the Hessian-vector product of scalar ``f`` with ``v`` (second
    order through each rule of a convolution variant)."""
    return jax.grad(lambda k: jnp.sum(jax.grad(f)(k) * v))


def conv_problem():
    """``x [2, 7, 7, 3]``, a kernel ``[3, 3, 3, 4]`` and a direction ``v`` like it, float64 under ``x64``."""
    kx, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    k = jax.random.normal(kk, (3, 3, 3, 4))
    return jax.random.normal(kx, (2, 7, 7, 3)), k, jax.random.normal(kv, k.shape)


def two_layer_loss(conv, x):
    """``k -> Σ tanh(conv(tanh(conv(x, k))[..., :3], k))²``: two layers, so that a convolution
    variant's input-gradient rule is exercised too."""

    def f(k):
        h = jnp.tanh(conv(x, k))
        return jnp.sum(jnp.tanh(conv(h[..., :3], k)) ** 2)

    return f


def test_vjp_conv_matches_the_patch_convolution_to_second_order(x64):
    kx, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, 6, 6, 3))
    k = jax.random.normal(kk, (3, 3, 3, 4))
    v = jax.random.normal(kv, k.shape)

    def loss(conv):
        return lambda k_: jnp.sum(jnp.tanh(conv(x, k_)) ** 2)

    custom, patches = loss(speed_variants.vjp_conv), loss(lambda x_, k_: conv3x3(x_, k_, 1, "patches"))
    np.testing.assert_allclose(custom(k), patches(k), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(custom)(k), jax.grad(patches)(k), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hvp(custom, v)(k), hvp(patches, v)(k), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
def test_channels_first_conv_matches_the_patch_convolution_to_second_order(x64, stride):
    x, k, v = conv_problem()

    def loss(conv):
        return lambda k_: jnp.sum(jnp.tanh(conv(x, k_, stride, "patches")) ** 2)

    custom, patches = loss(speed_variants.channels_first_conv), loss(conv3x3)
    np.testing.assert_allclose(custom(k), patches(k), rtol=1e-12)
    np.testing.assert_allclose(hvp(custom, v)(k), hvp(patches, v)(k), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 7, 7, 3), (1, 6, 9, 3)])
@pytest.mark.parametrize("name", ["winograd_conv", "winograd_primal_conv"])
def test_winograd_convs_match_the_patch_convolution_to_second_order(x64, shape, name):
    _, k, v = conv_problem()
    x = jax.random.normal(jax.random.PRNGKey(3), shape)  # odd sides crop the last tile's half
    conv, patches = getattr(speed_variants, name), lambda x_, k_: conv3x3(x_, k_, 1, "patches")
    np.testing.assert_allclose(conv(x, k), patches(x, k), rtol=1e-11, atol=1e-12)
    custom, plain = two_layer_loss(conv, x), two_layer_loss(patches, x)
    np.testing.assert_allclose(jax.grad(custom)(k), jax.grad(plain)(k), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(hvp(custom, v)(k), hvp(plain, v)(k), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk, cse", [(1, True), (2, True), (4, True), (1, False)])
def test_chunked_conv_matches_the_patch_convolution_to_second_order(x64, chunk, cse):
    """Groups of the largest divisor of the 6 images up to ``chunk`` (1, 2 and 3 images here);
    ``cse=False`` is ``nocse``'s checkpoint without optimisation barriers."""
    _, k, v = conv_problem()
    x = jax.random.normal(jax.random.PRNGKey(4), (6, 5, 6, 3))
    jaxpr = str(jax.make_jaxpr(lambda x_, k_: speed_variants.chunked_conv(x_, k_, 1, chunk, cse))(x, k))
    assert f"length={6 // min(chunk, 3)}" in jaxpr and "remat" in jaxpr
    assert f"prevent_cse={cse}" in jaxpr
    for stride in (1, 2):
        conv = lambda x_, k_, s=stride: speed_variants.chunked_conv(x_, k_, s, chunk, cse)  # noqa: E731
        patches = lambda x_, k_, s=stride: conv3x3(x_, k_, s, "patches")  # noqa: E731
        np.testing.assert_allclose(conv(x, k), patches(x, k), rtol=1e-12, atol=1e-12)
    custom, plain = (
        two_layer_loss(lambda x_, k_: speed_variants.chunked_conv(x_, k_, 1, chunk, cse), x),
        two_layer_loss(lambda x_, k_: conv3x3(x_, k_, 1, "patches"), x),
    )
    np.testing.assert_allclose(jax.grad(custom)(k), jax.grad(plain)(k), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(hvp(custom, v)(k), hvp(plain, v)(k), rtol=1e-9, atol=1e-10)


def test_input_layer_conv_routes_only_the_few_channel_layer(x64):
    """``firstwhole``'s dispatch: the 3-channel input layer runs the given convolution (one patch
    matmul, no loop), a layer with 8 channels the library's own (``patches_per_image``: a loop over
    the images); both compute the patch convolution."""
    kx, kk = jax.random.split(jax.random.PRNGKey(6))
    conv = speed_variants.input_layer_conv(speed_variants.conv4.patch_conv)
    for channels, looped in ((3, False), (8, True)):
        x = jax.random.normal(kx, (4, 6, 6, channels))
        k = jax.random.normal(kk, (3, 3, channels, 5))
        jaxpr = str(jax.make_jaxpr(lambda x_, k_: conv(x_, k_, 1, "patches_per_image"))(x, k))
        assert ("scan" in jaxpr) == looped
        np.testing.assert_allclose(conv(x, k, 1, "patches_per_image"), conv3x3(x, k, 1, "patches"), rtol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_per_image_conv_with_bias_is_the_conv_plus_bias_to_second_order(x64, stride):
    """``biasinloop``: the bias added inside the per-image loop gives the library's conv + bias:
    values, gradients and Hessian-vector products in the kernel and the bias together."""
    x, k, v = conv_problem()
    b = jax.random.normal(jax.random.PRNGKey(7), (4,))
    w = (v, jax.random.normal(jax.random.PRNGKey(8), (4,)))

    def loss(conv):
        return lambda kb: jnp.sum(jnp.tanh(conv(x, *kb)) ** 2)

    inside = loss(lambda x_, k_, b_: speed_variants.per_image_conv_with_bias(x_, k_, b_, stride))
    outside = loss(lambda x_, k_, b_: conv3x3(x_, k_, stride, "patches_per_image") + b_)
    assert "scan" in str(jax.make_jaxpr(inside)((k, b)))
    np.testing.assert_allclose(inside((k, b)), outside((k, b)), rtol=1e-12)
    for got, want in zip(jax.grad(inside)((k, b)), jax.grad(outside)((k, b)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    hvp_kb = lambda f: jax.grad(lambda kb: sum(jnp.vdot(g, u) for g, u in zip(jax.grad(f)(kb), w, strict=True)))  # noqa: E731
    for got, want in zip(hvp_kb(inside)((k, b)), hvp_kb(outside)((k, b)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_budget_chunk_sizes_groups_by_patch_matrix_bytes():
    # one 42x42x32 image's patch matrix is 42·42·288·4 bytes = 2,032,128 B; 10x10x32's 115,200 B
    assert speed_variants.budget_chunk((75, 42, 42, 32), 1, 1 << 20) == 1  # over budget: still 1
    assert speed_variants.budget_chunk((75, 42, 42, 32), 1, 2_032_128 * 3) == 3
    assert speed_variants.budget_chunk((75, 10, 10, 32), 1, 1 << 20) == 9
    assert speed_variants.budget_chunk((75, 10, 10, 32), 1, 1 << 20, itemsize=2) == 18
    assert speed_variants.budget_chunk((20, 28, 28, 1), 2, 14 * 14 * 9 * 4 * 5) == 5  # stride 2: 14x14 out


@pytest.mark.slow  # fusedblock was not kept (38% slower); 39 s of the default suite
@pytest.mark.parametrize("dataset, side", [("miniimagenet", 17), ("omniglot", 11)])
def test_per_image_blocks_are_conv4_to_second_order(x64, monkeypatch, dataset, side):
    """``fusedblock``'s ``PerImageConv4`` has conv4's parameter tree and computes its function:
    values, gradients and Hessian-vector products in every parameter, pooled (odd sides crop)
    and strided."""
    conv4_module = speed_variants.conv4  # the module (maml_jax.models.conv4 is also the function)
    channels = 3 if dataset == "miniimagenet" else 1
    kx, kp, kv = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(kx, (4, side, side, channels))
    y = jnp.arange(4) % 3
    plain = conv4_module.conv4(3, dataset=dataset)
    params = plain.init(kp, x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(kv, p.shape), params)  # BN not at 1, 0
    monkeypatch.setattr(conv4_module, "_Conv4", speed_variants.PerImageConv4)
    fused = conv4_module.conv4(3, dataset=dataset)
    chex.assert_trees_all_equal_shapes(fused.init(kp, x), params)
    jaxpr = str(jax.make_jaxpr(fused.apply)(params, x))
    assert jaxpr.count("length=4") == 8  # two maps over the 4 images per block

    def loss(model):
        return lambda p: jnp.mean(jax.nn.log_softmax(model.apply(p, x))[jnp.arange(4), y]) ** 2

    v = jax.tree.map(jnp.ones_like, params)

    def grad_dot_v(model):
        return lambda p: sum(jax.tree.leaves(jax.tree.map(jnp.vdot, jax.grad(loss(model))(p), v)))

    @functools.partial(jax.jit, static_argnums=1)  # one compile per model instead of one per eager op
    def derivatives(p, fused_model: bool):
        model = fused if fused_model else plain
        return (
            model.apply(p, x),
            jax.grad(loss(model))(p),
            jax.jvp(jax.grad(loss(model)), (p,), (v,))[1],  # forward over reverse (iMAML's HVPs)
            jax.grad(grad_dot_v(model))(p),  # reverse over reverse (MAML's second-order meta-gradient)
        )

    ours, theirs = derivatives(params, True), derivatives(params, False)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-10, atol=1e-11)
    chex.assert_trees_all_close(ours[1], theirs[1], rtol=1e-9, atol=1e-11)
    chex.assert_trees_all_close(ours[2:], theirs[2:], rtol=1e-8, atol=1e-10)


@pytest.mark.slow  # splitmap was not kept (16% slower on omniglot-5w1s); about 30 s per case
@pytest.mark.parametrize("steps", [1, 2])
def test_split_map_is_the_mapped_maml_meta_gradient(x64, monkeypatch, steps):
    """``splitmap``: first inner step batched, the rest per task, the first step's VJP batched;
    the loss, metrics and second-order meta-gradient of ``batched_meta_grad(maml, "map")``."""
    from maml_jax.algorithms import batched_meta_grad, maml
    from maml_jax.losses import cross_entropy_loss
    from maml_jax.models import conv4
    from maml_jax.types import Batch, Task

    kx, ks, kq, kp = jax.random.split(jax.random.PRNGKey(6), 4)
    labels = jnp.tile(jnp.arange(3), (4, 1))  # 4 tasks, 3-way 1-shot, 1 query per class
    tasks = Task(
        Batch(jax.random.normal(ks, (4, 3, 11, 11, 1)), labels), Batch(jax.random.normal(kq, (4, 3, 11, 11, 1)), labels)
    )
    model = conv4(3, dataset="omniglot")
    params = model.init(kp, tasks.support.x[0])
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(kx, p.shape), params)  # BN not at 1, 0
    loss_fn = cross_entropy_loss(model.apply)
    kwargs = {"num_inner_steps": steps, "inner_lr": 0.3}
    plain = jax.jit(lambda p: batched_meta_grad(maml(loss_fn, **kwargs), p, tasks, 0, task_map="map"))(params)
    split = jax.jit(lambda p: speed_variants.split_meta_grad(loss_fn, steps, 0.3, p, tasks))(params)
    chex.assert_trees_all_close(split, plain, rtol=1e-9, atol=1e-10)  # float64 rounding; entries up to ~1
    assert float(jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(plain[1])))) > 1e-3  # not ~0
    # the patch routes bench's "map" meta-gradient through it and leaves "vmap" as it was
    monkeypatch.setattr(speed_variants.bench, "maml", speed_variants.bench.maml)
    monkeypatch.setattr(speed_variants.bench, "batched_meta_grad", speed_variants.bench.batched_meta_grad)
    speed_variants.patch("splitmap")
    spec = speed_variants.bench.maml(loss_fn, **kwargs)
    with pytest.raises(ValueError, match="cannot apply \\['first_order'\\]"):
        speed_variants.bench.maml(loss_fn, first_order=True, remat=False, **kwargs)
    calls = []
    monkeypatch.setattr(speed_variants, "split_meta_grad", lambda *a: calls.append(a) or "split")
    assert speed_variants.bench.batched_meta_grad(spec, params, tasks, 0, task_map="map") == "split"
    assert calls and calls[0][1:3] == (steps, 0.3)
    vmapped = jax.jit(lambda p: speed_variants.bench.batched_meta_grad(spec, p, tasks, 0, task_map="vmap"))(params)
    chex.assert_trees_all_close(vmapped, plain, rtol=1e-9, atol=1e-10)
    assert len(calls) == 1


@pytest.mark.parametrize("first_order", [False, True])
def test_scan_all_inner_adapt_is_the_library_meta_loss(x64, monkeypatch, first_order):
    """``scanall``: every inner step in the scan, the first included; the same meta-loss, metrics
    and (second- or first-order) meta-gradient as ``core.meta_loss``, whose first step runs on its
    own."""
    from maml_jax import core, mlp, mse_loss
    from maml_jax.data import sinusoid
    from maml_jax.inner_updates import sgd

    model = mlp((8, 8), 1, activation="tanh")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    task = jax.tree.map(lambda a: a[0], sinusoid.sample_tasks(jax.random.PRNGKey(1), 1, num_support=5, num_query=6))
    kw = dict(num_inner_steps=3, inner_update_fn=sgd(0.3), first_order=first_order)
    f = lambda p: core.meta_loss(p, task, mse_loss(model.apply), **kw)  # noqa: E731
    plain = jax.value_and_grad(f, has_aux=True)(params)
    monkeypatch.setattr(core, "inner_adapt", core.inner_adapt)
    speed_variants.patch("scanall")
    assert core.inner_adapt is speed_variants.scan_all_inner_adapt
    scanned = jax.value_and_grad(f, has_aux=True)(params)
    loops = jax.jit(jax.grad(lambda p: f(p)[0])).lower(params).as_text().count("stablehlo.while")
    assert loops == 2  # the inner loop and its transpose (the library: the same, over K - 1 steps)
    chex.assert_trees_all_close(scanned, plain, rtol=1e-12, atol=1e-14)
    assert float(jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(plain[1])))) > 1e-3  # not ~0


def test_unroll_inner_variants_measure_through_the_bench_inner_unroll(monkeypatch):
    """``unrollinner`` and ``unrollinnerN`` reach the step through ``bench.measure``'s own
    ``inner_unroll`` (``build_chunk``'s test checks the lowered loops), not by patching ``maml``:
    such a patch was overridden by the ``unroll`` the bench passes itself, a silent no-op."""
    monkeypatch.setattr(speed_variants.bench, "maml", algorithms.maml)
    measured = []

    def fake_measure(name, **kwargs):
        measured.append(kwargs)
        return {"it_per_s": 1.0, "compile_s": 0.0}

    monkeypatch.setattr(speed_variants.bench, "measure", fake_measure)
    monkeypatch.setattr(speed_variants, "request_cpu_devices", lambda n: n)
    for variant, want in [
        ("base", False),
        ("unrollinner", True),
        ("unrollinner2", 2),
        ("fixedbatch+unrollinner", True),
    ]:
        monkeypatch.setattr("sys.argv", ["speed_variants.py", variant, "omniglot-20w1s"])
        speed_variants.main()
        got = measured[-1]["inner_unroll"]
        assert got == want and type(got) is type(want)  # True (all), not 1 (the loop)
        assert measured[-1]["fixed_tasks"] == ("fixedbatch" in variant)
    assert speed_variants.bench.maml is algorithms.maml  # nothing patched


def test_kernel_gradient_forms_compute_the_same_matrix(x64):
    a = jax.random.normal(jax.random.PRNGKey(0), (150, 6))
    g = jax.random.normal(jax.random.PRNGKey(1), (150, 4))
    for name, form in matmul_forms.KERNEL_GRAD_FORMS.items():
        np.testing.assert_allclose(form(a, g), a.T @ g, rtol=1e-12, err_msg=name)


def test_bf16_variants_match_float32_to_bf16_precision_and_bf16vjp_emits_only_bf16_dots():
    kx, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, 6, 6, 3))
    k = jax.random.normal(kk, (3, 3, 3, 4)) / 3
    v = jax.random.normal(kv, k.shape)

    def loss(conv):
        return lambda k_: jnp.mean(jnp.tanh(conv(x, k_, 1, "patches")) ** 2)

    ref = loss(conv3x3)
    bf16dot = loss(lambda *a: speed_variants.bf16_conv(conv3x3, *a))
    bf16vjp = loss(speed_variants.bf16_matmul_conv)
    for f in (bf16dot, bf16vjp):
        np.testing.assert_allclose(f(k), ref(k), rtol=2e-2)
        for order in (jax.grad, lambda f_: hvp(f_, v)):
            want, got = order(ref)(k), order(f)(k)
            assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 5e-2

    # JAX's side of bf16vjp: every dot_general it emits for the second-order computation (after
    # dead-code elimination, so read the lowered program) is bf16 x bf16 -> float32. XLA:CPU
    # then runs the kernel-gradient one, which contracts the patch rows, in float32 (see
    # experiments/results/bench/tried_2026-11-24.md); that is the compiler's choice, not tested.
    def dot_types(f):
        text = jax.jit(hvp(f, v)).lower(k).as_text()
        return [line.rsplit(" : ", 1)[1] for line in text.splitlines() if "dot_general" in line]

    bf16_dots, f32_dots = dot_types(bf16vjp), dot_types(ref)
    assert len(bf16_dots) == len(f32_dots) >= 3
    for sig in bf16_dots:
        assert re.fullmatch(r"\(tensor<\w+xbf16>, tensor<\w+xbf16>\) -> tensor<\w+xf32>", sig), sig


def test_one_draw_sampler_has_the_benchmark_shapes_and_distributions():
    w = bench.WORKLOADS["sinusoid"]
    one = speed_variants._one_draw_mlp_tasks(jax.random.PRNGKey(1), w)
    ref = bench._mlp_tasks(jax.random.PRNGKey(1), w)
    assert jax.tree.map(jnp.shape, one) == jax.tree.map(jnp.shape, ref)
    big = speed_variants._one_draw_mlp_tasks(jax.random.PRNGKey(2), dict(w, tasks=4000))
    x = jnp.concatenate([big.support.x, big.query.x]).ravel()
    y = jnp.concatenate([big.support.y, big.query.y]).ravel()
    assert jnp.all(jnp.isfinite(y)) and -5 <= x.min() and x.max() <= 5
    # U(-5, 5): mean 0, std 10/sqrt(12); N(0, 1). 80,000 draws each: standard errors < 0.02
    np.testing.assert_allclose([x.mean(), x.std(), y.mean(), y.std()], [0, 10 / 12**0.5, 0, 1], atol=0.03)
    # x and y come from disjoint halves of the draw: uncorrelated (standard error ~0.004)
    assert abs(jnp.corrcoef(x, y)[0, 1]) < 0.02
    assert abs(jnp.corrcoef(x, jnp.abs(y))[0, 1]) < 0.02


def test_chunk_drawn_tasks_are_the_tasks_each_step_samples():
    """``chunkdraw`` draws a chunk's tasks before its scan: step ``i`` must get bit for bit the
    tasks the library's chunk samples inside its scan at that step."""
    from maml_jax.train import TrainState, make_sampling_train_chunk

    def record_step(state, tasks):  # trains nothing; returns the tasks it was given
        return state._replace(step=state.step + 1), tasks

    state = TrainState(step=jnp.int32(7), meta_params=None, opt_state=None, rng=jax.random.PRNGKey(3))
    sample = bench.sample_fn("sinusoid")
    library = jax.jit(make_sampling_train_chunk(record_step, sample, 5))(state, None)
    drawn = jax.jit(speed_variants.chunk_drawn_train_chunk(record_step, sample, 5))(state, None)
    assert int(library[0].step) == int(drawn[0].step) == 12
    assert all(leaf.shape[0] == 5 for leaf in jax.tree.leaves(library[1]))  # one task batch per step
    chex.assert_trees_all_equal(library[1], drawn[1])


def test_unrolled_task_map_matches_a_python_loop_and_leaves_other_maps_to_the_plain_one():
    """``unrolled_map_tasks(plain, n)`` runs ``task_map="map"`` as its own unrolled scan: it must
    stack ``fn`` of each task as a Python loop over the tasks does (5 tasks, unroll 2: a partial
    last unrolled block), and as the library's ``map`` does. Every other task map is handed to
    ``plain`` unchanged, and ``map`` never reaches ``plain``."""
    from maml_jax.core import map_tasks

    tasks = {"a": jnp.arange(15.0).reshape(5, 3), "b": jnp.ones((5, 2))}
    fn = lambda t: (jnp.sin(t["a"]).sum() * t["b"], t["a"][::-1])  # noqa: E731
    rows = [fn(jax.tree.map(lambda a, i=i: a[i], tasks)) for i in range(5)]
    loop = jax.tree.map(lambda *r: jnp.stack(r), *rows)

    unrolled = speed_variants.unrolled_map_tasks(map_tasks, 2)
    got = jax.jit(unrolled, static_argnums=(0, 2))(fn, tasks, "map")
    assert jax.tree.structure(got) == jax.tree.structure(loop)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, loop)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, map_tasks(fn, tasks, "map"))

    calls = []

    def plain(fn_, tasks_, task_map):
        calls.append((fn_, tasks_, task_map))
        return "plain result"

    recording = speed_variants.unrolled_map_tasks(plain, 2)
    assert recording(fn, tasks, "vmap") == "plain result"
    assert len(calls) == 1 and calls[0][0] is fn and calls[0][1] is tasks and calls[0][2] == "vmap"
    recording(fn, tasks, "map")
    assert len(calls) == 1


def test_conv_grad_forms_agree_unrolled_and_mapped_and_with_the_patch_gradient():
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    xs, gs = jax.random.normal(kx, (3, 4, 7, 7, 5)), jax.random.normal(kg, (3, 4, 7, 7, 5))
    k = jax.random.normal(kk, (3, 3, 5, 5))
    out = {}
    for name, fn in conv_grad_under_map.forms().items():
        unrolled, mapped = conv_grad_under_map.variants(fn)
        out[name] = unrolled(xs, k, gs)
        np.testing.assert_allclose(mapped(xs, k, gs), out[name], rtol=1e-4, atol=1e-4)
    assert out["kernel_grad"].shape == (3, *k.shape)
    np.testing.assert_allclose(out["kernel_grad"], out["kernel_grad_patches"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out["input_grad_explicit"], out["input_grad"], rtol=1e-4, atol=1e-4)


def test_conv_grad_script_prints_one_row_per_form(capsys):
    conv_grad_under_map.main(["--tasks", "2", "--images", "2", "--size", "6", "--channels", "2", "--repeats", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["form"] for r in rows] == list(conv_grad_under_map.forms())
    assert all(r["unrolled_ms"] > 0 and r["map_ms"] > 0 for r in rows)


@pytest.mark.parametrize("build", ["patches", "input"])
@pytest.mark.parametrize("stride", [1, 2])
def test_transposed_kgrad_conv_matches_the_patch_convolution_in_both_modes(x64, stride, build):
    x, k, v = conv_problem()

    custom = two_layer_loss(lambda x_, k_: speed_variants.transposed_kgrad_conv(x_, k_, stride, build), x)
    patches = two_layer_loss(lambda x_, k_: conv3x3(x_, k_, stride, "patches"), x)
    np.testing.assert_allclose(custom(k), patches(k), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(custom)(k), jax.grad(patches)(k), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hvp(custom, v)(k), hvp(patches, v)(k), rtol=1e-9, atol=1e-10)
    forward_over_reverse = [jax.jvp(jax.grad(f), (k,), (v,))[1] for f in (custom, patches)]
    np.testing.assert_allclose(*forward_over_reverse, rtol=1e-9, atol=1e-10)


def test_two_step_transpose_is_the_transpose():
    for rows in (3675, 4900, 7):
        a = jnp.arange(rows * 6, dtype=jnp.float32).reshape(rows, 6)
        np.testing.assert_array_equal(jax.jit(speed_variants.two_step_transpose)(a), a.T)


def test_slice_window_max_pool_is_the_library_pool_to_second_order(x64):
    from maml_jax.models.conv4 import max_pool2x2

    x = jnp.round(jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, 3)), 1)  # rounded: ties in windows

    def loss(pool):
        return lambda x_: jnp.sum(jnp.tanh(pool(x_ * x_)) ** 3)

    np.testing.assert_array_equal(speed_variants.slice_window_max_pool(x), max_pool2x2(x))
    np.testing.assert_array_equal(
        jax.grad(loss(speed_variants.slice_window_max_pool))(x), jax.grad(loss(max_pool2x2))(x)
    )
    small = x[:1, :4, :4, :2]
    np.testing.assert_array_equal(
        jax.hessian(loss(speed_variants.slice_window_max_pool))(small), jax.hessian(loss(max_pool2x2))(small)
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_blas_kgrad_conv_matches_the_patch_convolution_to_second_order(x64, stride):
    x, k, v = conv_problem()

    blas = two_layer_loss(lambda x_, k_: blas_kgrad.blas_kgrad_conv(x_, k_, stride), x)
    patches = two_layer_loss(lambda x_, k_: conv3x3(x_, k_, stride, "patches"), x)
    np.testing.assert_allclose(blas(k), patches(k), rtol=1e-12)
    for transform in (lambda f: f, jax.jit):
        np.testing.assert_allclose(transform(jax.grad(blas))(k), jax.grad(patches)(k), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(transform(hvp(blas, v))(k), hvp(patches, v)(k), rtol=1e-9, atol=1e-10)


def test_blas_gemm_tn_is_the_transposed_product_batched_and_in_float32():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((3, 37, 5)).astype(np.float32)
    g = rng.standard_normal((3, 37, 4)).astype(np.float32)
    expected = np.swapaxes(p, 1, 2).astype(np.float64) @ g
    out = jax.jit(jax.vmap(blas_kgrad.gemm_tn))(p, g)
    assert out.dtype == jnp.float32
    chex.assert_shape(out, (3, 5, 4))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # one operand batched: vmap broadcasts the other
    one_batched = jax.vmap(blas_kgrad.gemm_tn, (0, None))(p, g[0])
    np.testing.assert_allclose(one_batched, np.swapaxes(p, 1, 2) @ g[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="float32 or two float64"):
        blas_kgrad.gemm_tn(p.astype(np.float16), g.astype(np.float16))
    with pytest.raises(ValueError, match="equal leading dims"):
        blas_kgrad.gemm_tn(p[0], g[0, :36])  # M differs: 37 rows against 36


@pytest.mark.slow  # Winograd was not kept; 25 s of the default suite
def test_winograd_layers_prints_a_row_per_layer(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(speed_variants.__file__).parent))  # as when run: its siblings importable
    monkeypatch.setattr("sys.argv", ["winograd_layers.py", "--images", "1"])
    load("winograd_layers").main()
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d+x\d+x\d+ \|", line)]
    assert [r.split(" | ")[0] for r in rows] == ["| 84x84x3", "| 42x42x32", "| 21x21x32", "| 10x10x32"]
    assert all(len(r.split(" | ")) == 9 and float(r.split(" | ")[-1].rstrip(" |")) > 0 for r in rows)


UNROLLED_RNG_CHECK = """
import sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
import speed_variants

def draw(key):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (25, 10)), jax.random.uniform(jax.random.fold_in(k2, 3), (25,))

key = jax.random.PRNGKey(7)
rolled = jax.jit(draw)(key), "while" in jax.jit(draw).lower(key).as_text()
speed_variants.unrolled_threefry_on_cpu()
again = lambda k: draw(k)  # a new function: traced and lowered again
unrolled = jax.jit(again)(key), "while" in jax.jit(again).lower(key).as_text()
print(rolled[1], unrolled[1], all(np.array_equal(a, b) for a, b in zip(rolled[0], unrolled[0])))
"""


def test_unrolled_threefry_drops_the_loop_and_keeps_the_bits():
    """In a child process: the lowering swap is process-wide."""
    out = subprocess.run(
        [sys.executable, "-c", UNROLLED_RNG_CHECK, str(Path(speed_variants.__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    ).stdout.split()
    assert out == ["True", "False", "True"]
