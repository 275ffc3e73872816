#!/usr/bin/env bash
# End to end: the OpenSSL pkcs11 engine (libp11) with our token's key, on the key store
# E2E_BACKEND names. `openssl pkeyutl -sign` through the engine, with the module named by
# PKCS11_MODULE_PATH and by an openssl.cnf (MODULE_PATH); `openssl req -x509` makes a self-signed
# certificate whose public key is the token's; `pkcs11-tool --write-object` imports it next to
# the key pair (same CKA_ID) and reads it back unchanged. Every signature is verified by openssl
# with the public key the token reports. (TLS through the engine: openssl-tls.sh.)
# Negative control: with the token's key broken, the engine's signature does not verify.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need openssl pkcs11-tool
e2e_setup
[ -f "$PKCS11_ENGINE" ] || abort "the OpenSSL pkcs11 engine is missing ($PKCS11_ENGINE; package libengine-pkcs11-openssl)"
setup_step "key generation" pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" \
  --keypairgen --key-type EC:prime256v1 --id 01 --label k1
KEY_URI=$(key_uri 01)
[ -n "$KEY_URI" ] || abort "devicekey uri printed nothing"
openssl_engine_conf "$T/openssl.cnf" "$MODULE"
head -c 1000 /dev/urandom >"$T/msg"
setup_step "digest" openssl dgst -sha256 -binary -out "$T/msg.sha256" "$T/msg"

# engine_sign OUT [ENV...]: sign $T/msg.sha256 with the token's key through the engine.
engine_sign() {
  local out=$1
  shift
  run env "$@" openssl pkeyutl -engine pkcs11 -keyform engine -sign -inkey "$KEY_URI" \
    -in "$T/msg.sha256" -out "$out"
  [ -s "$out" ] || fail "the engine wrote no signature"
}

check_pkeyutl_module_path_env() {
  pub_pem 01
  engine_sign sig.der PKCS11_MODULE_PATH="$MODULE"
  run openssl asn1parse -inform DER -in sig.der
  expect "SEQUENCE"
  expect "INTEGER"
  run openssl pkeyutl -verify -pubin -inkey pub.pem -in "$T/msg.sha256" -sigfile sig.der
  expect "Signature Verified Successfully"
  verify_ok sig.der "$T/msg"
}

check_pkeyutl_openssl_cnf() {
  pub_pem 01
  engine_sign sig2.der OPENSSL_CONF="$T/openssl.cnf"
  run openssl pkeyutl -verify -pubin -inkey pub.pem -in "$T/msg.sha256" -sigfile sig2.der
  expect "Signature Verified Successfully"
}

check_req_x509() {
  pub_pem 01
  run env OPENSSL_CONF="$T/openssl.cnf" openssl req -new -x509 -engine pkcs11 -keyform engine \
    -key "$KEY_URI" -sha256 -days 30 -subj /CN=devicekey-test -out "$T/cert.pem"
  run openssl x509 -in "$T/cert.pem" -noout -text
  expect "Subject: CN = devicekey-test"
  expect "Issuer: CN = devicekey-test"
  expect "ecdsa-with-SHA256"
  expect "NIST CURVE: P-256"
  run openssl verify -CAfile "$T/cert.pem" "$T/cert.pem"
  expect "cert.pem: OK"
  # The certificate carries the token's public key.
  run openssl x509 -in "$T/cert.pem" -noout -pubkey
  printf '%s\n' "$OUT" >cert-pub.pem
  cmp -s <(openssl pkey -pubin -in cert-pub.pem -outform DER) pub.der ||
    fail "the certificate's public key is not the token's public key"
  run openssl x509 -in "$T/cert.pem" -outform DER -out "$T/cert.der"
}

check_cert_import() {
  [ -s "$T/cert.der" ] || fail "no certificate from req_x509"
  p11 --write-object "$T/cert.der" --type cert --id 01 --label k1
  expect "Certificate Object"
  p11 -O
  expect "Certificate Object; type = X.509 cert"
  expect "subject:    DN: CN=devicekey-test"
  # Private key, public key and certificate share CKA_ID 01.
  local n
  n=$(grep -c "ID:         01" <<<"$OUT")
  [ "$n" -ge 3 ] || fail "expected private key, public key and certificate with ID 01, saw $n"
  p11 --read-object --type cert --id 01 -o back.der
  cmp -s back.der "$T/cert.der" || fail "the certificate read back differs from the one written"
}

negative_pkeyutl() {
  pub_pem 01
  no_valid_signature bad.der "$T/msg" env OPENSSL_CONF="$T/openssl.cnf" openssl pkeyutl \
    -engine pkcs11 -keyform engine -sign -inkey "$KEY_URI" -in "$T/msg.sha256" -out bad.der
}

check pkeyutl_module_path_env check_pkeyutl_module_path_env
check pkeyutl_openssl_cnf check_pkeyutl_openssl_cnf
check req_x509 check_req_x509
check cert_import check_cert_import
negative negative_broken_key_pkeyutl negative_pkeyutl
e2e_finish
