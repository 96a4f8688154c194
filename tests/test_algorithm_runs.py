"""Every algorithm of the registry trains and evaluates through the one entry point
(``maml-jax train --config.algorithm=NAME``), and ``maml-jax eval`` reloads its meta-parameters
(learned step sizes, LSTM weights, ...) and reproduces the numbers of ``eval.json``."""

import json

import numpy as np
import pytest

from maml_jax.algorithms.registry import ALGORITHMS
from maml_jax.cli import main

TINY_SINUSOID = [
    "--config.num_iterations=3",
    "--config.steps_per_call=3",
    "--config.log_every=3",
    "--config.checkpoint_every=3",
    "--config.hidden_sizes=8",
    "--config.meta_batch_size=2",
    "--config.num_inner_steps=2",
    "--config.baselines=",
    "--config.eval_num_tasks=4",
    "--config.eval_shots=5",
    "--config.eval_inner_steps=0,2",
    "--config.eval_grid_points=9",
    "--no-progress",
]
# same code path as another row (BOIL = ANIL's complement mask): slow
SINUSOID = [
    pytest.param(a, marks=pytest.mark.slow) if a == "boil" else a for a in ALGORITHMS if a not in ("protonets",)
]


@pytest.mark.parametrize("algorithm", SINUSOID)
def test_each_algorithm_trains_and_evaluates_the_sinusoid(algorithm, tmp_path, capsys):
    workdir = tmp_path / algorithm
    args = ["train", "sinusoid", "--workdir", str(workdir), f"--config.algorithm={algorithm}", *TINY_SINUSOID]
    assert main(args) == 0
    results = json.loads((workdir / "eval.json").read_text())["results"]
    assert list(results) == [algorithm]
    mse = results[algorithm]["by_shots"]["5"]["mse"]
    assert set(mse) == {"0", "2"} and all(np.isfinite(v[0]) for v in mse.values())
    # the evaluation adapts, and two inner steps on K=5 points lower the mean MSE of the 4 tasks
    # (measured 2.5 -> 2.0-2.3 for every algorithm after 3 meta-iterations)
    assert mse["2"][0] < mse["0"][0]
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(workdir)]) == 0
    again = json.loads((workdir / "eval-step3.json").read_text())["results"][algorithm]["by_shots"]["5"]["mse"]
    for k in mse:
        assert again[k][0] == pytest.approx(mse[k][0], rel=1e-5)


def test_protonets_on_sinusoid_is_a_config_error(tmp_path, capsys):
    args = ["train", "sinusoid", "--workdir", str(tmp_path / "p"), "--config.algorithm=protonets", *TINY_SINUSOID]
    assert main(args) == 2
    assert "protonets" in capsys.readouterr().err


def test_unknown_algorithm_is_a_config_error(tmp_path, capsys):
    assert main(["train", "sinusoid", "--workdir", str(tmp_path / "u"), "--config.algorithm=mamla"]) == 2
    assert "config.algorithm" in capsys.readouterr().err
