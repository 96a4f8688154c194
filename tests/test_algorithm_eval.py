"""Meta-test evaluation through ``Algorithm.evaluate`` equals the SGD adaptation curve for MAML."""

import dataclasses

import jax
import numpy as np

from maml_jax.algorithms import maml
from maml_jax.config import Config
from maml_jax.task_families import build_task_family


def test_sinusoid_evaluator_with_the_maml_algorithm_matches_the_sgd_curve():
    config = dataclasses.replace(Config(), hidden_sizes=(8,), eval_inner_steps=(0, 1, 3), eval_grid_points=11)
    family = build_task_family(config)
    params = family.model.init(jax.random.PRNGKey(0), family.example_x)
    alg = maml(family.task_loss_fn, num_inner_steps=1, inner_lr=0.02)
    kw = dict(inner_lr=0.02, seed=3, num_tasks=6, shots=[5])
    ref = family.evaluate(params, **kw)[5]["mse"]
    got = family.evaluate(params, algorithm=alg, **kw)[5]["mse"]
    assert set(got) == {0, 1, 3}
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5)
    assert got[3][0] != got[0][0]  # the columns are distinct step counts, not one repeated
