#!/usr/bin/env bash
# End to end: p11-kit, after scripts/install.sh. `p11-kit list-modules` lists our module (at its
# installed path) and its token; GnuTLS finds the key with no --provider (through p11-kit); the
# OpenSSL pkcs11 engine, with no MODULE_PATH, goes through p11-kit-proxy: it signs, and
# `s_server` (token server key) and `s_client` (token client key) complete a mutual TLS handshake
# that verifies both certificates. install.sh --uninstall runs at the end (unless it was installed
# before), and then p11-kit must no longer list the module.
# Negative control: with the token's key broken, signing through the proxy fails.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need p11-kit p11tool openssl pkcs11-tool
e2e_setup
[ -f "$PKCS11_ENGINE" ] || abort "the OpenSSL pkcs11 engine is missing ($PKCS11_ENGINE; package libengine-pkcs11-openssl)"
WAS_INSTALLED=0
[ -f /etc/pkcs11/modules/devicekey.module ] && WAS_INSTALLED=1
use_installed
# Everything below uses the installed module.
MODULE=$INSTALLED_MODULE
make_key 01 proxyclient "proxy client"
make_key 02 proxyserver "proxy server"
CLIENT_URI=$(key_uri 01)
SERVER_URI=$(key_uri 02)
[ -n "$CLIENT_URI" ] && [ -n "$SERVER_URI" ] || abort "devicekey uri printed nothing"

# The engine with no MODULE_PATH: libp11 loads p11-kit-proxy.
openssl_engine_conf "$T/openssl.cnf"
grep -q MODULE_PATH "$T/openssl.cnf" && abort "the engine config must not name a module"
export OPENSSL_CONF="$T/openssl.cnf"
printf 'GET / HTTP/1.0\r\n\r\n' >"$T/get.txt"
head -c 1000 /dev/urandom >"$T/payload.bin"
openssl dgst -sha256 -binary -out "$T/payload.sha256" "$T/payload.bin"

check_list_modules() {
  run p11-kit list-modules
  expect "devicekey: $INSTALLED_MODULE"
  expect "library-manufacturer: devicekey"
  expect "token: $TOKEN_LABEL"
  expect "model: $TOKEN_MODEL"
  run bash "$E2E_ROOT/scripts/install.sh" --status
  expect "present: /etc/pkcs11/modules/devicekey.module"
}

check_gnutls_through_p11kit() {
  # No --provider: GnuTLS loads the modules p11-kit knows.
  run p11tool --list-all "pkcs11:token=$TOKEN_LABEL"
  expect "object=proxyclient;type=private"
  expect "object=proxyclient;type=cert"
  run p11tool --test-sign "$CLIENT_URI"
  expect "Verifying against public key in the token... ok"
}

check_engine_sign_through_proxy() {
  run openssl pkeyutl -engine pkcs11 -keyform engine -sign -inkey "$CLIENT_URI" \
    -in "$T/payload.sha256" -out sig.der
  run openssl dgst -sha256 -verify "$T/proxyclient.pub.pem" -signature sig.der "$T/payload.bin"
  expect "Verified OK"
}

check_mutual_tls_through_proxy() {
  local port
  port=$(free_port)
  start_bg srv openssl s_server -accept "127.0.0.1:$port" -www -naccept 1 \
    -engine pkcs11 -keyform engine -key "$SERVER_URI" -cert "$T/proxyserver.pem" \
    -Verify 1 -verify_return_error -CAfile "$T/proxyclient.pem"
  local pid=$BG_PID
  wait_port "$port" 15 || { cat "$T/srv.out"; fail "s_server did not start"; }
  echo "\$ openssl s_client -connect 127.0.0.1:$port -engine pkcs11 -key $CLIENT_URI ..."
  OUT=$(timeout -k 5 "$TIMEOUT" openssl s_client -connect "127.0.0.1:$port" -ign_eof \
    -verify_return_error -verify_hostname localhost -CAfile "$T/proxyserver.pem" \
    -engine pkcs11 -keyform engine -key "$CLIENT_URI" -cert "$T/proxyclient.pem" <"$T/get.txt" 2>&1)
  printf '%s\n' "$OUT" | grep -E 'Verif|subject=|HTTP/|Subject:|Peer signature|error'
  stop_bg "$pid"
  expect "Verification: OK"
  expect "Verify return code: 0 (ok)"
  expect "subject=O = devicekey e2e, CN = proxy server"
  expect "HTTP/1.0 200 ok"
  expect "Subject: O=devicekey e2e, CN=proxy client"
  grep -q "verify return:1" "$T/srv.out" || { cat "$T/srv.out"; fail "s_server did not verify the client certificate"; }
}

negative_proxy_sign() {
  # By CKA_ID only: the replacement key of the softhsm control has no CKA_LABEL through our token.
  run_fails openssl pkeyutl -engine pkcs11 -keyform engine -sign -inkey "pkcs11:token=$TOKEN_LABEL;id=%01;type=private" \
    -in "$T/payload.sha256" -out bad.der
}

check_uninstall() {
  if [ $WAS_INSTALLED = 1 ]; then
    echo "(devicekey was installed before this test: left installed)"
    return 0
  fi
  run bash "$E2E_ROOT/scripts/install.sh" --uninstall
  run p11-kit list-modules
  reject "devicekey:"
  [ ! -e "$INSTALLED_MODULE" ] || fail "$INSTALLED_MODULE is still there"
  [ ! -e /etc/pkcs11/modules/devicekey.module ] || fail "the p11-kit registration is still there"
}

check list_modules check_list_modules
check gnutls_without_provider check_gnutls_through_p11kit
check engine_sign_through_proxy check_engine_sign_through_proxy
check mutual_tls_through_proxy check_mutual_tls_through_proxy
negative negative_broken_key_proxy_sign negative_proxy_sign
check uninstall_removes_registration check_uninstall
e2e_finish
