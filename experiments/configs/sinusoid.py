"""Sinusoid regression, Finn et al. (2017) §5.1 / Fig. 2; MAML plus the "pretrained" baseline.

Command (CPU, about 3-4 minutes):

    maml-jax train sinusoid --workdir runs/sinusoid

Setup: A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]; MLP 1-40-40-1 ReLU; K=10 support and 10
query points; one inner SGD step with α = 0.01; meta-batch 25; Adam 1e-3; 70,000
meta-iterations. Evaluation: 600 held-out tasks (fixed seed), K = 5, 10, 20 support points,
query = 100-point grid over [−5, 5], MSE after 0, 1 and 10 steps, mean ± 95% CI.

Published (Li et al. 2017, Meta-SGD, Table 1; MAML after one step): 1.13 ± 0.18 (5-shot),
0.77 ± 0.11 (10-shot), 0.48 ± 0.08 (20-shot).
"""

from maml_jax.config import Config


def get_config() -> Config:
    return Config(
        name="sinusoid",
        dataset="sinusoid",
        seed=0,
        hidden_sizes=(40, 40),
        activation="relu",
        # PyTorch's nn.Linear init (weights and biases ~ U(±1/√fan_in)). With zero biases
        # (flax's and the original TF code's default) every first-layer ReLU kink starts at
        # x = 0 on this 1-D input; spreading them seemed better-conditioned at 2974b97, but at
        # HEAD lecun_normal trains as well (README, "Initialisation": within the seed spread).
        kernel_init="torch_default",
        shots=10,
        queries=10,
        num_inner_steps=1,
        inner_lr=0.01,
        meta_batch_size=25,
        outer_lr=1e-3,
        num_iterations=70_000,
        eval_num_tasks=600,
        eval_shots=(5, 10, 20),
        eval_inner_steps=(0, 1, 10),
        baselines=("pretrained",),
    )
