"""The shared algorithm-test harness (tests/algo_harness.py) on plain MAML."""

import numpy as np
from algo_harness import omniglot_problem, sinusoid_problem, train_briefly

from maml_jax.algorithms import maml


def test_maml_improves_the_sinusoid_post_adaptation_mse():
    problem = sinusoid_problem()
    result = train_briefly(maml(problem.task_loss_fn, num_inner_steps=1, inner_lr=0.01), problem, steps=300)
    assert result.meta_losses.shape == (300,)
    assert result.improved(margin=0.1), result[:2]


def test_omniglot_subset_problem_shapes(omniglot_subset):
    assert omniglot_subset.train.shape == (30, 20, 14, 14) and omniglot_subset.test.shape == (10, 20, 14, 14)
    assert omniglot_subset.train.dtype == np.uint8 and omniglot_subset.train.max() > 128
    problem = omniglot_problem(omniglot_subset, ways=5, shots=1, queries=3, num_eval_tasks=4)
    assert problem.eval_tasks.support.x.shape == (4, 5, 14, 14, 1)
    assert problem.eval_tasks.query.y.shape == (4, 15)
    assert problem.head in problem.init_params
