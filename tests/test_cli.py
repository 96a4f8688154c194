"""The main job end to end on a tiny budget: run directory, resume, errors, bench."""

import csv
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax import serialization
from run_files import jsonl_rows, metric_rows

from maml_jax import mlp, rundir
from maml_jax.cli import main

TINY = [
    "--config.num_iterations=400",
    "--config.steps_per_call=100",
    "--config.log_every=100",
    "--config.checkpoint_every=200",
    "--config.eval_num_tasks=30",
    "--no-progress",
]


def load_params(path):
    template = mlp((40, 40), 1).init(jax.random.PRNGKey(0), np.zeros((1, 1), np.float32))
    return rundir.load_pytree(path, template)


def assert_same_final_params(run_a, run_b, label):
    """The final parameters of model ``label`` are bitwise equal in two run directories (read
    without a template, so that any algorithm's parameter tree fits)."""
    a, b = (serialization.msgpack_restore((d / label / "params.msgpack").read_bytes()) for d in (run_a, run_b))
    chex.assert_trees_all_equal(a, b)  # the same tree structure, every leaf bitwise equal


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["train", "sinusoid", "--workdir", str(workdir), *TINY, "--config.baseline_lr_grid=0.01,0.001"]) == 0
    out = capsys.readouterr().out
    assert "| MAML (α=0.01) | 5 |" in out and "| pretrained" in out
    config = json.loads((workdir / "config.json").read_text())
    assert config["num_iterations"] == 400 and config["inner_lr"] == 0.01
    meta = json.loads((workdir / "run.json").read_text())
    assert meta["seed"] == 0 and "jax" in meta["versions"] and meta["devices"]
    assert meta["task_devices"] == [meta["devices"][0]]  # num_devices=1: no split
    assert meta["xla_flags"] == os.environ.get("XLA_FLAGS")
    assert meta["compile_cache"] == jax.config.jax_compilation_cache_dir  # None unless JAX's env var sets one
    rows = metric_rows(workdir)
    assert [r["step"] for r in rows if r["run"] == "maml"] == [100, 200, 300, 400]
    assert len(list(csv.DictReader((workdir / "metrics.csv").read_text().splitlines()))) == len(rows)
    results = json.loads((workdir / "eval.json").read_text())["results"]
    assert set(results) == {"maml", "pretrained"}
    mse = results["maml"]["by_shots"]["10"]["mse"]
    assert set(mse) == {"0", "1", "10"} and all(np.isfinite(v[0]) for v in mse.values())
    png = (workdir / "sinusoid_adaptation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (workdir / "sinusoid_adaptation.pdf").exists()
    assert load_params(workdir / "maml" / "params.msgpack")


# a longer run resumed from a shorter one: (the run directory's model label, config overrides)
EXTENDABLE = {
    "maml": ("maml", []),
    # first_order_iters is num_iterations here, yet every step of either total is first order
    "mamlpp_first_order": (
        "maml++",
        ["--config.algorithm=maml++", "--config.first_order=true", "--config.num_inner_steps=2"],
    ),
}


@pytest.mark.parametrize("case", list(EXTENDABLE))
def test_resume_matches_uninterrupted_training(case, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    label, overrides = EXTENDABLE[case]
    args = ["--config.baselines=", "--config.eval_shots=5", "--config.eval_inner_steps=0,1", *overrides]
    assert main(["train", "sinusoid", "--workdir", str(full), *TINY, *args]) == 0
    half = [a if "num_iterations" not in a else "--config.num_iterations=200" for a in TINY]
    assert main(["train", "sinusoid", "--workdir", str(part), *half, *args]) == 0
    assert main(["train", "sinusoid", "--workdir", str(part), *TINY, *args]) == 0  # resumes at 200
    # run.json describes the latest start; sessions.jsonl keeps every start (where each part ran)
    sessions = jsonl_rows(part / "sessions.jsonl")
    assert len(sessions) == 2 and sessions[-1] == json.loads((part / "run.json").read_text())
    assert len((full / "sessions.jsonl").read_text().splitlines()) == 1
    assert_same_final_params(full, part, label)


# case -> (the run directory's model label, config overrides)
STEP_DEPENDENT = {
    # MSL weights anneal over 300 iterations and the outer lr follows a cosine over all 400:
    # both depend on the step, and both are mid-schedule at the step-200 checkpoint
    "mamlpp_anneal_cosine": (
        "maml++",
        [
            "--config.algorithm=maml++",
            "--config.mamlpp_learned_inner_lrs=false",
            "--config.mamlpp_msl_anneal_iters=300",
            "--config.num_inner_steps=2",
            "--config.cosine_outer_lr=true",
        ],
    ),
    # the optimizer state is a chain (clip, adam), not adam's alone
    "outer_grad_clip": ("maml", ["--config.outer_grad_clip=1.0"]),
}


@pytest.mark.parametrize("case", list(STEP_DEPENDENT))
def test_resume_of_step_dependent_training_matches_uninterrupted(case, tmp_path, monkeypatch, capsys):
    """A run that stopped after its step-200 checkpoint (a copy of the uninterrupted run without
    its later checkpoint and final parameters) resumes with the same command to the same final
    parameters and metric rows, bit for bit. (Unlike ``test_resume_matches_uninterrupted_training``
    the first part is not a shorter run: the cosine schedule spans ``num_iterations``.)"""
    from maml_jax import plotting

    monkeypatch.setattr(plotting, "sinusoid_figure", lambda *args, **kwargs: None)  # not under test here
    label, overrides = STEP_DEPENDENT[case]
    cmd = [*TINY, "--config.meta_batch_size=5", "--config.baselines=", "--config.eval_shots=5"]
    cmd += ["--config.eval_inner_steps=0,1", *overrides]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "sinusoid", "--workdir", str(full), *cmd]) == 0
    shutil.copytree(full, part)
    shutil.rmtree(part / label / "checkpoints" / "400")
    (part / label / "params.msgpack").unlink()
    capsys.readouterr()
    assert main(["train", "sinusoid", "--workdir", str(part), *cmd]) == 0
    assert f"{label}: dropped 2 metric row(s) logged after step 200" in capsys.readouterr().out  # resumed at 200

    assert_same_final_params(full, part, label)
    assert (full / "metrics.jsonl").read_bytes() == (part / "metrics.jsonl").read_bytes()


def test_resuming_with_a_different_experiment_is_refused(tmp_path, capsys):
    """A workdir holds one experiment: changing the algorithm or a learning rate and re-running
    must not reuse its checkpoints (or rewrite its config.json); schedule changes may."""
    work = tmp_path / "run"
    short = ["--config.num_iterations=100", "--config.steps_per_call=100", "--config.log_every=100", "--no-progress"]
    short += [
        "--config.eval_num_tasks=10",
        "--config.baselines=",
        "--config.eval_shots=5",
        "--config.eval_inner_steps=0",
    ]
    assert main(["train", "sinusoid", "--workdir", str(work), *short]) == 0
    saved = (work / "config.json").read_text()
    capsys.readouterr()
    assert main(["train", "sinusoid", "--workdir", str(work), *short, "--config.inner_lr=0.02"]) == 2
    err = capsys.readouterr().err
    assert "different experiment" in err and "inner_lr: 0.01 -> 0.02" in err and "--workdir" in err
    assert main(["train", "sinusoid", "--workdir", str(work), *short, "--config.algorithm=anil"]) == 2
    assert (work / "config.json").read_text() == saved
    assert main(["train", "sinusoid", "--workdir", str(work), *short, "--config.eval_num_tasks=12"]) == 0


def test_a_longer_run_is_refused_only_where_a_schedule_spans_num_iterations():
    """Extending ``num_iterations`` on resume only moves where a constant-rate run stops; with the
    cosine outer rate it would change every later step's rate. (MAML++ with ``first_order`` is
    first order at every step of any total: ``test_resume_matches_uninterrupted_training``.)"""
    import dataclasses

    from maml_jax.config import Config, ConfigError, check_resume_compatible

    for changes, refused in [
        ({}, False),
        ({"cosine_outer_lr": True}, True),
        ({"algorithm": "maml++", "first_order": True}, False),
        ({"algorithm": "maml++"}, False),
    ]:
        old = dataclasses.replace(Config(), num_iterations=200, **changes)
        saved = dataclasses.asdict(old)
        check_resume_compatible(saved, old, "run")  # the same config always resumes
        longer = dataclasses.replace(old, num_iterations=400)
        if refused:
            with pytest.raises(ConfigError, match=r"num_iterations: 200 -> 400 \(a schedule spans it\)"):
                check_resume_compatible(saved, longer, "run")
        else:
            check_resume_compatible(saved, longer, "run")


def test_bad_config_exits_2_with_the_key_named(capsys):
    assert main(["train", "sinusoid", "--config.inner_rate=0.1"]) == 2
    assert "unknown config key 'inner_rate'" in capsys.readouterr().err
    assert main(["train", "no_such_config"]) == 2
    assert "no config named 'no_such_config'" in capsys.readouterr().err


def test_list_configs(capsys):
    assert main(["list-configs"]) == 0
    assert "sinusoid" in capsys.readouterr().out.split()
    assert main(["list-configs", "--config.bogus_key=1"]) == 2  # not silently ignored
    assert "--config.bogus_key: --config overrides apply to train only" in capsys.readouterr().err


@pytest.mark.parametrize("entry", [["-m", "maml_jax.bench"], ["-m", "maml_jax", "bench"]])
def test_bench_prints_one_json_line(entry):
    cmd = [sys.executable, *entry, "--workload", "sinusoid", "--iters", "20", "--warmup", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["workload"] == "sinusoid" and result["it_per_s"] > 0 and result["compile_s"] > 0


def test_task_map_auto_trains_as_the_backends_choice(tmp_path, capsys, monkeypatch):
    """``--config.task_map=auto`` (the image configs') is resolved before training: the meta-
    gradient is taken with the backend's choice (``map`` on this CPU), ``run.json`` records it,
    and the run equals one with that choice explicit; an unknown value is refused by name."""
    from run_files import metric_rows

    import maml_jax.experiment as experiment

    used = []
    original = experiment.batched_meta_grad

    def spy(*args, task_map, **kwargs):
        used.append(task_map)
        return original(*args, task_map=task_map, **kwargs)

    monkeypatch.setattr(experiment, "batched_meta_grad", spy)

    def run(task_map):
        work = tmp_path / task_map
        argv = ["train", "sinusoid", "--workdir", str(work), "--no-progress", f"--config.task_map={task_map}"]
        argv += ["--config.num_iterations=40", "--config.steps_per_call=20", "--config.log_every=20"]
        argv += ["--config.eval_num_tasks=4", "--config.baselines=", "--config.eval_shots=5"]
        assert main(argv) == 0
        losses = [r["meta_loss"] for r in metric_rows(work) if r.get("run") == "maml"]
        return losses, json.loads((work / "run.json").read_text())["task_map"]

    resolved = "map" if jax.default_backend() == "cpu" else "vmap"
    auto_losses, recorded = run("auto")
    assert set(used) == {resolved} and recorded == resolved
    assert auto_losses == run(resolved)[0]
    assert main(["train", "sinusoid", "--workdir", str(tmp_path / "bad"), "--config.task_map=pmap"]) == 2
    assert "'vmap', 'map' or 'auto'" in capsys.readouterr().err
