"""Mixed precision: low-precision compute, float32 parameters and inner-loop accumulation.

``mixed_precision(model, jnp.bfloat16)`` returns a model whose ``apply`` casts the (float32)
parameters and floating inputs to ``compute_dtype``, runs the network there (matmuls and
convolutions in bf16 on TPU / recent GPUs) and casts the outputs back to float32, so that

* the task loss (and its softmax / log-sum-exp) is computed in float32;
* gradients come back in float32 (the transpose of a cast casts the cotangent back), so the
  inner update θ' = θ − α ∇L(θ) and its ``lax.scan`` carry accumulate in float32 and the
  meta-parameters and optax state stay float32 (the "master weights" recipe of Micikevicius
  et al. 2018, "Mixed Precision Training", §3.1; bf16 needs no loss scaling, §3.2 is for fp16).

Off by default: nothing in the library casts unless a model is wrapped. On XLA:CPU it is
slower, even with AVX512_BF16 (bf16 elementwise work and bf16-result matmuls are slow there);
use it on GPU/TPU.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from maml_jax.models.base import Model
from maml_jax.validation import HyperparameterError

OUTPUT_DTYPE = jnp.float32
# the names a config or the benchmark may give (``--config.compute_dtype``, ``--compute-dtype``)
COMPUTE_DTYPES = ("float32", "bfloat16")


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast the floating-point leaves of ``tree`` to ``dtype``; leave integer leaves alone."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def mixed_precision(model: Model, compute_dtype: Any = jnp.bfloat16) -> Model:
    """``model`` with ``apply(params, x, *args) = float32(model.apply(cast(params), cast(x), *args))``
    (``cast`` to ``compute_dtype`` for floating leaves). ``init`` is unchanged (float32 params).
    Output shapes are those of ``model.apply``; extra arguments (e.g. conv4's ``step``) pass
    through uncast."""
    dtype = jnp.dtype(compute_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise HyperparameterError(f"compute_dtype must be a floating dtype, got {dtype}")

    def apply(params, x, *args, **kwargs):
        out = model.apply(cast_floating(params, dtype), cast_floating(x, dtype), *args, **kwargs)
        return cast_floating(out, OUTPUT_DTYPE)

    return Model(model.init, apply)


def with_compute_dtype(model: Model, compute_dtype: str) -> Model:
    """``model`` itself for ``"float32"``, else ``mixed_precision(model, compute_dtype)``;
    ``HyperparameterError`` for a name outside ``COMPUTE_DTYPES``."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise HyperparameterError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    return model if compute_dtype == "float32" else mixed_precision(model, jnp.dtype(compute_dtype))
