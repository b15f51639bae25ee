#!/usr/bin/env bash
# Prefill A/B of two griffinc builds on one checkpoint, runs alternating so machine noise hits
# both alike (run by hand, never in CI). Prints one line per run, then best and median of each.
#
#   scripts/ab_prefill.sh OLD/griffinc NEW/griffinc MODEL_DIR [RUNS] [THREADS]
#
# Each griffinc needs its libgriffin_runner.a beside it (cargo build --release -p griffinc -p
# griffin-runner). Prompt: 512 random ids (seed 0); bf16 weights.
set -euo pipefail
old=$1 new=$2 model=$3 runs=${4:-5} threads=${5:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
vocab=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$model/config.json")
prompt=$(python3 -c "import random,sys; random.seed(0); v=int(sys.argv[1]); print(','.join(['2']+[str(random.randrange(3,v)) for _ in range(511)]))" "$vocab")
"$old" build "$model" -o "$work/old" --name g --weights-dtype bf16 >/dev/null
"$new" build "$model" -o "$work/new" --name g --weights-dtype bf16 >/dev/null
for _ in $(seq "$runs"); do
  for v in old new; do
    s=$("$work/$v/g" --ids "$prompt" --max-new-tokens 1 --stats --threads "$threads" 2>&1 >/dev/null | tail -1)
    echo "$v $(echo "$s" | sed -E 's/.*prefill ([0-9.]+) tokens.*/\1/')"
  done
done | tee "$work/runs"
for v in old new; do
  grep "^$v " "$work/runs" | awk '{print $2}' | sort -n | awk -v v="$v" '{a[NR]=$1} END {printf "%s: best %.1f, median %.1f tok/s\n", v, a[NR], a[int((NR+1)/2)]}'
done
