"""The patch convolution's kernel gradient through the BLAS, without a copy: a speed experiment.

XLA:CPU runs the kernel gradient ``Pᵀ g`` (the patch rows contracted) as a transpose of the
patch matrix plus a matmul (``results/bench/tried_2026-12-05.md``); a BLAS ``gemm`` takes the
transpose as a flag and reads ``P`` in place. ``blas_kgrad_conv`` is ``conv4.conv3x3`` (patches)
whose kernel gradient is a ``gemm`` called from an XLA FFI custom call. The handler is written
with ``ctypes`` against XLA's FFI C API (``jaxlib/include/xla/ffi/api/c_api.h``) and calls the
Fortran ``sgemm``/``dgemm`` that SciPy (a dependency of jax) exports through
``scipy.linalg.cython_blas``; the buffers XLA hands over are used in place.

Only for timing (``speed_variants.py blaskgrad``): a ``custom_vjp`` (no forward mode, so no
iMAML), CPU only, float32 and float64. One BLAS thread per call, so that each XLA CPU device's
task share runs on its own core: importing this module sets ``OPENBLAS_NUM_THREADS=1`` unless the
environment already sets it, which works only if SciPy's OpenBLAS is not yet loaded.
"""

from __future__ import annotations

import ctypes as C
import importlib
import os

import jax
import jax.numpy as jnp

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from scipy.linalg import cython_blas  # noqa: E402  (after the thread count)

conv4 = importlib.import_module("maml_jax.models.conv4")

P = C.POINTER
_EXTENSION_METADATA = 1  # XLA_FFI_Extension_Metadata
_STAGE_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_GEMM_BY_DTYPE = {11: "sgemm", 12: "dgemm"}  # XLA_FFI_DataType_F32, _F64
TARGET = "maml_jax_experiment_gemm_tn"


class _Extension(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("type", C.c_int), ("next", C.c_void_p)]


class _ApiVersion(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("major", C.c_int), ("minor", C.c_int)]


class _Metadata(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", C.c_uint32),
        ("state_type_id", C.c_int64),
    ]


class _MetadataExtension(C.Structure):
    _fields_ = [("base", _Extension), ("metadata", P(_Metadata))]


class _Args(C.Structure):  # XLA_FFI_Args and XLA_FFI_Rets have this layout
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.c_void_p),
        ("size", C.c_int64),
        ("types", C.c_void_p),
        ("args", P(C.c_void_p)),
    ]


class _Attrs(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.c_void_p),
        ("size", C.c_int64),
        ("types", C.c_void_p),
        ("names", C.c_void_p),
        ("attrs", C.c_void_p),
    ]


class _CallFrame(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", P(_Extension)),
        ("api", C.c_void_p),
        ("ctx", C.c_void_p),
        ("stage", C.c_int),
        ("args", _Args),
        ("rets", _Args),
        ("attrs", _Attrs),
        ("future", C.c_void_p),
    ]


class _Buffer(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.c_void_p),
        ("dtype", C.c_int),
        ("data", C.c_void_p),
        ("rank", C.c_int64),
        ("dims", P(C.c_int64)),
    ]


def _fortran_gemm(name: str, scalar):
    """SciPy's Fortran ``?gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)``."""
    capsule = cython_blas.__pyx_capi__[name]
    get_name = C.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = C.c_char_p, [C.py_object]
    get_pointer = C.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = C.c_void_p, [C.py_object, C.c_char_p]
    i, s, v = P(C.c_int), P(scalar), C.c_void_p
    signature = C.CFUNCTYPE(None, C.c_char_p, C.c_char_p, i, i, i, s, v, i, v, i, s, v, i)
    return signature(get_pointer(capsule, get_name(capsule))), scalar


_GEMMS = {"sgemm": _fortran_gemm("sgemm", C.c_float), "dgemm": _fortran_gemm("dgemm", C.c_double)}


def _gemm_tn_handler(frame_pointer) -> None:
    """XLA FFI handler: ``p [..., M, K]``, ``g [..., M, F]`` → ``out [..., K, F] = pᵀ g`` per
    leading index, all row-major. In column-major terms ``outᵀ [F, K] = gᵀ p``: ``gemm("N", "T")``
    with ``g`` as the ``[F, M]`` matrix and ``p`` as the transposed ``[K, M]`` one."""
    frame = frame_pointer.contents
    if frame.extension_start and frame.extension_start.contents.type == _EXTENSION_METADATA:
        metadata = C.cast(frame.extension_start, P(_MetadataExtension)).contents.metadata.contents
        metadata.api_version.major, metadata.api_version.minor = 0, 1
        metadata.traits = 0
        return None
    if frame.stage != _STAGE_EXECUTE:
        return None
    pointers = (frame.args.args[0], frame.args.args[1], frame.rets.args[0])
    p, g, out = (C.cast(pointer, P(_Buffer)).contents for pointer in pointers)
    rank = p.rank
    m, k, f = p.dims[rank - 2], p.dims[rank - 1], g.dims[rank - 1]
    batch = 1
    for axis in range(rank - 2):
        batch *= p.dims[axis]
    gemm, scalar = _GEMMS[_GEMM_BY_DTYPE[p.dtype]]
    size = C.sizeof(scalar)
    one, zero = scalar(1.0), scalar(0.0)
    c_f, c_k, c_m = C.c_int(f), C.c_int(k), C.c_int(m)
    for b in range(batch):
        gemm(
            b"N", b"T", c_f, c_k, c_m, one,
            g.data + size * b * m * f, c_f,
            p.data + size * b * m * k, c_k,
            zero, out.data + size * b * k * f, c_f,
        )  # fmt: skip
    return None


_HANDLER = C.CFUNCTYPE(C.c_void_p, P(_CallFrame))(_gemm_tn_handler)  # kept alive: XLA holds its address
jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(C.cast(_HANDLER, C.c_void_p).value), platform="cpu")


def gemm_tn(p: jax.Array, g: jax.Array) -> jax.Array:
    """``p [..., M, K]``, ``g [..., M, F]`` → ``pᵀ g [..., K, F]`` by one BLAS ``gemm`` per leading
    index (float32 or float64, CPU). Not differentiable: ``kgrad`` is."""
    if p.dtype != g.dtype or p.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"gemm_tn needs two float32 or two float64 arrays, got {p.dtype} and {g.dtype}")
    if p.ndim < 2 or p.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"gemm_tn needs p [..., M, K] and g [..., M, F] with equal leading dims, got {p.shape} and {g.shape}"
        )
    out = jax.ShapeDtypeStruct((*p.shape[:-2], p.shape[-1], g.shape[-1]), p.dtype)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(p, g)


@jax.custom_vjp
def kgrad(p: jax.Array, g: jax.Array) -> jax.Array:
    """``pᵀ g`` for ``p [M, K]``, ``g [M, F]`` (``gemm_tn``), differentiable: the cotangent
    ``c [K, F]`` gives ``(g cᵀ, p c)``, two plain matmuls."""
    return gemm_tn(p, g)


kgrad.defvjp(
    lambda p, g: (gemm_tn(p, g), (p, g)),
    lambda res, c: (res[1] @ c.T, res[0] @ c),
)


@jax.custom_vjp
def patch_matmul(p: jax.Array, k: jax.Array) -> jax.Array:
    """``p [M, K] @ k [K, F]`` whose kernel gradient is ``kgrad`` (the input gradient stays
    ``g kᵀ``); every rule is differentiable, so second-order MAML goes through it."""
    return p @ k


patch_matmul.defvjp(
    lambda p, k: (p @ k, (p, k)),
    lambda res, g: (g @ res[1].T, kgrad(res[0], g)),
)


def blas_kgrad_conv(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "patches") -> jax.Array:
    """``conv4.conv3x3(x, kernel, stride, "patches")`` (``x [n, H, W, C]``, ``kernel [3, 3, C, F]``)
    with the kernel gradient through ``kgrad``; ``impl`` is ignored (the signature of
    ``conv4.conv3x3``)."""
    patches = conv4.patches3x3(x, stride)
    n, ho, wo, k = patches.shape
    return patch_matmul(patches.reshape(n * ho * wo, k), kernel.reshape(k, -1)).reshape(n, ho, wo, -1)
