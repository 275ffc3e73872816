#!/usr/bin/env bash
# End to end: a real browser. Headless Chromium (Debian `chromium`), with our module in
# $HOME/.pki/nssdb and the AutoSelectCertificateForUrls policy, loads a page from
# `openssl s_server -Verify 1 -www`; the page (which the server writes after verifying the client
# certificate) must show our certificate's subject. A token that waits for a PIN dialog hangs here.
# Negative control: with the token's key broken, the page does not show our certificate.
#
# The policy file is system-wide (/etc/chromium/policies/managed/); it is removed when the test
# ends. Needs root (for the policy) and the `chromium` package (scripts/e2e/run.sh installs it).
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need chromium certutil modutil openssl pkcs11-tool
e2e_setup
[ -w /etc ] || abort "needs root to write the Chromium policy in /etc/chromium/policies/managed"
make_key 01 browser "browser client"
make_soft_cert softserver "software server"

POLICY_DIR=/etc/chromium/policies/managed
POLICY=$POLICY_DIR/devicekey-e2e-$$.json
PORT=$(free_port)
SUBJECT="Subject: O=devicekey e2e, CN=browser client"
CHROME_TIMEOUT=${E2E_CHROMIUM_TIMEOUT:-60}

# Chromium reads $HOME/.pki/nssdb.
DB=$HOME/.pki/nssdb
mkdir -p "$DB"
setup_step "NSS database" certutil -N -d "sql:$DB" --empty-password
setup_step "modutil -add" modutil -force -add devicekey -libfile "$MODULE" -dbdir "sql:$DB"

mkdir -p "$POLICY_DIR"
on_exit "rm -f '$POLICY'"
printf '{"AutoSelectCertificateForUrls": ["{\\"pattern\\":\\"https://127.0.0.1:%s\\",\\"filter\\":{}}"]}\n' "$PORT" >"$POLICY.tmp"
mv -f "$POLICY.tmp" "$POLICY"

# One server for the whole test: it asks for a client certificate and verifies it against ours.
start_bg s_server openssl s_server -accept "127.0.0.1:$PORT" -www \
  -key "$T/softserver.key" -cert "$T/softserver.pem" \
  -Verify 1 -verify_return_error -CAfile "$T/browser.pem"
wait_port "$PORT" 15 || abort "s_server did not start: $(cat "$T/s_server.out")"

# browse PROFILE: load the page with a fresh profile; the DOM in $OUT.
browse() {
  local profile=$T/$1
  rm -rf "$profile"
  echo "\$ chromium --headless=new ... --user-data-dir=$profile --dump-dom https://127.0.0.1:$PORT/"
  OUT=$(timeout -k 5 "$CHROME_TIMEOUT" chromium --headless=new --no-sandbox --disable-gpu \
    --no-first-run --disable-background-networking --disable-component-update --disable-sync \
    --disable-quic --ignore-certificate-errors --user-data-dir="$profile" \
    --dump-dom "https://127.0.0.1:$PORT/" </dev/null 2>"$profile.stderr")
  local rc=$?
  echo "(exit $rc)"
  printf '%s\n' "$OUT" | grep -vE '^[A-Za-z0-9+/=]{64}$' | head -n 120
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    tail -n 20 "$profile.stderr"
    fail "Chromium did not finish in ${CHROME_TIMEOUT}s (waiting for a PIN or certificate dialog?)"
  fi
}

check_page_shows_certificate() {
  browse profile1
  expect "Client certificate"
  expect "$SUBJECT"
  reject "no client certificate available"
}

negative_page() {
  browse profile2
  reject "$SUBJECT"
  echo "(no page with our certificate, as it must be)"
}

check client_cert_page check_page_shows_certificate
negative negative_broken_key_no_page negative_page
e2e_finish
