#!/usr/bin/env bash
# Proves the Secure Enclave key store on a real Mac: what CI on Linux cannot run.
#
#   scripts/macos-check.sh
#
# Needs a Mac with a Secure Enclave (Apple silicon, or an Intel Mac with a T2 chip), Rust, and the
# consumer tools: `brew install opensc openssl` (pkcs11-tool, OpenSSL 3) and the system's
# ssh-keygen. Everything happens in a temporary directory with its own config and key directory;
# the keys made here are ephemeral Secure Enclave keys whose blobs are deleted with that directory,
# so nothing is left in the enclave or the keychain.
#
# Checks, each verified: the build; `devicekey doctor` reports a reachable secure_enclave slot
# with class hardware_secure_enclave; pkcs11-tool sees the token; a key pair generated with
# pkcs11-tool is in the key directory as an enclave blob; pkcs11-tool signs a digest and openssl
# verifies it; a second process rebuilds the key from its blob and signs again; ssh-keygen -D reads
# the same public key; `devicekey serve` creates a hardware-only proof key and signs a proof that
# openssl verifies. The last line is `N passed, N failed`; the exit status is non-zero when any
# check failed.
set -uo pipefail

# shellcheck source=scripts/lib/stages.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/stages.sh" # the repository as working directory, cargo on PATH, record

if [ "$(uname -s)" != Darwin ]; then
  echo "macos-check: this runs on macOS only (on Linux, scripts/macos-typecheck.sh type-checks the macOS build)" >&2
  exit 2
fi
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
# Homebrew's OpenSSL 3 first: the system's LibreSSL lacks some options used below.
for prefix in /opt/homebrew/opt/openssl@3 /usr/local/opt/openssl@3; do
  [ -x "$prefix/bin/openssl" ] && PATH="$prefix/bin:$PATH"
done
missing=()
for tool in cargo pkcs11-tool openssl ssh-keygen perl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "macos-check: missing ${missing[*]}; install Rust (rustup.rs) and run: brew install opensc openssl" >&2
  exit 2
fi

TIMEOUT=${TIMEOUT:-120}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/devicekey-macos.XXXXXX")
chmod 700 "$WORK"
cleanup() {
  rm -rf "$WORK"
}
trap cleanup EXIT

# check NAME FUNCTION: run one check in a subshell and count it.
check() {
  local name=$1
  shift
  echo "== $name"
  ("$@")
  record "$name" $?
}

fail() {
  echo "ASSERTION FAILED: $*"
  exit 1
}

# run CMD...: run with a timeout and no stdin; keep the output in $OUT; fail on a non-zero exit.
run() {
  echo "\$ $*"
  OUT=$(perl -e 'alarm shift; exec @ARGV or die "cannot run $ARGV[0]: $!\n"' "$TIMEOUT" "$@" </dev/null 2>&1)
  local rc=$?
  [ -n "$OUT" ] && printf '%s\n' "$OUT"
  [ $rc -eq 0 ] || fail "exit status $rc: $*"
}

expect() {
  grep -qF -- "$1" <<<"$OUT" || fail "expected the output to contain: $1"
}

MODULE=$ROOT/target/release/libdevicekey_pkcs11.dylib
CLI=$ROOT/target/release/devicekey
KEYS=$WORK/keys
cat >"$WORK/config.toml" <<EOF
[[slot]]
label = "devicekey"
backend = "secure_enclave"
dir = "$KEYS"

[server]
module = "$MODULE"
EOF
export DEVICEKEY_CONFIG=$WORK/config.toml
P11=(pkcs11-tool --module "$MODULE" --token-label devicekey)
ID=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
cd "$WORK"

build() {
  run cargo build --release --manifest-path "$ROOT/Cargo.toml"
  [ -f "$MODULE" ] || fail "$MODULE was not built"
  [ -x "$CLI" ] || fail "$CLI was not built"
}

doctor() {
  run "$CLI" doctor
  expect "backend:          secure_enclave"
  expect "protection class: hardware_secure_enclave"
  expect "reachable:        yes"
}

token() {
  run "${P11[@]}" -L
  grep -Eq "token label *: devicekey" <<<"$OUT" || fail "no token labelled devicekey"
  grep -Eq "token model *: hardware_se" <<<"$OUT" || fail "the token model is not hardware_se"
}

keygen() {
  run "${P11[@]}" --keypairgen --key-type EC:prime256v1 --id "$ID" --label "macos-check-$ID"
  run "${P11[@]}" --read-object --type pubkey --id "$ID" -o pub.der
  run openssl pkey -pubin -inform DER -in pub.der -out pub.pem
  run openssl pkey -pubin -in pub.pem -noout -text
  expect "prime256v1"
  local files
  files=$(ls "$KEYS"/*.sekey 2>/dev/null | wc -l | tr -d ' ')
  [ "$files" -ge 1 ] || fail "no key file in $KEYS"
  grep -l "\"id\": \"$ID\"" "$KEYS"/*.sekey >/dev/null || fail "no key file holds CKA_ID $ID"
  grep -q '"route": "enclave_blob"' "$(grep -l "\"id\": \"$ID\"" "$KEYS"/*.sekey)" ||
    fail "the key was not made by the Secure Enclave blob route"
}

# sign_and_verify TAG: a fresh pkcs11-tool process (so a fresh module) signs a digest; openssl verifies.
sign_and_verify() {
  local tag=$1
  head -c 1000 /dev/urandom >"data-$tag"
  run openssl dgst -sha256 -binary -out "digest-$tag" "data-$tag"
  run "${P11[@]}" --sign -m ECDSA --id "$ID" -i "digest-$tag" -o "sig-$tag.der" --signature-format openssl
  run openssl dgst -sha256 -verify pub.pem -signature "sig-$tag.der" "data-$tag"
  expect "Verified OK"
}

sign_once() { sign_and_verify first; }
sign_again() { sign_and_verify second; }

ssh_key() {
  run ssh-keygen -D "$MODULE"
  expect "ecdsa-sha2-nistp256"
  local token_line expected
  token_line=$(grep ecdsa-sha2-nistp256 <<<"$OUT" | awk '{print $2}')
  run ssh-keygen -i -m PKCS8 -f pub.pem
  expected=$(awk '{print $2}' <<<"$OUT")
  grep -qxF "$expected" <<<"$token_line" || fail "ssh-keygen -D does not show the pkcs11-tool key"
}

serve() {
  b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
  field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" <<<"$2" | head -1; }
  mkfifo "$WORK/to-server" "$WORK/from-server" || fail "mkfifo"
  "$CLI" serve <"$WORK/to-server" >"$WORK/from-server" 2>"$WORK/serve.log" &
  SERVER_PID=$!
  trap 'kill "$SERVER_PID" 2>/dev/null' EXIT
  exec 3>"$WORK/to-server" 4<"$WORK/from-server"
  rpc() {
    printf '%s\n' "$1" >&3
    IFS= read -r -t "$TIMEOUT" REPLY_LINE <&4 || fail "no answer from devicekey serve: $(cat "$WORK/serve.log")"
    echo "<- $REPLY_LINE"
  }
  rpc '{"id":1,"method":"initialize","params":{"clientInfo":{"name":"macos-check","version":"1.0"}}}'
  grep -q '"result"' <<<"$REPLY_LINE" || fail "initialize failed"
  printf '%s\n' '{"method":"initialized"}' >&3
  # No protectionPolicy: hardware_only, which only a Secure Enclave key satisfies here.
  rpc '{"id":2,"method":"device/key/create","params":{"accountUserId":"macos-user","clientId":"macos-client"}}'
  local key_id spki class
  key_id=$(field keyId "$REPLY_LINE")
  spki=$(field publicKeySpkiDerBase64 "$REPLY_LINE")
  class=$(field protectionClass "$REPLY_LINE")
  [ -n "$key_id" ] && [ -n "$spki" ] || fail "device/key/create failed"
  [ "$class" = hardware_secure_enclave ] || fail "protection class is $class, not hardware_secure_enclave"

  local nonce token_hash expires payload sig signed
  nonce=$(head -c 32 /dev/urandom | b64url)
  token_hash=$(printf 'macos check token' | openssl dgst -sha256 -binary | b64url)
  expires=$(($(date +%s) + 300))
  payload="{\"type\":\"remoteControlClientConnection\",\"nonce\":\"$nonce\",\"audience\":\"remote_control_client_websocket\",\"sessionId\":\"wssess_macos\",\"targetOrigin\":\"https://chatgpt.com\",\"targetPath\":\"/api/codex/remote/control/client\",\"accountUserId\":\"macos-user\",\"clientId\":\"macos-client\",\"tokenExpiresAt\":$expires,\"tokenSha256Base64url\":\"$token_hash\",\"scopes\":[\"remote_control_controller_websocket\"]}"
  rpc "{\"id\":3,\"method\":\"device/key/sign\",\"params\":{\"keyId\":\"$key_id\",\"payload\":$payload}}"
  sig=$(field signatureDerBase64 "$REPLY_LINE")
  signed=$(field signedPayloadBase64 "$REPLY_LINE")
  [ -n "$sig" ] && [ -n "$signed" ] || fail "device/key/sign failed"
  exec 3>&- 4<&-
  wait "$SERVER_PID" 2>/dev/null

  printf '%s' "$spki" | openssl base64 -d -A >proof-pub.der
  printf '%s' "$sig" | openssl base64 -d -A >proof-sig.der
  printf '%s' "$signed" | openssl base64 -d -A >proof-signed.json
  run openssl pkey -pubin -inform DER -in proof-pub.der -out proof-pub.pem
  grep -qF "\"nonce\":\"$nonce\"" proof-signed.json || fail "the signed bytes lack our nonce"
  run openssl dgst -sha256 -verify proof-pub.pem -signature proof-sig.der proof-signed.json
  expect "Verified OK"
}

check "build (cargo build --release)" build
if [ -f "$MODULE" ] && [ -x "$CLI" ]; then
  check "devicekey doctor: a reachable secure_enclave slot, hardware_secure_enclave" doctor
  check "pkcs11-tool -L: the token reports hardware_se" token
  check "pkcs11-tool --keypairgen: a P-256 key kept as an enclave blob" keygen
  check "pkcs11-tool --sign -m ECDSA, verified by openssl" sign_once
  check "a new process rebuilds the key from its blob and signs, verified by openssl" sign_again
  check "ssh-keygen -D reads the same public key" ssh_key
  check "devicekey serve: device/key/create (hardware_only) and device/key/sign, verified by openssl" serve
fi

stages_finish macos-check.sh
