"""The model interface every algorithm uses: two pure functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from maml_jax.types import Params


class Model(NamedTuple):
    """``init(key, example_x) -> params`` and ``apply(params, x) -> outputs``.

    ``x`` carries a leading example axis, ``[n, *features]``. Built from flax modules whose
    variables are passed in on every call, so adapted parameters are plain pytrees.
    """

    init: Callable[[jax.Array, jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
