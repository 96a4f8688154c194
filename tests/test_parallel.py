"""Task-parallel training (maml_jax.parallel) over 1, 2, 4, 8 CPU devices equals one device.

The multi-device checks run ``parallel_check.py`` in a subprocess, because
``--xla_force_host_platform_device_count`` must be set before jax is imported."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from run_files import metric_rows

from maml_jax.core import batched_meta_loss
from maml_jax.data import sinusoid
from maml_jax.losses import mse_loss
from maml_jax.models import mlp
from maml_jax.parallel import default_mesh, loss_to_meta_grad, make_sharded_train_step, replicate
from maml_jax.train import init_train_state, make_train_step
from maml_jax.validation import HyperparameterError

CHECK = Path(__file__).with_name("parallel_check.py")


def xla_flags(*extra: str) -> str:
    """This process's ``XLA_FLAGS`` (in the default selection, conftest's LLVM level 0: these
    subprocesses mostly compile) without a forced device count, and ``extra`` after them."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*kept, *extra])


def run_check(task_map: str, counts: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, str(CHECK), task_map, counts], capture_output=True, text=True, check=True, env=env, timeout=900
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_same_as_one_device(result: dict, counts: str) -> None:
    assert result["devices"] == 8
    for n in counts.split(","):
        r = result[n]
        assert r["shards"] == int(n) and r["step"] == 3
        assert r["moved"] > 1e-3  # training did move the parameters
        assert r["grads"] < 1e-5 and r["train"] < 1e-5 and r["chunk"] < 1e-5, (n, r)


def test_eight_devices_match_one_device():
    result = run_check("vmap", "8")
    assert_same_as_one_device(result, "8")
    # shard_meta_grad refuses a task batch that does not split evenly over the devices (this
    # process has one device, where every batch splits)
    assert result["uneven"] == {
        "2/3": {"type": "ShapeError", "message": "the task batch (3 tasks) must divide evenly over 2 devices"},
        "8/12": {"type": "ShapeError", "message": "the task batch (12 tasks) must divide evenly over 8 devices"},
    }


@pytest.mark.slow
@pytest.mark.parametrize("task_map", ["vmap", "map"])
def test_one_two_four_eight_devices_match_one_device(task_map):
    assert_same_as_one_device(run_check(task_map, "1,2,4,8"), "1,2,4,8")


def _problem():
    model = mlp((8,), 1)
    objective = functools.partial(
        batched_meta_loss, task_loss_fn=mse_loss(model.apply), num_inner_steps=1, inner_lr=0.01
    )
    params = model.init(jax.random.PRNGKey(0), jax.numpy.zeros((4, 1)))
    return objective, params, sinusoid.sample_tasks(jax.random.PRNGKey(1), 4, 4, 4)


def test_sharded_step_over_this_process_devices_equals_the_plain_step():
    """In-process check of the sharded step over ``default_mesh()``, i.e. over this test
    process's own devices: normally a single CPU device, so this exercises the ``shard_map`` /
    ``pmean`` wrapper on a one-device mesh, not a split of the tasks (the subprocess tests above
    cover 2, 4 and 8 devices). The mesh spans ``jax.devices()``; one step trains (the
    parameters move) exactly like the plain jitted step, with the same metrics, and leaves the
    state replicated on the mesh."""
    objective, params, tasks = _problem()
    optimizer = optax.sgd(0.1)
    state = init_train_state(params, optimizer, jax.random.PRNGKey(2))
    mesh = default_mesh()
    assert mesh.axis_names == ("tasks",) and list(mesh.devices.ravel()) == jax.devices()
    step = make_sharded_train_step(loss_to_meta_grad(objective), optimizer, mesh)
    sharded, sharded_metrics = step(replicate(state, mesh), tasks)
    plain, plain_metrics = jax.jit(make_train_step(objective, optimizer))(state, tasks)
    chex.assert_tree_all_finite(plain.meta_params)  # assert_trees_all_close takes NaN == NaN
    pairs = zip(jax.tree.leaves(plain.meta_params), jax.tree.leaves(params), strict=True)
    moved = max(float(abs(a - b).max()) for a, b in pairs)
    assert moved > 1e-4  # the step trained: equal results are not two no-ops
    assert int(sharded.step) == int(plain.step) == 1
    chex.assert_trees_all_close(sharded.meta_params, plain.meta_params, rtol=0, atol=1e-6)
    assert set(sharded_metrics) == set(plain_metrics) and "meta_loss" in plain_metrics
    for name, value in plain_metrics.items():
        np.testing.assert_allclose(np.asarray(sharded_metrics[name]), np.asarray(value), rtol=1e-6, err_msg=name)
    for leaf in jax.tree.leaves(sharded.meta_params):
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
        assert leaf.sharding.is_fully_replicated


def test_bad_device_count_raises():
    with pytest.raises(HyperparameterError):
        default_mesh(jax.device_count() + 1)
    with pytest.raises(HyperparameterError):
        default_mesh(0)


def test_train_command_on_two_devices_follows_the_one_device_trajectory(tmp_path):
    """``--config.num_devices=2`` (two forced CPU devices) logs the same meta-losses as the
    one-device run, to float summation order."""
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"), JAX_PLATFORMS="cpu")
    flags = [
        "--no-progress",
        "--config.num_iterations=200",
        "--config.steps_per_call=100",
        "--config.meta_batch_size=24",
    ]
    flags += ["--config.log_every=100", "--config.eval_num_tasks=10", "--config.baselines=", "--config.eval_shots=10"]
    losses = {}
    for n in (1, 2):
        workdir = tmp_path / f"dev{n}"
        cmd = [sys.executable, "-m", "maml_jax", "train", "sinusoid", "--workdir", str(workdir), *flags]
        out = subprocess.run([*cmd, f"--config.num_devices={n}"], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = metric_rows(workdir)
        losses[n] = [r["meta_loss"] for r in rows]
    # float32 summation order differs between one device and two (psum of two half-batch means),
    # and 200 Adam steps amplify it: the mean meta-loss over steps 1-100 agrees to ~2e-6 and over
    # steps 101-200 to ~6e-5 on an AVX-512 EPYC (1e-5 on another CPU). A sharding bug (each
    # device training on the same tasks, or on half the batch) moves them by percents: a
    # 12-task batch instead of 24 logs 3.671 / 3.170 against 3.629 / 3.086.
    assert len(losses[1]) == 2
    np.testing.assert_allclose(losses[2][0], losses[1][0], rtol=1e-5)
    np.testing.assert_allclose(losses[2][1], losses[1][1], rtol=1e-3)
    bad = [sys.executable, "-m", "maml_jax", "train", "sinusoid", "--workdir", str(tmp_path / "bad"), *flags]
    out = subprocess.run([*bad, "--config.num_devices=4"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "xla_force_host_platform_device_count=4" in out.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ``maml-jax train`` in which process 1 (argv[1]) alone sends itself SIGTERM while its first chunk
# (steps 0-50) is booked, as when a scheduler stops one host of a job
SIGTERM_IN_PROCESS_1 = """
import os, signal, sys
from maml_jax import experiment
from maml_jax.cli import main

if sys.argv[1] == "1":
    concat, calls = experiment._concat, []

    def concat_then_signal(pending, metrics):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return concat(pending, metrics)

    experiment._concat = concat_then_signal
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_with_distributed_stop_together_resume_and_train_as_one_process_with_two_devices(tmp_path):
    """Multi-host, on one machine: two ``maml-jax train --distributed`` processes (one CPU device
    each, gloo collectives) split every task batch over both processes' devices. A SIGTERM that
    reaches process 1 alone stops both at step 50 with one checkpoint (exit 143); the same command
    then resumes both to step 200, and they log the meta-losses of one process with two devices
    trained without a stop. Only process 0 writes the run's files (one row per step, one sessions
    line per start); both write the Orbax checkpoints."""
    flags = ["--no-progress", "--config.num_iterations=200", "--config.steps_per_call=50", "--config.log_every=100"]
    flags += ["--config.checkpoint_every=100", "--config.meta_batch_size=24", "--config.eval_num_tasks=10"]
    flags += ["--config.baselines=", "--config.eval_shots=10", "--config.num_devices=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())  # one device per process

    one = tmp_path / "one_process"
    cmd = [sys.executable, "-m", "maml_jax", "train", "sinusoid", "--workdir", str(one), "--cpu-devices", "2", *flags]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]

    two = tmp_path / "two_processes"
    for run_start, expected_code in (("signal in process 1", 143), ("resume", 0)):
        cluster = ["--distributed", "--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2"]
        train = ["train", "sinusoid", "--workdir", str(two), *flags, *cluster]
        head = [sys.executable, "-c", SIGTERM_IN_PROCESS_1] if expected_code else [sys.executable, "-m", "maml_jax"]
        procs = []
        for i in (0, 1):
            argv = [*head, str(i), *train] if expected_code else [*head, *train]
            procs.append(
                subprocess.Popen(
                    [*argv, "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        try:
            outs = [p.communicate(timeout=180) for p in procs]  # a process left behind waits forever
        finally:
            for p in procs:
                p.kill()
        for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
            assert p.returncode == expected_code, (run_start, i, err[-2000:])
            assert f"process {i} of 2: 2 devices in all" in err
            if expected_code:
                assert "SIGTERM at step 50: checkpoint saved" in err, (i, err[-2000:])
        if expected_code:
            assert sorted(p.name for p in (two / "maml" / "checkpoints").iterdir()) == ["50"]
    assert "maml: resuming from the checkpoint at step 50 of 200" in outs[0][0]
    run = json.loads((two / "run.json").read_text())
    assert len(run["task_devices"]) == 2 and len(run["devices"]) == 2
    assert len((two / "sessions.jsonl").read_text().splitlines()) == 2
    rows = metric_rows(two)
    assert [r["step"] for r in rows] == [100, 200]  # process 1 wrote no rows of its own
    expected = [r["meta_loss"] for r in metric_rows(one)]
    np.testing.assert_allclose([r["meta_loss"] for r in rows], expected, rtol=1e-6)
    assert {"100", "200"} <= {p.name for p in (two / "maml" / "checkpoints").iterdir()}
    mse = [json.loads((d / "eval.json").read_text())["results"]["maml"]["by_shots"]["10"]["mse"] for d in (one, two)]
    np.testing.assert_allclose(mse[1]["1"][0], mse[0]["1"][0], rtol=1e-5)


def test_distributed_options_need_distributed(tmp_path, capsys):
    from maml_jax.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "sinusoid", "--workdir", str(tmp_path / "r"), "--num-processes", "2"])
    assert exc.value.code == 2 and "need --distributed" in capsys.readouterr().err
