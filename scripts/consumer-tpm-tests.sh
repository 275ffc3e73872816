#!/usr/bin/env bash
# Real PKCS#11 consumers against our module on a TPM-backed slot (a throwaway swtpm).
#
#   scripts/consumer-tpm-tests.sh [MODULE] [CHECK...]
#
# MODULE defaults to target/release/libdevicekey_pkcs11.so (built with the `tpm` feature, the
# default on Linux). The suite starts one swtpm on a free loopback port (scripts/swtpm.sh) and
# stops it by its pid on exit. Each check runs in its own subshell with a fresh key store: a
# config with one `[[slot]] backend = "tpm"` labelled devicekey-tpm on that swtpm
# (allow_simulator = true, so swtpm counts as a TPM), HOME and the XDG directories inside a new
# temporary directory. CHECK names (e.g. `sign_ecdsa`) run only those checks.
#
# Each check prints `PASS name` or `FAIL name` (followed by the tool output). The last line is
# `N passed, N failed`. The exit status is non-zero when any check failed.
#
# Environment: CONSUMER_TIMEOUT (seconds per tool call, default 120), CONSUMER_VERBOSE=1 prints
# the output of passing checks too, CONSUMER_KEEP=1 keeps the temporary directories.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/consumer.sh
. "$ROOT/scripts/lib/consumer.sh"
SWTPM_PID=
consumer_init consumers-tpm "$@"
TOKEN_LABEL=devicekey-tpm

# The suite's swtpm is stopped by its pid on exit.
suite_cleanup() {
  if [ -n "$SWTPM_PID" ]; then
    bash "$ROOT/scripts/swtpm.sh" stop "$SWTPM_PID" || true
  fi
}

# ---------------------------------------------------------------------------------------------
# Helpers used inside checks (next to fail/run/expect/reject of scripts/lib/assert.sh). A check
# runs in a subshell; `fail` ends it.

# p11 ARGS...: pkcs11-tool on the TPM token (it needs no login).
p11() { run pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" "$@"; }

# write_config ALLOW_SIMULATOR: the one-slot TPM config of this check.
write_config() {
  printf '[[slot]]\nlabel = "%s"\nbackend = "tpm"\ntcti = "%s"\ndir = "%s"\nallow_simulator = %s\n' \
    "$TOKEN_LABEL" "$SWTPM_TCTI" "$CHECK_DIR/tpmkeys" "$1" >"$DEVICEKEY_CONFIG"
}

# gen_key: an EC P-256 key pair with id 01, label k1, made by the TPM.
gen_key() {
  p11 --keypairgen --key-type EC:prime256v1 --id 01 --label k1
  expect "Key pair generated"
  expect "Private Key Object; EC"
  expect "Public Key Object; EC  EC_POINT 256 bits"
  expect "EC_PARAMS:  06082a8648ce3d030107"
  expect "label:      k1"
  expect "ID:         01"
  # The key lives in the TPM store: one TSS2 PRIVATE KEY file in the slot's directory.
  local n
  n=$(grep -l -- "-----BEGIN TSS2 PRIVATE KEY-----" "$CHECK_DIR"/tpmkeys/*.pem 2>/dev/null | wc -l)
  [ "$n" = 1 ] || fail "expected one TSS2 PRIVATE KEY file in $CHECK_DIR/tpmkeys, found $n"
}

# pub_pem: read key 01's public key as SPKI DER, convert it to pub.pem, check it is P-256.
pub_pem() {
  p11 --read-object --type pubkey --id 01 -o pub.der
  [ -s pub.der ] || fail "pub.der is empty"
  run openssl pkey -pubin -inform DER -in pub.der -out pub.pem
  run openssl pkey -pubin -in pub.pem -noout -text
  expect "ASN1 OID: prime256v1"
}

# must_not_verify SIG DATA: openssl rejects SIG over DATA.
must_not_verify() {
  echo "\$ openssl dgst -sha256 -verify pub.pem -signature $1 $2 (must fail)"
  if openssl dgst -sha256 -verify pub.pem -signature "$1" "$2"; then
    fail "a signature verified over other data"
  fi
}

# ---------------------------------------------------------------------------------------------
# The checks. Each starts in an empty working directory with an empty key store.

check_list_token() {
  run pkcs11-tool --module "$MODULE" -L -M
  expect "token label        : $TOKEN_LABEL"
  expect "token manufacturer : devicekey"
  expect "token model        : hardware_tpm"
  expect "ECDSA-SHA256"
  reject "login required"
  reject "error:"
}

check_class_without_allow_simulator() {
  # swtpm is a simulator: without allow_simulator it is honestly os_protected.
  write_config false
  run pkcs11-tool --module "$MODULE" -L
  expect "token label        : $TOKEN_LABEL"
  expect "token model        : os_protected"
  reject "hardware_tpm"
}

check_keypairgen() {
  gen_key
  # A second process finds the key pair again (loaded from its blob by the TPM).
  p11 -O
  expect "Private Key Object; EC"
  expect "Public Key Object; EC  EC_POINT 256 bits"
  expect "label:      k1"
  p11 --list-objects --type privkey
  expect "Access:     sensitive, always sensitive, never extractable, local"
  pub_pem
}

check_sign_ecdsa() {
  gen_key
  pub_pem
  head -c 1000 /dev/urandom >data
  run openssl dgst -sha256 -binary -out data.sha256 data
  p11 --sign -m ECDSA --id 01 -i data.sha256 -o sig.der --signature-format openssl
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data
  expect "Verified OK"
  p11 --sign -m ECDSA --id 01 -i data.sha256 -o sig.raw
  rs_to_der sig.raw sig2.der
  run openssl dgst -sha256 -verify pub.pem -signature sig2.der data
  expect "Verified OK"
  echo tampered >>data
  must_not_verify sig.der data
}

check_sign_ecdsa_sha256() {
  gen_key
  pub_pem
  head -c 5000 /dev/urandom >data
  p11 --sign -m ECDSA-SHA256 --id 01 -i data -o sig.der --signature-format openssl
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data
  expect "Verified OK"
  p11 --sign -m ECDSA-SHA256 --id 01 -i data -o sig.raw
  rs_to_der sig.raw sig2.der
  run openssl dgst -sha256 -verify pub.pem -signature sig2.der data
  expect "Verified OK"
  echo tampered >>data
  must_not_verify sig.der data
}

check_ssh_keygen_D() {
  gen_key
  pub_pem
  run ssh-keygen -i -m PKCS8 -f pub.pem
  local want
  want=$(awk '$1 == "ecdsa-sha2-nistp256" { print $2 }' <<<"$OUT")
  [ -n "$want" ] || fail "ssh-keygen -i gave no ecdsa-sha2-nistp256 key"
  run ssh-keygen -D "$MODULE"
  expect "ecdsa-sha2-nistp256 "
  awk -v k="$want" '$1 == "ecdsa-sha2-nistp256" && $2 == k { found = 1 } END { exit !found }' <<<"$OUT" ||
    fail "ssh-keygen -D did not list the TPM key $want"
}

ALL_CHECKS=(
  list_token
  class_without_allow_simulator
  keypairgen
  sign_ecdsa
  sign_ecdsa_sha256
  ssh_keygen_D
)

# ---------------------------------------------------------------------------------------------
# Per-check environment.

setup_check_env() {
  local dir=$1
  consumer_check_env "$dir"
  unset DEVICEKEY_TPM_TCTI
  export DEVICEKEY_CONFIG="$dir/config.toml"
  export DEVICEKEY_LOG="${DEVICEKEY_LOG:-warn}"
  CHECK_DIR=$dir
  write_config true
}

consumer_start "$MODULE (TPM slot on swtpm)"

if swtpm_env=$(bash "$ROOT/scripts/swtpm.sh" start "$SUITE_TMP/swtpm" 2>"$SUITE_TMP/swtpm-start.log"); then
  eval "$swtpm_env"
  echo "swtpm pid $SWTPM_PID on $SWTPM_TCTI"
  run_checks
else
  record_fail swtpm_start "$SUITE_TMP/swtpm-start.log"
fi

consumer_finish
