#!/usr/bin/env bash
# Installs what building and testing griffinc needs on a Debian or Ubuntu machine.
# Idempotent: does nothing that is already done.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found: install a Rust toolchain (1.80 or newer), e.g. with rustup" >&2
  exit 1
fi
