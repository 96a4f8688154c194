"""Does clipping the inner gradient at meta-test stop the sinusoid's 10-step divergence, and
what does it cost the tasks that did not diverge? Reads run directories written by
``maml-jax train sinusoid`` (trained without clipping) and re-evaluates their MAML model on the
run's own 600 evaluation tasks with ``inner_updates.clip_by_global_norm(sgd(α), c)``.

    python experiments/inner_clip_study.py runs/sinusoid-seed0 [RUN ...] [--clips 0 1 2 5 10]
        [--out experiments/results/sinusoid/inner_clip]

``c = 0`` is plain SGD (the published protocol). Prints, and with ``--out`` writes
``inner_clip.md`` / ``inner_clip.json``: per run, K and c the MSE mean ± 95% CI, median and
non-finite count after 1 and 10 steps, and the quantiles of the first inner gradient's norm
over tasks (what a threshold c is compared with).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from maml_jax import mse_loss, rundir
from maml_jax.data import sinusoid
from maml_jax.evaluate import adaptation_curve, summarize_curve
from maml_jax.experiment import load_trained
from maml_jax.inner_updates import sgd

SHOTS = (5, 10, 20)
STEPS = (1, 10)


def study(run_dir: Path, clips: list[float]) -> dict:
    """``{K: {"grad_norm_quantiles": {q: v}, "by_clip": {c: {steps: [mean, ci95, median, nonfinite]}}}}``."""
    config, model, params, _ = load_trained(run_dir)
    loss = mse_loss(model.apply)
    out = {}
    for k in SHOTS:
        tasks, _ = sinusoid.sample_eval_tasks(
            jax.random.PRNGKey(config.eval_seed), config.eval_num_tasks, k, config.eval_grid_points
        )
        grads = jax.vmap(lambda s: jax.grad(lambda p: loss(p, s)[0])(params))(tasks.support)
        norms = np.sqrt(sum(np.sum(np.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree.leaves(grads)))
        row = {"grad_norm_quantiles": {q: float(np.quantile(norms, q)) for q in (0.5, 0.9, 0.99, 1.0)}, "by_clip": {}}
        for c in clips:
            rule = sgd(config.inner_lr, c)  # c = 0: plain SGD
            curve = jax.jit(
                lambda p, t, rule=rule: adaptation_curve(p, t, loss, num_inner_steps=10, inner_update_fn=rule)
            )
            summary = summarize_curve(curve(params, tasks), list(STEPS))["loss"]
            row["by_clip"][c] = {s: [float(v) for v in summary[s]] for s in STEPS}
        out[k] = row
    return out


def table(results: dict) -> str:
    lines = [
        "| run | K | first inner gradient norm: median / 90% / 99% / max | c | 1 step: mean ± CI (median) "
        "| 10 steps: mean ± CI (median; non-finite) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run, by_k in results.items():
        for k, row in by_k.items():
            q = " / ".join(f"{v:.1f}" for v in row["grad_norm_quantiles"].values())
            for c, r in row["by_clip"].items():
                (m1, ci1, med1, _), (m10, ci10, med10, nf10) = r[1], r[10]
                lines.append(
                    f"| {run} | {k} | {q} | {'none' if c == 0 else f'{c:g}'} | {m1:.3f} ± {ci1:.3f} ({med1:.3f}) "
                    f"| {m10:.4g} ± {ci10:.3g} ({med10:.3f}; {int(nf10)}) |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--clips", nargs="+", type=float, default=[0, 1, 2, 5, 10])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if any(c < 0 for c in a.clips):
        ap.error("--clips must be >= 0 (0 = no clipping)")
    results = {}
    for run in a.runs:
        if not (run / "maml" / "params.msgpack").is_file():
            ap.error(f"{run}: no maml/params.msgpack (a finished maml-jax train sinusoid run directory?)")
        results[run.name] = study(run, a.clips)
        print(table({run.name: results[run.name]}), flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "inner_clip.md").write_text(table(results) + "\n")
        rundir.write_json(a.out / "inner_clip.json", {"clips": a.clips, "results": results})


if __name__ == "__main__":
    main()
