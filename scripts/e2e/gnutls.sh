#!/usr/bin/env bash
# End to end: GnuTLS. `p11tool --list-all` lists the key pair and certificate (with the URIs that
# `devicekey uri --full` prints), `p11tool --test-sign` signs and verifies, and `gnutls-cli` does
# TLS client authentication with pkcs11: URIs for key and certificate against
# `openssl s_server -Verify`, whose page must show our certificate.
# Negative control: with the token's key broken, --test-sign and the client authentication fail.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need p11tool gnutls-cli openssl pkcs11-tool
e2e_setup
make_key 01 gnutlsclient "gnutls client"
make_soft_cert softserver "software server"
KEY_URI=$(key_uri 01 private)
CERT_URI=$(key_uri 01 cert)
[ -n "$KEY_URI" ] && [ -n "$CERT_URI" ] || abort "devicekey uri printed nothing"
printf 'GET / HTTP/1.0\r\n\r\n' >"$T/get.txt"

check_list_all() {
  run p11tool --provider "$MODULE" --list-all
  local full
  for type in private public cert; do
    full=$("$DEVICEKEY" uri --module "$MODULE" --id 01 --type "$type" --full) || fail "devicekey uri failed"
    expect "URL: $full"
  done
  expect "Type: Private key (EC/ECDSA-SECP256R1)"
  expect "Type: Public key (EC/ECDSA-SECP256R1)"
  expect "Type: X.509 Certificate (EC/ECDSA-SECP256R1)"
  expect "Flags: CKA_NEVER_EXTRACTABLE; CKA_SENSITIVE;"
  reject_re "error|fail"
}

check_test_sign() {
  run p11tool --provider "$MODULE" --test-sign "$KEY_URI"
  expect "Signing using ECDSA-SHA256... ok"
  expect "Verifying against private key parameters... ok"
  expect "Verifying against public key in the token... ok"
}

# cli_get: gnutls-cli with the token's key and certificate, GET the server's page; $OUT.
cli_get() {
  echo "\$ gnutls-cli --provider $MODULE --x509keyfile '$KEY_URI' --x509certfile '$CERT_URI' -p $PORT 127.0.0.1"
  OUT=$(timeout -k 5 "$TIMEOUT" gnutls-cli --provider "$MODULE" --x509keyfile "$KEY_URI" \
    --x509certfile "$CERT_URI" --x509cafile "$T/softserver.pem" --verify-hostname localhost \
    -p "$PORT" 127.0.0.1 <"$T/get.txt" 2>&1)
  echo "(exit $?)"
  printf '%s\n' "$OUT" | grep -vE '^[A-Za-z0-9+/=]{64}$|TLSv1|SSLv3'
}

check_gnutls_cli_client_auth() {
  s_server_start srv1 "$T/gnutlsclient.pem"
  cli_get
  expect "Status: The certificate is trusted."
  expect "Handshake was completed"
  expect "HTTP/1.0 200 ok"
  expect "Client certificate"
  expect "Subject: O=devicekey e2e, CN=gnutls client"
  stop_bg "$SERVER_PID"
  grep -q "verify return:1" "$T/srv1.out" || { cat "$T/srv1.out"; fail "s_server did not verify the client certificate"; }
}

negative_gnutls() {
  # By CKA_ID only: the replacement key of the softhsm control has no CKA_LABEL through our token.
  KEY_URI="pkcs11:token=$TOKEN_LABEL;id=%01;type=private"
  run_fails p11tool --provider "$MODULE" --test-sign "$KEY_URI"
  s_server_start srv2 "$T/gnutlsclient.pem"
  cli_get
  expect "Status: The certificate is trusted."
  reject "HTTP/1.0 200 ok"
  reject "Client certificate"
  stop_bg "$SERVER_PID"
}

check p11tool_list_all check_list_all
check p11tool_test_sign check_test_sign
check gnutls_cli_client_auth check_gnutls_cli_client_auth
negative negative_broken_key_test_sign_and_tls negative_gnutls
e2e_finish
