"""The matmuls of conv4's second-order step on this backend: ``python experiments/matmul_forms.py``.

First table: float32 against bfloat16. Times one jitted matmul (median of 5 calls after one
warm-up) with float32 inputs and output,
bf16 inputs and output, and bf16 inputs with a float32 result (``preferred_element_type``), at
a square size and at the shapes of conv4's second layer for one task's 75 query images, in the
two forms the second-order step runs: the forward patch matmul ``[n·H'·W', 9·C] @ [9·C, F]``
and the kernel gradient, which contracts the patch rows: ``patches [n·H'·W', 9·C]`` with the
output gradient ``[n·H'·W', F]`` over ``n·H'·W'`` (``lhs_contracting_dims={0}`` in XLA's HLO).
On a CPU with AVX512_BF16 only bf16 inputs with a float32 result run faster than float32.
Why ``speed_variants.py bf16dot`` / ``bf16vjp`` are still slower: see
``results/bench/tried_2026-11-24.md``.

Second table (float32): the kernel gradient in other forms, against the library's (JAX's
transpose rule: contract the rows of both operands): the output gradient transposed first
(kept so by ``lax.optimization_barrier``) and a plain matmul, and the row contraction split into
B contiguous chunks (a batched matmul, then a sum over the chunks).

Third table (float32, ``results/bench/tried_2026-12-05.md``): where the kernel gradient's time
goes at the Omniglot layer-2 shapes (one task's 75 query images, and omniglot-20w1s's 100): the
forward matmul, the kernel gradient, the patch matrix transposed alone, the kernel gradient as a
plain matmul of an already transposed patch matrix, a copy of the patch matrix for scale, and
``speed_variants.two_step_transpose``, and the kernel gradient as one BLAS ``gemm`` that reads the
patch matrix in place (``blas_kgrad.gemm_tn``, SciPy's OpenBLAS on one thread unless
``OPENBLAS_NUM_THREADS`` says otherwise). Run it also under ``taskset -c 0`` for one core.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maml_jax.bench import median_call_ms

# name: (rows, k, n, form); "forward": [rows, k] @ [k, n]; "kernel gradient": contract the rows
# of [rows, k] and [rows, n] -> [k, n]
SHAPES = {
    "square 2048": (2048, 2048, 2048, "forward"),
    "miniimagenet layer 2, forward": (75 * 42 * 42, 9 * 32, 32, "forward"),
    "miniimagenet layer 2, kernel gradient": (75 * 42 * 42, 9 * 32, 32, "kernel gradient"),
    "omniglot layer 2, forward": (75 * 7 * 7, 9 * 64, 64, "forward"),
    "omniglot layer 2, kernel gradient": (75 * 7 * 7, 9 * 64, 64, "kernel gradient"),
}

ROWS_CONTRACTED = (((0,), (0,)), ((), ()))  # dot_general dimension numbers of the kernel gradient


def time_matmul(rows: int, k: int, n: int, form: str, dtype, out_dtype=None) -> float:
    """Median ms of one matmul of ``form`` with inputs in ``dtype`` and the result in
    ``out_dtype`` (default: ``dtype``), over 5 calls."""
    a = jnp.ones((rows, k), dtype)
    if form == "forward":
        b, dims = jnp.ones((k, n), dtype), (((1,), (0,)), ((), ()))
    else:
        b, dims = jnp.ones((rows, n), dtype), ROWS_CONTRACTED
    matmul = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype))
    return median_call_ms(matmul, a, b, calls=5)


KERNEL_GRAD_FORMS = {
    "library (rows contracted)": lambda a, g: jax.lax.dot_general(a, g, ROWS_CONTRACTED),
    "(g.T @ a).T": lambda a, g: (jax.lax.optimization_barrier(g.T) @ a).T,
    **{
        f"{b} chunks": (
            lambda a, g, b=b: jax.lax.dot_general(
                a.reshape(b, -1, a.shape[1]), g.reshape(b, -1, g.shape[1]), (((1,), (1,)), ((0,), (0,)))
            ).sum(0)
        )
        for b in (15, 75)
    },
}


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    for name, (rows, k, n, form) in SHAPES.items():
        gflop = 2 * rows * k * n / 1e9
        cells = []
        for label, dt, out in (
            ("f32", jnp.float32, None),
            ("bf16", jnp.bfloat16, None),
            ("bf16->f32", jnp.bfloat16, jnp.float32),
        ):
            ms = time_matmul(rows, k, n, form, dt, out)
            cells.append(f"{label} {ms:6.1f} ms {gflop / ms * 1e3:4.0f} GFLOP/s")
        print(f"{name} ({rows} rows, k {k}, n {n}): " + ", ".join(cells))
    print("kernel gradient forms, float32:")
    for name, (rows, k, n, form) in SHAPES.items():
        if form != "kernel gradient":
            continue
        a = jax.random.normal(jax.random.PRNGKey(0), (rows, k))
        g = jax.random.normal(jax.random.PRNGKey(1), (rows, n))
        cells = [f"{label} {median_call_ms(jax.jit(fn), a, g):6.1f} ms" for label, fn in KERNEL_GRAD_FORMS.items()]
        print(f"{name}: " + ", ".join(cells))

    print("where the kernel gradient's time goes, float32 (median of 41 calls):")
    from blas_kgrad import gemm_tn  # sibling scripts: experiments/ is sys.path[0] when run
    from speed_variants import two_step_transpose

    for rows in (75 * 7 * 7, 100 * 7 * 7):
        a = jax.random.normal(jax.random.PRNGKey(0), (rows, 9 * 64))
        k = jax.random.normal(jax.random.PRNGKey(1), (9 * 64, 64))
        g = jax.random.normal(jax.random.PRNGKey(2), (rows, 64))
        a_t = jnp.asarray(a.T)
        timed = {
            "forward a @ k": (jax.jit(lambda a, k: a @ k), (a, k)),
            "kernel gradient (rows contracted)": (jax.jit(KERNEL_GRAD_FORMS["library (rows contracted)"]), (a, g)),
            "a.T alone": (jax.jit(jnp.transpose), (a,)),
            "a.T @ g, a.T given": (jax.jit(lambda a_t, g: a_t @ g), (a_t, g)),
            "copy a + 1": (jax.jit(lambda a: a + 1.0), (a,)),
            "two-step transpose": (jax.jit(two_step_transpose), (a,)),
            "kernel gradient by BLAS gemm, a read in place": (jax.jit(gemm_tn), (a, g)),
        }
        cells = [f"{label} {median_call_ms(fn, *args, calls=41):6.2f} ms" for label, (fn, args) in timed.items()]
        print(f"omniglot layer 2, {rows} rows: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
