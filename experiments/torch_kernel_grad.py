"""PyTorch's side of ``matmul_forms.py``'s third table: the forward matmul and the kernel gradient
``a.t() @ g`` at the Omniglot layer-2 shapes, with the peers' torch (not a project dependency):

    /tmp/maml-peers/bin/python experiments/torch_kernel_grad.py   # the venv of ../shared/bench/setup_peers.sh

Median ms of 41 calls after 3 warm-up calls, with 1 and with 2 threads.
"""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, calls: int = 41) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    print(f"torch {torch.__version__}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (75 * 7 * 7, 100 * 7 * 7):
            a, k, g = torch.randn(rows, 9 * 64), torch.randn(9 * 64, 64), torch.randn(rows, 64)
            fwd = median_ms(lambda a=a, k=k: a @ k)
            kgrad = median_ms(lambda a=a, g=g: a.t() @ g)
            print(f"{threads} thread(s), {rows} rows: forward a @ k {fwd:.2f} ms, kernel gradient {kgrad:.2f} ms")


if __name__ == "__main__":
    main()
