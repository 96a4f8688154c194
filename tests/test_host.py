"""host.limit_cpus: the affinity mask is set before JAX's backend exists, and refused after."""

import json
import os
import subprocess
import sys

import jax
import pytest

from maml_jax import bench, host
from maml_jax.cli import main

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="affinity masks are Linux-only")


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_limit_cpus_before_jax_starts_pins_the_process():
    out = run_python(
        "import os, json, jax.numpy as jnp\n"
        "from maml_jax.host import limit_cpus\n"
        "kept = limit_cpus(1)\n"
        "float(jnp.ones(3).sum())\n"  # the backend starts on the kept CPU
        "print(json.dumps([kept, sorted(os.sched_getaffinity(0))]))"
    )
    kept, mask = json.loads(out)
    assert kept == mask == host.available_cpus()[:1]


def test_limit_cpus_after_jax_started_is_refused():
    jax.devices()  # this test process's backend exists
    with pytest.raises(RuntimeError, match="before JAX creates its backends"):
        host.limit_cpus(1)


@pytest.mark.parametrize("n", [0, -1, 10**6, 1.5, True])
def test_limit_cpus_rejects_counts_outside_the_mask(n):
    with pytest.raises(ValueError, match="cpus must be an integer in 1"):
        host.limit_cpus(n)


def test_train_cli_rejects_bad_cpus(capsys):
    with pytest.raises(SystemExit):
        main(["train", "sinusoid", "--cpus", "0"])
    assert "--cpus: cpus must be an integer" in capsys.readouterr().err


def test_bench_runs_the_sinusoid_on_one_cpu_by_default():
    args = ["--workload", "sinusoid", "--iters", "2", "--warmup", "0", "--tasks", "2"]
    cmd = [sys.executable, "-m", "maml_jax.bench", *args]
    one = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert one["cpus"] == bench.DEFAULT_CPUS["mlp"] == 1
    every = json.loads(subprocess.run(cmd + ["--cpus", "0"], capture_output=True, text=True, check=True).stdout)
    assert every["cpus"] == len(host.available_cpus())


def test_rounds_report_medians_of_ours_and_each_peer():
    rates = [(3, 1), (1, 5), (2, 2)]  # (ours, peer a) per round
    rounds = [({"it_per_s": r, "workload": "w"}, {"a": {"it_per_s": p, "peer": "a"}}) for r, p in rates]
    combined = bench._combine_rounds(rounds)
    assert combined["it_per_s"] == 2 and combined["it_per_s_rounds"] == [3, 1, 2]
    assert combined["peers"]["a"]["it_per_s"] == 2 and combined["peers"]["a"]["it_per_s_rounds"] == [1, 5, 2]


def test_request_cpu_devices_before_jax_starts_then_train_splits_tasks_over_them(tmp_path):
    out = run_python(
        "import jax\nfrom maml_jax.host import request_cpu_devices\nprint(request_cpu_devices(3), jax.device_count())"
    )
    assert out.split() == ["3", "3"]
    # the train CLI: --cpu-devices 2 with --config.num_devices=0 (all devices) splits the task batch
    from test_algorithm_runs import TINY_SINUSOID

    cmd = [sys.executable, "-m", "maml_jax", "train", "sinusoid", "--workdir", str(tmp_path / "r"), *TINY_SINUSOID]
    subprocess.run([*cmd, "--cpu-devices", "2", "--config.num_devices=0"], capture_output=True, check=True)
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert len(run["devices"]) == 2 and run["task_devices"] == run["devices"]  # names vary by jax version


def test_request_cpu_devices_after_jax_started_keeps_the_count():
    """Once the backends exist, a request for another count changes nothing: the existing CPU
    device count comes back (not the count asked for) and ``jax_num_cpu_devices`` is left as it
    was (jax would refuse the update with a RuntimeError anyway)."""
    count = len(jax.devices("cpu"))  # this test process's backends exist from here on
    setting = jax.config.jax_num_cpu_devices
    for asked in (count + 3, 1 if count > 1 else 2):  # never the count the platform has
        assert asked != count
        assert host.request_cpu_devices(asked) == count
        assert jax.config.jax_num_cpu_devices == setting
        assert len(jax.devices("cpu")) == count
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="CPU devices"):
            host.request_cpu_devices(bad)
