#!/usr/bin/env bash
# Installs what building and testing griffinc needs on a Debian or Ubuntu machine:
# a Rust toolchain (checked, not installed), a C compiler/linker, LLVM 19 for the CPU backend.
# Idempotent: does nothing that is already done.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found: install a Rust toolchain (1.80 or newer), e.g. with rustup" >&2
  exit 1
fi

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
[ -x /usr/lib/llvm-19/bin/llvm-config ] || need+=(llvm-19-dev libpolly-19-dev)
dpkg -s libzstd-dev >/dev/null 2>&1 || need+=(libzstd-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

# A real ptxas (from PyPI's nvidia-cuda-nvcc, no GPU or CUDA toolkit needed) for the PTX tests.
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! ls "$root"/.tools/venv/lib/python*/site-packages/nvidia/cu13/bin/ptxas >/dev/null 2>&1; then
  echo "setup: installing ptxas (nvidia-cuda-nvcc) into .tools/venv"
  if ! python3 -m venv "$root/.tools/venv" 2>/dev/null; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y -qq python3-venv
    python3 -m venv "$root/.tools/venv"
  fi
  "$root/.tools/venv/bin/pip" install -q nvidia-cuda-nvcc
fi
