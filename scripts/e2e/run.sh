#!/usr/bin/env bash
# Run the end-to-end tests: real tools against the module, with throwaway servers on 127.0.0.1.
#
#   scripts/e2e/run.sh [STORE...] [TEST...]
#     STORE: software softhsm tpm (default: all three, or E2E_BACKENDS)
#     TEST:  pkcs11tool openssl-engine ssh openssl-tls nss chromium gnutls java p11kit p11kit-remote
#            openssl-provider git-signing package pin (default: all)
#
# Installs what the tests need when it is missing (the packages of scripts/setup.sh, plus
# `chromium` and a JDK with javac and keytool), builds the release module when it is missing, then
# runs each test in turn (they share system-wide state: the p11-kit registration, the Chromium
# policy directory). Each test prints PASS/FAIL lines and its own `N passed, N failed`; the last
# line here is the sum, `N passed, N failed`. Exit status non-zero when anything failed.
#
# Every test runs once per key store behind our token: the STOREs named, else E2E_BACKENDS (default
# "software softhsm tpm"; `scripts/e2e/run.sh tpm pkcs11tool` runs one test on one store). softhsm is a `backend = "pkcs11"` slot wrapping a throwaway SoftHSM
# token, tpm a `backend = "tpm"` slot on a throwaway swtpm started by each test script). The tpm
# store is skipped, with a SKIP line, only when swtpm is not installed and cannot be installed.
# Environment: E2E_NO_INSTALL=1 (no apt-get), E2E_TEST_TIMEOUT (seconds per test script, default
# 300), and those of scripts/e2e/lib.sh.
set -uo pipefail

E2E=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$E2E/../.." && pwd)
ALL=(pkcs11tool openssl-engine ssh openssl-tls nss chromium gnutls java p11kit p11kit-remote openssl-provider git-signing package pin)
TESTS=()
STORES=()
for arg in "$@"; do
  case "$arg" in
    software | softhsm | tpm) STORES+=("$arg") ;;
    *) TESTS+=("$arg") ;;
  esac
done
[ ${#TESTS[@]} -eq 0 ] && TESTS=("${ALL[@]}")
TEST_TIMEOUT=${E2E_TEST_TIMEOUT:-300}
START=$SECONDS

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

install_packages() {
  command -v apt-get >/dev/null 2>&1 || { echo "e2e: not a Debian-family system; install chromium and a JDK by hand"; return 0; }
  bash "$ROOT/scripts/setup.sh" || return 1
  local missing=()
  installed chromium || missing+=(chromium)
  if ! command -v javac >/dev/null 2>&1 || ! command -v keytool >/dev/null 2>&1; then
    missing+=(default-jdk-headless)
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "e2e: missing ${missing[*]} and not root"; return 1; }
    sudo=(sudo -n)
  fi
  echo "e2e: installing ${missing[*]}"
  local log
  log=$(mktemp "${TMPDIR:-/tmp}/devicekey-e2e-apt.XXXXXX")
  if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -qq >"$log" 2>&1 ||
    ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    echo "e2e: apt-get failed"
    return 1
  fi
  rm -f "$log"
}

PASSED=0
FAILED=0
FAILED_TESTS=()

if [ "${E2E_NO_INSTALL:-0}" != 1 ]; then
  install_packages || { FAILED=$((FAILED + 1)); FAILED_TESTS+=(install); }
fi

MODULE=${DEVICEKEY_MODULE:-$ROOT/target/release/libdevicekey_pkcs11.so}
BIN=${DEVICEKEY_BIN:-$ROOT/target/release/devicekey}
if [ ! -f "$MODULE" ] || [ ! -x "$BIN" ]; then
  echo "e2e: building the release module and CLI"
  (cd "$ROOT" && cargo build --release --quiet) || { FAILED=$((FAILED + 1)); FAILED_TESTS+=(build); }
fi

BACKENDS=${E2E_BACKENDS:-software softhsm tpm}
[ ${#STORES[@]} -gt 0 ] && BACKENDS="${STORES[*]}"
if [[ " $BACKENDS " == *" tpm "* ]] && ! command -v swtpm >/dev/null 2>&1; then
  echo "SKIP the tpm key store: swtpm is not installed and could not be installed (apt-get install swtpm swtpm-tools, or scripts/setup.sh)"
  BACKENDS=$(tr ' ' '\n' <<<"$BACKENDS" | grep -vx tpm | tr '\n' ' ')
  BACKENDS=${BACKENDS% }
fi
for backend in $BACKENDS; do
  for t in "${TESTS[@]}"; do
    script=$E2E/$t.sh
    if [ ! -f "$script" ]; then
      echo "FAIL $t: no such test (have: ${ALL[*]})"
      FAILED=$((FAILED + 1))
      FAILED_TESTS+=("$t")
      continue
    fi
    t0=$SECONDS
    echo "==> e2e $t ($backend)"
    out=$(E2E_BACKEND=$backend timeout -k 10 "$TEST_TIMEOUT" bash "$script" </dev/null 2>&1)
    rc=$?
    printf '%s\n' "$out"
    summary=$(printf '%s\n' "$out" | tail -n 1)
    if [[ $summary =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
      PASSED=$((PASSED + BASH_REMATCH[1]))
      FAILED=$((FAILED + BASH_REMATCH[2]))
      [ "${BASH_REMATCH[2]}" -eq 0 ] && [ $rc -eq 0 ] || FAILED_TESTS+=("$t($backend)")
    else
      echo "FAIL $t: ended without a summary (exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${TEST_TIMEOUT}s"))"
      FAILED=$((FAILED + 1))
      FAILED_TESTS+=("$t($backend)")
    fi
    echo "<== e2e $t ($backend): $((SECONDS - t0))s"
  done
done

echo
echo "e2e finished in $((SECONDS - START))s (key stores: $BACKENDS)"
[ $FAILED -gt 0 ] && echo "failed: ${FAILED_TESTS[*]}"
echo "$PASSED passed, $FAILED failed"
[ $FAILED -eq 0 ]
