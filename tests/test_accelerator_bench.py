"""experiments/accelerator_bench.py and the benchmark's ``compute_dtype``: the configs it times
are the programs they name, bad configs are refused, and the README's GPU tables come from its
``--table`` mode (run here on CPU, tiny shapes)."""

import json
import math

import jax
import jax.numpy as jnp
import pytest
from experiment_scripts import load

from maml_jax import bench

accelerator_bench = load("accelerator_bench")


def test_parse_config_names_each_field_and_refuses_bad_ones():
    assert accelerator_bench.parse_config("patches/map/highest/bfloat16") == {
        "conv_impl": "patches",
        "task_map": "map",
        "precision": "highest",
        "compute_dtype": "bfloat16",
    }
    for bad, field in [
        ("lax/vmap/default", "CONV/TASK_MAP"),
        ("cudnn/vmap/default/float32", "conv"),
        ("lax/pmap/default/float32", "task map"),
        ("lax/vmap/tf32/float32", "precision"),
        ("lax/vmap/default/float16", "dtype"),
    ]:
        with pytest.raises(ValueError, match=field):
            accelerator_bench.parse_config(bad)


def test_the_sinusoid_runs_once_per_choice_that_changes_its_program():
    lax_cfg = accelerator_bench.parse_config("lax/vmap/default/float32")
    patches_cfg = accelerator_bench.parse_config("patches/vmap/default/float32")
    assert accelerator_bench.run_key("sinusoid", lax_cfg) == accelerator_bench.run_key("sinusoid", patches_cfg)
    assert accelerator_bench.run_key("omniglot-5w1s", lax_cfg) != accelerator_bench.run_key(
        "omniglot-5w1s", patches_cfg
    )


def _dot_outputs(fn, *args) -> list[str]:
    """The output types (``bf16[2,10,40]``, ...) of the dot_generals in ``fn(*args)``'s jaxpr."""
    lines = str(jax.make_jaxpr(fn)(*args)).splitlines()
    return [line.split("=")[0].split(":")[-1].strip() for line in lines if "= dot_general" in line]


def _step_dots(compute_dtype: str) -> list[str]:
    step, state, tasks, _ = bench.build("sinusoid", "vmap", num_tasks=2, compute_dtype=compute_dtype)
    return _dot_outputs(step, state, tasks)


def test_bench_compute_dtype_bfloat16_runs_the_network_in_bf16_and_float32_does_not():
    bf16, f32 = _step_dots("bfloat16"), _step_dots("float32")
    assert f32 and all(t.startswith("f32[") for t in f32), f32
    assert any(t.startswith("bf16[") for t in bf16), bf16
    with pytest.raises(ValueError, match="compute_dtype"):
        bench.build("sinusoid", "vmap", num_tasks=2, compute_dtype="float16")


def test_bf16_train_step_keeps_float32_state_and_lowers_the_loss_on_a_fixed_batch():
    step, state, tasks, _ = bench.build("sinusoid", "vmap", num_tasks=4, compute_dtype="bfloat16")
    losses = []
    for _ in range(30):
        state, metrics = step(state, tasks)
        losses.append(float(metrics["meta_loss"]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.meta_params))
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_timed_chunk_computes_in_the_dtype_measure_is_given(monkeypatch):
    """``measure`` times ``build_chunk``'s program: its dots are bf16 exactly when asked."""
    built = []
    real_build_chunk = bench.build_chunk

    def recording_build_chunk(*args, **kwargs):
        out = real_build_chunk(*args, **kwargs)
        built.append(out)
        return out

    monkeypatch.setattr(bench, "build_chunk", recording_build_chunk)
    for dtype in bench.COMPUTE_DTYPES:
        r = bench.measure("sinusoid", iters=2, warmup=0, num_tasks=2, windows=1, compute_dtype=dtype)
        assert r["compute_dtype"] == dtype
        chunk, state, _, _ = built[-1]
        dots = _dot_outputs(chunk, state, None)
        assert dots and any(t.startswith("bf16[") for t in dots) == (dtype == "bfloat16"), (dtype, dots)


def test_the_pinned_child_process_is_given_the_dtype(monkeypatch):
    ran = []

    def fake_run(cmd, **kwargs):
        ran.append(cmd)
        line = json.dumps({"workload": "sinusoid", "it_per_s": 1.0})
        return type("Done", (), {"returncode": 0, "stdout": line + "\n", "stderr": ""})()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    bench.measure_in_child("sinusoid", 2, 0, 1, compute_dtype="bfloat16")
    assert ran[0][ran[0].index("--compute-dtype") + 1] == "bfloat16"


def test_flops_are_counted_on_a_cpu_lowering_whatever_the_default_device(monkeypatch):
    """On GPU the lowering's cost analysis had no FLOPs (NaN): the count lowers for the CPU."""
    seen = []
    real_build = bench.build

    def recording_build(*args, **kwargs):
        seen.append(jax.config.jax_default_device)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(bench, "build", recording_build)
    flops = bench.xla_step_flops("sinusoid", num_tasks=2)
    assert seen == [jax.devices("cpu")[0]] and math.isfinite(flops) and flops > 0


def test_measure_config_sets_the_matmul_precision_and_dtype():
    cfg = accelerator_bench.parse_config("lax/map/highest/bfloat16")
    r = accelerator_bench.measure_config("sinusoid", cfg, iters=2, num_tasks=2)
    assert (r["matmul_precision"], r["compute_dtype"], r["task_map"]) == ("highest", "bfloat16", "map")
    assert jax.config.jax_default_matmul_precision is None  # restored afterwards
    assert r["it_per_s"] > 0 and r["iters"] == 2


def test_main_writes_device_and_result_lines_and_skips_past_the_deadline(tmp_path):
    out = tmp_path / "r.jsonl"
    argv = ["--out", str(out), "--workloads", "sinusoid", "--iters", "2", "--tasks", "2", "--peak-size", "64"]
    assert accelerator_bench.main(argv + ["--configs", "lax/vmap/default/float32,lax/map/default/float32"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["device", "result", "result"]
    assert set(rows[0]["matmul_peak_gflops"]) == {"default", "highest"}
    assert [r["task_map"] for r in rows[1:]] == ["vmap", "map"]
    assert all(math.isfinite(r["flops_per_step"]) and r["peak_fraction"] > 0 for r in rows[1:])
    assert accelerator_bench.main(argv + ["--deadline-s", "-1"]) == 0  # the default configs
    skipped = [json.loads(line) for line in out.read_text().splitlines()][3:]
    assert [r["kind"] for r in skipped] == ["device"] + ["skipped"] * 4  # one per distinct sinusoid program
    assert {r["config"] for r in skipped[1:]} == {
        "None/vmap/default/float32",
        "None/map/default/float32",
        "None/vmap/highest/float32",
        "None/vmap/default/bfloat16",
    }


def test_bad_arguments_exit_2(tmp_path, capsys):
    for argv in (["--configs", "lax/vmap"], ["--workloads", "imagenet"], []):
        with pytest.raises(SystemExit) as exc:
            accelerator_bench.main((["--out", str(tmp_path / "x")] if argv else []) + argv)
        assert exc.value.code == 2


def result(config, rate, flops=1e6):
    """A sinusoid result line of ``--out``, for ``config`` ``CONV/TASK_MAP/PRECISION/DTYPE``."""
    conv, task_map, precision, dtype = config.split("/")
    return {
        "kind": "result",
        "workload": "sinusoid",
        "config": config,
        "conv_impl": None,
        "task_map": task_map,
        "precision": precision,
        "compute_dtype": dtype,
        "it_per_s": rate,
        "it_per_s_min": rate,
        "it_per_s_max": rate,
        "compile_s": 1.0,
        "flops_per_step": flops,
    }


def test_table_recounts_missing_flops_and_takes_the_fastest_config_against_the_fastest_peer(tmp_path, capsys):
    ours = tmp_path / "ours.jsonl"
    device = {"kind": "device", "matmul_peak_gflops": {"default": 100.0, "highest": 10.0}}
    rows = [
        device,
        result("None/vmap/default/float32", 200.0, float("nan")),
        result("None/map/highest/float32", 100.0, 1e6),
    ]
    ours.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    peers = tmp_path / "peers.jsonl"
    peers.write_text(
        json.dumps({"peer": "torchfunc", "workload": "sinusoid", "it_per_s": 20.0})
        + "\n"
        + json.dumps({"peer": "loop", "workload": "sinusoid", "it_per_s": 5.0})
        + "\n"
    )
    assert accelerator_bench.main(["--table", str(ours), "--peers", str(peers)]) == 0
    out = capsys.readouterr().out
    recounted = bench.step_flops("sinusoid")
    assert math.isfinite(recounted) and recounted > 0 and "nan" not in out
    assert f"| {recounted / 1e9:.3g} |" in out  # the NaN count replaced by the CPU lowering's
    assert f"{100 * recounted * 200 / 100e9:.2f}%" in out and f"{100 * 1e6 * 100 / 10e9:.2f}%" in out
    assert "| sinusoid | 200.0 (None/vmap/default/float32) | 20 | 5 | 10.0x |" in out


def test_table_ratio_leaves_out_bf16_and_gives_tf32_peers_their_own_column(tmp_path, capsys):
    ours = tmp_path / "ours.jsonl"
    rows = [
        {"kind": "device", "matmul_peak_gflops": {"default": 100.0, "highest": 10.0}},
        result("None/vmap/default/float32", 200.0),
        result("None/vmap/default/bfloat16", 900.0),  # faster, but not comparable with float32 peers
    ]
    ours.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    peers = tmp_path / "peers.jsonl"
    peer_rows = [
        {"peer": "torchfunc", "workload": "sinusoid", "it_per_s": 20.0, "matmul_allow_tf32": False},
        {"peer": "torchfunc", "workload": "sinusoid", "it_per_s": 40.0, "matmul_allow_tf32": True},
    ]
    peers.write_text("\n".join(json.dumps(r) for r in peer_rows) + "\n")
    assert accelerator_bench.main(["--table", str(ours), "--peers", str(peers)]) == 0
    out = capsys.readouterr().out
    assert "| 900.0 (900.0-900.0) |" in out  # the bf16 row is still listed among our configs
    assert "torchfunc it/s | torchfunc+tf32 it/s |" in out
    assert "| sinusoid | 200.0 (None/vmap/default/float32) | 20 | 40 | 5.0x |" in out
