"""MAML (second order), miniimagenet 5-way 5-shot: MAML paper Table 1 row (Finn et al. 2017).

Paper: 63.11 ± 0.92% (mean ± 95% CI over 600 meta-test tasks).

    maml-jax train miniimagenet_5w5s --workdir runs/miniimagenet_5w5s

Needs MiniImageNet (Ravi & Larochelle split) in --config.data_dir (or $MAML_JAX_DATA/miniimagenet).
Shared hyper-parameters and the choices we made are in ``_maml_table1.py``.
"""

from _maml_table1 import table1_config


def get_config():
    return table1_config("miniimagenet", ways=5, shots=5, first_order=False)
