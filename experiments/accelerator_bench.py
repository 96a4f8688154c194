"""The benchmark's workloads on an accelerator, over the choices that only matter there.

    python experiments/accelerator_bench.py --out results.jsonl [--configs lax/vmap/default/float32,...]
        [--workloads ...] [--deadline-s S] [--peak-size 8192]

On a 2-core CPU the benchmark's defaults were chosen by measurement (``patches``
convolutions, one image at a time for MiniImageNet, ``lax.map`` over the task batch for the
images). On a GPU or TPU the fastest
choice can differ, so this script times each workload (``bench.measure``: the compiled
second-order train step with Adam, tasks sampled on device each step, ``steps_per_call`` steps
fused per call) under each config ``CONV/TASK_MAP/PRECISION/DTYPE``:

* ``CONV``: ``lax`` (``lax.conv_general_dilated``, cuDNN on GPU) or ``patches`` (3x3 patches and
  one matmul); ignored for the sinusoid's MLP (run once per remaining choice);
* ``TASK_MAP``: ``vmap`` or ``map`` (``lax.map``) over the task batch;
* ``PRECISION``: ``default`` (the backend's: TF32 tensor cores for float32 matmuls and
  convolutions on NVIDIA GPUs since Ampere) or ``highest`` (full float32, what PyTorch does for
  matmuls by default): ``jax.default_matmul_precision``;
* ``DTYPE``: ``float32`` or ``bfloat16`` (``precision.mixed_precision``: bf16 network, float32
  parameters, loss and inner updates).

Configs run in the order given, each over all workloads, so that the first config's full row
comes first; once ``--deadline-s`` has passed the rest are skipped (and reported as skipped).
Each result is one JSON line (``bench.measure``'s fields plus ``config``, ``peak_fraction``:
FLOPs per step of the measured program times it/s, over the float32 matmul peak measured at the
config's matmul precision, also for bf16 rows) printed and appended to ``--out``.
First lines: the device and the ``--peak-size`` float32 matmul rate at both precisions.

    python experiments/accelerator_bench.py --table OURS.jsonl [...] --peers PEERS.jsonl [...]

prints the markdown tables of the README from such files instead of measuring: every config
of ours (a FLOP count missing from a file, as JAX 0.11 on GPU gave before ``bench.xla_step_flops``
lowered for the CPU, is recounted here), then the fastest config of each workload against each
peer of ``torch_peers_cuda.py`` with the ratio to the fastest peer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from maml_jax import bench

DEFAULT_CONFIGS = (
    "lax/vmap/default/float32",
    "patches/vmap/default/float32",
    "lax/map/default/float32",
    "lax/vmap/highest/float32",
    "lax/vmap/default/bfloat16",
    "patches/map/default/float32",
)
# (iters, warmup, steps per call) on an accelerator: a step takes milliseconds, so steps are fused
ACCEL_ITERS = {"mlp": (5000, 200, 100), "omniglot": (200, 20, 10), "miniimagenet": (200, 20, 10)}


def parse_config(text: str) -> dict:
    """``"lax/vmap/default/float32"`` -> ``{"conv_impl", "task_map", "precision", "compute_dtype"}``;
    ``ValueError`` naming the bad field."""
    parts = text.split("/")
    if len(parts) != 4:
        raise ValueError(f"config {text!r}: expected CONV/TASK_MAP/PRECISION/DTYPE, e.g. lax/vmap/default/float32")
    conv_impl, task_map, precision, dtype = parts
    allowed = [
        ("conv", conv_impl, bench.CONV_IMPLS),
        ("task map", task_map, ("vmap", "map")),
        ("precision", precision, ("default", "highest")),
        ("dtype", dtype, bench.COMPUTE_DTYPES),
    ]
    for field, value, choices in allowed:
        if value not in choices:
            raise ValueError(f"config {text!r}: {field} must be one of {choices}, got {value!r}")
    return {"conv_impl": conv_impl, "task_map": task_map, "precision": precision, "compute_dtype": dtype}


def run_key(name: str, config: dict) -> tuple:
    """What decides the measured program: the sinusoid's MLP has no convolution."""
    conv = None if bench.WORKLOADS[name]["kind"] == "mlp" else config["conv_impl"]
    return name, conv, config["task_map"], config["precision"], config["compute_dtype"]


def matmul_precision(name: str) -> str | None:
    """``jax.default_matmul_precision``'s argument for a config's precision name."""
    return None if name == "default" else name


def measure_config(name: str, config: dict, iters: int | None = None, num_tasks: int | None = None) -> dict:
    """``bench.measure`` of workload ``name`` under ``config`` (``parse_config``), with the
    accelerator's iteration counts (``ACCEL_ITERS``) unless ``iters`` is given."""
    n_iters, warmup, per_call = ACCEL_ITERS[bench.WORKLOADS[name]["kind"]]
    if iters is not None:
        n_iters, warmup, per_call = iters, 1, min(per_call, iters)
    with jax.default_matmul_precision(matmul_precision(config["precision"])):
        return bench.measure(
            name,
            n_iters,
            warmup,
            task_map=config["task_map"],
            conv_impl=config["conv_impl"],
            num_tasks=num_tasks,
            steps_per_call=per_call,
            compute_dtype=config["compute_dtype"],
        )


def read_jsonl(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.startswith("{")]
    return rows


def peer_label(row: dict) -> str:
    """A peer's column name: ``torchfunc``, or ``torchfunc+tf32`` for a ``--tf32`` run."""
    return row["peer"] + ("+tf32" if row.get("matmul_allow_tf32") else "")


def tables(ours: list[dict], peers: list[dict]) -> str:
    """Markdown: every measured config of ours, then the fastest float32 config per workload
    against the peers (bf16 rows are left out of the ratio: the peers compute in float32)."""
    device = next((r for r in ours if r.get("kind") == "device"), None)
    peak = device["matmul_peak_gflops"] if device else {}
    results = [r for r in ours if r.get("kind") == "result"]
    flops_cache: dict[tuple, float] = {}
    for r in results:
        if r["flops_per_step"] != r["flops_per_step"]:  # NaN: recount (lowered for the CPU)
            tasks = r.get("tasks")
            tasks = None if tasks == bench.WORKLOADS[r["workload"]]["tasks"] else tasks
            key = (r["workload"], r["conv_impl"] or bench.CONV_IMPLS[0], tasks)
            if key not in flops_cache:
                flops_cache[key] = bench.step_flops(*key)
            r["flops_per_step"] = flops_cache[key]
    head = ["workload", "conv", "task map", "precision", "dtype", "it/s (min-max of 5 windows)", "compile s"]
    head += ["GFLOP/step", "% matmul peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        frac = r["flops_per_step"] * r["it_per_s"] / (peak[r["precision"]] * 1e9) if peak else float("nan")
        lines.append(
            f"| {r['workload']} | {r['conv_impl'] or '-'} | {r['task_map']} | {r['precision']} | "
            f"{r['compute_dtype']} | {r['it_per_s']:,.1f} ({r['it_per_s_min']:,.1f}-{r['it_per_s_max']:,.1f}) | "
            f"{r['compile_s']:.1f} | {r['flops_per_step'] / 1e9:.3g} | {100 * frac:.2f}% |"
        )
    names = list(dict.fromkeys(peer_label(p) for p in peers))
    head = ["workload", "ours it/s (config)"] + [f"{p} it/s" for p in names] + ["ours / fastest peer"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    float32 = [r for r in results if r["compute_dtype"] == "float32"]  # the peers compute in float32
    for name in dict.fromkeys(r["workload"] for r in float32):
        best = max((r for r in float32 if r["workload"] == name), key=lambda r: r["it_per_s"])
        rates = {peer_label(p): p["it_per_s"] for p in peers if p["workload"] == name}
        cells = [name, f"{best['it_per_s']:,.1f} ({best['config']})"]
        cells += [f"{rates[p]:,.3g}" if p in rates else "-" for p in names]
        cells.append(f"{best['it_per_s'] / max(rates.values()):.1f}x" if rates else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="JSON lines are appended here (and printed)")
    ap.add_argument("--table", nargs="+", help="print tables from these result files instead of measuring")
    ap.add_argument("--peers", nargs="*", default=[], help="with --table: torch_peers_cuda.py output files")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="CONV/TASK_MAP/PRECISION/DTYPE, ...")
    ap.add_argument("--workloads", default=",".join(bench.WORKLOADS))
    ap.add_argument("--deadline-s", type=float, default=None, help="skip the configs not started by then")
    ap.add_argument("--peak-size", type=int, default=8192, help="n of the n x n float32 matmul peak")
    ap.add_argument("--iters", type=int, default=None, help="override every workload's iterations (smoke tests)")
    ap.add_argument("--tasks", type=int, default=None, help="override the task count (smoke tests only)")
    a = ap.parse_args(argv)
    if a.table:
        print(tables(read_jsonl(a.table), read_jsonl(a.peers)))
        return 0
    if not a.out:
        ap.error("--out is required when measuring")
    try:
        configs = [parse_config(c) for c in a.configs.split(",") if c]
    except ValueError as err:
        ap.error(str(err))
    names = [n for n in a.workloads.split(",") if n]
    unknown = [n for n in names if n not in bench.WORKLOADS]
    if unknown:
        ap.error(f"unknown workloads {unknown}; choose from {sorted(bench.WORKLOADS)}")
    start = time.perf_counter()

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        with open(a.out, "a") as f:
            f.write(line + "\n")

    device = jax.devices()[0]
    peaks = {}
    for precision in ("default", "highest"):
        with jax.default_matmul_precision(matmul_precision(precision)):
            peaks[precision] = bench.matmul_peak_gflops(a.peak_size)
    emit(
        {
            "kind": "device",
            "backend": jax.default_backend(),
            "device_kind": device.device_kind,
            "devices": jax.device_count(),
            "jax": jax.__version__,
            "matmul_peak_gflops": peaks,
            "peak_size": a.peak_size,
        }
    )
    done = set()
    for config in configs:
        for name in names:
            key = run_key(name, config)
            if key in done:
                continue
            done.add(key)
            label = "/".join(str(k) for k in key[1:])
            if a.deadline_s is not None and time.perf_counter() - start > a.deadline_s:
                emit({"kind": "skipped", "workload": name, "config": label, "reason": "deadline"})
                continue
            try:
                r = measure_config(name, config, a.iters, a.tasks)
            except Exception as err:  # one config failing must not lose the others' results
                emit({"kind": "error", "workload": name, "config": label, "error": f"{type(err).__name__}: {err}"})
                continue
            peak = peaks[config["precision"]]
            r.update(kind="result", config=label, precision=config["precision"])
            r["peak_fraction"] = r["flops_per_step"] * r["it_per_s"] / (peak * 1e9)
            emit(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
