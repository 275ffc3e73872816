#!/usr/bin/env bash
# End to end: Java (JDK 17, SunPKCS11). With a SunPKCS11 config naming our module, `keytool -list`
# shows the token's key entry with our certificate's fingerprint; tests/java/DeviceKeyCheck.java
# signs with the token key and verifies in the JDK's own EC code (a flipped signature byte must
# not verify), OpenSSL verifies the same signature with the token's public key, and a Java TLS
# client authenticates with the token key against `openssl s_server -Verify`.
# Negative control: with the token's key broken, signing and the client authentication fail.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need java javac keytool openssl pkcs11-tool
e2e_setup
make_key 01 javaclient "java client"
make_soft_cert softserver "software server"

CFG=$T/sunpkcs11.cfg
printf 'name = devicekey\nlibrary = %s\n' "$MODULE" >"$CFG"
mkdir -p "$T/classes"
setup_step "javac" javac -d "$T/classes" "$E2E_ROOT/tests/java/DeviceKeyCheck.java"
head -c 4096 /dev/urandom >"$T/payload.bin"

javacheck() { run java -cp "$T/classes" DeviceKeyCheck "$@"; }

check_keytool_list() {
  # SunPKCS11 logs in with whatever password keytool is given; the token needs none.
  run keytool -list -keystore NONE -storetype PKCS11 -addprovider SunPKCS11 -providerArg "$CFG" -storepass unused
  expect "Keystore provider: SunPKCS11-devicekey"
  expect "Your keystore contains 1 entry"
  expect "javaclient, PrivateKeyEntry,"
  local fpr
  fpr=$(openssl x509 -in "$T/javaclient.pem" -noout -fingerprint -sha256 | sed 's/.*=//')
  expect "Certificate fingerprint (SHA-256): $fpr"
}

check_sign_verify() {
  javacheck sign "$CFG" javaclient "$T/payload.bin" "$T/java.sig"
  expect "key: EC from SunPKCS11-devicekey"
  expect "verify: OK"
  expect "corrupted signature rejected: OK"
  expect "sign: OK"
  # Outside Java: OpenSSL checks the signature with the public key the token reports.
  run openssl dgst -sha256 -verify "$T/javaclient.pub.pem" -signature "$T/java.sig" "$T/payload.bin"
  expect "Verified OK"
}

check_tls_client_auth() {
  s_server_start srv1 "$T/javaclient.pem"
  javacheck tls "$CFG" javaclient "$T/softserver.pem" localhost "$PORT"
  expect "handshake: TLSv1.3"
  expect "HTTP/1.0 200 ok"
  expect "Client certificate"
  expect "Subject: O=devicekey e2e, CN=java client"
  expect "tls: OK"
  stop_bg "$SERVER_PID"
  grep -q "verify return:1" "$T/srv1.out" || { cat "$T/srv1.out"; fail "s_server did not verify the client certificate"; }
}

negative_java() {
  run_fails java -cp "$T/classes" DeviceKeyCheck sign "$CFG" javaclient "$T/payload.bin" "$T/bad.sig"
  reject "sign: OK"
  s_server_start srv2 "$T/javaclient.pem"
  echo "\$ java DeviceKeyCheck tls ... (must not get the page)"
  OUT=$(timeout -k 5 "$TIMEOUT" java -cp "$T/classes" DeviceKeyCheck tls "$CFG" javaclient \
    "$T/softserver.pem" localhost "$PORT" </dev/null 2>&1)
  printf '%s\n' "$OUT" | tail -n 15
  reject "HTTP/1.0 200 ok"
  reject "tls: OK"
  stop_bg "$SERVER_PID"
}

check keytool_list check_keytool_list
check sign_verify_in_java_and_openssl check_sign_verify
check tls_client_auth check_tls_client_auth
negative negative_broken_key_sign_and_tls negative_java
e2e_finish
