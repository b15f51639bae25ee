#!/usr/bin/env bash
# A walk through the IR of a tiny golden checkpoint. Run from the repository root.
set -euo pipefail
griffinc=${GRIFFINC:-target/debug/griffinc}
model=tests/golden/tiny-text
[ -x "$griffinc" ] || cargo build -q

echo "== interface of the decode graph: inputs and outputs"
"$griffinc" ir "$model" --graph decode | grep -E "input\.|output\."

echo "== layer 0 (recurrent): conv1d, the gates, the scan"
"$griffinc" ir "$model" --graph decode | grep -E "conv1d|block_diagonal_linear|linear_scan" | head -4

echo "== layer 2 (attention): rotary and the windowed attention over the KV ring"
"$griffinc" ir "$model" --graph decode | grep -E "rotary|local_attention"

echo "== the prefill graph is the same function over a symbolic number of tokens T"
"$griffinc" ir "$model" --graph prefill | head -4

echo "== logits for three tokens: two through prefill, one decode step"
out=$(mktemp -d)/logits.safetensors
"$griffinc" eval "$model" --ids 2,17,5 --prefill 2 --out "$out"
ls -l "$out"
