#!/usr/bin/env bash
# Fourth device call: the five tests that failed on the GPU in run3.sh (whose cut-off run printed
# no tracebacks), with tracebacks, at JAX's default precision (TF32) and then at `highest`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T="tests/test_precision.py::test_config_compute_dtype_runs_the_model_in_bf16_and_trains
tests/test_remat.py::test_config_remat_trains_the_same_numbers
tests/test_remat.py::test_config_first_order_reaches_training
tests/test_conv4.py::test_second_order_maml_meta_gradients_agree_between_impls"
timeout 120 python3 -m pytest -v --tb=short -p no:cacheprovider $T > $OUT/pytest_default.txt 2>&1
echo "default done at $SECONDS s"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 100 python3 -m pytest -v --tb=line -p no:cacheprovider $T \
  > $OUT/pytest_highest.txt 2>&1
echo "highest done at $SECONDS s"
