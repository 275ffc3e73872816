#!/usr/bin/env bash
# Real PKCS#11 consumers against our module's SoftHSM-backed slot: pkcs11-tool (key generation,
# CKM_ECDSA and CKM_ECDSA_SHA256 signatures verified with openssl) and ssh-keygen -D.
#
#   scripts/consumer-hsm-tests.sh [MODULE] [CHECK...]
#
# MODULE defaults to target/release/libdevicekey_pkcs11.so. CHECK names (e.g. `sign_ecdsa`) run
# only those checks.
#
# Each check runs in its own subshell with a fresh config of two slots: slot 0 the software store
# ("devicekey", os_protected) and slot 1 ("devicekey-hsm") a pkcs11 slot wrapping a throwaway
# SoftHSM token (scripts/softhsm-token.sh) and declared hardware_tpm. HOME and the XDG directories
# point inside the check's temporary directory. Each check prints `PASS name`, `FAIL name`
# (followed by the tool output) or `SKIP name`; the last line is `N passed, N failed`. The exit
# status is non-zero when any check failed.
#
# Environment: CONSUMER_TIMEOUT (seconds per tool call, default 120), CONSUMER_VERBOSE=1 prints
# the output of passing checks too, CONSUMER_KEEP=1 keeps the temporary directories.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/consumer.sh
. "$ROOT/scripts/lib/consumer.sh"
consumer_init consumers-hsm "$@"
CHECK_PREFIX=hsm_
HSM_LABEL=devicekey-hsm

# ---------------------------------------------------------------------------------------------
# Helpers used inside checks (next to fail/run/expect/reject of scripts/lib/assert.sh). A check
# runs in a subshell; `fail` ends it.

# ours ARGS...: pkcs11-tool on our module's SoftHSM-backed slot (no login: our token needs none).
ours() { run pkcs11-tool --module "$MODULE" --slot "$HSM_SLOT" "$@"; }
# softhsm ARGS...: pkcs11-tool on the wrapped SoftHSM token directly, logged in.
softhsm() {
  run pkcs11-tool --module "$SOFTHSM_MODULE" --token-label "$SOFTHSM_TOKEN_LABEL" \
    --login --pin "$SOFTHSM_PIN" "$@"
}

# find_hsm_slot: sets HSM_SLOT to the slot number whose token is labelled devicekey-hsm.
find_hsm_slot() {
  run pkcs11-tool --module "$MODULE" -L
  HSM_SLOT=$(awk -v want="$HSM_LABEL" '
    /^Slot [0-9]+ / { slot = $2 }
    /token label/ { sub(/^[^:]*: */, ""); if ($0 == want) print slot }' <<<"$OUT")
  [ -n "$HSM_SLOT" ] || fail "no slot with the token $HSM_LABEL"
}

# gen_key: an EC P-256 key pair with id 01, label hk1 on the SoftHSM-backed slot.
gen_key() {
  find_hsm_slot
  ours --keypairgen --key-type EC:prime256v1 --id 01 --label hk1
  expect "Key pair generated"
  expect "Private Key Object; EC"
  expect "Public Key Object; EC  EC_POINT 256 bits"
  expect "label:      hk1"
  expect "ID:         01"
}

# pub_pem: key 01's public key through our module, as pub.der and pub.pem (P-256).
pub_pem() {
  ours --read-object --type pubkey --id 01 -o pub.der
  [ -s pub.der ] || fail "pub.der is empty"
  run openssl pkey -pubin -inform DER -in pub.der -out pub.pem
  run openssl pkey -pubin -in pub.pem -noout -text
  expect "ASN1 OID: prime256v1"
}

# ---------------------------------------------------------------------------------------------
# The checks. Each starts in an empty working directory with an empty software store and an
# empty SoftHSM token.

check_list_two_slots() {
  run pkcs11-tool --module "$MODULE" -L
  expect "token label        : devicekey"
  expect "token model        : os_protected"
  expect "token label        : $HSM_LABEL"
  expect "token model        : hardware_tpm"
  reject "login required"
  find_hsm_slot
  [ "$HSM_SLOT" = 1 ] || fail "the pkcs11 slot is slot $HSM_SLOT, expected 1 (config order)"
  ours -M
  expect "ECDSA"
  expect "ECDSA-SHA256"
}

check_keypairgen() {
  gen_key
  pub_pem
  # The key pair lives in the SoftHSM token, with the same point.
  local point
  point=$(tail -c 65 pub.der | od -An -v -tx1 | tr -d ' \n')
  softhsm --list-objects --type pubkey
  expect "label:      hk1"
  grep -qi "EC_POINT: *0441${point}" <<<"$OUT" || fail "SoftHSM does not hold the point $point"
  softhsm --list-objects --type privkey
  expect "Private Key Object; EC"
  expect "sensitive"
  expect "never extractable"
  ours --list-objects --type pubkey
  grep -qi "EC_POINT: *0441${point}" <<<"$OUT" || fail "our module reports another point"
  # Not on the software slot.
  run pkcs11-tool --module "$MODULE" --slot 0 --list-objects
  reject "hk1"
}

check_sign_ecdsa() {
  gen_key
  pub_pem
  head -c 1000 /dev/urandom >data
  run openssl dgst -sha256 -binary -out data.sha256 data
  ours --sign -m ECDSA --id 01 -i data.sha256 -o sig.der --signature-format openssl
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data
  expect "Verified OK"
  ours --sign -m ECDSA --id 01 -i data.sha256 -o sig.raw
  rs_to_der sig.raw sig2.der
  run openssl dgst -sha256 -verify pub.pem -signature sig2.der data
  expect "Verified OK"
  echo tampered >>data
  echo "\$ openssl dgst -sha256 -verify pub.pem -signature sig.der data (tampered, must fail)"
  if openssl dgst -sha256 -verify pub.pem -signature sig.der data; then
    fail "a signature verified over tampered data"
  fi
}

check_sign_ecdsa_sha256() {
  # SoftHSM 2.6 has no CKM_ECDSA_SHA256: our module hashes and sends CKM_ECDSA down.
  gen_key
  pub_pem
  head -c 5000 /dev/urandom >data
  ours --sign -m ECDSA-SHA256 --id 01 -i data -o sig.der --signature-format openssl
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data
  expect "Verified OK"
  ours --sign -m ECDSA-SHA256 --id 01 -i data -o sig.raw
  rs_to_der sig.raw sig2.der
  run openssl dgst -sha256 -verify pub.pem -signature sig2.der data
  expect "Verified OK"
}

check_ssh_keygen_D() {
  gen_key
  # The public key as SoftHSM itself has it.
  softhsm --read-object --type pubkey --id 01 -o softhsm-pub.der
  run openssl pkey -pubin -inform DER -in softhsm-pub.der -out softhsm-pub.pem
  run ssh-keygen -i -m PKCS8 -f softhsm-pub.pem
  local want
  want=$(awk '$1 == "ecdsa-sha2-nistp256" { print $2 }' <<<"$OUT")
  [ -n "$want" ] || fail "ssh-keygen -i gave no ecdsa-sha2-nistp256 key"
  run ssh-keygen -D "$MODULE"
  awk -v k="$want" '$1 == "ecdsa-sha2-nistp256" && $2 == k { found = 1 } END { exit !found }' <<<"$OUT" ||
    fail "ssh-keygen -D did not print the SoftHSM-backed key $want"
}

check_wrong_pin_keeps_software_slot() {
  export SOFTHSM_WRONG_PIN=999999
  sed -i 's/^pin_env = .*/pin_env = "SOFTHSM_WRONG_PIN"/' "$DEVICEKEY_CONFIG"
  run pkcs11-tool --module "$MODULE" -L
  expect "token label        : devicekey"
  reject "token label        : $HSM_LABEL"
  expect "(empty)"
  grep -F "rejected the PIN" "$DEVICEKEY_LOG_FILE" | grep -qF "fix:" ||
    fail "no log line names the rejected PIN and the fix: $(cat "$DEVICEKEY_LOG_FILE")"
  if grep -qF 999999 "$DEVICEKEY_LOG_FILE"; then fail "the PIN appears in the log"; fi
  run pkcs11-tool --module "$MODULE" --slot 0 --keypairgen --key-type EC:prime256v1 --id 02 --label sk
  expect "Key pair generated"
  head -c 100 /dev/urandom >data
  run pkcs11-tool --module "$MODULE" --slot 0 --sign -m ECDSA-SHA256 --id 02 -i data -o sig.der \
    --signature-format openssl
  run pkcs11-tool --module "$MODULE" --slot 0 --read-object --type pubkey --id 02 -o pub.der
  run openssl pkey -pubin -inform DER -in pub.der -out pub.pem
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data
  expect "Verified OK"
}

ALL_CHECKS=(
  list_two_slots
  keypairgen
  sign_ecdsa
  sign_ecdsa_sha256
  ssh_keygen_D
  wrong_pin_keeps_software_slot
)

# ---------------------------------------------------------------------------------------------
# Per-check environment.

setup_check_env() {
  local dir=$1
  consumer_check_env "$dir"
  # shellcheck source=scripts/softhsm-token.sh
  . "$ROOT/scripts/softhsm-token.sh" "$dir/softhsm" >/dev/null || return 1
  cat >"$dir/config.toml" <<EOF
[[slot]]
label = "devicekey"
backend = "software"
dir = "$dir/keys"

[[slot]]
label = "$HSM_LABEL"
backend = "pkcs11"
module = "$SOFTHSM_MODULE"
token = "$SOFTHSM_TOKEN_LABEL"
pin_env = "SOFTHSM_PIN"
protection_class = "hardware_tpm"
EOF
  export DEVICEKEY_CONFIG="$dir/config.toml"
  export DEVICEKEY_LOG="${DEVICEKEY_LOG:-warn}"
  export DEVICEKEY_LOG_FILE="$dir/module.log"
}

consumer_start "the SoftHSM-backed slot of $MODULE"
if ! command -v softhsm2-util >/dev/null 2>&1 || [ ! -f /usr/lib/softhsm/libsofthsm2.so ]; then
  for name in "${ALL_CHECKS[@]}"; do
    consumer_skip "$name" "SoftHSM is not installed; run scripts/setup.sh"
  done
  ALL_CHECKS=()
fi

run_checks
consumer_finish
