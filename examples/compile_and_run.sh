#!/usr/bin/env bash
# Compile a checkpoint folder into a standalone executable and run it. From the repository root:
#   bash examples/compile_and_run.sh [MODEL_DIR] ["prompt"]
set -euo pipefail
model=${1:-tests/golden/tiny-text}
prompt=${2:-"the quick brown fox"}
cargo build --release -q
out=$(mktemp -d)
target/release/griffinc build "$model" --target cpu -o "$out" --name model
ls -l "$out"
echo "== ldd: what it needs at run time"
ldd "$out/model"
echo "== greedy, 24 tokens, with timings"
"$out/model" --prompt "$prompt" --max-new-tokens 24 --stats
echo "== sampled, same seed twice"
"$out/model" --prompt "$prompt" --max-new-tokens 24 --temperature 0.8 --seed 7 --format ids
"$out/model" --prompt "$prompt" --max-new-tokens 24 --temperature 0.8 --seed 7 --format ids
