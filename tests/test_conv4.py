"""conv4: shapes, transductive BN, equality of the conv formulations (also under vmap and in
second-order MAML), and second-order meta-gradients against finite differences, in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from maml_jax import Batch, ShapeError, Task, batched_meta_loss, cross_entropy_loss, meta_loss
from maml_jax.models import conv4
from maml_jax.models.conv4 import CONV_IMPLS, batch_norm, conv3x3, max_pool2x2, resolve_conv_impl

pytestmark = pytest.mark.usefixtures("x64")

IMAGE = {"omniglot": (28, 28, 1), "miniimagenet": (84, 84, 3)}
# the MiniImageNet net (stride 1, max-pool) on smaller images keeps the maths tests quick
SMALL = {"omniglot": (28, 28, 1), "miniimagenet": (22, 22, 3)}


def init64(model, seed, x):
    """float64 parameters (kernels ~ N(0, 1/fan_in), BN scales ~ 1 + N(0, 0.1²), biases
    ~ N(0, 0.1²)) built in numpy from the init's shapes: no compilation, and a generic point
    rather than the zero-bias, unit-scale initialisation."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray((name == "scale") + 0.1 * noise)

    params = jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(params))
    return params


def compile_fast(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` without LLVM optimisation: these test programs
    are tiny, and compiling second-order conv nets at the default level dominates test time."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def assert_close(a, b, rtol=1e-10):
    """Flattened pytrees agree to ``rtol`` relative to the largest entry."""
    a, b = flat(a), flat(b)
    scale = max(np.abs(a).max(), np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def image_task(seed, dataset="omniglot", ways=3, n_support=2, n_query=2, image=None):
    image = image or SMALL[dataset]
    xs, xq = normal(seed, (n_support, *image)), normal(seed + 100, (n_query, *image))
    return Task(Batch(xs, jnp.arange(n_support) % ways), Batch(xq, (jnp.arange(n_query) + 1) % ways))


@pytest.mark.parametrize("dataset, flat_features", [("omniglot", 64 * 2 * 2), ("miniimagenet", 32 * 5 * 5)])
def test_shapes_match_the_pytorch_peers(dataset, flat_features):
    model = conv4(5, dataset=dataset)
    x = jax.ShapeDtypeStruct((3, *IMAGE[dataset]), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    filters = flat_features // (4 if dataset == "omniglot" else 25)
    assert params["head"]["kernel"].shape == (flat_features, 5)
    assert params["conv_0"]["kernel"].shape == (3, 3, IMAGE[dataset][-1], filters)
    assert params["conv_3"]["kernel"].shape == (3, 3, filters, filters)
    assert params["bn_2"]["scale"].shape == (filters,)
    assert jax.eval_shape(model.apply, params, x).shape == (3, 5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_conv3x3_patches_equals_lax_values_and_gradients(stride, size):
    x, kernel = normal(0, (2, size, size + 1, 3)), normal(1, (3, 3, 3, 4))

    def outputs_and_grads(x, kernel):
        f = lambda x, k, impl: jnp.sum(jnp.sin(conv3x3(x, k, stride, impl)))
        return {impl: (conv3x3(x, kernel, stride, impl), jax.grad(f, (0, 1))(x, kernel, impl)) for impl in CONV_IMPLS}

    out = compile_fast(outputs_and_grads, x, kernel)(x, kernel)
    assert out["lax"][0].shape == (2, (size - 1) // stride + 1, size // stride + 1, 4)
    for impl in ("patches", "patches_per_image"):
        np.testing.assert_allclose(out[impl][0], out["lax"][0], rtol=1e-12, atol=1e-12)
        assert_close(out[impl][1], out["lax"][1], rtol=1e-12)


def test_patches_per_image_is_a_loop_over_the_images_with_its_patches_rematerialised():
    """The per-image form is what its name says (a ``lax.map`` over the batch whose body is a
    ``checkpoint``), and its forward-over-reverse derivatives (the Hessian-vector products of
    iMAML, ``jax.jvp`` of ``jax.grad``) equal the patch convolution's."""
    x, kernel, tangent = normal(0, (3, 9, 8, 4)), normal(1, (3, 3, 4, 5)), normal(2, (3, 3, 4, 5))
    jaxpr = str(jax.make_jaxpr(lambda x, k: conv3x3(x, k, 1, "patches_per_image"))(x, kernel))
    assert "scan[" in jaxpr and "remat" in jaxpr and "length=3" in jaxpr  # remat: jax.checkpoint

    def hvp(impl):
        grad = jax.grad(lambda k: jnp.sum(jnp.sin(conv3x3(x, k, 1, impl)) ** 2))
        return jax.jvp(grad, (kernel,), (tangent,))

    out = compile_fast(lambda: {impl: hvp(impl) for impl in ("patches", "patches_per_image")})()
    assert_close(out["patches_per_image"], out["patches"], rtol=1e-12)
    assert np.abs(flat(out["patches"][1])).max() > 1e-3  # a real second derivative, not zeros


def test_patches_per_image_sums_a_bf16_kernel_gradient_in_float32():
    """With a bf16 network the loop's transpose sums the 64 images' kernel-gradient partials;
    they are summed in float32, as the single matmul of ``"patches"`` does (summed in bf16 the
    error was 1.3e-2 of the largest entry here, against 2.9e-3)."""
    x = normal(0, (64, 6, 6, 8)).astype(jnp.bfloat16)
    kernel = (normal(1, (3, 3, 8, 4)) / 8).astype(jnp.bfloat16)

    def grad(impl, dtype):
        return jax.grad(lambda k: jnp.sum(conv3x3(x.astype(dtype), k, 1, impl).astype(jnp.float32) ** 2))(
            kernel.astype(dtype)
        )

    ref = np.asarray(grad("patches", jnp.float32))
    for impl in ("patches", "patches_per_image"):
        g = grad(impl, jnp.bfloat16)
        assert g.dtype == jnp.bfloat16
        assert np.abs(np.asarray(g, np.float32) - ref).max() < 6e-3 * np.abs(ref).max(), impl


def test_resolve_conv_impl():
    """``"auto"``: per image only for MiniImageNet on the CPU backend with the tasks split over two
    or more devices; other names pass through."""
    assert resolve_conv_impl("auto", "miniimagenet", "cpu", task_devices=2) == "patches_per_image"
    assert resolve_conv_impl("auto", "miniimagenet", "cpu", task_devices=4) == "patches_per_image"
    assert resolve_conv_impl("auto", "miniimagenet", "cpu") == "patches"  # one device: per image was slower
    assert resolve_conv_impl("auto", "omniglot", "cpu", task_devices=2) == "patches"
    for backend in ("gpu", "tpu"):
        assert resolve_conv_impl("auto", "miniimagenet", backend, task_devices=2) == "patches"
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_conv_impl("auto", "miniimagenet", task_devices=2) == ("patches_per_image" if on_cpu else "patches")
    for impl in CONV_IMPLS:
        assert resolve_conv_impl(impl, "miniimagenet", "cpu") == impl
    with pytest.raises(ValueError, match="conv_impl must be 'auto' or one of"):
        resolve_conv_impl("fft", "omniglot")


def test_batch_norm_uses_the_batch_statistics_and_max_pool_floors():
    x = 3 + 2 * normal(0, (4, 5, 5, 6))
    y = batch_norm(x, jnp.ones(6), jnp.zeros(6))
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1, rtol=1e-4)  # eps = 1e-5
    pooled = max_pool2x2(x)
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    assert pooled.shape == (4, 2, 2, 6)
    np.testing.assert_array_equal(pooled, ref)


def test_apply_is_transductive():
    """An example's output depends on the rest of its batch: batch norm uses the statistics of
    the batch it normalises. (There is no state to update: ``Model.apply`` passes only
    ``{"params": params}``, and flax raises if a module writes any other collection.)"""
    model = conv4(3)
    x = normal(0, (4, 28, 28, 1))
    params = init64(model, 1, x)
    apply = compile_fast(model.apply, params, x)
    full = apply(params, x)
    other = apply(params, x.at[2:].multiply(3.0))  # same first two images, different batch
    assert not np.allclose(full[:2], other[:2])
    no_bn = conv4(3, bn="none")
    assert "bn_0" not in jax.eval_shape(no_bn.init, jax.random.PRNGKey(1), x)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="conv_impl"):
        conv4(5, conv_impl="fft")
    with pytest.raises(ValueError, match="bn must be one of"):
        conv4(5, bn="running")
    with pytest.raises(ValueError, match="bn_steps"):
        conv4(5, bn="per_step", bn_steps=0)
    with pytest.raises(ValueError, match="dataset"):
        conv4(5, dataset="cifar")
    with pytest.raises(ShapeError, match="NHWC"):
        conv4(5).init(jax.random.PRNGKey(0), jnp.zeros((28, 28, 1)))


@pytest.mark.parametrize("dataset", ["omniglot", "miniimagenet"])
def test_impls_agree_under_vmap_with_per_task_params(dataset):
    """Per-task weights (what vmap over inner adaptation creates): values and gradients of
    every impl agree, and equal a per-task loop."""
    num_tasks, n = 3, 2
    models = {impl: conv4(4, dataset=dataset, conv_impl=impl) for impl in CONV_IMPLS}
    x = normal(0, (num_tasks, n, *SMALL[dataset]))
    per_task = jax.tree.map(lambda *a: jnp.stack(a), *(init64(models["lax"], seed, x[0]) for seed in range(num_tasks)))
    cot = normal(1, (num_tasks, n, 4))

    def outputs_and_grads(params, impl):
        objective = lambda p: (lambda out: (jnp.sum(out * cot), out))(jax.vmap(models[impl].apply)(p, x))
        grads, out = jax.grad(objective, has_aux=True)(params)
        return out, grads

    res = {
        impl: compile_fast(functools.partial(outputs_and_grads, impl=impl), per_task)(per_task) for impl in CONV_IMPLS
    }
    one = lambda i: jax.tree.map(lambda a: a[i], per_task)
    apply = compile_fast(models["lax"].apply, one(0), x[0])
    loop = jnp.stack([apply(one(i), x[i]) for i in range(num_tasks)])
    np.testing.assert_allclose(res["lax"][0], loop, rtol=1e-10, atol=1e-10)
    for impl in ("patches", "patches_per_image"):
        np.testing.assert_allclose(res[impl][0], res["lax"][0], rtol=1e-10, atol=1e-10)
        assert_close(res[impl][1], res["lax"][1])
    # the reason for "patches" on CPU: under vmap "lax" becomes a (grouped) convolution
    jaxprs = {impl: str(jax.make_jaxpr(jax.vmap(m.apply))(per_task, x)) for impl, m in models.items()}
    assert "conv_general_dilated" in jaxprs["lax"]
    assert "conv_general_dilated" not in jaxprs["patches"] + jaxprs["patches_per_image"]


def second_order_meta_grads(dataset, device=None):
    """Task-batched (vmapped) second-order meta-gradients of every impl, 1 inner step, 2 tasks,
    from the same float64 parameters, computed on ``device`` (default: JAX's default device)."""
    tasks = jax.tree.map(lambda *a: jnp.stack(a), *(image_task(i, dataset) for i in range(2)))
    meta_grads, params = {}, None
    for impl in CONV_IMPLS:
        model = conv4(3, dataset=dataset, conv_impl=impl)
        params = init64(model, 2, tasks.support.x[0]) if params is None else params
        loss = cross_entropy_loss(model.apply)
        f = lambda p, loss=loss: batched_meta_loss(p, tasks, loss, num_inner_steps=1, inner_lr=0.4)[0]
        on = jax.device_put(params, device)
        meta_grads[impl] = compile_fast(jax.grad(f), on)(on)
    return meta_grads


@pytest.mark.parametrize("dataset", ["omniglot", "miniimagenet"])
def test_second_order_maml_meta_gradients_agree_between_impls(dataset):
    meta_grads = second_order_meta_grads(dataset)
    assert_close(meta_grads["patches"], meta_grads["lax"], rtol=1e-9)
    assert_close(meta_grads["patches_per_image"], meta_grads["lax"], rtol=1e-9)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compares a GPU with the CPU, in float64")
@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("dataset", ["omniglot", "miniimagenet"])
def test_accelerator_second_order_meta_gradients_match_the_cpu(dataset, impl):
    """On a GPU, each impl's float64 second-order meta-gradient against the CPU's. (On one
    H200 the two impls differed by up to 3e-4 relative, 5e-7 absolute, where the CPU agrees to
    1e-9; this says which of them is off.)"""
    here = second_order_meta_grads(dataset)[impl]
    cpu = second_order_meta_grads(dataset, jax.devices("cpu")[0])[impl]
    assert_close(here, cpu, rtol=1e-9)


def directional_check(dataset, conv_impl, num_directions=3, eps=1e-6, image=None):
    """Second-order meta-gradient · d against central differences of the meta-loss along
    random unit directions d; also returns how far first-order MAML is off."""
    model = conv4(3, dataset=dataset, conv_impl=conv_impl)
    task = image_task(0, dataset, image=image)
    params = init64(model, 1, task.support.x)
    loss = cross_entropy_loss(model.apply)
    adapt = dict(num_inner_steps=1, inner_lr=0.4 if dataset == "omniglot" else 0.1)
    f = lambda p: meta_loss(p, task, loss, **adapt)[0]
    f_fo = lambda p: meta_loss(p, task, loss, first_order=True, **adapt)[0]
    flat0, unravel = ravel_pytree(params)
    f_flat = compile_fast(lambda v: f(unravel(v)), flat0)
    grad, grad_fo = map(flat, compile_fast(lambda p: (jax.grad(f)(p), jax.grad(f_fo)(p)), params)(params))
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(num_directions):
        d = rng.standard_normal(flat0.size)
        d /= np.linalg.norm(d)
        numeric = float(f_flat(flat0 + eps * d) - f_flat(flat0 - eps * d)) / (2 * eps)
        rows.append((grad @ d, numeric, grad_fo @ d))
    rows = np.array(rows)
    assert np.isfinite(rows).all(), rows
    return rows


@pytest.mark.parametrize(
    "dataset, conv_impl",
    [
        ("omniglot", "patches"),
        ("miniimagenet", "patches"),
        ("miniimagenet", "patches_per_image"),
        pytest.param("omniglot", "lax", marks=pytest.mark.slow),
    ],
)
def test_second_order_meta_gradient_matches_finite_differences(dataset, conv_impl):
    rows = directional_check(dataset, conv_impl)
    analytic, numeric, first_order = rows.T
    scale = np.abs(numeric).max()
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7 * scale)
    # the second-order (BN, softmax) terms are far above the tolerance: FOMAML would fail
    assert np.abs(first_order - numeric).max() > 1e-3 * scale


@pytest.mark.slow
def test_miniimagenet_full_size_meta_gradient_matches_finite_differences():
    """84x84x3 input (5x5x32 features), the size of the benchmark."""
    rows = directional_check("miniimagenet", "patches", image=IMAGE["miniimagenet"], num_directions=2)
    analytic, numeric, _ = rows.T
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7 * np.abs(numeric).max())


def test_float32_params_and_outputs_by_default():
    with jax.enable_x64(False):
        model = conv4(5)
        x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype("float32")}
        assert jax.eval_shape(model.apply, params, x).dtype == jnp.float32
