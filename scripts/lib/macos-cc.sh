#!/usr/bin/env bash
# A C compiler for type-checking the macOS build on Linux (scripts/macos-typecheck.sh).
#
# Build scripts (openssl-sys's header probe) call the target's C compiler with Apple-only flags
# (`-arch arm64`, `-mmacosx-version-min=...`) that the Linux compiler rejects. This wrapper drops
# those flags and runs the host `cc` on the rest. Nothing it builds is linked into a macOS binary:
# `cargo check` and `cargo clippy` only need the probe to succeed.
set -euo pipefail
args=()
skip_next=0
for arg in "$@"; do
  if [ "$skip_next" -eq 1 ]; then
    skip_next=0
    continue
  fi
  case "$arg" in
    -arch) skip_next=1 ;;
    -mmacosx-version-min=* | -mmacos-version-min=*) ;;
    *) args+=("$arg") ;;
  esac
done
exec cc "${args[@]}"
