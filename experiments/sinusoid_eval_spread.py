"""How much do the sinusoid figures move with the draw of the 600 evaluation tasks, and which
tasks carry a large mean? Reads a run directory written by ``maml-jax train sinusoid``.

    python experiments/sinusoid_eval_spread.py runs/sinusoid-seed0 [--seeds 6]

Prints, for evaluation seeds 0..n-1, the pre-update and post-update MSE of the run's MAML
model (K = 5, 10, 20); then the three worst K=5 tasks of the run's own evaluation seed after
10 steps (a NaN ranks worst), with the mean of the remaining tasks.
"""

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from maml_jax import adaptation_curve, mse_loss, rundir
from maml_jax.config import config_from_dict
from maml_jax.data import sinusoid
from maml_jax.evaluate import summarize_curve
from maml_jax.task_families import build_task_family


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--seeds", type=int, default=6)
    a = ap.parse_args()
    raw = json.loads((a.run_dir / "config.json").read_text())
    config = config_from_dict(raw)
    family = build_task_family(config)
    model, evaluate = family.model, family.evaluate
    template = model.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.float32))
    params = rundir.load_pytree(a.run_dir / "maml" / "params.msgpack", template)
    print("eval seed | K=5: 0 / 1 / 10 steps | K=10 | K=20")
    for seed in range(a.seeds):
        r = evaluate(params, inner_lr=config.inner_lr, seed=seed, num_tasks=config.eval_num_tasks, shots=(5, 10, 20))
        cells = [" / ".join(f"{r[k]['mse'][s][0]:.3f}" for s in (0, 1, 10)) for k in (5, 10, 20)]
        print(f"{seed} | " + " | ".join(cells))
    tasks, fns = sinusoid.sample_eval_tasks(jax.random.PRNGKey(config.eval_seed), config.eval_num_tasks, 5)
    curve = np.asarray(
        adaptation_curve(
            params,
            tasks,
            mse_loss(model.apply),
            num_inner_steps=10,
            inner_lr=config.inner_lr,
            inner_grad_clip=config.inner_grad_clip,
        )["loss"]
    )
    final = np.where(np.isnan(curve[:, 10]), np.inf, curve[:, 10])  # a NaN task diverged: rank it worst
    worst = np.argsort(-final)[:3]
    for i in worst:
        print(
            f"task {i}: amplitude {float(fns.amplitude[i]):.2f}, "
            f"support x {np.round(np.sort(tasks.support.x[i, :, 0]), 2)}, "
            f"MSE after 1 step {curve[i, 1]:.3f}, after 10 steps {curve[i, 10]:.3f}"
        )
    rest = np.delete(final, worst)
    mean, _, median, nonfinite = summarize_curve({"mse": curve}, [10])["mse"][10]
    print(
        f"K=5, 10 steps: mean {mean:.3f}, median {median:.3f}, "
        f"{nonfinite} non-finite, mean without the 3 worst tasks {rest.mean():.3f}"
    )


if __name__ == "__main__":
    main()
