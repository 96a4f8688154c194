"""The Colab notebooks run end to end on CPU with small parameters.

Each notebook's code cells are joined into one script and run in a fresh interpreter, the way
papermill runs a notebook: the cell tagged ``colab-install`` (clone + pip install) is skipped,
since the test environment has the package installed, and the values given here are assigned
right after the cell tagged ``parameters``. ``IPython.display.Image`` is replaced by a stub
that records which file was displayed, so that neither IPython nor a kernel is needed.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from algo_harness import SHARED_OMNIGLOT
from run_files import metric_rows

from maml_jax.compile_cache import cache_entries

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

DISPLAY_STUB = """
import sys, types
_display = types.ModuleType("IPython.display")
def Image(filename):
    print("displayed", filename)
_display.Image = Image
_ipython = types.ModuleType("IPython")
_ipython.get_ipython = lambda: None  # what matplotlib asks a loaded IPython: not running inside it,
_ipython.version_info = (99, 0)  # and new enough that it needs no backend fix-up
sys.modules["IPython"] = _ipython
sys.modules["IPython.display"] = _display
"""


def notebook_script(path: Path, parameters: dict[str, object]) -> str:
    """The code cells of ``path`` as one script, ``parameters`` assigned after the cell tagged
    ``parameters``. Every name in ``parameters`` must be assigned in that cell, so a renamed
    parameter fails here instead of being silently ignored."""
    cells = json.loads(path.read_text())["cells"]
    parts, seen_parameters = [DISPLAY_STUB], False
    for cell in cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell["cell_type"] != "code" or "colab-install" in tags:
            continue
        source = "".join(cell["source"])
        parts.append(source)
        if "parameters" in tags:
            seen_parameters = True
            assigned = {
                name.id
                for node in ast.parse(source).body
                if isinstance(node, ast.Assign | ast.AnnAssign)
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                for name in ast.walk(target)
                if isinstance(name, ast.Name)
            }
            unknown = set(parameters) - assigned
            assert not unknown, f"{path.name}: the parameters cell assigns no {sorted(unknown)}"
            parts.append("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    assert seen_parameters, f"{path.name} has no cell tagged 'parameters'"
    return "\n\n".join(parts)


def run_notebook(name: str, parameters: dict[str, object], cwd: Path) -> str:
    script = notebook_script(NOTEBOOKS / name, parameters)
    # on CPU whatever the host has (the Omniglot notebook picks its layout by backend), and the
    # package importable from the repository even without an install
    path = os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_notebook_script_injects_parameters_and_skips_install(tmp_path):
    nb = {
        "cells": [
            {"cell_type": "code", "metadata": {"tags": ["colab-install"]}, "source": ["raise SystemExit(3)"]},
            {
                "cell_type": "code",
                "metadata": {"tags": ["parameters"]},
                "source": ["N = 100\n", "M: int = 2\n", "A, B = 1, 2"],
            },
            {"cell_type": "markdown", "metadata": {}, "source": ["N = 0"]},
            {"cell_type": "code", "metadata": {}, "source": ["print(N * M)"]},
        ]
    }
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    script = notebook_script(path, {"N": 7, "M": 3, "B": 5})
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "21"
    with pytest.raises(AssertionError, match="assigns no"):
        notebook_script(path, {"STEPS": 1})


def test_sinusoid_notebook_trains_and_plots(tmp_path):
    out = run_notebook(
        "sinusoid_maml.ipynb", {"META_ITERATIONS": 200, "STEPS_PER_CALL": 100, "EVAL_TASKS": 20}, tmp_path
    )
    assert "step    200" in out
    for k in (0, 1, 10):
        assert f"K=10, {k:2d} steps: MSE" in out
    assert (tmp_path / "sinusoid_adaptation.png").stat().st_size > 0
    assert "displayed sinusoid_adaptation.png" in out


def test_omniglot_notebook_trains_evaluates_and_plots(tmp_path):
    if not (SHARED_OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot not found in {SHARED_OMNIGLOT}")
    workdir = tmp_path / "run"
    params = {
        "NUM_ITERATIONS": 2,
        "EVAL_NUM_TASKS": 10,
        "DATA_DIR": str(SHARED_OMNIGLOT),
        "WORKDIR": str(workdir),
        "COMPILE_CACHE": str(tmp_path / "xla"),
    }
    out = run_notebook("omniglot_maml.ipynb", params, tmp_path)
    # the compilation cache was on before the first compilation: the run's programs are in it
    assert f"compile cache in {tmp_path / 'xla'}" in out and cache_entries(tmp_path / "xla")
    assert json.loads((workdir / "run.json").read_text())["compile_cache"] == str(tmp_path / "xla")
    # LAYOUT "auto" on CPU keeps the library's CPU defaults (the GPU layout runs in the test
    # below; the TPU layout's grouped convolutions are too slow on XLA:CPU for the test suite)
    assert "'conv_impl': 'patches', 'task_map': 'map', 'num_devices': 1" in out
    config = json.loads((workdir / "config.json").read_text())
    assert config["num_iterations"] == 2 and config["name"] == "omniglot_5w1s"
    steps = [r["step"] for r in metric_rows(workdir)]
    assert steps and steps[-1] == 2
    evaluation = json.loads((workdir / "eval.json").read_text())
    assert evaluation["num_tasks"] == 10
    assert (workdir / "learning_curves.png").stat().st_size > 0
    assert f"displayed {workdir / 'learning_curves.png'}" in out


def test_omniglot_notebook_gpu_layout_trains_with_patches_and_vmap_on_all_devices(tmp_path):
    """LAYOUT "gpu" (what "auto" picks on a GPU runtime) forced on CPU: the settings that the
    notebook hands the entry point on a GPU run here through training (speed is the GPU's)."""
    if not (SHARED_OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot not found in {SHARED_OMNIGLOT}")
    workdir = tmp_path / "run"
    params = {"NUM_ITERATIONS": 2, "EVAL_NUM_TASKS": 2, "DATA_DIR": str(SHARED_OMNIGLOT), "WORKDIR": str(workdir)}
    out = run_notebook("omniglot_maml.ipynb", dict(params, LAYOUT="gpu"), tmp_path)
    assert "'conv_impl': 'patches', 'task_map': 'vmap', 'num_devices': 0" in out
    config = json.loads((workdir / "config.json").read_text())
    assert (config["conv_impl"], config["task_map"], config["num_devices"]) == ("patches", "vmap", 0)
    assert [r["step"] for r in metric_rows(workdir)][-1] == 2


def test_omniglot_notebook_refuses_an_unknown_layout(tmp_path):
    """A typo, or the old "accelerator", must not silently train with the CPU settings."""
    if not (SHARED_OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot not found in {SHARED_OMNIGLOT}")
    params = {"NUM_ITERATIONS": 1, "DATA_DIR": str(SHARED_OMNIGLOT), "WORKDIR": str(tmp_path / "run")}
    with pytest.raises(AssertionError, match="LAYOUT must be"):
        run_notebook("omniglot_maml.ipynb", dict(params, LAYOUT="accelerator"), tmp_path)
    assert not (tmp_path / "run" / "metrics.csv").exists()
