#!/usr/bin/env bash
# Third device call (second session): the configs the first session's 15 minutes left out.
# 1. torch.func with TF32 matmuls (JAX's default precision on this GPU); 2. ours with bf16
# mixed precision, full-float32 matmuls for the two larger image workloads, and lax.map over
# tasks; 3. more of the test suite on the GPU, verbose so that a cut-off run still says which
# tests passed. Every stage writes under $OUT as it goes. Total budget: BUDGET seconds.
set -u
BUDGET=${BUDGET:-540}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
lim() { local n=$(( $(left) - $1 )); [ $n -lt 5 ] && n=5; echo $n; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
G=$PWD/.gpu
{ nvidia-smi; nproc; python3 --version
  python3 -c "import jax, jaxlib, torch; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'torch', torch.__version__); print(jax.devices())"
} > $OUT/env.txt 2>&1
echo "env done at $(( $(date +%s) - T0 )) s"
env PYTHONPATH=$G/site:$PYTHONPATH L2L_SRC=$G/learn2learn-0.2.0 timeout 60 python3 experiments/torch_peers_cuda.py \
  --peers-script $G/torch_peers.py --peers torchfunc --tf32 > $OUT/peers_tf32.jsonl 2>> $OUT/stderr.txt
echo "peers done at $(( $(date +%s) - T0 )) s"
timeout $(lim 120) python3 experiments/accelerator_bench.py --out $OUT/ours3.jsonl --peak-size 4096 \
  --deadline-s $(( $(left) - 170 )) --workloads omniglot-5w1s,omniglot-20w1s,miniimagenet-5w1s \
  --configs patches/vmap/default/bfloat16 > $OUT/ours3.log 2>&1
echo "bf16 done at $(( $(date +%s) - T0 )) s"
timeout $(lim 120) python3 experiments/accelerator_bench.py --out $OUT/ours3.jsonl --peak-size 4096 \
  --deadline-s $(( $(left) - 170 )) --workloads omniglot-20w1s,miniimagenet-5w1s \
  --configs patches/vmap/highest/float32 >> $OUT/ours3.log 2>&1
timeout $(lim 120) python3 experiments/accelerator_bench.py --out $OUT/ours3.jsonl --peak-size 4096 \
  --deadline-s $(( $(left) - 170 )) --workloads omniglot-5w1s,omniglot-20w1s,miniimagenet-5w1s \
  --configs patches/map/default/float32 >> $OUT/ours3.log 2>&1
echo "ours done at $(( $(date +%s) - T0 )) s"
timeout $(lim 0) python3 -m pytest -v -p no:cacheprovider tests/test_precision.py tests/test_no_retrace.py \
  tests/test_remat.py tests/test_conv4.py tests/test_algorithms_maml.py tests/test_algorithms_imaml.py \
  > $OUT/pytest.txt 2>&1
echo "pytest done at $(( $(date +%s) - T0 )) s"
