#!/bin/bash
# Training speed of `maml-jax train` on the Omniglot configs with the task batch on one XLA CPU
# device against split over two (--cpu-devices 2 --config.num_devices=2), alternated; each run
# logs steps/s every 20 steps to its timing.jsonl (the first window includes the compile).
# Produced train_2devices_zen3.jsonl.
# Usage: train_devices_timing.sh OUT.jsonl SCRATCH_DIR OMNIGLOT_DIR
set -u
cd "$(dirname "$0")/../../../.."
usage="usage: train_devices_timing.sh OUT.jsonl SCRATCH_DIR OMNIGLOT_DIR"
out=$(realpath -m "${1:?$usage}") scratch=$(realpath -m "${2:?$usage}") data=$(realpath -m "${3:?$usage}")
: > "$out"; mkdir -p "$scratch"
run() { # CFG LABEL ITERS extra...
  local cfg=$1 label=$2 iters=$3; shift 3
  local w=$scratch/w_${cfg}_${label}; rm -rf $w
  local t0=$(date +%s.%N)
  .venv/bin/maml-jax train $cfg --workdir $w --config.data_dir=$data --config.num_iterations=$iters \
    --config.log_every=20 --config.checkpoint_every=$iters --config.eval_num_tasks=10 --no-progress "$@" > $w.out 2> $w.err
  local rc=$? t1=$(date +%s.%N)
  .venv/bin/python - "$cfg" "$label" "$rc" "$t0" "$t1" "$w" >> "$out" <<'PY'
import json, sys
cfg, label, rc, t0, t1, w = sys.argv[1:]
rates = [json.loads(l)["steps_per_s"] for l in open(f"{w}/timing.jsonl")] if rc == "0" else []
print(json.dumps({"config": cfg, "label": label, "rc": int(rc), "wall_s": float(t1) - float(t0), "steps_per_s": rates}))
PY
  tail -1 "$out"
}
pairs() { # CFG ITERS ROUNDS: one device, then two, in odd rounds; two first in even rounds
  local cfg=$1 iters=$2 r
  for r in $(seq 1 "$3"); do
    if [ $((r % 2)) = 1 ]; then run "$cfg" "one_$r" "$iters"; run "$cfg" "two_$r" "$iters" --cpu-devices 2 --config.num_devices=2
    else run "$cfg" "two_$r" "$iters" --cpu-devices 2 --config.num_devices=2; run "$cfg" "one_$r" "$iters"; fi
  done
}
run omniglot_5w1s warmup 20
pairs omniglot_5w1s 80 3
pairs omniglot_20w1s 60 2
echo "{\"done\": true}" >> "$out"
