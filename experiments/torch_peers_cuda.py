"""The PyTorch peers of ``shared/bench/torch_peers.py`` timed on a CUDA GPU.

    python experiments/torch_peers_cuda.py --peers-script PATH/torch_peers.py \\
        [--workloads sinusoid,omniglot-5w1s,...] [--peers torchfunc,loop,l2l,higher] [--iters N]

``torch_peers.py`` builds each peer's model and its one task batch on the CPU and times it
without a device synchronisation. This script imports it unchanged and, for each (peer,
workload), moves the model and batch built by its own ``make`` to the GPU, runs the peer's own
step function (``step_torchfunc``, ``step_loop``, ``step_l2l``, ``step_higher``: the same code
the CPU comparison times), and times ``--iters`` steps after ``--warmup`` with
``torch.cuda.synchronize()`` before the clock starts and before it stops (CUDA kernels are
asynchronous). Like the CPU peers, each steps on one fixed task batch. PyTorch's default
precision is kept and reported: float32 matmuls in full precision
(``torch.backends.cuda.matmul.allow_tf32`` False) and cuDNN convolutions allowed TF32.
``--tf32`` lets the matmuls use TF32 too (``torch.backends.cuda.matmul.allow_tf32 = True``), the
precision JAX uses by default on such a GPU, for a comparison at equal precision. Prints
one JSON line per (peer, workload), as ``torch_peers.py`` does, plus ``device`` and the TF32
flags. learn2learn comes from ``L2L_SRC`` as in ``torch_peers.py``; ``higher`` must be importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time


def load_peers(path: str):
    """``torch_peers.py`` at ``path`` as a module (not on ``sys.path``; it stays unchanged)."""
    spec = importlib.util.spec_from_file_location("torch_peers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_step(tp, peer: str, name: str, device: str):
    """``fn()`` running one meta-step of ``peer`` on workload ``name`` with model and batch on
    ``device``, or ``None`` where the peer is not installed (as ``torch_peers.run``)."""
    import torch

    w = tp.WORKLOADS[name]
    torch.manual_seed(0)
    model, batch, loss = tp.make(w)
    model = model.to(device)
    batch = tuple(t.to(device) for t in batch)
    if peer == "l2l":
        maml_cls = tp.load_l2l()
        if maml_cls is None:
            return None
        maml = maml_cls(model, lr=w["alpha"], first_order=False)
        opt = torch.optim.Adam(maml.parameters(), 1e-3)
        return lambda: tp.step_l2l(maml, opt, batch, loss, w)
    if peer == "higher":
        try:
            import higher  # noqa: F401
        except ImportError:
            return None
        inner = torch.optim.SGD(model.parameters(), lr=w["alpha"])
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        return lambda: tp.step_higher(model, opt, batch, loss, w, inner)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    step = {"torchfunc": tp.step_torchfunc, "loop": tp.step_loop}[peer]
    return lambda: step(model, opt, batch, loss, w)


def time_peer(fn, iters: int, warmup: int, device: str = "cuda") -> float:
    """Meta-steps per second of ``fn`` over ``iters`` calls after ``warmup``, GPU work included."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return iters / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers-script", required=True, help="path of shared/bench/torch_peers.py")
    ap.add_argument("--workloads", default="sinusoid,omniglot-5w1s,omniglot-20w1s,miniimagenet-5w1s")
    ap.add_argument("--peers", default="torchfunc,loop,l2l,higher")
    ap.add_argument("--iters", type=int, default=None, help="default: 200 sinusoid, 20 images")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="torch device (cpu: a smoke test of this script)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (JAX's default precision)")
    a = ap.parse_args(argv)
    import torch

    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    tp = load_peers(a.peers_script)
    flags = {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    for name in a.workloads.split(","):
        iters = a.iters or (200 if tp.WORKLOADS[name]["kind"] == "mlp" else 20)
        for peer in a.peers.split(","):
            fn = make_step(tp, peer, name, a.device)
            if fn is None:
                continue
            rate = time_peer(fn, iters, a.warmup, a.device)
            device = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
            row = dict(peer=peer, workload=name, it_per_s=rate, iters=iters, device=device)
            print(json.dumps(dict(row, torch=torch.__version__, **flags)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
