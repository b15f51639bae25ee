#!/usr/bin/env bash
# Builds, here (Rust and LLVM needed), everything scripts/gpu-check.sh runs on the GPU machine
# (which has neither): release `--target cuda` executables for every golden case (weights
# embedded) and for the 2B shape (weights packed there from a checkpoint made there), stripped,
# with the golden answers, packed as target/gpu-carry/carry.tar.xz (the executables share most
# of their bytes: 92 MB unpacked, ~23 MB packed; a device call carries 64 MiB with the
# working tree). Needs torch + transformers in REFERENCE_PYTHON to write the 2B checkpoint
# (5.4 GB, deterministic: `--values hash`).
#
#   REFERENCE_PYTHON=/tmp/refenv/bin/python scripts/gpu-prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${REFERENCE_PYTHON:-python3}
carry=target/gpu-stage
rm -rf "$carry" target/gpu-carry && mkdir -p "$carry/golden" "$carry/2b" target/gpu-carry
cargo build --release --workspace --locked -q
for case in tiny-f32 tiny-bf16-sharded tiny-text gen-h3-bf16 gen-b64-bf16; do
  target/release/griffinc build "tests/golden/$case" --target cuda --embed-weights --name griffin -o "$carry/golden/$case"
  cp "tests/golden/$case/expected.safetensors" "tests/golden/$case/case.json" "$carry/golden/$case/"
done
# The bf16 cases again with the projections on the warpgroup MMA (`--wgmma`, sm_90a), whose
# layouts only the interpreter has checked so far.
for case in tiny-bf16-sharded gen-h3-bf16 gen-b64-bf16; do
  target/release/griffinc build "tests/golden/$case" --target cuda --embed-weights --name griffin --wgmma -o "$carry/golden/$case-wgmma"
  cp "tests/golden/$case/expected.safetensors" "tests/golden/$case/case.json" "$carry/golden/$case-wgmma/"
done
ckpt=${CHECKPOINT_2B:-/tmp/griffin-2b-hash}
[ -f "$ckpt/config.json" ] || "$py" scripts/make_random_checkpoint.py "$ckpt" --config 2b --dtype bf16 --values hash
# Each build also writes a 5.4 GB weights file: not carried (packed there from the same
# checkpoint), so removed at once.
target/release/griffinc build "$ckpt" --target cuda --name griffin-2b -o "$carry/2b" --emit-ptx target/gpu-ptx   # for reading; not carried
rm -f "$carry"/2b/*.weights
# The same with prefill projections on CUDA cores, to compare (same weights file).
target/release/griffinc build "$ckpt" --target cuda --name griffin-2b-simt -o "$carry/2b" --no-tensor-cores
rm -f "$carry"/2b/*.weights
# And with one MMA per tile on inputs rounded to bf16 (half the tensor-core work).
target/release/griffinc build "$ckpt" --target cuda --name griffin-2b-bf16in -o "$carry/2b" --tensor-core-inputs bf16
rm -f "$carry"/2b/*.weights
# And on inputs rounded to f16 (11 bits; the bf16 weights widened to f16 as staged).
target/release/griffinc build "$ckpt" --target cuda --name griffin-2b-f16in -o "$carry/2b" --tensor-core-inputs f16
rm -f "$carry"/2b/*.weights
# And with the projections on the warpgroup MMA (wgmma.mma_async, sm_90a) instead of mma.sync.
target/release/griffinc build "$ckpt" --target cuda --name griffin-2b-wgmma -o "$carry/2b" --wgmma
rm -f "$carry"/2b/*.weights
# And both: the warpgroup MMA on f16 projection inputs (the fastest prefill by count).
target/release/griffinc build "$ckpt" --target cuda --name griffin-2b-wgmma-f16in -o "$carry/2b" --wgmma --tensor-core-inputs f16
rm -f "$carry"/2b/*.weights
# And with every projection in one k part (the default splits some in two by a cost model).
target/release/griffinc build "$ckpt" --target cuda --name griffin-2b-whole -o "$carry/2b" --k-parts 1
rm -f "$carry"/2b/*.weights
# And with prefill chunks of 512 (the default until 2026-12-01; the default is 2048: the
# benchmark prompt in one chunk), to compare.
target/release/griffinc build "$ckpt" --target cuda --name griffin-2b-chunk512 -o "$carry/2b" --prefill-chunk 512
rm -f "$carry"/2b/*.weights
cp "$ckpt/config.json" "$carry/2b/"
# The latency model's estimate of the decode step (interpreter, ~80 s), for gpu-check.sh to
# print beside the measured profile: the first comparison of the model with a GPU.
cargo build --release -p griffinc --example decode_estimate --locked -q
target/release/examples/decode_estimate > "$carry/decode_estimate.txt"
# The kernel probe: tensor-core kernels on the device against the interpreter, one by one.
cp target/release/griffin-gpu-probe "$carry/"
strip "$carry"/golden/*/griffin "$carry"/2b/griffin-2b* "$carry/griffin-gpu-probe"
du -sh "$carry"
tar -C "$carry" -cf - . | xz -T0 -6 > target/gpu-carry/carry.tar.xz
du -sh target/gpu-carry
