"""Where a meta-step's time goes on this backend: trace a few train steps of a benchmark
workload and sum the XLA ops' time by kind.

    python experiments/profile_step.py --workload miniimagenet-5w1s [--steps 2] [--json] [--by-instruction]

It traces at least ``--steps`` train steps (the step that ``python -m maml_jax.bench`` times:
second-order MAML, per-task meta-gradients, Adam) with ``jax.profiler``, reads the trace back
with ``jax.profiler.ProfileData`` (no TensorBoard needed), and prints one row per op kind: the
HLO op or fusion name without its numeric suffix (``ynn_fusion.131`` → ``ynn_fusion``), its
time per step summed over XLA's worker threads, and its share. A ``group`` column puts each
kind in one of: ``matmul`` (dots, YNNPACK/oneDNN library fusions), ``patches`` (the stacked
and sliced views of the patch-matmul convolutions), ``layout`` (transposes, copies,
dynamic slices/updates of the task map), ``elementwise`` (every other fusion: BatchNorm, ReLU
and max-pool masks, their derivatives, Adam), ``control`` and ``collective`` (with
``--cpu-devices``: the all-reduce of the gradients and the wait for the other device). Each
event counts its own time, without the events nested in it (``self_times``). The shares are what a speed-up
has to attack; the absolute times depend on the machine's load.

``--by-instruction`` lists single HLO instructions instead of kinds (``ynn_fusion.52``, not
``ynn_fusion``), each with its output shape and the JAX ``op_name`` it came from (read from the
compiled HLO), which says which layer and which derivative the time belongs to. That is how
the slow task-axis mean of ``results/bench/tried_2026-12-05.md`` was found. In that reading, XLA's own
``dot`` instructions took less time than their FLOPs allow, so their events may not cover all
of their work; compare them with ``matmul_forms.py`` timings.

``--cpu-devices N`` splits the task batch over N XLA CPU devices, with the convolution the bench
picks for them (``bench.default_conv_impl``), as ``python -m maml_jax.bench`` runs the image
workloads by default (N = 2); the times are then summed over both devices' threads. The default,
1, traces the one-device step that ``maml-jax train`` runs without ``--cpu-devices``.
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
from maml_jax.host import request_cpu_devices

GROUPS = (  # first match wins
    ("matmul", re.compile(r"^(ynn_fusion|xnn_fusion|onednn|dot|dot_general|custom-call|convolution)")),
    ("layout", re.compile(r"transpose|copy|dynamic-slice|dynamic-update-slice|^bitcast$")),
    ("patches", re.compile(r"(^|_)(stack|concatenate|pad)(_|$)|^slice|_slice_|slice_bitcast")),
    ("control", re.compile(r"^(while|conditional|call)$")),
    # the cross-device reduction of the meta-gradients and the time spent waiting for the other device
    (
        "collective",
        re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|Rendezvous|Wait)"),
    ),
)
RUNTIME_EVENTS = ("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool", "$", "end: ")


def op_group(kind: str) -> str:
    """``matmul`` / ``patches`` / ``layout`` / ``control`` / ``collective`` / ``elementwise`` for an op kind."""
    for group, pattern in GROUPS:
        if pattern.search(kind):
            return group
    return "elementwise"


def self_times(events: list[tuple[int, int, str]]) -> list[tuple[str, int]]:
    """``(name, own ns)`` of each ``(start ns, end ns, name)`` event of one thread: its duration
    less that of the events nested directly inside it. XLA:CPU's ``while`` events span the ops of
    the loop bodies that run on the same thread (the per-image loops of ``patches_per_image``,
    for one), and a collective spans its rendezvous, so plain durations would count that time
    twice. An event that starts inside another but ends after it is not nested in it."""
    out: list[tuple[str, int]] = []
    stack: list[list] = []  # [start, end, name, ns of direct children]

    def close() -> None:
        start, end, name, children = stack.pop()
        out.append((name, end - start - children))

    for start, end, name in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and (start >= stack[-1][1] or end > stack[-1][1]):
            close()
        if stack:
            stack[-1][3] += end - start
        stack.append([start, end, name, 0])
    while stack:
        close()
    return out


def op_times(xplane: Path, by_instruction: bool = False) -> dict[str, float]:
    """Seconds per op kind (per instruction if ``by_instruction``) in a ``.xplane.pb`` trace:
    each event's own time (``self_times``), summed over the XLA worker threads."""
    profile = jax.profiler.ProfileData.from_file(str(xplane))
    totals: dict[str, float] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            events = [
                (e.start_ns, e.start_ns + e.duration_ns, e.name)
                for e in line.events
                if not e.name.startswith(RUNTIME_EVENTS)
            ]
            for name, ns in self_times(events):
                key = name if by_instruction else re.sub(r"\.\d+$", "", name)
                totals[key] += ns / 1e9
    return dict(totals)


INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", re.M)
OP_NAME = re.compile(r'op_name="([^"]*)"')


def _split_shape(rest: str) -> tuple[str, str] | None:
    """``("f32[2]{0}", "tuple(...)...")`` from the text after ``=``: a shape that is one token or
    a (nested) parenthesised tuple of shapes, then an opcode and its ``(``; ``None`` otherwise."""
    end = rest.find(" ")  # a one-token shape ends at the first space
    if rest.startswith("("):  # a tuple ends where its first parenthesis closes
        depth, end = 0, -1
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                end = i + 1
                break
    if end < 0:
        return None
    shape, after = rest[:end], rest[end:]
    return (shape, after) if re.match(r" [\w\-]+\(", after) else None


def instruction_info(hlo_text: str) -> dict[str, tuple[str, str]]:
    """``{instruction name: (output shape, JAX op_name)}`` from compiled HLO text (the first
    definition of each name; tuple shapes kept whole; ``op_name`` empty where the HLO has none)."""
    info: dict[str, tuple[str, str]] = {}
    for name, rest in INSTRUCTION.findall(hlo_text):
        split = _split_shape(rest)
        if split is None:
            continue
        op_name = OP_NAME.search(split[1])
        info.setdefault(name, (split[0], op_name.group(1) if op_name else ""))
    return info


def instruction_table(times: dict[str, float], info: dict[str, tuple[str, str]], top: int = 15) -> str:
    """Markdown: the ``top`` instructions by time with their shape and the end of their op_name."""
    total = sum(times.values())
    rows = ["| instruction | ms/step | share | shape | op_name (end) |", "| --- | --- | --- | --- | --- |"]
    for name, t in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        shape, op_name = info.get(name, ("?", ""))
        rows.append(f"| {name} | {1e3 * t:.2f} | {100 * t / total:.1f}% | `{shape}` | {op_name[-80:]} |")
    rows.append(f"| all instructions (summed over threads) | {1e3 * total:.1f} | 100% | | |")
    return "\n".join(rows)


def profile(
    name: str, steps: int, by_instruction: bool = False, cpu_devices: int = 1
) -> dict[str, float] | tuple[dict[str, float], str]:
    """Seconds per step per op kind for benchmark workload ``name``: at least ``steps`` steps,
    in calls of the fused chunk that the benchmark times (``bench.DEFAULT_STEPS_PER_CALL``),
    after two warm-up calls, with the tasks split over ``cpu_devices`` devices (which must exist:
    ``host.request_cpu_devices`` before JAX starts). ``by_instruction``: per HLO instruction
    instead, returned with the chunk's compiled HLO text."""
    per_call = bench.DEFAULT_STEPS_PER_CALL[bench.WORKLOADS[name]["kind"]]
    calls = -(-steps // per_call)
    bench.check_task_split(name, None, cpu_devices)
    conv_impl = bench.default_conv_impl(name, cpu_devices=cpu_devices)
    chunk, state, _, _ = bench.build_chunk(name, bench.default_task_map(name), per_call, conv_impl, None, cpu_devices)
    hlo = chunk.lower(state, None).compile().as_text() if by_instruction else ""
    for _ in range(2):
        state, _ = chunk(state, None)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                state, _ = chunk(state, None)
            jax.block_until_ready(state)
        (xplane,) = Path(trace_dir).rglob("*.xplane.pb")
        times = op_times(xplane, by_instruction)
    per_step = {k: v / (calls * per_call) for k, v in times.items()}
    return (per_step, hlo) if by_instruction else per_step


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
    ap.add_argument(
        "--by-instruction", action="store_true", help="single HLO instructions with shape and op_name, not kinds"
    )
    ap.add_argument(
        "--cpu-devices", type=int, default=1, help="split the tasks over N XLA CPU devices (the bench's default: 2)"
    )
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be at least 1")
    if a.cpu_devices < 1:
        ap.error("--cpu-devices must be at least 1")
    try:
        bench.check_task_split(a.workload, None, a.cpu_devices)
    except ValueError as err:
        ap.error(str(err))
    if request_cpu_devices(a.cpu_devices) < a.cpu_devices:
        ap.error(f"--cpu-devices {a.cpu_devices}: JAX started with fewer CPU devices; run it in a fresh process")
    if a.by_instruction:
        times, hlo = profile(a.workload, a.steps, by_instruction=True, cpu_devices=a.cpu_devices)
        info = instruction_info(hlo)
        if a.json:
            rows = {
                k: {"s_per_step": t, "shape": info.get(k, ("?", ""))[0], "op_name": info.get(k, ("?", ""))[1]}
                for k, t in times.items()
            }
            print(json.dumps({"workload": a.workload, "steps": a.steps, "instructions": rows}, sort_keys=True))
        else:
            print(f"{a.workload}: at least {a.steps} step(s) traced on {jax.default_backend()}, by instruction\n")
            print(instruction_table(times, info, a.top))
        return 0
    times = profile(a.workload, a.steps, cpu_devices=a.cpu_devices)
    if a.json:
        print(json.dumps({"workload": a.workload, "steps": a.steps, "s_per_step": times}, sort_keys=True))
    else:
        print(f"{a.workload}: at least {a.steps} step(s) traced on {jax.default_backend()}\n")
        print(table(times, a.top))
    return 0


if __name__ == "__main__":
    from maml_jax.host import reexec_with_malloc_hugepages

    reexec_with_malloc_hugepages()  # as python -m maml_jax.bench does, so that both time the same process
    sys.exit(main())
