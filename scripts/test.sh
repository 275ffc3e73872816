#!/usr/bin/env bash
# The whole test suite: system packages, build, format, lints, cargo tests, then real PKCS#11
# consumers (pkcs11-tool, the OpenSSL engine, ssh-keygen) against the built module.
#
#   scripts/test.sh
#
# Every stage runs even when an earlier one failed (except that the consumer checks need a
# release build). Each stage and each consumer check counts once in the last line,
# `N passed, N failed`. The exit status is non-zero when anything failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
export CARGO_TERM_PROGRESS_WHEN=never

PASSED=0
FAILED=0
FAILED_NAMES=()
START=$SECONDS

record() { # record NAME STATUS
  if [ "$2" -eq 0 ]; then
    PASSED=$((PASSED + 1))
    echo "PASS $1"
  else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$1")
    echo "FAIL $1"
  fi
}

stage() { # stage NAME CMD...: run a stage, show its output, record it
  local name=$1 t0=$SECONDS rc
  shift
  echo "==> $name: $*"
  "$@" </dev/null
  rc=$?
  echo "<== $name: exit $rc after $((SECONDS - t0))s"
  record "$name" "$rc"
  return "$rc"
}

stage setup bash scripts/setup.sh
stage cargo-fmt cargo fmt --all -- --check
stage cargo-build-release cargo build --release
build_rc=$?
stage cargo-clippy cargo clippy --all-targets -- -D warnings
# `cargo test` builds no cdylib: the integration tests load target/debug/libdevicekey_pkcs11.so.
stage cargo-build-debug cargo build
stage cargo-test cargo test --no-fail-fast
stage fuzz-smoke bash scripts/fuzz.sh --smoke # fuzz harnesses on stable, 5 s per target; stress/crash/server tests run in cargo-test at STRESS_SCALE=0.1

echo "==> consumers: scripts/consumer-tests.sh target/release/libdevicekey_pkcs11.so"
if [ $build_rc -ne 0 ] || [ ! -f target/release/libdevicekey_pkcs11.so ]; then
  echo "the release build failed: consumer checks not run"
  record consumers-not-run 1
else
  out=$(mktemp "${TMPDIR:-/tmp}/devicekey-test.XXXXXX")
  trap 'rm -f "$out"' EXIT
  # consumer-hsm-tests.sh: the same consumers on a SoftHSM-backed slot next to the software one.
  # consumer-tpm-tests.sh: pkcs11-tool, openssl and ssh-keygen on a TPM slot (a throwaway swtpm).
  for suite in consumer-tests consumer-hsm-tests consumer-tpm-tests; do
    bash "scripts/$suite.sh" "$ROOT/target/release/libdevicekey_pkcs11.so" </dev/null | tee "$out"
    summary=$(tail -n 1 "$out")
    if [[ $summary =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
      PASSED=$((PASSED + BASH_REMATCH[1]))
      FAILED=$((FAILED + BASH_REMATCH[2]))
      [ "${BASH_REMATCH[2]}" -eq 0 ] || FAILED_NAMES+=("$suite")
    else
      echo "scripts/$suite.sh ended without a summary line"
      record "$suite-summary" 1
    fi
  done
fi
stage e2e bash scripts/e2e/run.sh # real tools (ssh, TLS, NSS, Chromium, GnuTLS, Java, p11-kit) on the software, SoftHSM-backed and TPM (swtpm) key stores

echo
echo "test.sh finished in $((SECONDS - START))s"
if [ $FAILED -gt 0 ]; then echo "failed: ${FAILED_NAMES[*]}"; fi
echo "$PASSED passed, $FAILED failed"
[ $FAILED -eq 0 ]
