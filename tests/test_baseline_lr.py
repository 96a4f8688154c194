"""``experiment.tune_baseline_lr``: the pretrained baseline's fine-tuning step size, picked per K
from ``config.baseline_lr_grid`` on validation tasks. A fake evaluator with the real signature
(``TaskFamily.evaluate``) stands in for adaptation, so these run instantly."""

import math

import pytest

from maml_jax.config import Config
from maml_jax.experiment import tune_baseline_lr

GRID = (0.001, 0.01, 0.1)


def fake_evaluator(metric, scores):
    """``evaluate(params, *, inner_lr, seed, num_tasks, shots, algorithm=None)`` returning
    ``{K: {metric: {steps: (mean, ci95, median)}}}`` with ``mean = scores[inner_lr][K][steps]``;
    its calls are recorded in ``evaluate.calls``."""

    def evaluate(params, *, inner_lr, seed, num_tasks, shots, algorithm=None):
        evaluate.calls.append({"params": params, "inner_lr": inner_lr, "seed": seed, "num_tasks": num_tasks})
        out = {}
        for k in shots:
            curve = {s: (v, 0.1, v) for s, v in scores[inner_lr][k].items()}
            out[k] = {metric: curve, "loss": {s: (0.0, 0.0, 0.0) for s in curve}}  # "loss": a decoy metric
        return out

    evaluate.calls = []
    return evaluate


def test_mse_picks_the_lowest_mean_post_update_mse_for_each_k():
    config = Config(dataset="sinusoid", eval_inner_steps=(0, 1, 10), baseline_lr_grid=GRID)
    scores = {
        # K=5: 0.01 has the lowest mean over steps 1 and 10 ((2+1)/2 = 1.5 vs 2.5 and 2.0), though
        # 0.001 is lowest after 1 step and 0.1 after 10 steps; step 0 (before adapting) is not counted
        0.001: {5: {0: 0.0, 1: 1.0, 10: 4.0}, 10: {0: 9.0, 1: 3.0, 10: 3.0}},
        0.01: {5: {0: 9.0, 1: 2.0, 10: 1.0}, 10: {0: 9.0, 1: 2.0, 10: 2.0}},
        0.1: {5: {0: 9.0, 1: 3.5, 10: 0.5}, 10: {0: 0.0, 1: 1.0, 10: 1.0}},
    }
    evaluate = fake_evaluator("mse", scores)
    params = object()
    assert tune_baseline_lr(config, evaluate, params, (5, 10)) == {5: 0.01, 10: 0.1}
    # every grid step size once, on the given parameters and on validation tasks whose seed is
    # disjoint from the meta-test tasks' (eval_seed)
    assert [c["inner_lr"] for c in evaluate.calls] == list(GRID)
    assert all(c["params"] is params and c["seed"] == config.eval_seed + 1 for c in evaluate.calls)
    assert all(c["num_tasks"] == 100 for c in evaluate.calls)


def test_accuracy_picks_the_highest_mean_post_update_accuracy():
    config = Config(dataset="omniglot", model="conv4", shots=1, eval_inner_steps=(0, 1, 5), baseline_lr_grid=GRID)
    scores = {
        0.001: {1: {0: 0.99, 1: 0.40, 5: 0.50}},
        0.01: {1: {0: 0.20, 1: 0.70, 5: 0.90}},  # highest mean over steps 1 and 5
        0.1: {1: {0: 0.20, 1: 0.80, 5: 0.60}},  # highest after 1 step only
    }
    assert tune_baseline_lr(config, fake_evaluator("accuracy", scores), None, (1,)) == {1: 0.01}


def test_only_step_zero_reported_scores_the_unadapted_model():
    # with no step count > 0 to average, step 0 is what is compared
    config = Config(dataset="sinusoid", eval_inner_steps=(0,), baseline_lr_grid=GRID)
    scores = {0.001: {5: {0: 3.0}}, 0.01: {5: {0: 1.0}}, 0.1: {5: {0: 2.0}}}
    assert tune_baseline_lr(config, fake_evaluator("mse", scores), None, (5,)) == {5: 0.01}


@pytest.mark.parametrize(
    ("metric", "bad"),
    [("mse", math.nan), ("mse", math.inf), ("mse", -math.inf), ("accuracy", math.nan), ("accuracy", math.inf)],
)
def test_a_step_size_scoring_nan_or_inf_loses(metric, bad):
    # a diverging step size ranks worst, below every finite score; compared as a number it could
    # win: np.argmin stops at a NaN, -inf is the lowest MSE and +inf the highest accuracy
    dataset = "sinusoid" if metric == "mse" else "omniglot"
    worst_finite = 1e6 if metric == "mse" else -1e6
    config = Config(dataset=dataset, eval_inner_steps=(0, 1, 10), baseline_lr_grid=GRID)
    scores = {
        0.001: {5: {0: 0.5, 1: worst_finite, 10: worst_finite}},
        0.01: {5: {0: 0.5, 1: bad, 10: 0.5}},  # non-finite after 1 step: its mean is non-finite too
        0.1: {5: {0: 0.5, 1: bad, 10: bad}},
    }
    assert tune_baseline_lr(config, fake_evaluator(metric, scores), None, (5,)) == {5: 0.001}


def test_every_step_size_diverging_keeps_the_first_and_warns():
    config = Config(dataset="sinusoid", eval_inner_steps=(0, 1), baseline_lr_grid=GRID)
    scores = {lr: {5: {0: 0.5, 1: float("nan")}} for lr in GRID}
    with pytest.warns(UserWarning, match="every value of baseline_lr_grid .* diverged"):
        assert tune_baseline_lr(config, fake_evaluator("mse", scores), None, (5,)) == {5: GRID[0]}
