#!/bin/bash
# Alternated rounds of step_faults.py under three allocator settings: glibc as the process
# starts by default (base), glibc with huge pages for large blocks (huge), and jemalloc that keeps
# its freed pages (jemalloc: Debian's libjemalloc2, not a project dependency). Each round rotates
# the order. The MiniImageNet rounds of malloc_hugepages_zen3.md came from a scratch form of this
# loop and of step_faults.py (the same settings and measurement, text output instead of JSON).
#
#   bash experiments/results/bench/scripts/malloc_rounds.sh miniimagenet-5w1s 6 6 > OUT.jsonl
#   (workload, timed steps per run, rounds)
set -eu
cd "$(dirname "$0")/../../../.."
W=${1:-miniimagenet-5w1s}
STEPS=${2:-6}
ROUNDS=${3:-6}
PY=${PYTHON:-.venv/bin/python}
JEMALLOC=${JEMALLOC:-/usr/lib/x86_64-linux-gnu/libjemalloc.so.2}
one() { # variant name, then the environment to run it with
  local name=$1
  shift
  echo "{\"round\": $r, \"variant\": \"$name\", \"started\": \"$(date +%T)\", \"run\": $(env "$@" "$PY" \
    experiments/results/bench/scripts/step_faults.py "$W" "$STEPS" 2>/dev/null | tail -1)}"
}
for r in $(seq 1 "$ROUNDS"); do
  variants=(base huge jemalloc)
  for k in 0 1 2; do
    case ${variants[$(((k + r) % 3))]} in
      base) one base -u GLIBC_TUNABLES -u LD_PRELOAD ;;
      huge) one huge -u LD_PRELOAD GLIBC_TUNABLES=glibc.malloc.hugetlb=1 ;;
      jemalloc)
        if [ -e "$JEMALLOC" ]; then
          one jemalloc -u GLIBC_TUNABLES LD_PRELOAD="$JEMALLOC" MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
        fi
        ;;
    esac
  done
done
