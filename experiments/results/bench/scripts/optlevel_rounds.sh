#!/bin/bash
# Alternated rounds of `python -m maml_jax.bench`: XLA's default LLVM optimisation level against
# XLA_FLAGS=--xla_backend_optimization_level=1, one process per run (XLA reads the flag at start).
# Usage: [ITERS=N] optlevel_rounds.sh OUT.jsonl ROUNDS WORKLOAD...
# Timed iterations asked for: sinusoid 2000, omniglot-5w1s 10, the others 6, or ITERS for every
# workload (the benchmark times whole windows, so it may time fewer).
# Produced optlevel_zen1_rounds3.jsonl (`optlevel_rounds.sh OUT 3 sinusoid omniglot-5w1s omniglot-20w1s
# miniimagenet-5w1s`) and optlevel_o5_zen1_rounds4.jsonl (`ITERS=20 optlevel_rounds.sh OUT 4 omniglot-5w1s`),
# both by an earlier form of this script that kept no stderr files and wrote no "rc" field.
set -u
out=$(realpath -m "${1:?usage: optlevel_rounds.sh OUT.jsonl ROUNDS WORKLOAD...}")
rounds=${2:?usage: optlevel_rounds.sh OUT.jsonl ROUNDS WORKLOAD...}
shift 2
cd "$(dirname "$0")/../../../.."
: > "$out"
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then order="none l1"; else order="l1 none"; fi
  for w in "$@"; do
    case $w in sinusoid) iters=2000 ;; omniglot-5w1s) iters=10 ;; *) iters=6 ;; esac
    iters=${ITERS:-$iters}
    for f in $order; do
      flags=; [ "$f" = l1 ] && flags=--xla_backend_optimization_level=1
      err="$out.r$r.$w.$f.stderr"
      line=$(XLA_FLAGS=$flags .venv/bin/python -m maml_jax.bench --workload "$w" --iters "$iters" 2>"$err" | tail -1)
      rc=${PIPESTATUS[0]}
      if [ "$rc" != 0 ] || [ "${line:0:1}" != "{" ]; then
        echo "round $r $w $f failed (exit $rc), stderr in $err" >&2
        line=null
      fi
      echo "{\"round\": $r, \"xla_flags\": \"$flags\", \"rc\": $rc, \"result\": $line}" >> "$out"
      echo "$(date +%T) round $r $w $f $(echo "$line" | cut -c1-100)"
    done
  done
done
