# shellcheck shell=bash
# The stage runner of scripts/test.sh, stress.sh and fuzz.sh (the end-to-end checks have their own
# harness, scripts/e2e/lib.sh): cargo on PATH, the repository as the working directory, a PASS or
# FAIL line per stage, and the summary whose last line is `N passed, N failed`.
#
# A script sources this file, runs `stage NAME CMD...` (or `record NAME STATUS` for what it runs
# itself) and ends with `stages_finish SCRIPT`, whose status is the script's. With STAGE_LOG set to
# a file, each stage's output is appended to it too.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
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

stage() { # stage NAME CMD...: run a stage (no stdin), show its output, record it
  local name=$1 t0=$SECONDS rc
  shift
  echo "==> $name: $*"
  if [ -n "${STAGE_LOG:-}" ]; then
    "$@" </dev/null 2>&1 | tee -a "$STAGE_LOG"
    rc=${PIPESTATUS[0]}
  else
    "$@" </dev/null
    rc=$?
  fi
  echo "<== $name: exit $rc after $((SECONDS - t0))s"
  record "$name" "$rc"
  return "$rc"
}

stages_finish() { # stages_finish SCRIPT: the summary; succeeds when nothing failed
  echo
  echo "$1 finished in $((SECONDS - START))s"
  if [ "$FAILED" -gt 0 ]; then echo "failed: ${FAILED_NAMES[*]}"; fi
  echo "$PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ]
}
