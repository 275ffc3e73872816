#!/usr/bin/env bash
# End to end: OpenSC's pkcs11-tool against our token, on the key store E2E_BACKEND names.
# `-L -M -O` (token, mechanisms, objects), `--keypairgen` (seen again by a second process, the
# point is the SPKI's, and the key is in the store: a key file, a TSS2 blob, an object of the
# wrapped SoftHSM token), the private key's attributes (sensitive, never extractable, not
# readable), `--sign -m ECDSA` and `-m ECDSA-SHA256` (DER and raw r||s forms, verified by
# openssl), pkcs11-tool's own `--test`, `--test-threads` and `--test-fork`, and the token next to
# a software slot in one config.
#
# Every check runs on every store, --test-threads and --test-fork too (SoftHSM loaded directly
# fails those two; our module in front of it does not), except (SKIP elsewhere, with the reason):
#   softhsm  a wrong PIN for the wrapped token hides that slot only; the software slot keeps
#            working and the log names the fix, never the PIN (only this store has a PIN).
#   tpm      without `allow_simulator` swtpm is honestly os_protected (only this store has a
#            simulator to tell apart).
# Negative control: with the token's key broken, a signature does not verify.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need pkcs11-tool openssl od
e2e_setup

check_list_token_mechanisms_objects() {
  run pkcs11-tool --module "$MODULE" -L -M -O
  expect "token label        : $TOKEN_LABEL"
  expect "token manufacturer : devicekey"
  expect "token model        : $TOKEN_MODEL"
  expect "token initialized"
  reject "login required"
  expect "ECDSA-SHA256"
  expect_re "EC(DSA)?-KEY-PAIR-GEN, keySize=\{256,256\}"
  reject "error:"
}

# The key pair is where the store keeps keys, with the point our token reports ($1: that point).
key_in_store() {
  case "$E2E_BACKEND" in
    software)
      grep -l '"id": "01"' "$T"/keys/*.key >/dev/null 2>&1 || fail "no key file with id 01 in $T/keys"
      ;;
    tpm)
      local n
      n=$(grep -l -- "-----BEGIN TSS2 PRIVATE KEY-----" "$T"/keys/*.pem 2>/dev/null | wc -l)
      [ "$n" = 1 ] || fail "expected one TSS2 PRIVATE KEY file in $T/keys, found $n"
      ;;
    softhsm)
      local hsm=(pkcs11-tool --module "$SOFTHSM_MODULE" --token-label "$SOFTHSM_TOKEN_LABEL" --login --pin "$SOFTHSM_PIN")
      run "${hsm[@]}" --list-objects --type pubkey
      expect "label:      k1"
      grep -qi "EC_POINT: *0441$1" <<<"$OUT" || fail "SoftHSM does not hold the point $1"
      run "${hsm[@]}" --list-objects --type privkey
      expect "Private Key Object; EC"
      expect "never extractable"
      ;;
  esac
}

check_keypairgen() {
  gen_key 01 k1
  # A second process sees the new key pair (token objects persist).
  p11 -O
  expect "Private Key Object; EC"
  expect "Public Key Object; EC  EC_POINT 256 bits"
  expect "label:      k1"
  pub_pem 01
  # CKA_EC_POINT is the DER OCTET STRING of the SPKI's point 04||X||Y.
  local point
  point=$(tail -c 65 pub.der | od -An -v -tx1 | tr -d ' \n')
  p11 -O --type pubkey
  grep -qi "EC_POINT: *0441${point}" <<<"$OUT" ||
    fail "CKA_EC_POINT is not a DER OCTET STRING of the SPKI point 04||X||Y ($point)"
  key_in_store "$point"
}

check_key_attributes() {
  p11 --list-objects --type privkey
  expect "Private Key Object; EC"
  expect "Access:     sensitive, always sensitive, never extractable, local"
  expect "sign"
  local access
  access=$(grep -m1 "Access:" <<<"$OUT")
  if grep -qE '(:|,) *extractable(,|$)' <<<"$access"; then fail "the private key is extractable: $access"; fi
  p11 --list-objects --type pubkey
  expect "Public Key Object; EC"
  expect "verify"
  # The private value cannot be read.
  echo "\$ pkcs11-tool --read-object --type privkey --id 01 (must fail)"
  if timeout -k 5 "$TIMEOUT" pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" \
    --read-object --type privkey --id 01 -o priv.bin </dev/null >priv.log 2>&1 && [ -s priv.bin ]; then
    cat priv.log
    fail "the private key was read out"
  fi
  cat priv.log
}

# sign_both MECH INPUT DATA: sign INPUT with MECH in DER and raw form; both verify over DATA.
sign_both() {
  p11 --sign -m "$1" --id 01 -i "$2" -o "sig-$1.der" --signature-format openssl
  verify_ok "sig-$1.der" "$3"
  p11 --sign -m "$1" --id 01 -i "$2" -o "sig-$1.raw"
  rs_to_der "sig-$1.raw" "sig-$1-raw.der"
  verify_ok "sig-$1-raw.der" "$3"
}

check_sign_ecdsa() {
  pub_pem 01
  head -c 1000 /dev/urandom >data
  run openssl dgst -sha256 -binary -out data.sha256 data
  sign_both ECDSA data.sha256 data
  echo tampered >>data
  verify_fails sig-ECDSA.der data
}

check_sign_ecdsa_sha256() {
  pub_pem 01
  head -c 5000 /dev/urandom >data2
  sign_both ECDSA-SHA256 data2 data2
  echo tampered >>data2
  verify_fails sig-ECDSA-SHA256.der data2
}

check_pkcs11_tool_test() {
  p11 --test
  expect "No errors"
  reject "error:"
  # Some tools always log in: a PIN-less token accepts C_Login and keeps working.
  p11 --login --pin 0000 --test
  expect "No errors"
  reject "error:"
}

check_test_threads() {
  run pkcs11-tool --module "$MODULE" --test-threads IL --test-threads ILGISLT0 -L
  expect "Test thread 1 C_GetTokenInfo"
  expect "Test thread 0 returning rv = 0"
  expect "Test thread 1 returning rv = 0"
  expect "token label        : $TOKEN_LABEL"
  # Whichever of main, thread 0 and thread 1 calls C_Initialize first gets CKR_OK; the others
  # must get CKR_CRYPTOKI_ALREADY_INITIALIZED (pkcs11-tool then says "some errors").
  local ended
  expect "test_threads all threads have ended"
  ended=$(sed -n '/^test_threads all threads have ended/,$p' <<<"$OUT" |
    grep -E "^test_threads thread:[01] state:-1, rv:" || true)
  [ "$(grep -c . <<<"$ended")" = 2 ] || fail "expected both threads to end (state:-1)"
  if grep -vE "rv:(CKR_OK|CKR_CRYPTOKI_ALREADY_INITIALIZED)$" <<<"$ended"; then
    fail "a thread ended with an unexpected return value"
  fi
  reject "Segmentation"
}

check_test_fork() {
  p11 --test-fork
  expect "Calling C_Initialize in forked child process"
  reject "error:"
  reject "Aborting"
}

# A software slot first, then this store's slot: both tokens are listed, in config order.
check_after_a_software_slot() {
  export DEVICEKEY_CONFIG=$T/two-slots.toml
  mkdir -p "$T/soft-keys" && chmod 700 "$T/soft-keys"
  { printf '[[slot]]\nlabel = "soft-slot"\nbackend = "software"\ndir = "%s/soft-keys"\n\n' "$T"; cat "$T/devicekey.toml"; } >"$DEVICEKEY_CONFIG"
  run pkcs11-tool --module "$MODULE" -L
  expect "token label        : soft-slot"
  expect "token label        : $TOKEN_LABEL"
  local slot
  slot=$(awk -v want="$TOKEN_LABEL" '/^Slot [0-9]+ / { s = $2 } /token label/ { sub(/^[^:]*: */, ""); if ($0 == want) print s }' <<<"$OUT")
  [ "$slot" = 1 ] || fail "the $E2E_BACKEND slot is slot '$slot', expected 1 (config order)"
  run pkcs11-tool --module "$MODULE" --slot 1 --list-objects --type pubkey
  expect "label:      k1"
  run pkcs11-tool --module "$MODULE" --slot 0 --list-objects
  reject "k1"
}

check_wrong_pin_keeps_software_slot() {
  export SOFTHSM_WRONG_PIN=999999 DEVICEKEY_LOG_FILE=$T/wrong-pin.log DEVICEKEY_CONFIG=$T/wrong-pin.toml
  mkdir -p "$T/soft-keys2" && chmod 700 "$T/soft-keys2"
  { printf '[[slot]]\nlabel = "soft-slot"\nbackend = "software"\ndir = "%s/soft-keys2"\n\n' "$T"; sed 's/^pin_env = .*/pin_env = "SOFTHSM_WRONG_PIN"/' "$T/devicekey.toml"; } >"$DEVICEKEY_CONFIG"
  run pkcs11-tool --module "$MODULE" -L
  expect "token label        : soft-slot"
  reject "token label        : $TOKEN_LABEL"
  grep -F "rejected the PIN" "$DEVICEKEY_LOG_FILE" | grep -qF "fix:" ||
    fail "no log line names the rejected PIN and the fix: $(cat "$DEVICEKEY_LOG_FILE")"
  if grep -qF 999999 "$DEVICEKEY_LOG_FILE"; then fail "the PIN appears in the log"; fi
  run pkcs11-tool --module "$MODULE" --slot 0 --keypairgen --key-type EC:prime256v1 --id 02 --label sk
  expect "Key pair generated"
  head -c 100 /dev/urandom >data3
  run pkcs11-tool --module "$MODULE" --slot 0 --sign -m ECDSA-SHA256 --id 02 -i data3 -o sig3.der \
    --signature-format openssl
  run pkcs11-tool --module "$MODULE" --slot 0 --read-object --type pubkey --id 02 -o pub.der
  run openssl pkey -pubin -inform DER -in pub.der -out pub.pem
  verify_ok sig3.der data3
}

check_class_without_allow_simulator() {
  export DEVICEKEY_CONFIG=$T/no-simulator.toml
  sed 's/^allow_simulator = .*/allow_simulator = false/' "$T/devicekey.toml" >"$DEVICEKEY_CONFIG"
  run pkcs11-tool --module "$MODULE" -L
  expect "token label        : $TOKEN_LABEL"
  expect "token model        : os_protected"
  reject "hardware_tpm"
}

negative_sign_ecdsa() {
  pub_pem 01
  head -c 1000 /dev/urandom >data4
  no_valid_signature sig4.der data4 pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" \
    --sign -m ECDSA-SHA256 --id 01 -i data4 -o sig4.der --signature-format openssl
}

check list_token_mechanisms_objects check_list_token_mechanisms_objects
check keypairgen check_keypairgen
check key_attributes check_key_attributes
check sign_ecdsa check_sign_ecdsa
check sign_ecdsa_sha256 check_sign_ecdsa_sha256
check pkcs11_tool_test check_pkcs11_tool_test
check test_threads check_test_threads
check test_fork check_test_fork
check after_a_software_slot check_after_a_software_slot
if [ "$E2E_BACKEND" = softhsm ]; then
  check wrong_pin_keeps_software_slot check_wrong_pin_keeps_software_slot
else
  skip wrong_pin_keeps_software_slot "only the pkcs11 store (softhsm) has a PIN"
fi
if [ "$E2E_BACKEND" = tpm ]; then
  check class_without_allow_simulator check_class_without_allow_simulator
else
  skip class_without_allow_simulator "only the tpm store runs on a simulator"
fi
negative negative_broken_key_sign negative_sign_ecdsa
e2e_finish
