#!/usr/bin/env bash
# Type-checks the macOS build on Linux: `cargo check` and `cargo clippy -- -D warnings` for
# aarch64-apple-darwin and x86_64-apple-darwin, library and binaries, with the Secure Enclave
# store compiled in.
#
#   scripts/macos-typecheck.sh
#
# This proves the macOS code compiles and passes the lints; it does not link (the macOS SDK is not
# here) and runs nothing. What a Mac user runs on real hardware is scripts/macos-check.sh.
#
# Needs the two Rust targets (installed with rustup when missing, which needs access to the Rust
# distribution server) and a host C compiler: openssl-sys's build script probes the OpenSSL
# headers with the target's C compiler, which is pointed at scripts/lib/macos-cc.sh, and the
# OPENSSL_* variables below make it read the host's headers. The exit status is non-zero when any
# check fails.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
export CARGO_TERM_PROGRESS_WHEN=never

TARGETS=(aarch64-apple-darwin x86_64-apple-darwin)

installed=$(rustup target list --installed 2>/dev/null) || {
  echo "macos-typecheck: rustup is needed to add the macOS targets" >&2
  exit 1
}
for target in "${TARGETS[@]}"; do
  if ! grep -qx "$target" <<<"$installed"; then
    echo "macos-typecheck: adding the Rust target $target"
    rustup target add "$target" || {
      echo "macos-typecheck: could not add $target (no access to the Rust distribution server?)" >&2
      exit 1
    }
  fi
done

CC_WRAPPER="$ROOT/scripts/lib/macos-cc.sh"
export CC_aarch64_apple_darwin="$CC_WRAPPER"
export CC_x86_64_apple_darwin="$CC_WRAPPER"
# Header probe only: nothing is linked against these libraries.
OPENSSL_LIB_DIR=$(dirname "$(cc -print-file-name=libssl.so 2>/dev/null)")
[ -d "$OPENSSL_LIB_DIR" ] || OPENSSL_LIB_DIR=/usr/lib
export OPENSSL_DIR=/usr OPENSSL_LIB_DIR OPENSSL_INCLUDE_DIR=/usr/include

PASSED=0
FAILED=0
check() { # check NAME CMD...
  local name=$1
  shift
  echo "== $name: $*"
  if "$@"; then
    PASSED=$((PASSED + 1))
    echo "PASS $name"
  else
    FAILED=$((FAILED + 1))
    echo "FAIL $name"
  fi
}

for target in "${TARGETS[@]}"; do
  check "check $target" cargo check --target "$target" --lib --bins
  check "clippy $target" cargo clippy --target "$target" --lib --bins -- -D warnings
done

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
