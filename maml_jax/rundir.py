"""Run directories: everything needed to reproduce and inspect a run, beside its checkpoints.

Layout of ``workdir``::

    config.json       the resolved config
    run.json          seed, command, git commit, package versions, devices, start time
    metrics.jsonl     one JSON object per log row (``metrics.csv``: the same rows)
    <label>/checkpoint.msgpack   latest TrainState of each trained model (atomic writes)
    <label>/params.msgpack       final meta-parameters
    eval.json         meta-test results
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import flax.serialization
import jax

from maml_jax.files import atomic_write_bytes

PACKAGES = ("maml_jax", "jax", "jaxlib", "optax", "flax", "chex", "numpy")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_run_metadata(workdir: Path, config_dict: dict, seed: int) -> None:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "config.json", config_dict)
    meta = {
        "seed": seed,
        "command": sys.argv,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "versions": package_versions(),
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
    }
    write_json(workdir / "run.json", meta)


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` (CSV columns from the first row)."""

    def __init__(self, workdir: Path):
        self.jsonl = Path(workdir) / "metrics.jsonl"
        self.csv = Path(workdir) / "metrics.csv"

    def write(self, row: dict[str, Any]) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        new = not self.csv.exists()
        fields = sorted(row) if new else next(csv.reader(open(self.csv)))
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def save_pytree(path: Path, tree: Any) -> None:
    atomic_write_bytes(path, flax.serialization.to_bytes(jax.device_get(tree)))


def load_pytree(path: Path, template: Any) -> Any:
    """Restore a pytree saved by ``save_pytree`` into the structure of ``template``."""
    data = Path(path).read_bytes()
    try:
        return flax.serialization.from_bytes(template, data)
    except Exception as err:  # msgpack/structure errors come in many types
        raise ValueError(f"cannot restore {path}: incompatible or corrupt checkpoint ({err})") from err
