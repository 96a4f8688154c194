"""Run directories: everything needed to reproduce and inspect a run, beside its checkpoints.

Layout of ``workdir``::

    config.json       the resolved config
    run.json          seed, command, git commit, package versions, devices (and the ones the
                      task batch is split over), the task map used, start time
    sessions.jsonl    the same, one line per start or resume (a run resumed on another
                      machine, e.g. a GPU, keeps where each part of it ran)
    metrics.jsonl     one JSON object per log row (``metrics.csv``: the same rows); only
                      values determined by config + seed (timings are in ``timing.jsonl``)
    tb/<label>/       TensorBoard event files of the same scalars
    <label>/checkpoints/<step>/  Orbax checkpoints of each trained model (``maml_jax.checkpoint``)
    <label>/checkpoint.msgpack   the same in the format of runs made before Orbax (read only)
    <label>/params.msgpack       final meta-parameters
    eval.json         meta-test results
"""

from __future__ import annotations

import csv
import datetime
import importlib
import importlib.metadata
import io
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import flax.serialization
import jax

from maml_jax.files import atomic_write_bytes
from maml_jax.host import available_cpus

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


def write_run_metadata(
    workdir: Path,
    config_dict: dict,
    seed: int,
    task_devices: list[str] | None = None,
    task_map: str | None = None,
    conv_impl: str | None = None,
) -> None:
    """``config.json``, and ``run.json`` plus one line of ``sessions.jsonl`` for this start:
    seed, command, commit, versions, the visible devices and CPUs, ``XLA_FLAGS``, the compilation
    cache directory (``None`` without one), ``task_devices``, the
    devices the task batch is split over (default the first device), and ``task_map``, the task
    map the config's resolves to on this backend (``"auto"`` → ``"map"`` or ``"vmap"``), and
    ``conv_impl``, the conv4 convolution it resolves to (``"auto"`` → ``models.conv4.resolve_conv_impl``;
    ``None`` for the MLP)."""
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
        "task_devices": task_devices if task_devices is not None else [str(jax.devices()[0])],
        "task_map": task_map,
        "conv_impl": conv_impl,
        "cpus": available_cpus(),  # the affinity mask (maml-jax train --cpus)
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS"),  # e.g. an LLVM optimisation level, which may change the bits
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # the huge-page malloc (maml_jax.host); same bits
        "compile_cache": jax.config.jax_compilation_cache_dir,  # maml-jax train --compile-cache
    }
    write_json(workdir / "run.json", meta)
    with open(workdir / "sessions.jsonl", "a") as f:
        f.write(json.dumps(meta, sort_keys=True) + "\n")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` (CSV columns from the first row),
    wall-clock measurements to ``timing.jsonl``, and every numeric value of a row as a
    TensorBoard scalar to ``tb/<run>/`` (``tensorboard --logdir runs/``).

    ``metrics.*`` hold only values that are a function of the config and seed, so that two
    runs of one config on one machine write identical files; timings go to ``timing.jsonl``.
    Without ``tensorboardX`` (a dependency, but missing from some prepared images) it warns
    once, when created, and writes no event files; training goes on.
    """

    def __init__(self, workdir: Path, *, tensorboard: bool = True, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled  # False: write nothing (the non-primary processes of a multi-process job)
        self.jsonl = self.workdir / "metrics.jsonl"
        self.csv = self.workdir / "metrics.csv"
        self.timing = self.workdir / "timing.jsonl"
        if tensorboard and enabled and not _importable("tensorboardX"):
            warnings.warn(
                "tensorboardX is not installed, so no TensorBoard event files are written (metrics.jsonl "
                "and metrics.csv are); install it with `pip install tensorboardX`",
                stacklevel=2,
            )
            tensorboard = False
        self.tensorboard = tensorboard
        self._tb: dict[str, Any] = {}  # run label -> tensorboardX SummaryWriter

    def write(self, row: dict[str, Any], timing: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        new = not self.csv.exists()
        if new:
            fields = sorted(row)
        else:
            with open(self.csv, newline="") as f:
                fields = next(csv.reader(f))
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if timing:
            with open(self.timing, "a") as f:
                f.write(json.dumps({"run": row.get("run"), "step": row.get("step"), **timing}, sort_keys=True) + "\n")
        if self.tensorboard and "step" in row:
            tb = self._summary_writer(str(row.get("run", "train")))
            scalars = {**row, **(timing or {})}
            for k, v in sorted(scalars.items()):
                if k not in ("run", "step") and isinstance(v, int | float) and not isinstance(v, bool):
                    tb.add_scalar(k, v, global_step=int(row["step"]))
            tb.flush()

    def drop_rows_after(self, run: str, step: int) -> int:
        """Remove ``run``'s rows logged after ``step`` from ``metrics.jsonl``, ``metrics.csv``
        and ``timing.jsonl``; returns how many metric rows went. A run resumed from its
        checkpoint at ``step`` logs those steps again, so a crash between a log row and the
        next checkpoint leaves no duplicate rows (the files then equal an uninterrupted run's).
        """

        if not self.enabled:
            return 0

        def later(r: dict) -> bool:
            return r.get("run") == run and r.get("step") is not None and int(r["step"]) > step

        def drop_from_jsonl(path: Path) -> int:
            if not path.exists():
                return 0
            lines = path.read_text().splitlines(keepends=True)
            keep = [line for line in lines if not later(json.loads(line))]
            if len(keep) != len(lines):
                atomic_write_bytes(path, "".join(keep).encode())
            return len(lines) - len(keep)

        drop_from_jsonl(self.timing)
        dropped = drop_from_jsonl(self.jsonl)
        if dropped and self.csv.exists():
            with open(self.csv, newline="") as f:
                header, *rows = list(csv.reader(f))
            keep = [r for r in rows if not later(dict(zip(header, r, strict=True)))]
            buf = io.StringIO(newline="")
            csv.writer(buf).writerows([header, *keep])
            atomic_write_bytes(self.csv, buf.getvalue().encode())
        return dropped

    def _summary_writer(self, run: str):
        if run not in self._tb:
            from tensorboardX import SummaryWriter  # checked importable when the writer was made

            self._tb[run] = SummaryWriter(logdir=str(self.workdir / "tb" / run))
        return self._tb[run]

    def close(self) -> None:
        for tb in self._tb.values():
            tb.close()
        self._tb.clear()


def save_pytree(path: Path, tree: Any) -> None:
    atomic_write_bytes(path, flax.serialization.to_bytes(jax.device_get(tree)))


def load_pytree(path: Path, template: Any) -> Any:
    """Restore a pytree saved by ``save_pytree`` into the structure of ``template``."""
    data = Path(path).read_bytes()
    try:
        return flax.serialization.from_bytes(template, data)
    except Exception as err:  # msgpack/structure errors come in many types
        raise ValueError(f"cannot restore {path}: incompatible or corrupt checkpoint ({err})") from err
