#!/bin/bash
# Wall time of a short `maml-jax train omniglot_5w1s` (6 iterations, a 10-task evaluation) without a
# compilation cache and with a warm one (--compile-cache), alternated; then the cache's size.
# Produced compile_cache_zen1.jsonl, by an earlier form of this script (the same runs; its cache_size
# line was added afterwards with the same du -sb command); compile_cache_epyc512.jsonl and
# compile_cache_zen3.jsonl by this form.
# Usage: compile_cache_timing.sh OUT.jsonl SCRATCH_DIR OMNIGLOT_DIR
set -u
usage="usage: compile_cache_timing.sh OUT.jsonl SCRATCH_DIR OMNIGLOT_DIR"
out=$(realpath -m "${1:?$usage}") scratch=$(realpath -m "${2:?$usage}") data=$(realpath -m "${3:?$usage}")
cd "$(dirname "$0")/../../../.."
: > "$out"; mkdir -p "$scratch"; rm -rf "$scratch/xla"
args=(--config.data_dir="$data" --config.num_iterations=6 --config.log_every=3 --config.checkpoint_every=3
      --config.eval_num_tasks=10 --no-progress --cpu-devices 2)
run() {  # LABEL [extra args]
  local label=$1; shift
  rm -rf "$scratch/w_$label"
  local t0 t1 rc
  t0=$(date +%s.%N)
  .venv/bin/maml-jax train omniglot_5w1s --workdir "$scratch/w_$label" "${args[@]}" "$@" \
    > "$scratch/out_$label.txt" 2> "$scratch/err_$label.txt"
  rc=$?
  t1=$(date +%s.%N)
  .venv/bin/python -c 'import json, sys
label, rc, t0, t1, err = sys.argv[1:]
lines = [l for l in open(err).read().splitlines() if l.startswith("compile cache")]
print(json.dumps({"label": label, "rc": int(rc), "wall_s": float(t1) - float(t0), "summary": lines[-1] if lines else ""}))' \
    "$label" "$rc" "$t0" "$t1" "$scratch/err_$label.txt" >> "$out"
  tail -1 "$out"
}
run warmup_data  # decodes the Omniglot PNGs into the data cache once
run cold --compile-cache "$scratch/xla"
for r in 1 2 3; do
  if [ $((r % 2)) = 1 ]; then run "none_$r"; run "warm_$r" --compile-cache "$scratch/xla"
  else run "warm_$r" --compile-cache "$scratch/xla"; run "none_$r"; fi
done
echo "{\"label\": \"cache_size\", \"du_sb_bytes\": $(du -sb "$scratch/xla" | cut -f1), \"entries\": $(ls "$scratch/xla" | wc -l)}" >> "$out"
