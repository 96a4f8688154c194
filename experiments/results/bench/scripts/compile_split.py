"""A bench workload's compile split into JAX's tracing and lowering and XLA's compile, plus a
hash of the train state after two steps (to show that a change leaves the program's results
bit for bit alone). Produced ``trace_once_zen3.md``; alternate the two versions compared.

    python experiments/results/bench/scripts/compile_split.py omniglot-5w1s
"""

import hashlib
import sys
import time

import jax
import numpy as np
from lower_time import default_chunk  # this folder is sys.path[0] when run as a script


def main() -> None:
    name = sys.argv[1]
    chunk, state = default_chunk(name)
    t0 = time.perf_counter()
    lowered = chunk.lower(state, None)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    xla_s = time.perf_counter() - t0
    for _ in range(2):
        state, _ = compiled(state, None)
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        digest.update(np.asarray(leaf).tobytes())
    print(name, "lower", round(lower_s, 2), "xla", round(xla_s, 2), "hash", digest.hexdigest()[:16], flush=True)


if __name__ == "__main__":
    main()
