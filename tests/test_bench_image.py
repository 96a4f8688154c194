"""The conv4 benchmark workloads: shapes equal the PyTorch peers', and the command runs."""

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from maml_jax import bench

PEERS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "torch_peers.py"


def run_bench(*args, timeout=600, fast_compile=False):
    """``fast_compile``: skip LLVM optimisation (a smoke test checks the command, not speed)."""
    cmd = [sys.executable, "-m", "maml_jax.bench", *args]
    env = dict(os.environ)
    if fast_compile:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout, env=env).stdout
    return [json.loads(line) for line in out.strip().splitlines()]


@pytest.mark.skipif(not PEERS.exists(), reason="shared/bench/torch_peers.py not checked out beside the repo")
def test_workloads_have_exactly_the_torch_peers_shapes():
    tree = ast.parse(PEERS.read_text())
    assign = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "WORKLOADS")
    # read, not imported (that needs torch): a literal of dict(...) calls
    peers = eval(compile(ast.Expression(assign.value), str(PEERS), "eval"), {"__builtins__": {}, "dict": dict})
    ours = {k: {f: v for f, v in w.items() if f != "kind"} for k, w in bench.WORKLOADS.items()}
    assert ours == {k: {f: v for f, v in w.items() if f != "kind"} for k, w in peers.items()}
    assert set(bench.DEFAULT_TASK_MAP) == set(bench.WORKLOADS)
    assert {k: w["kind"] for k, w in bench.WORKLOADS.items() if k != "sinusoid"} == {
        "omniglot-5w1s": "omniglot",
        "omniglot-20w1s": "omniglot",
        "miniimagenet-5w1s": "miniimagenet",
    }


def test_image_tasks_shapes_and_labels():
    w = bench.WORKLOADS["omniglot-20w1s"]
    tasks = jax.jit(functools.partial(bench._image_tasks, w=w))(jax.random.PRNGKey(0))
    assert tasks.support.x.shape == (16, 20, 28, 28, 1) and tasks.query.x.shape == (16, 100, 28, 28, 1)
    assert tasks.support.y.shape == (16, 20) and tasks.query.y.shape == (16, 100)
    assert tasks.query.y[3].tolist() == [c for c in range(20) for _ in range(5)]


@pytest.mark.parametrize("fixed", [False, True])
def test_omniglot_bench_prints_one_json_line(fixed):
    """Two tasks instead of 32 (``--tasks`` is for tests; not the benchmark shape); with
    ``--fixed-tasks`` too, through the two-CPU-device chunk."""
    args = ["--workload", "omniglot-5w1s", "--iters", "1", "--warmup", "0", "--tasks", "2"]
    (result,) = run_bench(*args, *(["--fixed-tasks"] if fixed else []), fast_compile=True)
    assert result["fixed_tasks"] is fixed
    assert result["workload"] == "omniglot-5w1s" and result["it_per_s"] > 0 and result["compile_s"] > 0
    assert "--xla_backend_optimization_level=0" in result["xla_flags"]  # the result names what compiled it
    assert 0 < result["lower_s"] < result["compile_s"]  # tracing + lowering is part of compile_s
    assert result["tasks"] == 2 and result["iters"] == 1
    # the image workloads split their tasks over two CPU devices by default (DEFAULT_CPU_DEVICES)
    assert result["cpu_devices"] == result["devices"] == bench.DEFAULT_CPU_DEVICES["omniglot"] == 2
    assert result["conv_impl"] == bench.CONV_IMPLS[0] and result["task_map"] == bench.DEFAULT_TASK_MAP["omniglot-5w1s"]


def test_tasks_that_do_not_split_over_the_cpu_devices_are_an_error():
    cmd = [sys.executable, "-m", "maml_jax.bench", "--workload", "omniglot-5w1s", "--tasks", "3", "--iters", "1"]
    out = subprocess.run([*cmd, "--cpu-devices", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "3 tasks do not split evenly over 2 CPU devices" in out.stderr


@pytest.mark.slow
def test_omniglot_bench_at_the_benchmark_shape_with_each_choice():
    for conv_impl in ("patches", "lax"):
        (result,) = run_bench(
            "--workload",
            "omniglot-5w1s",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--conv-impl",
            conv_impl,
            "--task-map",
            "map",
        )
        assert result["tasks"] == 32 and result["conv_impl"] == conv_impl and result["it_per_s"] > 0


@pytest.mark.slow
def test_all_workloads_run():
    results = run_bench(
        "--workload", "all", "--iters", "1", "--warmup", "0", "--tasks", "2", timeout=1200, fast_compile=True
    )
    assert [r["workload"] for r in results] == sorted(bench.WORKLOADS)
    assert all(r["it_per_s"] > 0 for r in results)


def test_step_flops_counts_every_inner_step():
    """XLA counts a loop body once, so the 5-inner-step workload's step read as one inner step;
    ``step_flops`` equals XLA's count of the same step with the inner loop unrolled (``unroll=True``)."""
    name = "omniglot-20w1s"
    assert bench.WORKLOADS[name]["steps"] == 5

    counted = bench.step_flops(name, num_tasks=2)
    rolled = bench.xla_step_flops(name, num_tasks=2)
    unrolled = bench.xla_step_flops(name, num_tasks=2, unroll=True)
    assert counted == pytest.approx(unrolled, rel=1e-4)
    # XLA's own count: the first inner step (outside the scan, core.inner_adapt) and the scan
    # body once, 2 of 5 inner steps (should a later XLA multiply by the trip count, this fails
    # and the extrapolation in step_flops is no longer needed)
    assert rolled < 0.6 * unrolled


def test_default_task_map_is_the_cpu_measurement_on_cpu_and_vmap_elsewhere():
    for name in bench.WORKLOADS:
        assert bench.default_task_map(name, "cpu") == bench.DEFAULT_TASK_MAP[name]
        assert bench.default_task_map(name, "gpu") == bench.default_task_map(name, "tpu") == "vmap"
    assert bench.default_task_map("omniglot-5w1s", "cpu") == "map"  # the measured CPU choice


def test_default_conv_impl_is_per_image_only_for_miniimagenet_on_two_cpu_devices():
    assert bench.DEFAULT_CPU_DEVICES["miniimagenet"] == 2
    assert bench.default_conv_impl("miniimagenet-5w1s", "cpu") == "patches_per_image"
    assert bench.default_conv_impl("miniimagenet-5w1s", "cpu", cpu_devices=1) == "patches"
    for name in ("omniglot-5w1s", "omniglot-20w1s"):
        assert bench.default_conv_impl(name, "cpu") == "patches"
    for name in bench.WORKLOADS:
        assert bench.default_conv_impl(name, "gpu") == bench.default_conv_impl(name, "tpu") == "patches"


def test_bench_offers_each_model_convolution_once_with_patches_first():
    from maml_jax.models.conv4 import CONV_IMPLS

    assert sorted(bench.CONV_IMPLS) == sorted(CONV_IMPLS) and bench.CONV_IMPLS[0] == "patches"


def record_child_commands(monkeypatch) -> list[list[str]]:
    """The commands ``measure_in_child`` would run, recorded instead (each child reports 1 it/s)."""
    ran = []

    def fake_run(cmd, **kwargs):
        ran.append(cmd)
        return type("Done", (), {"returncode": 0, "stdout": '{"it_per_s": 1.0}\n', "stderr": ""})()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    return ran


def test_a_pinned_child_gets_the_conv_impl_only_when_one_is_given(monkeypatch):
    """Without ``--conv-impl`` the child resolves the default for its own backend."""
    ran = record_child_commands(monkeypatch)
    bench.measure_in_child("miniimagenet-5w1s", 2, 0, 1)
    bench.measure_in_child("miniimagenet-5w1s", 2, 0, 1, conv_impl="patches")
    assert "--conv-impl" not in ran[0]
    assert ran[1][ran[1].index("--conv-impl") + 1] == "patches"


def test_measure_defaults_to_vmap_off_the_cpu(monkeypatch):
    """``measure`` without ``task_map`` takes ``default_task_map`` for the backend it runs on:
    with the backend reported as a GPU (the step itself still runs on this CPU) the Omniglot
    workload, ``map`` on a CPU, is timed with ``vmap``."""
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
    result = bench.measure("omniglot-5w1s", iters=1, warmup=0, windows=1, num_tasks=2)
    assert result["task_map"] == "vmap" and result["it_per_s"] > 0


def test_inner_unroll_reaches_the_step_and_the_pinned_child(monkeypatch):
    """``--inner-unroll``: the chunk's inner loop (and its transpose) is unrolled, so the lowered
    step has two ``while`` loops fewer; ``inner_unroll=2`` keeps both loops with two inner steps
    per trip (more calls in them). A pinned child gets the flag, and refuses an N it cannot pass."""

    def lowered(unroll):
        chunk, state, _, _ = bench.build_chunk("omniglot-20w1s", "map", 1, num_tasks=2, inner_unroll=unroll)
        text = chunk.lower(state, None).as_text()
        return text.count("stablehlo.while"), text.count("call @")

    (w_loop, c_loop), (w_all, _), (w_two, c_two) = map(lowered, (False, True, 2))
    assert w_all == w_loop - 2
    assert w_two == w_loop and c_two > c_loop
    ran = record_child_commands(monkeypatch)
    bench.measure_in_child("omniglot-20w1s", 2, 0, 1)
    bench.measure_in_child("omniglot-20w1s", 2, 0, 1, inner_unroll=True)
    assert "--inner-unroll" not in ran[0] and "--inner-unroll" in ran[1]
    with pytest.raises(ValueError, match="all or nothing"):
        bench.measure_in_child("omniglot-20w1s", 2, 0, 1, inner_unroll=2)
