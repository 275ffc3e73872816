#!/usr/bin/env bash
# Real PKCS#11 consumers against a module: pkcs11-tool, the OpenSSL pkcs11 engine, ssh-keygen.
#
#   scripts/consumer-tests.sh [MODULE] [CHECK...]
#
# MODULE defaults to target/release/libdevicekey_pkcs11.so. When MODULE is SoftHSM
# (/usr/lib/softhsm/libsofthsm2.so), every check runs on a throwaway SoftHSM token with a PIN
# instead, which proves the checks themselves; checks SoftHSM is known to fail are skipped.
# CHECK names (e.g. `sign_ecdsa`) run only those checks.
#
# Each check runs in its own subshell on a fresh key store (DEVICEKEY_CONFIG naming a new temporary
# directory), with HOME and the XDG directories pointed inside it, and prints `PASS name`,
# `FAIL name` (followed by the tool output) or `SKIP name`. The last line is `N passed, N failed`.
# The exit status is non-zero when any check failed.
#
# Environment: CONSUMER_TIMEOUT (seconds per tool call, default 120), CONSUMER_VERBOSE=1 prints
# the output of passing checks too, CONSUMER_KEEP=1 keeps the temporary directories.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/consumer.sh
. "$ROOT/scripts/lib/consumer.sh"
consumer_init consumers "$@"

SOFTHSM_MODULE_DEFAULT=/usr/lib/softhsm/libsofthsm2.so
case "$(basename "$MODULE")" in
  *softhsm*) TARGET=softhsm ;;
  *) TARGET=devicekey ;;
esac

# Where the OpenSSL pkcs11 engine (libp11) lives; `-engine pkcs11` finds it by name in ENGINESDIR.
ENGINES_DIR=$(openssl version -e 2>/dev/null | sed -n 's/^ENGINESDIR: "\(.*\)"$/\1/p')

# ---------------------------------------------------------------------------------------------
# Helpers used inside checks (next to fail/run/expect/reject of scripts/lib/assert.sh). A check
# runs in a subshell; `fail` ends it.

# p11 ARGS...: pkcs11-tool on our token (no login); p11_auth: with login where the token needs it.
p11() { run pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" "$@"; }
p11_auth() { run pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" "${AUTH[@]}" "$@"; }

# The RFC 7512 URI of key 01's private key, as libp11 takes it.
key_uri() { echo "pkcs11:token=$TOKEN_LABEL;id=%01;type=private$URI_PIN"; }

# gen_key: an EC P-256 key pair with id 01, label k1; asserts the tool's report.
gen_key() {
  p11_auth --keypairgen --key-type EC:prime256v1 --id 01 --label k1
  expect "Key pair generated"
  expect "Private Key Object; EC"
  expect "Public Key Object; EC  EC_POINT 256 bits"
  expect "EC_PARAMS:  06082a8648ce3d030107"
  expect "label:      k1"
  expect "ID:         01"
}

# pub_pem: read key 01's public key as SPKI DER, convert it to pub.pem, check it is P-256.
pub_pem() {
  p11 --read-object --type pubkey --id 01 -o pub.der
  [ -s pub.der ] || fail "pub.der is empty"
  run openssl pkey -pubin -inform DER -in pub.der -out pub.pem
  run openssl pkey -pubin -in pub.pem -noout -text
  expect "ASN1 OID: prime256v1"
  expect "NIST CURVE: P-256"
}

# ---------------------------------------------------------------------------------------------
# The checks. Each starts in an empty working directory with an empty token.

check_list_slots_mechanisms_objects() {
  run pkcs11-tool --module "$MODULE" -L -M -O
  expect "token label        : $TOKEN_LABEL"
  expect "token initialized"
  expect_re "ECDSA(,| )"
  expect_re "EC(DSA)?-KEY-PAIR-GEN"
  if [ "$TARGET" = devicekey ]; then
    expect "token manufacturer : devicekey"
    expect "token model        : os_protected"
    reject "login required"
    expect "ECDSA-SHA256"
    expect "SHA256"
    expect_re "EC(DSA)?-KEY-PAIR-GEN, keySize=\{256,256\}"
  fi
  reject "error:"
}

check_keypairgen() {
  gen_key
  # A second process sees the new key pair (token objects persist).
  p11 -O
  expect "Public Key Object; EC  EC_POINT 256 bits"
  expect "label:      k1"
  if [ "$TARGET" = devicekey ]; then
    expect "Private Key Object; EC"
  fi
  pub_pem
  # CKA_EC_POINT is the DER OCTET STRING of the SPKI's point 04||X||Y.
  local spki_point
  spki_point=$(tail -c 65 pub.der | od -An -v -tx1 | tr -d ' \n')
  p11 -O --type pubkey
  grep -qi "EC_POINT: *0441${spki_point}" <<<"$OUT" ||
    fail "CKA_EC_POINT is not a DER OCTET STRING of the SPKI point 04||X||Y ($spki_point)"
}

check_key_attributes() {
  gen_key
  p11_auth --list-objects --type privkey
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
  if timeout -k 5 "$TIMEOUT" pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" "${AUTH[@]}" \
      --read-object --type privkey --id 01 -o priv.bin </dev/null >priv.log 2>&1 && [ -s priv.bin ]; then
    cat priv.log
    fail "the private key was read out"
  fi
  cat priv.log
}

check_sign_ecdsa() {
  gen_key
  pub_pem
  head -c 1000 /dev/urandom >data
  run openssl dgst -sha256 -binary -out data.sha256 data
  p11_auth --sign -m ECDSA --id 01 -i data.sha256 -o sig.der --signature-format openssl
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data
  expect "Verified OK"
  # The raw form is exactly 64 bytes r||s and verifies too.
  p11_auth --sign -m ECDSA --id 01 -i data.sha256 -o sig.raw
  rs_to_der sig.raw sig2.der
  run openssl dgst -sha256 -verify pub.pem -signature sig2.der data
  expect "Verified OK"
  # A signature over other data does not verify.
  echo tampered >>data
  echo "\$ openssl dgst -sha256 -verify pub.pem -signature sig.der data (tampered, must fail)"
  if openssl dgst -sha256 -verify pub.pem -signature sig.der data; then
    fail "a signature verified over tampered data"
  fi
}

check_sign_ecdsa_sha256() {
  gen_key
  pub_pem
  head -c 5000 /dev/urandom >data
  p11_auth --sign -m ECDSA-SHA256 --id 01 -i data -o sig.der --signature-format openssl
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data
  expect "Verified OK"
  p11_auth --sign -m ECDSA-SHA256 --id 01 -i data -o sig.raw
  rs_to_der sig.raw sig2.der
  run openssl dgst -sha256 -verify pub.pem -signature sig2.der data
  expect "Verified OK"
}

check_pkcs11_tool_test() {
  gen_key
  p11_auth --test
  expect "No errors"
  reject "error:"
  if [ "$TARGET" = devicekey ]; then
    # Some tools always log in: a PIN-less token accepts C_Login and keeps working.
    p11 --login --pin 0000 --test
    expect "No errors"
    reject "error:"
  fi
}

check_test_threads() {
  gen_key
  run pkcs11-tool --module "$MODULE" --test-threads IL --test-threads ILGISLT0 -L
  expect "Test thread 1 C_GetTokenInfo"
  expect "Test thread 0 returning rv = 0"
  expect "Test thread 1 returning rv = 0"
  expect "token label        : $TOKEN_LABEL"
  # Whichever of main, thread 0 and thread 1 calls C_Initialize first gets CKR_OK; the others
  # must get CKR_CRYPTOKI_ALREADY_INITIALIZED (pkcs11-tool then says "some errors"). Anything
  # else is a failure.
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
  gen_key
  p11 --test-fork
  expect "Calling C_Initialize in forked child process"
  reject "error:"
  reject "Aborting"
}

check_engine_pkeyutl() {
  gen_key
  pub_pem
  head -c 1000 /dev/urandom >data
  run openssl dgst -sha256 -binary -out data.sha256 data
  run openssl pkeyutl -engine pkcs11 -keyform engine -sign -inkey "$(key_uri)" \
    -in data.sha256 -out sig.der
  [ -s sig.der ] || fail "the engine wrote no signature"
  run openssl asn1parse -inform DER -in sig.der
  expect "SEQUENCE"
  expect "INTEGER"
  run openssl pkeyutl -verify -pubin -inkey pub.pem -in data.sha256 -sigfile sig.der
  expect "Signature Verified Successfully"
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data
  expect "Verified OK"
  # The same through an openssl.cnf that names the module (no PKCS11_MODULE_PATH).
  cat >openssl.cnf <<EOF
openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
MODULE_PATH = $MODULE
EOF
  run env -u PKCS11_MODULE_PATH OPENSSL_CONF="$PWD/openssl.cnf" openssl pkeyutl -engine pkcs11 \
    -keyform engine -sign -inkey "$(key_uri)" -in data.sha256 -out sig2.der
  run openssl pkeyutl -verify -pubin -inkey pub.pem -in data.sha256 -sigfile sig2.der
  expect "Signature Verified Successfully"
}

# make_cert: a self-signed certificate for key 01 through the engine, in cert.pem and cert.der.
make_cert() {
  run openssl req -new -x509 -engine pkcs11 -keyform engine -key "$(key_uri)" \
    -sha256 -days 30 -subj /CN=devicekey-test -out cert.pem
  run openssl x509 -in cert.pem -noout -text
  expect "Subject: CN = devicekey-test"
  expect "Issuer: CN = devicekey-test"
  expect "ecdsa-with-SHA256"
  expect "NIST CURVE: P-256"
  run openssl verify -CAfile cert.pem cert.pem
  expect "cert.pem: OK"
  # The certificate carries the token's public key.
  run openssl x509 -in cert.pem -noout -pubkey
  printf '%s\n' "$OUT" >cert-pub.pem
  cmp -s <(openssl pkey -pubin -in cert-pub.pem -outform DER) pub.der ||
    fail "the certificate's public key is not the token's public key"
  run openssl x509 -in cert.pem -outform DER -out cert.der
}

check_engine_req_x509() {
  gen_key
  pub_pem
  make_cert
}

check_cert_import() {
  gen_key
  pub_pem
  make_cert
  p11_auth --write-object cert.der --type cert --id 01 --label k1
  expect "Certificate Object"
  p11 -O
  expect "Certificate Object; type = X.509 cert"
  expect "subject:    DN: CN=devicekey-test"
  # key pair and certificate share CKA_ID 01
  local n
  n=$(grep -c "ID:         01" <<<"$OUT")
  if [ "$TARGET" = devicekey ]; then
    [ "$n" -ge 3 ] || fail "expected private key, public key and certificate with ID 01, saw $n"
  else
    [ "$n" -ge 2 ] || fail "expected public key and certificate with ID 01, saw $n"
  fi
  p11 --read-object --type cert --id 01 -o back.der
  cmp -s back.der cert.der || fail "the certificate read back differs from the one written"
}

check_ssh_keygen_D() {
  gen_key
  pub_pem
  run ssh-keygen -i -m PKCS8 -f pub.pem
  local want
  want=$(awk '$1 == "ecdsa-sha2-nistp256" { print $2 }' <<<"$OUT")
  [ -n "$want" ] || fail "ssh-keygen -i gave no ecdsa-sha2-nistp256 key"
  run ssh-keygen -D "$MODULE"
  expect "ecdsa-sha2-nistp256 "
  awk -v k="$want" '$1 == "ecdsa-sha2-nistp256" && $2 == k { found = 1 } END { exit !found }' <<<"$OUT" ||
    fail "ssh-keygen -D did not print the token's key $want"
}

# start_sshd DIR AUTHORIZED_KEYS: a throwaway sshd on 127.0.0.1; sets SSHD_PORT and SSHD_PID.
start_sshd() {
  local dir=$1 keys=$2 port try
  [ -x /usr/sbin/sshd ] || fail "/usr/sbin/sshd not found (package openssh-server)"
  mkdir -p "$dir"
  [ -d /run/sshd ] || mkdir -p /run/sshd 2>/dev/null || true
  run ssh-keygen -q -t ed25519 -N "" -f "$dir/host_key"
  for try in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 40000))
    cat >"$dir/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
LogLevel VERBOSE
EOF
    : >"$dir/sshd.log"
    /usr/sbin/sshd -D -f "$dir/sshd_config" -E "$dir/sshd.log" </dev/null &
    SSHD_PID=$!
    for _ in $(seq 50); do
      grep -q "Server listening" "$dir/sshd.log" && break
      kill -0 "$SSHD_PID" 2>/dev/null || break
      sleep 0.1
    done
    if grep -q "Server listening" "$dir/sshd.log"; then
      SSHD_PORT=$port
      return 0
    fi
    kill "$SSHD_PID" 2>/dev/null
    wait "$SSHD_PID" 2>/dev/null
  done
  cat "$dir/sshd.log"
  fail "sshd did not start"
}

check_ssh_login() {
  gen_key
  pub_pem
  run ssh-keygen -D "$MODULE"
  awk '$1 == "ecdsa-sha2-nistp256"' <<<"$OUT" >authorized_keys
  [ -s authorized_keys ] || fail "ssh-keygen -D listed no key"
  run ssh-keygen -lf authorized_keys
  local fp
  fp=$(awk '{ print $2 }' <<<"$OUT")
  SSHD_PID=
  trap '[ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null' EXIT
  start_sshd "$PWD/sshd" "$PWD/authorized_keys"
  printf '#!/bin/sh\necho "%s"\n' "${SOFTHSM_PIN:-}" >askpass
  chmod 700 askpass
  run setsid -w env SSH_ASKPASS="$PWD/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY=:0 \
    ssh -F /dev/null -I "$MODULE" -p "$SSHD_PORT" \
    -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o PasswordAuthentication=no \
    -o KbdInteractiveAuthentication=no -o ConnectTimeout=20 \
    "$(id -un)@127.0.0.1" echo devicekey-ssh-ok
  expect "devicekey-ssh-ok"
  grep -F "Accepted publickey" "$PWD/sshd/sshd.log" || true
  grep -qF "Accepted publickey for $(id -un) from 127.0.0.1" "$PWD/sshd/sshd.log" ||
    fail "sshd did not log the public key login"
  grep -qF "ECDSA $fp" "$PWD/sshd/sshd.log" || fail "sshd did not accept the token's key $fp"
}

ALL_CHECKS=(
  list_slots_mechanisms_objects
  keypairgen
  key_attributes
  sign_ecdsa
  sign_ecdsa_sha256
  pkcs11_tool_test
  test_threads
  test_fork
  engine_pkeyutl
  engine_req_x509
  cert_import
  ssh_keygen_D
  ssh_login
)

# Checks SoftHSM 2.6 fails by itself (see the project's tooling notes); skipped only for SoftHSM.
check_skip_reason() {
  [ "$TARGET" = softhsm ] || return 1
  case "$1" in
    sign_ecdsa_sha256) echo "SoftHSM 2.6 has no CKM_ECDSA_SHA256" ;;
    test_threads) echo "SoftHSM 2.6 may crash at exit under --test-threads" ;;
    test_fork) echo "SoftHSM 2.6 answers ALREADY_INITIALIZED in the forked child" ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Per-check environment.

setup_check_env() {
  local dir=$1
  consumer_check_env "$dir"
  if [ "$TARGET" = softhsm ]; then
    # shellcheck source=scripts/softhsm-token.sh
    . "$ROOT/scripts/softhsm-token.sh" "$dir/softhsm" >/dev/null || return 1
    TOKEN_LABEL=$SOFTHSM_TOKEN_LABEL
    AUTH=(--login --pin "$SOFTHSM_PIN")
    URI_PIN=";pin-value=$SOFTHSM_PIN"
  else
    printf '[[slot]]\nlabel = "devicekey"\nbackend = "software"\ndir = "%s/keys"\n' "$dir" >"$dir/config.toml"
    export DEVICEKEY_CONFIG="$dir/config.toml"
    export DEVICEKEY_LOG="${DEVICEKEY_LOG:-warn}"
    TOKEN_LABEL=devicekey
    AUTH=()
    URI_PIN=""
  fi
}

consumer_start "$MODULE ($TARGET)"
if [ -z "$ENGINES_DIR" ] || [ ! -f "$ENGINES_DIR/pkcs11.so" ]; then
  echo "note: the OpenSSL pkcs11 engine was not found under '$ENGINES_DIR' (package libengine-pkcs11-openssl)"
fi

run_checks
consumer_finish
