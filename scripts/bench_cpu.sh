#!/usr/bin/env bash
# CPU benchmark, run by hand (never in CI): our executable and the reference implementation
# (transformers, eager, same thread count) on one random-weight checkpoint, plus this machine's
# measured read bandwidth. Prints a table last.
#
#   REFERENCE_PYTHON=/path/to/venv/bin/python [VARIANTS="f32 bf16"] [PREFILL=512] [DECODE=64] scripts/bench_cpu.sh [small|2b] [THREADS]
#
# The reference needs torch + transformers + safetensors + numpy in REFERENCE_PYTHON's
# environment (python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers safetensors numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-small}
threads=${2:-$(nproc)}
py=${REFERENCE_PYTHON:-python3}
work=${BENCH_DIR:-/tmp/griffin-bench}/$config
prefill=${PREFILL:-512}
decode=${DECODE:-64}

# The 2B checkpoint is written in bf16 (5.4 GB) like the published one; the reference loads it in f32.
ckpt_dtype=${CHECKPOINT_DTYPE:-$([ "$config" = 2b ] && echo bf16 || echo f32)}
[ -f "$work/model/config.json" ] || "$py" scripts/make_random_checkpoint.py "$work/model" --config "$config" --dtype "$ckpt_dtype" >&2
cargo build --release -q
vocab=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$work/model/config.json")
prompt=$("$py" -c "import random,sys; random.seed(0); v=int(sys.argv[1]); n=int(sys.argv[2]); print(','.join(['2']+[str(random.randrange(3,v)) for _ in range(n-1)]))" "$vocab" "$prefill")

row() { printf '| %-34s | %14s | %14s | %12s |\n' "$@"; }
results=()
for wd in ${VARIANTS:-f32 bf16}; do
  target/release/griffinc build "$work/model" -o "$work/out-$wd" --name griffin --threads "$threads" --weights-dtype "$wd" >&2
  # Write the fresh weights file out now, not while the executable is being timed.
  sync
  p=$("$work/out-$wd/griffin" --ids "$prompt" --max-new-tokens 1 --stats --threads "$threads" 2>&1 >/dev/null)
  d=$("$work/out-$wd/griffin" --ids 2,5 --max-new-tokens $((decode + 1)) --ignore-eos --stats --threads "$threads" 2>&1 >/dev/null)
  pt=$(sed -E 's/.*prefill ([0-9.]+) tokens\/s.*/\1/' <<<"$p")
  dt=$(sed -E 's/.*decode ([0-9.]+) tokens\/s.*/\1/' <<<"$d")
  rss=$(sed -E 's/.*peak RSS ([0-9]+) kB.*/\1/' <<<"$d")
  results+=("$(row "griffinc executable, $wd weights" "$pt" "$dt" "$((rss / 1024)) MB")")
done
ref=$("$py" scripts/bench_reference.py "$work/model" --threads "$threads" --prefill "$prefill" --decode "$decode")
rp=$("$py" -c "import json,sys; r=json.loads(sys.argv[1]); print('%.1f %.2f %d' % (r['prefill_tokens_per_s'], r['decode_tokens_per_s'], r['peak_rss_mb']))" "$ref")
read -r rpt rdt rrss <<<"$rp"
results+=("$(row "reference (transformers eager, f32)" "$rpt" "$rdt" "$rrss MB")")
bw=$("$py" -c "
import numpy as np, time
a = np.ones(1 << 28, dtype=np.float32)  # 1 GiB
best = min((lambda t: (a.sum(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
print('%.1f' % (a.nbytes / best / 1e9))")
pool_bw=$(cargo bench -q -p griffin-runtime --bench bandwidth -- "$threads" 2>/dev/null | tail -1)
weights_mb=$(du -m "$work"/out-*/griffin.weights | tail -1 | cut -f1)

echo
echo "config $config, $threads threads, prompt $prefill tokens, $decode decode steps; $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "single-thread read bandwidth (numpy sum over 1 GiB): $bw GB/s; with our thread pool: $pool_bw"
echo "weights file of the last variant built: $weights_mb MB"
echo
row "engine" "prefill tok/s" "decode tok/s" "peak RSS"
row "---" "---" "---" "---"
printf '%s\n' "${results[@]}"
