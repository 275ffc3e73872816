# shellcheck shell=bash
# Assertions of the shell test suites (sourced by scripts/lib/consumer.sh and scripts/e2e/lib.sh).
#
# A check runs in a subshell; inside it `run` runs a tool with a timeout ($TIMEOUT seconds) and no
# stdin and keeps its output in $OUT, `expect`/`expect_re`/`reject` assert on $OUT, and `fail` ends
# the check.

# fail MESSAGE: end the check (its subshell) as failed.
fail() {
  echo "ASSERTION FAILED: $*"
  exit 1
}

# run CMD...: run a command (with a timeout, no stdin), print and keep its output in $OUT,
# fail when it exits non-zero.
run() {
  echo "\$ $*"
  OUT=$(timeout -k 5 "$TIMEOUT" "$@" </dev/null 2>&1)
  local rc=$?
  [ -n "$OUT" ] && printf '%s\n' "$OUT"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    fail "timed out after ${TIMEOUT}s: $*"
  fi
  [ $rc -eq 0 ] || fail "exit status $rc: $*"
}

# expect TEXT: the last command's output contains TEXT (fixed string).
expect() {
  grep -qF -- "$1" <<<"$OUT" || fail "expected output to contain: $1"
}

# expect_re REGEX: the last command's output matches an extended regex.
expect_re() {
  grep -qE -- "$1" <<<"$OUT" || fail "expected output to match: $1"
}

# reject TEXT: the last command's output does not contain TEXT.
reject() {
  if grep -qF -- "$1" <<<"$OUT"; then fail "output must not contain: $1"; fi
}
