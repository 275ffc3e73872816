#!/usr/bin/env bash
# End to end: OpenSSL TLS through the pkcs11 engine (libp11), with the module path explicit in an
# openssl.cnf (MODULE_PATH). `openssl s_server` serves with a token key as its server key;
# `openssl s_client` does mutual TLS with a token key as its client key; and both at once. Every
# handshake must verify the peer's certificate, and the server's page must show the client
# certificate. The same handshakes through p11-kit (no MODULE_PATH) are in p11kit.sh.
# Negative controls: a server that does not trust the client's certificate refuses it, and with the
# token's key broken the client authentication fails.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need openssl pkcs11-tool
e2e_setup
[ -f "$PKCS11_ENGINE" ] || abort "the OpenSSL pkcs11 engine is missing ($PKCS11_ENGINE; package libengine-pkcs11-openssl)"
make_key 01 client "tls client"
make_key 02 server "tls server"
make_soft_cert softserver "software server"
make_soft_cert softclient "software client"
CLIENT_URI=$(key_uri 01)
SERVER_URI=$(key_uri 02)
[ -n "$CLIENT_URI" ] && [ -n "$SERVER_URI" ] || abort "devicekey uri printed nothing"

openssl_engine_conf "$T/openssl.cnf" "$MODULE"
export OPENSSL_CONF="$T/openssl.cnf"
printf 'GET / HTTP/1.0\r\n\r\n' >"$T/get.txt"

# s_server_start NAME KEYARGS... -- EXTRA...: an s_server with -www on a free port ($PORT).
s_server_start() {
  local name=$1
  shift
  PORT=$(free_port)
  start_bg "$name" openssl s_server -accept "127.0.0.1:$PORT" -www -naccept 1 "$@"
  SERVER_PID=$BG_PID
  wait_port "$PORT" 15 || { cat "$T/$name.out"; fail "s_server did not start"; }
}

# tls_get ARGS...: s_client to $PORT, send a GET, keep everything in $OUT (never fails by itself).
tls_get() {
  echo "\$ openssl s_client -connect 127.0.0.1:$PORT $*"
  OUT=$(timeout -k 5 "$TIMEOUT" openssl s_client -connect "127.0.0.1:$PORT" -ign_eof \
    -verify_return_error -verify_hostname localhost "$@" <"$T/get.txt" 2>&1)
  echo "(exit $?)"
  printf '%s\n' "$OUT" | grep -vE '^[A-Za-z0-9+/=]{64}$'
}

engine_key() { echo -engine pkcs11 -keyform engine -key "$1"; }

check_server_key_on_token() {
  # shellcheck disable=SC2046
  s_server_start srv1 $(engine_key "$SERVER_URI") -cert "$T/server.pem"
  tls_get -CAfile "$T/server.pem"
  expect "Verification: OK"
  expect "Verify return code: 0 (ok)"
  expect "subject=O = devicekey e2e, CN = tls server"
  expect "Peer signature type: ECDSA"
  expect "HTTP/1.0 200 ok"
  expect "no client certificate available"
  stop_bg "$SERVER_PID"
}

check_client_key_on_token() {
  s_server_start srv2 -key "$T/softserver.key" -cert "$T/softserver.pem" \
    -Verify 1 -verify_return_error -CAfile "$T/client.pem"
  # shellcheck disable=SC2046
  tls_get -CAfile "$T/softserver.pem" $(engine_key "$CLIENT_URI") -cert "$T/client.pem"
  expect "Verify return code: 0 (ok)"
  expect "HTTP/1.0 200 ok"
  expect "Client certificate"
  expect "Subject: O=devicekey e2e, CN=tls client"
  reject "no client certificate available"
  stop_bg "$SERVER_PID"
  grep -q "verify return:1" "$T/srv2.out" || { cat "$T/srv2.out"; fail "s_server did not verify the client certificate"; }
}

check_both_keys_on_token() {
  # shellcheck disable=SC2046
  s_server_start srv3 $(engine_key "$SERVER_URI") -cert "$T/server.pem" \
    -Verify 1 -verify_return_error -CAfile "$T/client.pem"
  # shellcheck disable=SC2046
  tls_get -CAfile "$T/server.pem" $(engine_key "$CLIENT_URI") -cert "$T/client.pem"
  expect "Verify return code: 0 (ok)"
  expect "subject=O = devicekey e2e, CN = tls server"
  expect "HTTP/1.0 200 ok"
  expect "Subject: O=devicekey e2e, CN=tls client"
  stop_bg "$SERVER_PID"
}

check_tls12_client_key_on_token() {
  s_server_start srv4 -key "$T/softserver.key" -cert "$T/softserver.pem" -tls1_2 \
    -Verify 1 -verify_return_error -CAfile "$T/client.pem"
  # shellcheck disable=SC2046
  tls_get -tls1_2 -CAfile "$T/softserver.pem" $(engine_key "$CLIENT_URI") -cert "$T/client.pem"
  expect "Protocol  : TLSv1.2"
  expect "HTTP/1.0 200 ok"
  expect "Subject: O=devicekey e2e, CN=tls client"
  stop_bg "$SERVER_PID"
}

# client_refused NAME CA URI: an s_server that trusts CA only, and our client with the key URI and
# client.pem. The handshake gets past the server's certificate; the client authentication fails.
client_refused() {
  s_server_start "$1" -key "$T/softserver.key" -cert "$T/softserver.pem" \
    -Verify 1 -verify_return_error -CAfile "$2"
  # shellcheck disable=SC2046
  tls_get -CAfile "$T/softserver.pem" $(engine_key "$3") -cert "$T/client.pem"
  expect "Verification: OK"
  reject "HTTP/1.0 200 ok"
  reject "Client certificate"
  stop_bg "$SERVER_PID"
}

# Negative: the server trusts another certificate only; our client must be refused.
check_untrusted_client_refused() {
  client_refused srv5 "$T/softclient.pem" "$CLIENT_URI"
  echo "(refused as it must be)"
}

negative_client_auth() {
  # By CKA_ID only: the replacement key of the softhsm control has no CKA_LABEL through our token.
  client_refused srv6 "$T/client.pem" "pkcs11:token=$TOKEN_LABEL;id=%01;type=private"
  echo "(failed as it must)"
}

# `devicekey cert` and `devicekey uri` on a fresh key (on every backend: the key pairs above take a
# shortcut on softhsm, see make_key): the certificate is stored next to the key, a CSR verifies,
# and a certificate for another key is refused.
check_devicekey_cert_import() {
  run pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" --keypairgen --key-type EC:prime256v1 --id 03 --label imported
  run "$DEVICEKEY" cert --module "$MODULE" --id 03 --subject "CN=imported,O=devicekey e2e" -o imported.pem
  expect "stored on the token as pkcs11:token=$TOKEN_LABEL;id=%03;object=imported;type=cert"
  run "$DEVICEKEY" uri --module "$MODULE" --id 03 --type cert
  expect "pkcs11:token=$TOKEN_LABEL;id=%03;object=imported;type=cert"
  run pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" --read-object --type cert --id 03 -o back.der
  cmp -s back.der <(openssl x509 -in imported.pem -outform DER) || fail "the token's certificate differs from the one made"
  run openssl verify -CAfile imported.pem imported.pem
  run "$DEVICEKEY" cert --module "$MODULE" --id 03 --csr --subject "CN=imported request" -o req.pem
  run openssl req -in req.pem -noout -verify -subject
  expect "verify OK"
  run_fails "$DEVICEKEY" cert --module "$MODULE" --id 03 --import "$T/client.pem"
  expect "the certificate is not for this key"
}

check devicekey_cert_import check_devicekey_cert_import
check server_key_on_token check_server_key_on_token
check mutual_tls_client_key_on_token check_client_key_on_token
check mutual_tls_both_keys_on_token check_both_keys_on_token
check mutual_tls12_client_key_on_token check_tls12_client_key_on_token
check negative_untrusted_client_refused check_untrusted_client_refused
negative negative_broken_key_client_auth negative_client_auth
e2e_finish
