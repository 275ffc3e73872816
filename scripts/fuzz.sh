#!/usr/bin/env bash
# Fuzzing: the four cargo-fuzz targets in fuzz/ (the C ABI, JSON-RPC lines, proof payloads,
# key files).
#
#   scripts/fuzz.sh                  build with nightly + cargo-fuzz, run each target 300 s
#   scripts/fuzz.sh --seconds 60     another time per target
#   scripts/fuzz.sh abi key_file     only these targets
#   scripts/fuzz.sh --smoke          the CI smoke: the same harnesses on the stable toolchain
#                                    (tests/robust_fuzz.rs: seeds, regressions, then 5 s of random
#                                    and mutated inputs per target)
#
# Corpora grow in fuzz/corpus/<target> (not committed), starting from fuzz/seeds/<target>.
# A crash leaves its input in fuzz/artifacts/<target>/; copy it into fuzz/regressions/<target>/
# (replayed by tests/robust_fuzz.rs in every `cargo test`) once it is fixed.
# The last line is `N passed, N failed`; exit status non-zero when a target crashed.
set -uo pipefail

# shellcheck source=scripts/lib/stages.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/stages.sh"

ALL_TARGETS=(abi rpc_lines proof_payload key_file)
SECONDS_PER=300
SMOKE=0
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 SECONDS_PER=5 ;;
    --seconds)
      SECONDS_PER=$2
      shift
      ;;
    -h | --help)
      sed -n '2,17p' "$0"
      exit 0
      ;;
    *) TARGETS+=("$1") ;;
  esac
  shift
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")

have_cargo_fuzz() {
  cargo +nightly --version >/dev/null 2>&1 && cargo +nightly fuzz --help >/dev/null 2>&1
}

run_libfuzzer() { # run_libfuzzer TARGET SECONDS
  local t=$1 secs=$2 log rc
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
  log=$(mktemp "${TMPDIR:-/tmp}/devicekey-fuzz.XXXXXX")
  local extra=()
  # The server's request threads are detached: one may still be exiting (its last 32 bytes not
  # yet freed) when serve() returns, which LeakSanitizer's per-input check reports as a leak.
  # Leaks of the module are measured with valgrind instead (scripts/stress.sh).
  [ "$t" = rpc_lines ] && extra=(-detect_leaks=0)
  (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=1024 -print_final_stats=1 "${extra[@]}") >"$log" 2>&1
  rc=$?
  local runs execs cov
  runs=$(grep -oE '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1)
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n 1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n 1)
  if [ $rc -eq 0 ]; then
    echo "FUZZ $t: ${execs:-?} executions in ${secs}s (${runs:-no summary}); $cov; no crash"
  else
    echo "FUZZ $t: CRASH after ${execs:-?} executions:"
    grep -E 'panicked|ERROR|SUMMARY|Test unit written|artifact' "$log" | head -20
  fi
  rm -f "$log"
  return $rc
}

if [ $SMOKE -eq 1 ]; then
  # The stable harnesses: no nightly build in CI, and always the current code.
  FUZZ_SMOKE_SECONDS=$SECONDS_PER cargo test --test robust_fuzz -- --nocapture 2>&1 |
    grep -E 'FUZZ-SMOKE|panicked|test result|error'
  record fuzz-smoke-stable "${PIPESTATUS[0]}"
else
  if ! have_cargo_fuzz; then
    echo "fuzz.sh: needs the nightly toolchain and cargo-fuzz:" \
      "rustup toolchain install nightly && cargo install cargo-fuzz" >&2
    echo "0 passed, 1 failed"
    exit 1
  fi
  echo "==> building the fuzz targets (nightly, AddressSanitizer)"
  if ! (cd fuzz && cargo +nightly fuzz build -O); then
    echo "0 passed, 1 failed"
    exit 1
  fi
  for t in "${TARGETS[@]}"; do
    run_libfuzzer "$t" "$SECONDS_PER"
    record "fuzz-$t" $?
  done
fi
stages_finish fuzz.sh
