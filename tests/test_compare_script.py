"""experiments/compare_algorithms.py: one command per row, a table from the runs' eval.json."""

import json
import shlex

import pytest
from experiment_scripts import load

from maml_jax.algorithms.registry import ALGORITHMS
from maml_jax.config import apply_overrides, load_config


@pytest.fixture(scope="module")
def compare():
    return load("compare_algorithms")


def test_rows_cover_the_family_and_fomaml(compare):
    assert set(compare.rows("omniglot_5w1s")) == {*ALGORITHMS, "fomaml"}
    assert "protonets" not in compare.rows("sinusoid")
    assert compare.algorithm_flags("fomaml") == ["--config.algorithm=maml", "--config.first_order=true"]


def test_table_only_reads_each_row_and_writes_runnable_commands(compare, tmp_path, capsys):
    run = tmp_path / "maml"
    run.mkdir()
    by_shots = {"10": {"mse": {"0": [3.0, 0.2, 2.9], "1": [0.5, 0.04, 0.4], "10": [0.1, 0.01, 0.09]}}}
    (run / "eval.json").write_text(json.dumps({"results": {"maml": {"by_shots": by_shots}}}))
    argv = ["sinusoid", "--iterations", "50", "--out", str(tmp_path), "--table-only"]
    assert compare.main(argv) == 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| algorithm | metric | after 0 steps | after 1 step | after 10 steps |")
    assert table[2].startswith("| maml | mse | 3.000 ± 0.200 | 0.500 ± 0.040 | 0.100 ± 0.010 |")
    assert any(line.startswith("| reptile | (run did not finish)") for line in table)
    commands = json.loads((tmp_path / "commands.json").read_text())
    assert set(commands) == set(compare.rows("sinusoid"))
    for name, cmd in commands.items():  # every row's command names a config and parses
        args = shlex.split(cmd)
        assert args[:3] == ["maml-jax", "train", "sinusoid"] and f"{tmp_path / name}" in args
        overrides = dict(a[len("--config.") :].split("=", 1) for a in args if a.startswith("--config."))
        apply_overrides(load_config("sinusoid"), overrides)  # raises ConfigError if invalid


def test_table_header_names_the_evaluated_step_counts(compare, tmp_path):
    """20-way configs evaluate after 0/5/10 steps: the header must say 5, not 1."""
    for name, steps in [("maml", ["0", "5", "10"]), ("anil", ["0", "5", "10"]), ("boil", ["0", "1", "10"])]:
        (tmp_path / name).mkdir()
        accuracy = {k: [0.5, 0.01, 0.5] for k in steps}
        (tmp_path / name / "eval.json").write_text(
            json.dumps({"results": {name: {"by_shots": {"1": {"accuracy": accuracy}}}}})
        )
    header = compare.table(tmp_path, ["maml", "anil", "reptile"], {}).splitlines()[0]
    assert header.startswith("| algorithm | metric | after 0 steps | after 5 steps | after 10 steps |")
    with pytest.raises(ValueError, match="boil was evaluated after"):
        compare.table(tmp_path, ["maml", "boil"], {})
