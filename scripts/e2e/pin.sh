#!/usr/bin/env bash
# End to end: the user PIN, seen from the consumers. The script's slot gets `login = "pin"` after
# its key and certificate are made, and `devicekey pin set --pin-file` gives it a PIN (re-protecting
# the key that is there). Without a login the token shows the public key and the certificate but no
# private key. Then each consumer logs in its own way: `ssh -I` and `ssh-add -s` (with an
# ssh-agent for the test) read the PIN from SSH_ASKPASS and log in to a throwaway sshd; the OpenSSL
# engine (libp11) and the OpenSSL 3 provider (pkcs11-provider) take `pin-value` in the pkcs11:
# URI; NSS `certutil -K` takes `-f pinfile` and `tstclnt` `-w` for TLS client authentication;
# `p11tool --test-sign` takes GNUTLS_PIN; Java (SunPKCS11) the PIN given to KeyStore.load
# (keytool's -storepass). Every signature is verified outside the token.
# Each consumer has a wrong-PIN control: it fails, and the store counted the wrong try (software
# store: one try fewer in `devicekey pin status`; TPM store: the TPM's TPM2_PT_LOCKOUT_COUNTER
# moved). On the TPM store the throwaway swtpm's dictionary-attack limit is raised first and the
# counter cleared after each control, so the controls never lock the later checks out.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need ssh sshd ssh-keygen ssh-agent ssh-add setsid pkcs11-tool openssl certutil modutil tstclnt \
  p11tool java javac keytool
e2e_setup
if [ "$E2E_BACKEND" = softhsm ]; then
  skip all "the PIN checks run on the software and TPM stores; a login = \"pin\" slot over the pkcs11 store (its own PIN in pin_dir) is not covered here yet"
  e2e_finish
fi
[ -f "$PKCS11_ENGINE" ] || abort "the OpenSSL pkcs11 engine is missing ($PKCS11_ENGINE; package libengine-pkcs11-openssl)"
if [ "$E2E_BACKEND" = tpm ]; then
  need tpm2_getcap tpm2_dictionarylockout
  # Many tries before a lockout, and no forgetting of failures during the test (recovery time one
  # day), so that every wrong PIN shows in the counter.
  setup_step "TPM dictionary-attack parameters" tpm2_dictionarylockout -T "$SWTPM_TCTI" \
    --setup-parameters --max-tries=1000 --recovery-time=86400 --lockout-recovery-time=86400
fi

make_key 01 pinkey "pin user"
make_soft_cert softserver "software server"
KEY_URI=$(key_uri 01)
[ -n "$KEY_URI" ] || abort "devicekey uri printed nothing"

# The PIN, from now on.
PIN=e2e-pin-2718
WRONG_PIN=e2e-wrong-3141
printf '%s\n' "$PIN" >"$T/pin.txt"
printf '%s\n' "$WRONG_PIN" >"$T/wrong-pin.txt"
chmod 600 "$T/pin.txt" "$T/wrong-pin.txt"
printf 'login = "pin"\n' >>"$DEVICEKEY_CONFIG"
setup_step "pin set" "$DEVICEKEY" pin set --slot "$TOKEN_LABEL" --pin-file "$T/pin.txt"

# failures: a number that grows with each wrong PIN the store counted.
failures() {
  local out left max
  if [ "$E2E_BACKEND" = tpm ]; then
    out=$(tpm2_getcap -T "$SWTPM_TCTI" properties-variable) || return 1
    out=$(sed -n 's/^TPM2_PT_LOCKOUT_COUNTER: *//p' <<<"$out")
    [ -n "$out" ] || return 1
    echo $((out))
  else
    out=$("$DEVICEKEY" pin status --slot "$TOKEN_LABEL") || return 1
    read -r left max < <(sed -n 's/.*tries left \([0-9]*\) of \([0-9]*\).*/\1 \2/p' <<<"$out")
    [ -n "$left" ] || return 1
    echo $((max - left))
  fi
}

# forget_failures: the TPM's counter cleared; the software store's by a right login.
forget_failures() {
  if [ "$E2E_BACKEND" = tpm ]; then
    tpm2_dictionarylockout -T "$SWTPM_TCTI" --clear-lockout >/dev/null
  else
    pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" --login --pin "$PIN" -O >/dev/null 2>&1
  fi
}

# wrong_pin NAME FUNCTION: FUNCTION (a consumer given WRONG_PIN) must fail, and the store must
# have counted the wrong try.
wrong_pin() {
  local name=$1 fn=$2
  _wrong_pin_body() {
    local before after
    before=$(failures) || fail "cannot read the store's failure count"
    "$fn"
    after=$(failures) || fail "cannot read the store's failure count"
    echo "(wrong PINs counted by the store: $before before, $after after)"
    [ "$after" -gt "$before" ] || fail "the store did not count the wrong PIN"
  }
  check "$name" _wrong_pin_body
  forget_failures
}

# askpass PIN: SSH_ASKPASS answers PIN, and ssh and ssh-add must use it. ssh asks a token for
# its PIN only outside batch mode (with BatchMode=yes it says "pin required" and skips the key).
askpass() {
  printf '#!/bin/sh\necho %s\n' "$1" >"$T/askpass-$1"
  chmod 700 "$T/askpass-$1"
  export SSH_ASKPASS=$T/askpass-$1 SSH_ASKPASS_REQUIRE=force DISPLAY=:0
  SSH_OPTS=("${SSH_OPTS[@]/BatchMode=yes/BatchMode=no}")
}

check_token_wants_login() {
  run "$DEVICEKEY" pin status --slot "$TOKEN_LABEL"
  expect "PIN set"
  reject "LOCKED"
  p11 -L
  expect "login required"
  expect "PIN initialized"
  # Without a login: the public key and the certificate, no private key.
  p11 -O
  expect "Public Key Object; EC"
  expect "Certificate Object"
  reject "Private Key Object"
  p11 --login --pin "$PIN" -O
  expect "Private Key Object; EC"
}

wrong_pkcs11_tool() {
  run_fails pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" --login --pin "$WRONG_PIN" -O
  expect "CKR_PIN_INCORRECT"
}

check_ssh_I() {
  askpass "$PIN"
  ssh_key_login a -I "$MODULE"
}

wrong_ssh_I() {
  askpass "$WRONG_PIN"
  ssh_login_fails -I "$MODULE"
}

check_ssh_agent() {
  start_ssh_agent "$MODULE"
  askpass "$PIN"
  run setsid -w ssh-add -s "$MODULE"
  expect "Card added"
  ssh_agent_login
  stop_bg "$AGENT_PID"
}

wrong_ssh_agent() {
  start_ssh_agent "$MODULE"
  askpass "$WRONG_PIN"
  run_fails setsid -w ssh-add -s "$MODULE"
  reject "Card added"
  run_fails ssh-add -l
  ssh_login_fails -o IdentityAgent="$SSH_AUTH_SOCK"
  stop_bg "$AGENT_PID"
}

head -c 1000 /dev/urandom >"$T/msg"
setup_step "digest" openssl dgst -sha256 -binary -out "$T/msg.sha256" "$T/msg"
MODULES_DIR=$(openssl version -m 2>/dev/null | sed -n 's/^MODULESDIR: "\(.*\)"$/\1/p')
PROVIDER=${MODULES_DIR:-/usr/lib/x86_64-linux-gnu/ossl-modules}/pkcs11.so

# engine_sign RUN PIN / provider_sign RUN PIN: the OpenSSL engine (libp11) / the OpenSSL 3 provider
# (pkcs11-provider, after the default provider) signs the digest into sig.der with pin-value=PIN
# in the key's URI, through RUN (run; run_fails for a wrong PIN).
engine_sign() {
  "$1" env PKCS11_MODULE_PATH="$MODULE" openssl pkeyutl -engine pkcs11 -keyform engine -sign \
    -inkey "$KEY_URI;pin-value=$2" -in "$T/msg.sha256" -out sig.der
}
provider_sign() {
  "$1" env PKCS11_PROVIDER_MODULE="$MODULE" openssl pkeyutl -provider default -provider pkcs11 -sign \
    -inkey "$KEY_URI;pin-value=$2" -in "$T/msg.sha256" -out sig.der
}

# check_openssl_sign HOW: HOW (engine_sign or provider_sign) signs with the PIN, and openssl
# verifies with the public key the token reported.
check_openssl_sign() {
  "$1" run "$PIN"
  run openssl pkeyutl -verify -pubin -inkey "$T/pinkey.pub.pem" -in "$T/msg.sha256" -sigfile sig.der
  expect "Signature Verified Successfully"
}

# wrong_openssl_sign HOW: with the wrong PIN nothing is signed.
wrong_openssl_sign() {
  rm -f sig.der
  "$1" run_fails "$WRONG_PIN"
  [ ! -s sig.der ] || fail "openssl wrote a signature"
}

check_openssl_engine() { check_openssl_sign engine_sign; }
wrong_openssl_engine() { wrong_openssl_sign engine_sign; }
check_openssl_provider() { check_openssl_sign provider_sign; }
wrong_openssl_provider() { wrong_openssl_sign provider_sign; }

DB=$T/nssdb
NICK="$TOKEN_LABEL:pinkey"
mkdir -p "$DB"
setup_step "NSS database" certutil -N -d "sql:$DB" --empty-password
setup_step "NSS module" modutil -force -add devicekey -libfile "$MODULE" -dbdir "sql:$DB"
setup_step "trust the server" certutil -A -d "sql:$DB" -f "$T/pin.txt" -n softserver -t "CP,," -i "$T/softserver.pem"

check_nss() {
  run modutil -list devicekey -dbdir "sql:$DB"
  expect "Token Name: $TOKEN_LABEL"
  reject "Public (no login required)"
  run certutil -L -h all -d "sql:$DB" -f "$T/pin.txt"
  expect_re "^$NICK +u,u,u$"
  run certutil -K -h "$TOKEN_LABEL" -d "sql:$DB" -f "$T/pin.txt"
  expect_re "<[ 0-9]+> ec +01 +pinkey"
  s_server_start srv1 "$T/pinkey.pem"
  tstclnt_get "$PORT" "$PIN"
  expect "HTTP/1.0 200 ok"
  expect "Subject: O=devicekey e2e, CN=pin user"
  stop_bg "$SERVER_PID"
  grep -q "verify return:1" "$T/srv1.out" || { cat "$T/srv1.out"; fail "s_server did not verify the client certificate"; }
}

wrong_nss() {
  run_fails certutil -K -h "$TOKEN_LABEL" -d "sql:$DB" -f "$T/wrong-pin.txt"
  reject "pinkey"
  s_server_start srv2 "$T/pinkey.pem"
  tstclnt_get "$PORT" "$WRONG_PIN"
  reject "HTTP/1.0 200 ok"
  reject "Client certificate"
  stop_bg "$SERVER_PID"
}

check_p11tool() {
  run setsid -w env GNUTLS_PIN="$PIN" p11tool --provider "$MODULE" --login --test-sign "$KEY_URI"
  expect "Signing using ECDSA-SHA256... ok"
  expect "Verifying against public key in the token... ok"
}

wrong_p11tool() {
  run_fails setsid -w env GNUTLS_PIN="$WRONG_PIN" p11tool --provider "$MODULE" --login --test-sign "$KEY_URI"
  reject "Signing using ECDSA-SHA256... ok"
}

CFG=$T/sunpkcs11.cfg
printf 'name = devicekey\nlibrary = %s\n' "$MODULE" >"$CFG"
mkdir -p "$T/classes"
setup_step "javac" javac -d "$T/classes" "$E2E_ROOT/tests/java/DeviceKeyCheck.java"
head -c 4096 /dev/urandom >"$T/payload.bin"

# keytool_list RUN PIN / java_sign RUN PIN: `keytool -list` of the token, and DeviceKeyCheck
# signing payload.bin into java.sig, with PIN, through RUN (run; run_fails for a wrong PIN).
keytool_list() {
  "$1" keytool -list -keystore NONE -storetype PKCS11 -addprovider SunPKCS11 -providerArg "$CFG" -storepass "$2"
}
java_sign() {
  "$1" env DEVICEKEY_E2E_PIN="$2" java -cp "$T/classes" DeviceKeyCheck sign "$CFG" pinkey "$T/payload.bin" java.sig
}

check_java() {
  keytool_list run "$PIN"
  expect "pinkey, PrivateKeyEntry,"
  java_sign run "$PIN"
  expect "verify: OK"
  expect "sign: OK"
  run openssl dgst -sha256 -verify "$T/pinkey.pub.pem" -signature java.sig "$T/payload.bin"
  expect "Verified OK"
}

wrong_java() {
  keytool_list run_fails "$WRONG_PIN"
  reject "PrivateKeyEntry"
  rm -f java.sig
  java_sign run_fails "$WRONG_PIN"
  reject "sign: OK"
  [ ! -s java.sig ] || fail "Java wrote a signature"
}

sshd_setup "$T/pinkey.pub.pem"
cp "$SSH_PUB" "$S/authorized_keys"
start_sshd

check token_wants_login check_token_wants_login
wrong_pin wrong_pin_pkcs11_tool wrong_pkcs11_tool
check ssh_I_askpass check_ssh_I
wrong_pin wrong_pin_ssh_I wrong_ssh_I
check ssh_agent_askpass check_ssh_agent
wrong_pin wrong_pin_ssh_agent wrong_ssh_agent
check openssl_engine_pin_value check_openssl_engine
wrong_pin wrong_pin_openssl_engine wrong_openssl_engine
if [ -f "$PROVIDER" ]; then
  check openssl_provider_pin_value check_openssl_provider
  wrong_pin wrong_pin_openssl_provider wrong_openssl_provider
else
  skip openssl_provider_pin_value "pkcs11-provider is not installed ($PROVIDER)"
fi
check nss_pinfile_and_tstclnt check_nss
wrong_pin wrong_pin_nss wrong_nss
check p11tool_gnutls_pin check_p11tool
wrong_pin wrong_pin_p11tool wrong_p11tool
check java_keystore_pin check_java
wrong_pin wrong_pin_java wrong_java
e2e_finish
