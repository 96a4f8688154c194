"""Where a meta-step's time goes on this backend: trace a few train steps of a benchmark
workload and sum the XLA ops' time by kind.

    python experiments/profile_step.py --workload miniimagenet-5w1s [--steps 2] [--json]

It traces at least ``--steps`` train steps (the step that ``python -m maml_jax.bench`` times:
second-order MAML, per-task meta-gradients, Adam) with ``jax.profiler``, reads the trace back
with ``jax.profiler.ProfileData`` (no TensorBoard needed), and prints one row per op kind: the
HLO op or fusion name without its numeric suffix (``ynn_fusion.131`` → ``ynn_fusion``), its
time per step summed over XLA's worker threads, and its share. A ``group`` column puts each
kind in one of: ``matmul`` (dots, YNNPACK/oneDNN library fusions), ``patches`` (the stacked
and sliced views of the patch-matmul convolutions), ``layout`` (transposes, copies,
dynamic slices/updates of the task map), ``elementwise`` (every other fusion: BatchNorm, ReLU
and max-pool masks, their derivatives, Adam) and ``control``. The shares are what a speed-up
has to attack; the absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

import jax

from maml_jax import bench

GROUPS = (  # first match wins
    ("matmul", re.compile(r"^(ynn_fusion|xnn_fusion|onednn|dot|dot_general|custom-call|convolution)")),
    ("layout", re.compile(r"transpose|copy|dynamic-slice|dynamic-update-slice|^bitcast$")),
    ("patches", re.compile(r"(^|_)(stack|concatenate|pad)(_|$)|^slice|_slice_|slice_bitcast")),
    ("control", re.compile(r"^(while|conditional|call)$")),
)
RUNTIME_EVENTS = ("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool", "$", "end: ")


def op_group(kind: str) -> str:
    """``matmul`` / ``patches`` / ``layout`` / ``control`` / ``elementwise`` for an op kind."""
    for group, pattern in GROUPS:
        if pattern.search(kind):
            return group
    return "elementwise"


def op_times(xplane: Path) -> dict[str, float]:
    """Seconds per op kind in a ``.xplane.pb`` trace, summed over the XLA worker threads."""
    profile = jax.profiler.ProfileData.from_file(str(xplane))
    totals: dict[str, float] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if event.name.startswith(RUNTIME_EVENTS):
                    continue
                totals[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns / 1e9
    return dict(totals)


def profile(name: str, steps: int) -> dict[str, float]:
    """Seconds per step per op kind for benchmark workload ``name``: at least ``steps`` steps,
    in calls of the fused chunk that the benchmark times (``bench.DEFAULT_STEPS_PER_CALL``),
    after two warm-up calls."""
    per_call = bench.DEFAULT_STEPS_PER_CALL[bench.WORKLOADS[name]["kind"]]
    calls = -(-steps // per_call)
    chunk, state, _, _ = bench.build_chunk(name, bench.default_task_map(name), per_call)
    for _ in range(2):
        state, _ = chunk(state, None)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                state, _ = chunk(state, None)
            jax.block_until_ready(state)
        (xplane,) = Path(trace_dir).rglob("*.xplane.pb")
        times = op_times(xplane)
    return {k: v / (calls * per_call) for k, v in times.items()}


def table(times: dict[str, float], top: int = 15) -> str:
    """Markdown: the ``top`` op kinds by time, then the groups' totals."""
    total = sum(times.values())
    rows = ["| op kind | group | ms/step | share |", "| --- | --- | --- | --- |"]
    for kind, t in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"| {kind} | {op_group(kind)} | {1e3 * t:.1f} | {100 * t / total:.1f}% |")
    groups: dict[str, float] = collections.Counter()
    for kind, t in times.items():
        groups[op_group(kind)] += t
    rows += ["", "| group | ms/step | share |", "| --- | --- | --- |"]
    for group, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        rows.append(f"| {group} | {1e3 * t:.1f} | {100 * t / total:.1f}% |")
    rows.append(f"| all ops (summed over threads) | {1e3 * total:.1f} | 100% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="omniglot-5w1s", choices=sorted(bench.WORKLOADS))
    ap.add_argument("--steps", type=int, default=2, help="traced train steps, rounded up to whole fused calls")
    ap.add_argument("--top", type=int, default=15, help="op kinds listed before the group totals")
    ap.add_argument("--json", action="store_true", help="one JSON line {op kind: s/step} instead of tables")
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be at least 1")
    times = profile(a.workload, a.steps)
    if a.json:
        print(json.dumps({"workload": a.workload, "steps": a.steps, "s_per_step": times}, sort_keys=True))
    else:
        print(f"{a.workload}: at least {a.steps} step(s) traced on {jax.default_backend()}\n")
        print(table(times, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
