#!/usr/bin/env bash
# End to end: NSS (the library of Firefox and Chromium). `modutil -add` puts the module into a
# fresh NSS database; `certutil -L -h all` shows the token's certificate, `certutil -K` its key;
# `tstclnt` does TLS client authentication with the token key against `openssl s_server -Verify`,
# and the server's page shows our certificate. No NSS tool may print an error (missing attributes
# and the like). Negative control: with the token's key broken, the client authentication fails.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need certutil modutil tstclnt openssl pkcs11-tool
e2e_setup
make_key 01 nssclient "nss client"
make_soft_cert softserver "software server"

DB=$T/nssdb
NICK="$TOKEN_LABEL:nssclient"
mkdir -p "$DB"
echo >"$T/pwfile"

# NSS messages that mean a module is incomplete or wrong.
# The module's own warnings (stderr, DEVICEKEY_LOG=warn) count too.
NSS_ERRORS='SEC_ERROR|PR_[A-Z_]+_ERROR|CKR_|attribute (is )?(missing|invalid|not)|missing attribute|could not|failed|invalid|not found|devicekey\[[0-9]+\] (ERROR|WARN)'

check_modutil_add() {
  run certutil -N -d "sql:$DB" --empty-password
  run modutil -force -add devicekey -libfile "$MODULE" -dbdir "sql:$DB"
  expect 'Module "devicekey" added to database.'
  reject_re "$NSS_ERRORS"
  run modutil -list devicekey -dbdir "sql:$DB"
  expect "Token Name: $TOKEN_LABEL"
  expect "Status: Enabled"
  expect "Login Type: Public (no login required)"
  reject_re "$NSS_ERRORS"
}

check_certutil_L() {
  run certutil -L -h all -d "sql:$DB" -f "$T/pwfile"
  expect_re "^$NICK +u,u,u$"
  reject_re "$NSS_ERRORS"
  run certutil -L -d "sql:$DB" -f "$T/pwfile" -n "$NICK"
  expect 'Subject: "CN=nss client,O=devicekey e2e"'
  expect "Certificate Trust Flags"
  # NSS prints this line for every certificate outside its built-in root list, its own soft
  # token's included (an NSS vendor attribute): not a sign of a missing standard attribute.
  OUT=$(grep -vF "Mozilla-CA-Policy: false (attribute missing)" <<<"$OUT")
  reject_re "$NSS_ERRORS"
  # The certificate NSS reads from the token is the one `devicekey cert` made.
  run certutil -L -d "sql:$DB" -f "$T/pwfile" -n "$NICK" -a
  printf '%s\n' "$OUT" >nss-cert.pem
  cmp -s <(openssl x509 -in nss-cert.pem -outform DER) <(openssl x509 -in "$T/nssclient.pem" -outform DER) ||
    fail "the certificate NSS reads differs from the one stored"
}

check_certutil_K() {
  run certutil -K -h "$TOKEN_LABEL" -d "sql:$DB" -f "$T/pwfile"
  expect_re "<[ 0-9]+> ec +01 +nssclient"
  reject_re "$NSS_ERRORS|no keys found"
}

check_tstclnt_client_auth() {
  s_server_start srv1 "$T/nssclient.pem"
  tstclnt_get "$PORT"
  expect "HTTP/1.0 200 ok"
  expect "Client certificate"
  expect "Subject: O=devicekey e2e, CN=nss client"
  reject_re "SEC_ERROR|PR_[A-Z_]+_ERROR|CKR_|attribute|devicekey\[[0-9]+\] (ERROR|WARN)"
  stop_bg "$SERVER_PID"
  grep -q "verify return:1" "$T/srv1.out" || { cat "$T/srv1.out"; fail "s_server did not verify the client certificate"; }
}

negative_tstclnt() {
  s_server_start srv2 "$T/nssclient.pem"
  tstclnt_get "$PORT"
  # The server's certificate was not the problem (tstclnt blames "server cert" for any failure).
  reject "SEC_ERROR_UNTRUSTED_ISSUER"
  reject "SEC_ERROR_UNKNOWN_ISSUER"
  reject "SEC_ERROR_BAD_CERT_DOMAIN"
  reject "HTTP/1.0 200 ok"
  reject "Client certificate"
  stop_bg "$SERVER_PID"
  echo "(failed as it must)"
}

check modutil_add check_modutil_add
# Trust the software server's certificate, for tstclnt.
setup_step "trust the server" certutil -A -d "sql:$DB" -f "$T/pwfile" -n softserver -t "CP,," -i "$T/softserver.pem"
check certutil_L_shows_token_cert check_certutil_L
check certutil_K_shows_token_key check_certutil_K
check tstclnt_client_auth check_tstclnt_client_auth
negative negative_broken_key_tstclnt negative_tstclnt
e2e_finish
