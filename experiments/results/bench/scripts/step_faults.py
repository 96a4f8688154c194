"""Wall time, CPU use and minor page faults per train step of a bench workload, as
``python -m maml_jax.bench`` runs it by default (``lower_time.default_chunk``), with whatever
allocator settings this process started with. Produced the Omniglot rounds of
``malloc_hugepages_zen3.md`` (its MiniImageNet rounds came from a scratch form with the same
measurement and a text line for output); alternate the settings compared, e.g. with ``malloc_rounds.sh``:

    python experiments/results/bench/scripts/step_faults.py miniimagenet-5w1s 6
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/results/bench/scripts/step_faults.py miniimagenet-5w1s 6

Prints one JSON line: ``wall_s_per_step``, ``user`` and ``sys`` (CPU seconds per wall second,
from ``getrusage`` around the timed calls: 2.0 is two busy cores), ``minor_faults_per_step`` and
the ``GLIBC_TUNABLES`` and ``LD_PRELOAD`` it ran with. Run it as a script, not through
``maml_jax``'s entry points, which would add the huge-page tunable themselves.
"""

import json
import os
import resource
import sys
import time

import jax
from lower_time import default_chunk  # this folder is sys.path[0] when run as a script


def main() -> None:
    name, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    chunk, state = default_chunk(name)  # one train step per call
    for _ in range(2):  # compile, then one warm call
        state, _ = chunk(state, None)
    jax.block_until_ready(state)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        state, _ = chunk(state, None)
    jax.block_until_ready(state)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "workload": name,
                "steps": steps,
                "wall_s_per_step": round(wall / steps, 4),
                "user": round((after.ru_utime - before.ru_utime) / wall, 3),
                "sys": round((after.ru_stime - before.ru_stime) / wall, 3),
                "minor_faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps),
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "ld_preload": os.environ.get("LD_PRELOAD"),
            }
        )
    )


if __name__ == "__main__":
    main()
