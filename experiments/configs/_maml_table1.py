"""Shared hyper-parameters of the MAML paper's Table 1 (Finn et al. 2017, §5.2 and App. A.1).

Omniglot: conv4 with 64 filters, 3×3 stride-2 convolutions, batch norm, ReLU; 60,000
meta-iterations, Adam 1e-3; 5-way: meta-batch 32, one inner step with α = 0.4; 20-way:
meta-batch 16, five inner steps with α = 0.1. MiniImageNet: conv4 with 32 filters and 2×2
max-pooling; meta-batch 4 (2 for 5-shot in the paper's code), five inner steps with α = 0.01.
At meta-test the original code adapts with 10 steps for both data sets; we report 0, the
training step count and 10. Query examples per class: 15 at meta-test for every row (the
paper used K for training queries; we train with 15 for 5-way and 5 for 20-way, the shapes of
the benchmark workloads, and say so here rather than silently).
"""

from maml_jax.config import Config


def table1_config(dataset: str, ways: int, shots: int, *, first_order: bool = False) -> Config:
    omniglot = dataset == "omniglot"
    if omniglot:
        five_way = ways == 5
        batch, steps, lr = (32, 1, 0.4) if five_way else (16, 5, 0.1)
        queries = 15 if five_way else 5
    else:
        batch, steps, lr, queries = 4, 5, 0.01, 15
    name = f"{dataset}_{ways}w{shots}s" + ("_fomaml" if first_order else "")
    return Config(
        name=name,
        dataset=dataset,
        model="conv4",
        seed=0,
        ways=ways,
        shots=shots,
        queries=min(queries, (20 - shots) if omniglot else queries),
        num_inner_steps=steps,
        inner_lr=lr,
        first_order=first_order,
        meta_batch_size=batch,
        outer_lr=1e-3,
        num_iterations=60_000,
        task_map="auto",  # lax.map on XLA:CPU (faster there), vmap on GPU/TPU (6x faster on an H200): README, Speed
        # MiniImageNet: the patch convolution one image at a time on XLA:CPU, where it is faster;
        # Omniglot keeps "patches" (what "auto" gives it too), the value its recorded runs were made with
        conv_impl="patches" if omniglot else "auto",
        steps_per_call=10,
        log_every=100,
        checkpoint_every=500,
        eval_num_tasks=600,
        eval_queries=min(15, 20 - shots) if omniglot else 15,
        eval_inner_steps=tuple(sorted({0, steps, 10})),
        eval_batch_tasks=25,
        baselines=(),
    )
