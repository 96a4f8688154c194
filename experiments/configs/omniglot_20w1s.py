"""MAML (second order), omniglot 20-way 1-shot: MAML paper Table 1 row (Finn et al. 2017).

Paper: 95.8 ± 0.3% (mean ± 95% CI over 600 meta-test tasks).

    maml-jax train omniglot_20w1s --workdir runs/omniglot_20w1s

Needs the Omniglot zips in --config.data_dir (or $MAML_JAX_DATA/omniglot).
Shared hyper-parameters and the choices we made are in ``_maml_table1.py``.
"""

from _maml_table1 import table1_config


def get_config():
    return table1_config("omniglot", ways=20, shots=1, first_order=False)
