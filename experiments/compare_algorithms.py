"""Train every algorithm of the family on one protocol and write a comparison table.

Each row is one ``maml-jax train`` run (its command is printed and written beside the table),
so any row can be re-run alone. The protocol is shortened for a 2-core CPU (``--iterations``);
the published numbers in the README were obtained with the papers' full budgets.

    python experiments/compare_algorithms.py sinusoid --iterations 10000 --out experiments/results/compare_sinusoid
    python experiments/compare_algorithms.py omniglot_5w1s --iterations 300 --meta-batch 8 \\
        --eval-tasks 200 --data-dir ../shared/data/omniglot --out experiments/results/compare_omniglot_5w1s

Per-algorithm settings that differ from the config's MAML setup are in ``OVERRIDES`` (e.g.
Reptile and iMAML need several inner steps to do anything on one gradient step's budget).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from maml_jax.algorithms.registry import ALGORITHMS

# rows: every registered algorithm, plus first-order MAML (config.algorithm=maml, first_order)
ROWS = ("maml", "fomaml", *ALGORITHMS[1:])

# the extra flags of each row, on top of the config and the shared protocol flags
OVERRIDES: dict[str, dict[str, list[str]]] = {
    "sinusoid": {
        "reptile": ["--config.num_inner_steps=5", "--config.inner_lr=0.02"],
        # λ=2 (the default); λ=10 diverged here at step 4093 (CG on I + H/λ, H indefinite for the
        # ReLU MLP), and 5 inner steps at α=0.01 stay far from the proximal optimum either way
        "imaml": ["--config.num_inner_steps=5"],
        # with LSLR the learned step sizes (Adam at 1e-3 from 0.01) diverge by step ~300 here
        "maml++": ["--config.num_inner_steps=5", "--config.mamlpp_learned_inner_lrs=false"],
        "meta_lstm": ["--config.num_inner_steps=5"],
    },
    "omniglot": {
        "reptile": ["--config.num_inner_steps=5", "--config.inner_lr=0.1"],
        "imaml": ["--config.num_inner_steps=5", "--config.inner_lr=0.1"],
        "maml++": ["--config.num_inner_steps=5", "--config.inner_lr=0.1"],
        "meta_lstm": ["--config.num_inner_steps=5", "--config.inner_lr=0.1"],
    },
}


def rows(config: str) -> list[str]:
    return [a for a in ROWS if not (config == "sinusoid" and a == "protonets")]


def algorithm_flags(name: str) -> list[str]:
    """The config flags that select row ``name``."""
    if name == "fomaml":
        return ["--config.algorithm=maml", "--config.first_order=true"]
    return [f"--config.algorithm={name}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="config name, e.g. sinusoid or omniglot_5w1s")
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--meta-batch", type=int, default=None)
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--only", default=None, help="comma-separated algorithms (default: all)")
    ap.add_argument("--out", required=True, help="folder for the run directories and the table")
    ap.add_argument("--table-only", action="store_true", help="write table.md from the runs already in --out")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    family = "sinusoid" if a.config == "sinusoid" else "omniglot"
    shared = [f"--config.num_iterations={a.iterations}", f"--config.eval_num_tasks={a.eval_tasks}", "--no-progress"]
    shared += ["--config.baselines="] if family == "sinusoid" else []
    shared += ["--config.eval_shots=10"] if family == "sinusoid" else []
    shared += [f"--config.meta_batch_size={a.meta_batch}"] if a.meta_batch else []
    shared += [f"--config.data_dir={a.data_dir}"] if a.data_dir else []
    shared += [f"--config.log_every={min(1000, a.iterations)}", f"--config.checkpoint_every={a.iterations}"]
    shared += [f"--config.steps_per_call={min(100 if family == 'omniglot' else 500, a.iterations)}"]
    commands = {}
    for name in rows(a.config):
        flags = [*algorithm_flags(name), *OVERRIDES[family].get(name, [])]
        commands[name] = ["maml-jax", "train", a.config, "--workdir", str(out / name), *shared, *flags]
    commands = {name: shlex.join(cmd) for name, cmd in commands.items()}
    (out / "commands.json").write_text(json.dumps(commands, indent=1) + "\n")
    for name in [] if a.table_only else a.only.split(",") if a.only else rows(a.config):
        print(f"[{time.strftime('%H:%M:%S')}] {commands[name]}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "maml_jax", *shlex.split(commands[name])[1:]]).returncode
        print(f"  -> exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "table.md").write_text(table(out, rows(a.config), commands) + "\n")
    print((out / "table.md").read_text())
    return 0


def table(out: Path, names: list[str], commands: dict[str, str]) -> str:
    """Markdown table of each row's metric after the evaluated inner-step counts (from eval.json)."""
    found, steps = {}, None
    for name in names:
        path = out / name / "eval.json"
        if not path.is_file():
            continue
        (by_shots,) = json.loads(path.read_text())["results"][name]["by_shots"].values()
        metric = "mse" if "mse" in by_shots else "accuracy"
        scale, digits = (1.0, 3) if metric == "mse" else (100.0, 2)
        by_steps = sorted(by_shots[metric].items(), key=lambda kv: int(kv[0]))
        row_steps = [int(k) for k, _ in by_steps]
        if steps is not None and row_steps != steps:
            raise ValueError(f"{name} was evaluated after {row_steps} inner steps, the other rows after {steps}")
        steps = row_steps
        found[name] = [metric] + [f"{scale * v[0]:.{digits}f} ± {scale * v[1]:.{digits}f}" for _, v in by_steps]
    steps = steps or [0, 1, 10]
    after = [f"after {k} step" + ("" if k == 1 else "s") for k in steps]
    lines = ["| algorithm | metric | " + " | ".join(after) + " | command |", "|" + " --- |" * (len(steps) + 3)]
    for name in names:
        cells = found.get(name, ["(run did not finish)"] + [""] * len(steps))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | `{commands.get(name, '')}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
