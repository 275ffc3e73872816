# shellcheck shell=bash
# The harness of the consumer suites (scripts/consumer-tests.sh, consumer-hsm-tests.sh,
# consumer-tpm-tests.sh): arguments, the suite's temporary directory, the per-check environment,
# the check runner and the summary.
#
# A suite sets ROOT (the repository), sources this file, calls `consumer_init NAME "$@"`, defines
# its `check_<name>` functions, ALL_CHECKS and `setup_check_env DIR` (which calls
# `consumer_check_env DIR` and writes the check's config), then calls `consumer_start DESCRIPTION`,
# `run_checks` and, last, `consumer_finish` (its status is the suite's exit status).
#
# Optional hooks a suite may define: `suite_cleanup` (runs on exit, before the temporary directory
# is removed), `check_skip_reason NAME` (prints a reason and succeeds when NAME is to be skipped).
# CHECK_PREFIX is put before the check names in PASS/FAIL/SKIP lines.
#
# Environment: CONSUMER_TIMEOUT (seconds per tool call, default 120), CONSUMER_VERBOSE=1 prints
# the output of passing checks too, CONSUMER_KEEP=1 keeps the temporary directories.

# shellcheck source=scripts/lib/assert.sh
. "$ROOT/scripts/lib/assert.sh"

PASSED=0
FAILED=0
SKIPPED=0
FAILED_NAMES=()
CHECK_PREFIX=

# consumer_init NAME [MODULE] [CHECK...]: sets MODULE (an absolute path; default
# target/release/libdevicekey_pkcs11.so), ONLY (the checks to run; all when empty), TIMEOUT, and
# SUITE_TMP (a new directory devicekey-NAME.XXXXXX, removed on exit).
consumer_init() {
  local name=$1
  shift
  MODULE=${1:-$ROOT/target/release/libdevicekey_pkcs11.so}
  [ $# -gt 0 ] && shift
  ONLY=("$@")
  case "$MODULE" in /*) ;; *) MODULE=$PWD/$MODULE ;; esac
  TIMEOUT=${CONSUMER_TIMEOUT:-120}
  SUITE_TMP=$(mktemp -d "${TMPDIR:-/tmp}/devicekey-$name.XXXXXX")
  trap consumer_cleanup EXIT
  trap 'exit 130' INT TERM
}

consumer_cleanup() {
  if declare -F suite_cleanup >/dev/null; then suite_cleanup; fi
  if [ "${CONSUMER_KEEP:-0}" = 1 ]; then
    echo "kept $SUITE_TMP"
  else
    rm -rf "$SUITE_TMP"
  fi
}

# rs_to_der RAW DER: convert a raw r||s signature (64 bytes) to DER SEQUENCE { r, s }.
rs_to_der() {
  local size hex
  size=$(stat -c %s "$1")
  [ "$size" = 64 ] || fail "raw signature $1 is $size bytes, expected 64"
  hex=$(od -An -v -tx1 "$1" | tr -d ' \n')
  printf 'asn1=SEQUENCE:sig\n[sig]\nr=INTEGER:0x%s\ns=INTEGER:0x%s\n' "${hex:0:64}" "${hex:64:64}" >"$1.cnf"
  run openssl asn1parse -genconf "$1.cnf" -out "$2" -noout
}

# consumer_check_env DIR: the check's own HOME, XDG directories and work directory under DIR,
# PKCS11_MODULE_PATH naming the module, and no OpenSSL config or ssh agent from outside.
consumer_check_env() {
  local dir=$1
  mkdir -p "$dir/home" "$dir/config" "$dir/data" "$dir/cache" "$dir/run" "$dir/work"
  chmod 700 "$dir" "$dir/run"
  export HOME="$dir/home"
  export XDG_CONFIG_HOME="$dir/config" XDG_DATA_HOME="$dir/data" XDG_CACHE_HOME="$dir/cache"
  export XDG_RUNTIME_DIR="$dir/run"
  export PKCS11_MODULE_PATH="$MODULE"
  unset OPENSSL_CONF SSH_AUTH_SOCK
}

# consumer_skip NAME REASON: report a skipped check.
consumer_skip() {
  echo "SKIP $CHECK_PREFIX$1 ($2)"
  SKIPPED=$((SKIPPED + 1))
}

# record_fail NAME LOG: report a failed check (or suite step) with its output.
record_fail() {
  FAILED=$((FAILED + 1))
  FAILED_NAMES+=("$1")
  echo "FAIL $1"
  sed 's/^/    /' "$2"
}

# run_check NAME: run check_NAME in a subshell, in DIR/work of a fresh DIR set up by
# setup_check_env, and report PASS, FAIL (with its output, and the module's log when the check
# wrote one to DIR/module.log) or SKIP.
run_check() {
  local name=$1 shown=$CHECK_PREFIX$1 dir log rc reason
  if declare -F check_skip_reason >/dev/null && reason=$(check_skip_reason "$name"); then
    consumer_skip "$name" "$reason"
    return
  fi
  dir="$SUITE_TMP/$name"
  log="$SUITE_TMP/$name.log"
  mkdir -p "$dir"
  (
    { setup_check_env "$dir" && cd "$dir/work"; } || fail "could not set up the check environment"
    "check_$name"
  ) >"$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    PASSED=$((PASSED + 1))
    echo "PASS $shown"
    [ "${CONSUMER_VERBOSE:-0}" = 1 ] && sed 's/^/    /' "$log"
  else
    record_fail "$shown" "$log"
    if [ -f "$dir/module.log" ]; then sed 's/^/    module log: /' "$dir/module.log"; fi
  fi
  return 0
}

# run_checks: run every check of ALL_CHECKS, or only those named in ONLY.
run_checks() {
  local name o want
  for name in "${ALL_CHECKS[@]}"; do
    if [ ${#ONLY[@]} -gt 0 ]; then
      want=0
      for o in "${ONLY[@]}"; do [ "$o" = "$name" ] && want=1; done
      [ $want = 1 ] || continue
    fi
    run_check "$name"
  done
}

# consumer_start DESCRIPTION: the suite's first lines.
consumer_start() {
  echo "consumer checks against $1"
  if [ ! -f "$MODULE" ]; then
    echo "module $MODULE not found (build it with: cargo build --release)"
  fi
}

# consumer_finish: the summary (`N passed, N failed` last); succeeds when no check failed.
consumer_finish() {
  if [ $SKIPPED -gt 0 ]; then echo "($SKIPPED skipped)"; fi
  if [ $FAILED -gt 0 ]; then echo "failed: ${FAILED_NAMES[*]}"; fi
  echo "$PASSED passed, $FAILED failed"
  [ $FAILED -eq 0 ]
}
