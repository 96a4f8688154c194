#!/usr/bin/env bash
# One prepared device session: our benchmark, the PyTorch peers on the GPU, memory vs inner
# steps and a GPU pass of the maths tests. Every stage has its own limit and writes under $OUT
# as it goes, so a stage that runs long loses only itself. Total budget: BUDGET seconds.
set -u
BUDGET=${BUDGET:-530}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
lim() { local n=$(( $(left) - $1 )); [ $n -lt 5 ] && n=5; echo $n; }  # timeout 0 would mean none
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
G=$PWD/.gpu
{
  nvidia-smi; nproc; python3 --version
  python3 -c "import jax, jaxlib, optax, flax, chex, torch; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'optax', optax.__version__, 'flax', flax.__version__, 'chex', chex.__version__, 'torch', torch.__version__); print(jax.devices())"
} > $OUT/env.txt 2>&1
echo "env done at $(( $(date +%s) - T0 )) s"
# 1. ours, the likely-fastest config on GPU for every workload
timeout $(lim 300) python3 experiments/accelerator_bench.py --out $OUT/ours.jsonl \
  --configs lax/vmap/default/float32 > $OUT/ours.log 2>&1
echo "ours1 done at $(( $(date +%s) - T0 )) s"
# 2. the PyTorch peers on the same GPU
PYTHONPATH=$G/site:$PYTHONPATH L2L_SRC=$G/learn2learn-0.2.0 timeout 110 python3 experiments/torch_peers_cuda.py \
  --peers-script $G/torch_peers.py > $OUT/peers.jsonl 2>> $OUT/stderr.txt
echo "peers done at $(( $(date +%s) - T0 )) s"
# 3. the other choices, until 150 s before the end
timeout $(lim 100) python3 experiments/accelerator_bench.py --out $OUT/ours.jsonl --peak-size 4096 \
  --deadline-s $(( $(left) - 170 )) \
  --configs patches/vmap/default/float32,lax/vmap/highest/float32,lax/vmap/default/bfloat16,lax/map/default/float32,patches/map/default/float32 \
  >> $OUT/ours.log 2>&1
echo "ours2 done at $(( $(date +%s) - T0 )) s"
# 4. memory and time vs inner steps (omniglot-5w1s, vmap, cuDNN convolutions)
timeout $(lim 45) python3 experiments/memory_vs_steps.py --task-map vmap --conv-impl lax --json \
  --steps 5,50 --time-iters 5 --variants maml,remat,fomaml,imaml > $OUT/memory.jsonl 2>> $OUT/stderr.txt
echo "memory done at $(( $(date +%s) - T0 )) s"
# 5. the maths tests on the GPU, with what time is left
timeout $(lim 0) python3 -m pytest -q -p no:cacheprovider tests/test_core_math.py tests/test_conv4.py \
  tests/test_algorithms_maml.py tests/test_precision.py tests/test_no_retrace.py > $OUT/pytest.txt 2>&1
echo "pytest done at $(( $(date +%s) - T0 )) s"
