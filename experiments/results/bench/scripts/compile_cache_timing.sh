#!/bin/bash
# Wall time of a short `maml-jax train omniglot_5w1s` (6 iterations, a 10-task evaluation) without a
# compilation cache and with a warm one (--compile-cache), alternated. Produced compile_cache_zen1.jsonl.
# Usage: compile_cache_timing.sh OUT.jsonl SCRATCH_DIR OMNIGLOT_DIR
set -u
cd "$(dirname "$0")/../../../.."
out=$1 scratch=$2 data=$3
: > "$out"; mkdir -p "$scratch"; rm -rf "$scratch/xla"
args="--config.data_dir=$data --config.num_iterations=6 --config.log_every=3 --config.checkpoint_every=3"
args="$args --config.eval_num_tasks=10 --no-progress --cpu-devices 2"
run() {  # LABEL [extra args]
  label=$1; shift
  rm -rf "$scratch/w_$label"
  t0=$(date +%s.%N)
  .venv/bin/maml-jax train omniglot_5w1s --workdir "$scratch/w_$label" $args "$@" \
    > "$scratch/out_$label.txt" 2> "$scratch/err_$label.txt"
  rc=$?
  t1=$(date +%s.%N)
  summary=$(grep "compile cache" "$scratch/err_$label.txt" | tail -1)
  echo "{\"label\": \"$label\", \"rc\": $rc, \"wall_s\": $(echo "$t1 - $t0" | bc), \"summary\": \"$summary\"}" >> "$out"
  tail -1 "$out"
}
run warmup_data  # decodes the Omniglot PNGs into the data cache once
run cold --compile-cache "$scratch/xla"
for r in 1 2 3; do
  if [ $((r % 2)) = 1 ]; then run none_$r; run warm_$r --compile-cache "$scratch/xla"
  else run warm_$r --compile-cache "$scratch/xla"; run none_$r; fi
done
