#!/usr/bin/env bash
# The GPU check, run on the GPU machine (one H200; no Rust, no LLVM, no network; torch and
# transformers installed) from the repository root, with target/gpu-carry built here by
# scripts/gpu-prepare.sh. One device call:
#
#   run(command="bash scripts/gpu-check.sh", carry=["target/gpu-carry"], timeout_s=480)
#
# 1. Every golden case through its `--target cuda` executable: logits at every position against
#    the float64 reference (f32 path within 5e-4, bf16 within 0.02), greedy ids exactly.
# 2. The 2B shape with deterministic random bf16 weights (the same bytes as the executable was
#    built from): our executable and the reference implementation (transformers, eager, bf16,
#    cuda) side by side: prefill tokens/s (2048 tokens), decode tokens/s (batch 1), memory,
#    achieved bandwidth in decode; a per-kernel profile of one prefill chunk and one decode
#    step (`--profile`). The default build and the reference run first; the other builds and
#    the profiles only while BUDGET seconds (380) allow, every run bounded by `timeout`, each
#    result printed as it ends. The tables last.
# Kernels are launched with programmatic dependent launch (they overlap the one before up to
# their griddepcontrol.wait); the golden cases and the 2B runs are repeated with
# GRIFFIN_CUDA_PDL=0 (plain stream order), so a fault or a gain is attributable.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
work=${WORK:-/tmp/griffin-gpu}
mkdir -p "$work"
# gpu-prepare.sh packs the executables into one archive (they share most of their bytes).
carry=${CARRY:-$work/carry}
if [ -z "${CARRY:-}" ]; then
  rm -rf "$carry" && mkdir -p "$carry"
  "$py" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" target/gpu-carry/carry.tar.xz "$carry"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# First the instruction families the interpreter could only take from the PTX ISA's text
# (ldmatrix, mma.sync, wgmma and its descriptor, the gates' ldmatrix.trans), kernel by kernel
# against the interpreter: if a golden case fails below, this says where to look.
echo "== kernel probe"
probe_table=$(timeout 120 "$carry/griffin-gpu-probe" 2>&1)
echo "$probe_table"

# A failing golden case is replayed launch by launch against the interpreter (the first two
# cases that fail, once each, so failures everywhere still leave time for the rest): the first
# launch whose results differ names the kernel to look at.
bisected=" "
bisects=0
bisect() {
  case "$bisected" in *" $2 "*) return;; esac
  [ "$bisects" -lt 2 ] || return
  bisected="$bisected$2 "
  bisects=$((bisects + 1))
  echo "== bisect $2"
  timeout 60 "$1/griffin" --dump-gpu-plan "$work/$2.plan" &&
    timeout 180 "$carry/griffin-gpu-probe" --bisect "$work/$2.plan" --ids "$3" 2>&1 | grep -v '| ok |' | head -40
}

echo "== golden cases"
golden_rows=()
for pdl in 1 0; do
export GRIFFIN_CUDA_PDL=$pdl
for dir in "$carry"/golden/*/; do
  case=$(basename "$dir")
  ids=$("$py" -c "
from safetensors.numpy import load_file; import sys
print(','.join(str(int(i)) for i in load_file(sys.argv[1])['input_ids']))" "$dir/expected.safetensors")
  # (Bounded: a kernel that hangs must not take the rest of the check with it.)
  timeout 120 "$dir/griffin" --ids "$ids" --logits-out "$work/$case.safetensors" 2>"$work/$case.err" || { cat "$work/$case.err"; golden_rows+=("| $case | $pdl | failed | | | |"); bisect "$dir" "$case" "$ids"; continue; }
  gen=$(timeout 120 "$dir/griffin" --ids "$ids" --max-new-tokens 64 --ignore-eos --format ids 2>>"$work/$case.err")
  # Sampled: the device sampler's ids against the host sampler's from the same logits.
  sampled=(--ids "$ids" --max-new-tokens 32 --ignore-eos --format ids --temperature 0.9 --top-p 0.95 --repetition-penalty 1.1 --seed 1)
  s_dev=$(timeout 120 "$dir/griffin" "${sampled[@]}" 2>>"$work/$case.err")
  s_host=$(GRIFFIN_SAMPLE_ON_HOST=1 timeout 120 "$dir/griffin" "${sampled[@]}" 2>>"$work/$case.err")
  if [ -n "$s_dev" ] && [ "$s_dev" = "$s_host" ]; then samp=same; else samp=DIFFER; fi
  row=$("$py" - "$dir" "$work/$case.safetensors" "$gen" "$pdl" "$samp" <<'PY'
import json, sys
from safetensors.numpy import load_file
d, got_path, gen, pdl, samp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
exp = load_file(d + "/expected.safetensors")
got = load_file(got_path)["logits"]
diff = float(abs(got - exp["logits"]).max())
dtype = json.load(open(d + "/case.json")).get("weights_dtype", "")
bound = 5e-4 if "float32" in dtype else 0.02
want = [int(i) for i in exp["generated_ids"]]
ids = [int(i) for i in gen.split(",")][: len(want)]
ok = diff <= bound and (ids == want or "float32" not in dtype) and samp == "same"
print(f"| {d.rstrip('/').split('/')[-1]} | {pdl} | {diff:.2e} (bound {bound}) | {'exact' if ids == want else 'DIFFER'} | {samp} | {'ok' if ok else 'FAIL'} |")
PY
)
  golden_rows+=("$row")
  case "$row" in *FAIL*) bisect "$dir" "$case" "$ids";; esac
done
done
export GRIFFIN_CUDA_PDL=1

if [ -n "${GOLDEN_ONLY:-}" ]; then
  # A dry run of the part above on a machine without a GPU, on the stand-in driver:
  #   GOLDEN_ONLY=1 CARRY=target/gpu-stage LD_LIBRARY_PATH=/tmp/fakecuda bash scripts/gpu-check.sh
  echo "$probe_table"
  echo
  echo "| golden case | PDL | max abs diff | greedy ids | sampled ids, device vs host | |"
  echo "| --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${golden_rows[@]}"
  exit 0
fi

echo "== 2B shape"
ck="$work/2b-model"
[ -f "$ck/config.json" ] || "$py" scripts/make_random_checkpoint.py "$ck" --config 2b --dtype bf16 --values hash
exe="$carry/2b/griffin-2b"
"$exe" --pack-weights-from "$ck" || echo "packing failed"
prompt=$("$py" -c "import random; random.seed(0); print(','.join(['2']+[str(random.randrange(3,256000)) for _ in range(2047)]))")
# The headline runs first, each printed as it ends: the default build's prefill and decode,
# then the reference; the other builds and the profiles only while the call's time allows
# (BUDGET seconds since the start, 380 by default, for a 480-second call), so a slow step
# costs the extras, not the table.
budget=${BUDGET:-380}
stats() { timeout 120 "$@" 2>&1 >/dev/null | tail -1; }
pre=$(stats "$exe" --ids "$prompt" --max-new-tokens 1 --stats); echo "prefill: $pre"
dec=$(stats "$exe" --ids 2 --max-new-tokens 512 --ignore-eos --stats); echo "decode:  $dec"
ref=$(timeout 150 "$py" scripts/bench_reference.py "$ck" --threads 16 --prefill 2048 --decode 64 --device cuda --dtype bf16 2>/dev/null | tail -1)
echo "reference: $ref"
# `variant NAME COMMAND...`: sets NAME to the command's stats line, or says why it did not run.
variant() {
  local name=$1; shift
  if [ "$SECONDS" -lt "$budget" ]; then
    printf -v "$name" '%s' "$(stats "$@")"
  else
    printf -v "$name" '%s' "skipped: out of time"
  fi
  echo "$name: ${!name}"
}
# Sampled decoding: the device sampler draws each token (one id comes back).
variant dec_sampled "$exe" --ids 2 --max-new-tokens 512 --ignore-eos --temperature 0.8 --top-p 0.95 --seed 1 --stats
variant dec_sampled_host env GRIFFIN_SAMPLE_ON_HOST=1 "$exe" --ids 2 --max-new-tokens 512 --ignore-eos --temperature 0.8 --top-p 0.95 --seed 1 --stats
w=(--weights "$exe.weights" --ids "$prompt" --max-new-tokens 1 --stats)
variant pre_wgmma "$carry/2b/griffin-2b-wgmma" "${w[@]}"
variant pre_f16in "$carry/2b/griffin-2b-f16in" "${w[@]}"
variant pre_wgmma_f16 "$carry/2b/griffin-2b-wgmma-f16in" "${w[@]}"
variant pre_bf16in "$carry/2b/griffin-2b-bf16in" "${w[@]}"
variant pre_simt "$carry/2b/griffin-2b-simt" "${w[@]}"
variant pre_whole "$carry/2b/griffin-2b-whole" "${w[@]}"
variant pre_512 "$carry/2b/griffin-2b-chunk512" "${w[@]}"
variant pre_plain env GRIFFIN_CUDA_PDL=0 "$exe" --ids "$prompt" --max-new-tokens 1 --stats
variant dec_plain env GRIFFIN_CUDA_PDL=0 "$exe" --ids 2 --max-new-tokens 512 --ignore-eos --stats
# Where the device time goes: one 2048-token prefill chunk and one decode step after it, each
# launch timed (kernel tables on stderr).
if [ "$SECONDS" -lt "$budget" ]; then
  echo "== profile (2B shape)"
  timeout 120 "$exe" --ids "$prompt" --max-new-tokens 1 --profile 2>&1 >/dev/null | grep -v '^time to first' | head -80
fi
# The same chunk on CUDA cores: attention and the RG-LRU gates beside their tensor-core forms.
if [ "$SECONDS" -lt "$budget" ]; then
  echo "== profile (2B shape, --no-tensor-cores): attention and gates"
  timeout 120 "$carry/2b/griffin-2b-simt" --weights "$exe.weights" --ids "$prompt" --max-new-tokens 1 --profile 2>&1 >/dev/null | grep -E '^profile:|^\| *(kernel|---)|attend_tokens|_gates|_conv' | head -24
fi
# What the interpreter's latency model estimated for the same step (made before the call, not
# on the GPU): to set beside the decode profile above.
if [ -f "$carry/decode_estimate.txt" ]; then
  echo "== the latency model's estimate of a decode step (made without a GPU)"
  grep -E '^\| (launch|---|k|greedy|sample)|^- |^2B|^sampled' "$carry/decode_estimate.txt" | head -50
fi
echo "elapsed: ${SECONDS} s"

"$py" - "$pre" "$dec" "$ref" "$carry/2b/griffin-2b" "$pre_simt" "$pre_bf16in" "$pre_plain" "$dec_plain" "$pre_512" "$pre_f16in" "$pre_whole" "$pre_wgmma" "$pre_wgmma_f16" "$dec_sampled" "$dec_sampled_host" <<'PY'
import json, os, re, sys
pre, dec, ref, exe, pre_simt, pre_bf16in, pre_plain, dec_plain, pre_512, pre_f16in, pre_whole, pre_wgmma, pre_wgmma_f16, dec_sampled, dec_sampled_host = sys.argv[1:16]
def num(pattern, s):
    m = re.search(pattern, s)
    return float(m.group(1)) if m else float("nan")
ours_pre = num(r"prefill ([0-9.]+) tokens/s", pre)
ours_dec = num(r"decode ([0-9.]+) tokens/s", dec)
dev_mb = num(r"device memory ([0-9.]+) MB", dec)
weights_gb = os.path.getsize(exe + ".weights") / 1e9 if os.path.exists(exe + ".weights") else float("nan")
try:
    r = json.loads(ref)
except Exception:
    r = {}
print()
print("| engine | prefill tok/s (2048) | decode tok/s | memory | decode bandwidth |")
print("| --- | --- | --- | --- | --- |")
print(f"| griffinc --target cuda | {ours_pre:.0f} | {ours_dec:.1f} | {dev_mb:.0f} MB device | {ours_dec * weights_gb:.0f} GB/s of weights |")
print(f"| griffinc --target cuda, GRIFFIN_CUDA_PDL=0 | {num(r'prefill ([0-9.]+) tokens/s', pre_plain):.0f} | {num(r'decode ([0-9.]+) tokens/s', dec_plain):.1f} | | {num(r'decode ([0-9.]+) tokens/s', dec_plain) * weights_gb:.0f} GB/s of weights |")
print(f"| griffinc --target cuda, sampled (temperature 0.8, top-p 0.95) on the device | | {num(r'decode ([0-9.]+) tokens/s', dec_sampled):.1f} | | |")
print(f"| the same, GRIFFIN_SAMPLE_ON_HOST=1 (logits back, host sampler) | | {num(r'decode ([0-9.]+) tokens/s', dec_sampled_host):.1f} | | |")
print(f"| griffinc --target cuda --prefill-chunk 512 | {num(r'prefill ([0-9.]+) tokens/s', pre_512):.0f} | | {num(r'device memory ([0-9.]+) MB', pre_512):.0f} MB device | |")
print(f"| griffinc --target cuda --no-tensor-cores | {num(r'prefill ([0-9.]+) tokens/s', pre_simt):.0f} | | | |")
print(f"| griffinc --target cuda --tensor-core-inputs bf16 | {num(r'prefill ([0-9.]+) tokens/s', pre_bf16in):.0f} | | | |")
print(f"| griffinc --target cuda --tensor-core-inputs f16 | {num(r'prefill ([0-9.]+) tokens/s', pre_f16in):.0f} | | | |")
print(f"| griffinc --target cuda --wgmma | {num(r'prefill ([0-9.]+) tokens/s', pre_wgmma):.0f} | | | |")
print(f"| griffinc --target cuda --wgmma --tensor-core-inputs f16 | {num(r'prefill ([0-9.]+) tokens/s', pre_wgmma_f16):.0f} | | | |")
print(f"| griffinc --target cuda --k-parts 1 | {num(r'prefill ([0-9.]+) tokens/s', pre_whole):.0f} | | | |")
print(f"| reference (transformers eager, bf16) | {r.get('prefill_tokens_per_s', float('nan')):.0f} | {r.get('decode_tokens_per_s', float('nan')):.1f} | {r.get('peak_gpu_mb', float('nan')):.0f} MB peak allocated | |")
PY
echo
echo "$probe_table"
echo
echo "| golden case | PDL | max abs diff | greedy ids | sampled ids, device vs host | |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${golden_rows[@]}"
