#!/usr/bin/env bash
# Second device call: the peers the first call's 110 s limit cut off (omniglot-20w1s: loop,
# l2l, higher; miniimagenet-5w1s: all), then ours with full-float32 matmuls and with bf16.
set -u
BUDGET=${BUDGET:-150}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
lim() { local n=$(( $(left) - $1 )); [ $n -lt 5 ] && n=5; echo $n; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
G=$PWD/.gpu
P="PYTHONPATH=$G/site:$PYTHONPATH L2L_SRC=$G/learn2learn-0.2.0"
env PYTHONPATH=$G/site:$PYTHONPATH L2L_SRC=$G/learn2learn-0.2.0 timeout 35 python3 experiments/torch_peers_cuda.py \
  --peers-script $G/torch_peers.py --workloads omniglot-20w1s --peers loop,l2l,higher --iters 5 --warmup 1 \
  > $OUT/peers2.jsonl 2>> $OUT/stderr2.txt
env PYTHONPATH=$G/site:$PYTHONPATH L2L_SRC=$G/learn2learn-0.2.0 timeout 35 python3 experiments/torch_peers_cuda.py \
  --peers-script $G/torch_peers.py --workloads miniimagenet-5w1s --iters 5 --warmup 1 \
  >> $OUT/peers2.jsonl 2>> $OUT/stderr2.txt
echo "peers done at $(( $(date +%s) - T0 )) s"
timeout $(lim 3) python3 experiments/accelerator_bench.py --out $OUT/ours2.jsonl --peak-size 4096 \
  --deadline-s $(( $(left) - 40 )) --workloads omniglot-5w1s,omniglot-20w1s,miniimagenet-5w1s \
  --configs patches/vmap/highest/float32,patches/vmap/default/bfloat16 > $OUT/ours2.log 2>&1
echo "ours done at $(( $(date +%s) - T0 )) s"
