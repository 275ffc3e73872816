#!/usr/bin/env bash
# A tour of devicekey on this machine, from nothing to verified signatures.
#
#   scripts/demo.sh
#
# Installs the system packages it needs, builds the module and the CLI, then, on a throwaway key
# store: creates a P-256 key with pkcs11-tool, signs with CKM_ECDSA and CKM_ECDSA_SHA256, makes a
# self-signed certificate through the OpenSSL pkcs11 engine, imports it into the token, prints the
# key as OpenSSH sees it, signs a device-key proof through `devicekey serve`, and verifies every
# signature with openssl.
#
# Environment: DEVICEKEY_DEMO_DIR=<dir> keeps the key store (and the files the demo makes) in <dir>
# instead of a temporary directory that is removed at the end.
# Optional: `scripts/demo.sh --hsm` (or DEVICEKEY_DEMO_HSM=1) adds a last step: a throwaway SoftHSM
# token behind a second slot declared hardware_tpm, a key made on it, signed and verified through
# our module.
# Optional: `scripts/demo.sh --tpm` (or DEVICEKEY_DEMO_TPM=1) adds a TPM step: a throwaway swtpm
# (stopped at the end, manufactured with an EK certificate by swtpm_setup) behind a `backend = "tpm"`
# slot; doctor, keygen, sign, verify, ssh-keygen -D, then key attestation: `devicekey attest` for a
# fresh nonce and `devicekey attest verify` against swtpm's local CA, explained in plain words.
set -euo pipefail
DEMO_HSM=${DEVICEKEY_DEMO_HSM:-0}
[ "${1:-}" = --hsm ] && DEMO_HSM=1
DEMO_TPM=${DEVICEKEY_DEMO_TPM:-0}
for arg in "$@"; do if [ "$arg" = --tpm ]; then DEMO_TPM=1; fi; done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

MODULE=$ROOT/target/release/libdevicekey_pkcs11.so
CLI=$ROOT/target/release/devicekey
STEP=0

say() { printf '\n== %s\n' "$*"; }
step() {
  STEP=$((STEP + 1))
  printf '\n[%d] %s\n' "$STEP" "$*"
}
ok() { printf '    ok: %s\n' "$*"; }
die() {
  printf '\nDEMO FAILED: %s\n' "$*" >&2
  exit 1
}
# quiet CMD...: run a command; show its output only if it fails.
quiet() {
  local out
  if ! out=$("$@" 2>&1 </dev/null); then
    printf '%s\n' "$out" >&2
    die "command failed: $*"
  fi
}
trap 'rc=$?; [ $rc -eq 0 ] || printf "\nDEMO FAILED at step %d (exit %d)\n" "$STEP" "$rc" >&2' EXIT
SERVE_DONE=0
ATTEST_DONE=0

# ---------------------------------------------------------------------------------------------
step "Installing the system packages devicekey uses (only those missing)"
bash scripts/setup.sh
ok "softhsm2, opensc, the OpenSSL pkcs11 engine, OpenSSH, GnuTLS, NSS tools and p11-kit are present"

step "Building the PKCS#11 module and the devicekey command (cargo build --release)"
cargo build --release --quiet
[ -f "$MODULE" ] || die "$MODULE was not built"
ok "module: $MODULE"
ok "command: $CLI"

# ---------------------------------------------------------------------------------------------
if [ -n "${DEVICEKEY_DEMO_DIR:-}" ]; then
  DEMO=$DEVICEKEY_DEMO_DIR
  mkdir -p "$DEMO"
  DEMO=$(cd "$DEMO" && pwd)
  KEEP=1
else
  DEMO=$(mktemp -d "${TMPDIR:-/tmp}/devicekey-demo.XXXXXX")
  KEEP=0
fi
chmod 700 "$DEMO"
cleanup() {
  local rc=$?
  if [ "$KEEP" = 0 ]; then rm -rf "$DEMO"; fi
  [ $rc -eq 0 ] || printf "\nDEMO FAILED at step %d (exit %d)\n" "$STEP" "$rc" >&2
}
trap cleanup EXIT

mkdir -p "$DEMO/files"
cat >"$DEMO/config.toml" <<EOF
[[slot]]
label = "devicekey"
backend = "software"
dir = "$DEMO/keys"

[server]
module = "$MODULE"
EOF
export DEVICEKEY_CONFIG=$DEMO/config.toml
export PKCS11_MODULE_PATH=$MODULE
cd "$DEMO/files"

step "Using a private key store"
if [ "$KEEP" = 1 ]; then
  ok "key store in $DEMO/keys (DEVICEKEY_DEMO_DIR; kept afterwards)"
else
  ok "key store in $DEMO/keys (temporary; removed at the end; set DEVICEKEY_DEMO_DIR to keep it)"
fi
ok "config file $DEVICEKEY_CONFIG (DEVICEKEY_CONFIG points the module at it):"
sed 's/^/        /' "$DEVICEKEY_CONFIG"

P11=(pkcs11-tool --module "$MODULE" --token-label devicekey)

step "Asking pkcs11-tool what the token is"
out=$("${P11[@]}" -L 2>&1 </dev/null) || {
  printf '%s\n' "$out"
  die "pkcs11-tool cannot load the module"
}
printf '%s\n' "$out" | sed -n 's/^ *\(token label\|token manufacturer\|token model\|token flags\) *: */        \1: /p'
grep -q "token label *: devicekey" <<<"$out" || die "no token labelled devicekey"
ok "the token reports its protection class in its model string (os_protected = software store)"

# A fresh CKA_ID, so that a kept key store can run the demo again.
ID=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
URI_ID=$(sed 's/../%&/g' <<<"$ID")
LABEL=demo-$ID
URI="pkcs11:token=devicekey;id=$URI_ID;type=private"

step "Creating a P-256 key pair on the token with pkcs11-tool (id $ID, label $LABEL)"
quiet "${P11[@]}" --keypairgen --key-type EC:prime256v1 --id "$ID" --label "$LABEL"
quiet "${P11[@]}" --read-object --type pubkey --id "$ID" -o pub.der
quiet openssl pkey -pubin -inform DER -in pub.der -out pub.pem
attrs=$("${P11[@]}" --list-objects --type privkey --id "$ID" 2>&1 </dev/null) || die "pkcs11-tool --list-objects failed: $attrs"
access=$(grep -m1 "Access:" <<<"$attrs" | sed 's/^ *Access: *//' || true)
ok "public key exported as SubjectPublicKeyInfo ($(stat -c %s pub.der) bytes):"
sed 's/^/        /' pub.pem
ok "private key attributes: $access"
grep -q "never extractable" <<<"$access" || die "the private key is not marked never extractable"

step "Signing a SHA-256 digest with CKM_ECDSA (the caller hashes)"
head -c 4096 /dev/urandom >message.bin
openssl dgst -sha256 -binary -out message.sha256 message.bin
quiet "${P11[@]}" --sign -m ECDSA --id "$ID" -i message.sha256 -o sig-ecdsa.der --signature-format openssl
openssl dgst -sha256 -verify pub.pem -signature sig-ecdsa.der message.bin >verify.out 2>&1 ||
  die "openssl rejected the CKM_ECDSA signature: $(cat verify.out)"
ok "openssl dgst -verify: $(cat verify.out)"

step "Signing the whole message with CKM_ECDSA_SHA256 (the token hashes)"
quiet "${P11[@]}" --sign -m ECDSA-SHA256 --id "$ID" -i message.bin -o sig-ecdsa-sha256.der --signature-format openssl
openssl dgst -sha256 -verify pub.pem -signature sig-ecdsa-sha256.der message.bin >verify.out 2>&1 ||
  die "openssl rejected the CKM_ECDSA_SHA256 signature: $(cat verify.out)"
ok "openssl dgst -verify: $(cat verify.out)"

step "Signing through the OpenSSL pkcs11 engine (key named by the URI $URI)"
quiet openssl pkeyutl -engine pkcs11 -keyform engine -sign -inkey "$URI" -in message.sha256 -out sig-engine.der
openssl pkeyutl -verify -pubin -inkey pub.pem -in message.sha256 -sigfile sig-engine.der >verify.out 2>&1 ||
  die "openssl rejected the engine's signature: $(cat verify.out)"
ok "openssl pkeyutl -verify: $(cat verify.out)"

step "Making a self-signed X.509 certificate with the token's key (openssl req -x509 through the engine)"
quiet openssl req -new -x509 -engine pkcs11 -keyform engine -key "$URI" -sha256 -days 365 \
  -subj "/CN=devicekey-demo" -out cert.pem
openssl x509 -in cert.pem -noout -subject -enddate -fingerprint -sha256 | sed 's/^/        /'
openssl verify -CAfile cert.pem cert.pem >verify.out 2>&1 || die "the certificate does not verify: $(cat verify.out)"
ok "openssl verify: $(cat verify.out)"
cmp -s <(openssl x509 -in cert.pem -noout -pubkey | openssl pkey -pubin -outform DER) pub.der ||
  die "the certificate does not carry the token's public key"
ok "the certificate carries the token's public key"

step "Importing the certificate into the token next to its key (same CKA_ID)"
openssl x509 -in cert.pem -outform DER -out cert.der
quiet "${P11[@]}" --write-object cert.der --type cert --id "$ID" --label "$LABEL"
objs=$("${P11[@]}" --list-objects --id "$ID" 2>&1 </dev/null) || die "pkcs11-tool --list-objects failed: $objs"
grep -q "Certificate Object; type = X.509 cert" <<<"$objs" || die "the certificate is not on the token: $objs"
ok "the token now holds: $(grep -E 'Object;' <<<"$objs" | sed 's/;.*//' | paste -sd, - | sed 's/,/, /g')"

step "Showing the key as OpenSSH sees it (ssh-keygen -D)"
want=$(ssh-keygen -i -m PKCS8 -f pub.pem | awk '{ print $2 }') || die "ssh-keygen -i cannot read pub.pem"
sshout=$(ssh-keygen -D "$MODULE" 2>&1 </dev/null) || die "ssh-keygen -D failed: $sshout"
sshline=$(awk -v k="$want" '$1 == "ecdsa-sha2-nistp256" && $2 == k' <<<"$sshout")
[ -n "$sshline" ] || die "ssh-keygen -D did not list the key: $sshout"
printf '        %s\n' "$sshline"
ok "this line goes into ~/.ssh/authorized_keys on a server; then: ssh -I $MODULE user@host"

# ---------------------------------------------------------------------------------------------
step "Signing a device-key proof through the JSON-RPC server (devicekey serve)"
if ! "$CLI" serve --help >/dev/null 2>&1; then
  echo "    SKIPPED: this build has no working 'devicekey serve' yet"
else
  b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
  field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" <<<"$2" | head -1; }

  coproc SERVER { exec "$CLI" serve 2>"$DEMO/files/serve.log"; }
  SERVER_PID=$SERVER_PID
  rpc() { # rpc JSON: send one request line, read one response line
    printf '%s\n' "$1" >&"${SERVER[1]}"
    local line
    IFS= read -r -t 60 line <&"${SERVER[0]}" || die "no answer from devicekey serve (log: $(cat "$DEMO/files/serve.log"))"
    printf '%s' "$line"
  }

  resp=$(rpc '{"id":1,"method":"initialize","params":{"clientInfo":{"name":"devicekey-demo","version":"1.0"}}}')
  grep -q '"result"' <<<"$resp" || die "initialize failed: $resp"
  ok "initialize -> $(sed 's/^\(.\{150\}\).*/\1.../' <<<"$resp")"
  printf '%s\n' '{"method":"initialized"}' >&"${SERVER[1]}"

  resp=$(rpc '{"id":2,"method":"device/key/create","params":{"accountUserId":"demo-user","clientId":"demo-client","protectionPolicy":"allow_os_protected_nonextractable"}}')
  KEY_ID=$(field keyId "$resp")
  SPKI=$(field publicKeySpkiDerBase64 "$resp")
  CLASS=$(field protectionClass "$resp")
  [ -n "$KEY_ID" ] && [ -n "$SPKI" ] || die "device/key/create failed: $resp"
  ok "device/key/create -> keyId $KEY_ID, protection class $CLASS"

  NONCE=$(head -c 32 /dev/urandom | b64url)
  TOKEN_HASH=$(printf 'demo access token' | openssl dgst -sha256 -binary | b64url)
  EXPIRES=$(($(date +%s) + 300))
  PAYLOAD="{\"type\":\"remoteControlClientConnection\",\"nonce\":\"$NONCE\",\"audience\":\"remote_control_client_websocket\",\"sessionId\":\"wssess_demo\",\"targetOrigin\":\"https://chatgpt.com\",\"targetPath\":\"/api/codex/remote/control/client\",\"accountUserId\":\"demo-user\",\"clientId\":\"demo-client\",\"tokenExpiresAt\":$EXPIRES,\"tokenSha256Base64url\":\"$TOKEN_HASH\",\"scopes\":[\"remote_control_controller_websocket\"]}"
  resp=$(rpc "{\"id\":3,\"method\":\"device/key/sign\",\"params\":{\"keyId\":\"$KEY_ID\",\"payload\":$PAYLOAD}}")
  SIG=$(field signatureDerBase64 "$resp")
  SIGNED=$(field signedPayloadBase64 "$resp")
  [ -n "$SIG" ] && [ -n "$SIGNED" ] || die "device/key/sign failed: $resp"
  server_in=${SERVER[1]}
  exec {server_in}>&-
  wait "$SERVER_PID" 2>/dev/null || true

  base64 -d <<<"$SPKI" >proof-pub.der
  openssl pkey -pubin -inform DER -in proof-pub.der -out proof-pub.pem 2>/dev/null || die "bad public key from create"
  base64 -d <<<"$SIG" >proof-sig.der
  base64 -d <<<"$SIGNED" >proof-signed.json
  ok "device/key/sign -> $(stat -c %s proof-sig.der)-byte DER signature over $(stat -c %s proof-signed.json) bytes:"
  printf '        %s\n' "$(cat proof-signed.json)"
  grep -q '"domain":"codex-device-key-sign-payload/v1"' proof-signed.json || die "the signed bytes lack the domain"
  grep -qF "\"nonce\":\"$NONCE\"" proof-signed.json || die "the signed bytes lack our nonce"
  openssl dgst -sha256 -verify proof-pub.pem -signature proof-sig.der proof-signed.json >verify.out 2>&1 ||
    die "openssl rejected the proof signature: $(cat verify.out)"
  ok "openssl dgst -verify over signedPayloadBase64 with publicKeySpkiDerBase64: $(cat verify.out)"
  SERVE_DONE=1
fi

# ---------------------------------------------------------------------------------------------
if [ "$DEMO_HSM" = 1 ]; then
  step "Adding a second slot: a throwaway SoftHSM token that our module wraps, declared hardware_tpm"
  # shellcheck source=scripts/softhsm-token.sh
  . "$ROOT/scripts/softhsm-token.sh" "$DEMO/softhsm" >/dev/null || die "cannot create a SoftHSM token"
  cat >>"$DEVICEKEY_CONFIG" <<EOF

[[slot]]
label = "devicekey-hsm"
backend = "pkcs11"
module = "$SOFTHSM_MODULE"
token = "$SOFTHSM_TOKEN_LABEL"
pin_env = "SOFTHSM_PIN"
protection_class = "hardware_tpm"
EOF
  ok "SoftHSM token '$SOFTHSM_TOKEN_LABEL' in $SOFTHSM_DIR (its PIN comes from \$SOFTHSM_PIN, never from the config)"
  doctor=$("$CLI" doctor 2>&1 </dev/null) || die "devicekey doctor reports a problem: $doctor"
  ok "devicekey doctor:"
  printf '%s\n' "$doctor" | sed 's/^/        /'
  HSM=(pkcs11-tool --module "$MODULE" --token-label devicekey-hsm)
  out=$("${HSM[@]}" -L 2>&1 </dev/null) || die "pkcs11-tool -L failed: $out"
  grep -q "token model *: hardware_tpm" <<<"$out" || die "no token reports model hardware_tpm: $out"
  quiet "${HSM[@]}" --keypairgen --key-type EC:prime256v1 --id "$ID" --label "$LABEL-hsm"
  quiet "${HSM[@]}" --read-object --type pubkey --id "$ID" -o hsm-pub.der
  quiet openssl pkey -pubin -inform DER -in hsm-pub.der -out hsm-pub.pem
  direct=$(pkcs11-tool --module "$SOFTHSM_MODULE" --token-label "$SOFTHSM_TOKEN_LABEL" --login \
    --pin "$SOFTHSM_PIN" --list-objects --type privkey 2>&1 </dev/null) || die "SoftHSM listing failed: $direct"
  grep -q "label: *$LABEL-hsm" <<<"$direct" || die "the key is not in the SoftHSM token: $direct"
  ok "key $LABEL-hsm, made through our module, lives in the SoftHSM token (SoftHSM lists it itself)"
  quiet "${HSM[@]}" --sign -m ECDSA-SHA256 --id "$ID" -i message.bin -o sig-hsm.der --signature-format openssl
  openssl dgst -sha256 -verify hsm-pub.pem -signature sig-hsm.der message.bin >verify.out 2>&1 ||
    die "openssl rejected the SoftHSM-backed signature: $(cat verify.out)"
  ok "CKM_ECDSA_SHA256 on the SoftHSM-backed slot; openssl dgst -verify: $(cat verify.out)"
fi

# ---------------------------------------------------------------------------------------------
if [ "$DEMO_TPM" = 1 ]; then
  step "Adding a TPM slot: a throwaway swtpm (TPM 2.0 simulator) on a free loopback port"
  # Manufacture the TPM first, as a vendor would: an endorsement key (EK) and its certificate in
  # NV, issued by swtpm's local test CA (created on first use in /var/lib/swtpm-localca).
  mkdir -p "$DEMO/swtpm"
  quiet swtpm_setup --tpm2 --create-ek-cert --tpmstate "$DEMO/swtpm" --overwrite
  ok "swtpm_setup: the TPM holds an EK certificate issued by swtpm's local CA"
  swtpm_env=$(bash "$ROOT/scripts/swtpm.sh" start "$DEMO/swtpm") || die "cannot start swtpm"
  eval "$swtpm_env"
  # Stop swtpm (by its pid) before the usual cleanup, whatever happens.
  trap 'rc=$?; bash "$ROOT/scripts/swtpm.sh" stop "$SWTPM_PID" || true; (exit $rc); cleanup' EXIT
  cat >>"$DEVICEKEY_CONFIG" <<EOF

[[slot]]
label = "devicekey-tpm"
backend = "tpm"
tcti = "$SWTPM_TCTI"
dir = "$DEMO/tpmkeys"
allow_simulator = true
EOF
  ok "swtpm pid $SWTPM_PID on $SWTPM_TCTI, state in $SWTPM_STATE"
  ok "allow_simulator = true lets a simulator report hardware_tpm (for demos and tests only)"
  doctor=$("$CLI" doctor 2>&1 </dev/null) || die "devicekey doctor reports a problem: $doctor"
  ok "devicekey doctor (the TPM's manufacturer, firmware and the class we report):"
  printf '%s\n' "$doctor" | sed -n '/: devicekey-tpm$/,/^$/p' | sed 's/^/        /'
  TPM=(pkcs11-tool --module "$MODULE" --token-label devicekey-tpm)
  out=$("${TPM[@]}" -L 2>&1 </dev/null) || die "pkcs11-tool -L failed: $out"
  grep -q "token model *: hardware_tpm" <<<"$out" || die "the TPM token does not report hardware_tpm: $out"
  ok "token devicekey-tpm, model hardware_tpm"
  quiet "${TPM[@]}" --keypairgen --key-type EC:prime256v1 --id "$ID" --label "$LABEL-tpm"
  quiet "${TPM[@]}" --read-object --type pubkey --id "$ID" -o tpm-pub.der
  quiet openssl pkey -pubin -inform DER -in tpm-pub.der -out tpm-pub.pem
  grep -ql -- "-----BEGIN TSS2 PRIVATE KEY-----" "$DEMO"/tpmkeys/*.pem ||
    die "no TSS2 PRIVATE KEY file in $DEMO/tpmkeys"
  ok "key $LABEL-tpm made inside the TPM; its blob (useless without this TPM) is a TSS2 PRIVATE KEY file in $DEMO/tpmkeys"
  quiet "${TPM[@]}" --sign -m ECDSA --id "$ID" -i message.sha256 -o sig-tpm.der --signature-format openssl
  openssl dgst -sha256 -verify tpm-pub.pem -signature sig-tpm.der message.bin >verify.out 2>&1 ||
    die "openssl rejected the TPM's CKM_ECDSA signature: $(cat verify.out)"
  ok "CKM_ECDSA by the TPM; openssl dgst -verify: $(cat verify.out)"
  quiet "${TPM[@]}" --sign -m ECDSA-SHA256 --id "$ID" -i message.bin -o sig-tpm-sha256.der --signature-format openssl
  openssl dgst -sha256 -verify tpm-pub.pem -signature sig-tpm-sha256.der message.bin >verify.out 2>&1 ||
    die "openssl rejected the TPM's CKM_ECDSA_SHA256 signature: $(cat verify.out)"
  ok "CKM_ECDSA_SHA256 by the TPM; openssl dgst -verify: $(cat verify.out)"
  want=$(ssh-keygen -i -m PKCS8 -f tpm-pub.pem | awk '{ print $2 }') || die "ssh-keygen -i cannot read tpm-pub.pem"
  sshout=$(ssh-keygen -D "$MODULE" 2>&1 </dev/null) || die "ssh-keygen -D failed: $sshout"
  sshline=$(awk -v k="$want" '$1 == "ecdsa-sha2-nistp256" && $2 == k' <<<"$sshout")
  [ -n "$sshline" ] || die "ssh-keygen -D did not list the TPM key: $sshout"
  ok "ssh-keygen -D lists the TPM key:"
  printf '        %s\n' "$sshline"

  step "Proving to a relying party that a key lives in this TPM (key attestation)"
  LOCALCA=/var/lib/swtpm-localca
  CA_ROOT=$LOCALCA/swtpm-localca-rootca-cert.pem
  CA_ISSUER=$LOCALCA/issuercert.pem
  [ -f "$CA_ROOT" ] && [ -f "$CA_ISSUER" ] || die "swtpm's local CA is not in $LOCALCA"
  created=$("$CLI" create --account-user-id demo-user --client-id demo-attest --json 2>&1 </dev/null) ||
    die "devicekey create failed: $created"
  ATT_KEY=$(sed -n 's/.*"keyId": *"\([^"]*\)".*/\1/p' <<<"$created" | head -1)
  [ -n "$ATT_KEY" ] || die "devicekey create printed no keyId: $created"
  grep -q '"protectionClass": *"hardware_tpm"' <<<"$created" || die "the key is not in the TPM: $created"
  ok "devicekey create -> $ATT_KEY (hardware_tpm)"
  # The relying party picks a fresh nonce; the device answers with its evidence for that nonce.
  ATT_NONCE=$(head -c 32 /dev/urandom | base64 -w0 | tr '+/' '-_' | tr -d '=')
  "$CLI" attest --key-id "$ATT_KEY" --nonce "$ATT_NONCE" >evidence.json 2>attest.err </dev/null ||
    die "devicekey attest failed: $(cat attest.err)"
  grep -q '"format": *"tpm"' evidence.json || die "the evidence is not TPM evidence: $(cat evidence.json)"
  ok "devicekey attest --nonce $ATT_NONCE -> evidence.json ($(stat -c %s evidence.json) bytes: the key's TPM public area, a TPM2_Certify of it by the attestation key, the EK and its certificate)"
  # The relying party's side: needs no TPM; check 3 sends a challenge only the TPM can answer.
  verify_out=$("$CLI" attest verify --evidence evidence.json --nonce "$ATT_NONCE" \
    --roots "$CA_ROOT" --intermediates "$CA_ISSUER" \
    --activate-with "'$CLI' attest activate --key-id '$ATT_KEY'" 2>&1 </dev/null) || {
    printf '%s\n' "$verify_out"
    die "devicekey attest verify did not verify the evidence"
  }
  ok "devicekey attest verify (roots: swtpm's test CA in $LOCALCA):"
  printf '%s\n' "$verify_out" | sed 's/^/        /'
  grep -q "verified: all six checks pass" <<<"$verify_out" || die "not all six checks passed"
  # The same evidence with another nonce (a replay) is refused.
  if replay=$("$CLI" attest verify --evidence evidence.json \
    --nonce "$(head -c 32 /dev/urandom | base64 -w0 | tr '+/' '-_' | tr -d '=')" \
    --roots "$CA_ROOT" --intermediates "$CA_ISSUER" \
    --activate-with "'$CLI' attest activate --key-id '$ATT_KEY'" 2>&1 </dev/null); then
    die "evidence replayed with another nonce was accepted: $replay"
  fi
  grep -q "check 5 (certifyInfo): FAIL" <<<"$replay" || die "a replay was refused for the wrong reason: $replay"
  ok "the same evidence replayed for another nonce is refused: $(grep '^check 5' <<<"$replay")"
  cat <<EOF
    In plain words: the private key of $ATT_KEY was made inside this TPM and cannot leave it
    (not even to devicekey; a compromised OS could use it while it runs, never copy it). The TPM
    answered a challenge encrypted to its endorsement key, and that key's certificate is vouched
    for by the TPM maker's CA: here swtpm's test CA, which a real relying party would not trust;
    on real hardware it is the TPM manufacturer's root.
EOF
  ATTEST_DONE=1
fi

# ---------------------------------------------------------------------------------------------
say "Done. What happened:"
cat <<EOF
  - pkcs11-tool created a P-256 key pair in devicekey's software store; the private key is
    sensitive and never extractable: no tool can read it out, only ask the token to sign.
  - The token signed a digest (CKM_ECDSA) and a whole message (CKM_ECDSA_SHA256); openssl verified
    both against the exported public key.
  - The OpenSSL pkcs11 engine found the key by its pkcs11: URI, signed with it, and made a
    self-signed certificate that openssl verifies; the certificate now sits on the token with the key.
  - ssh-keygen -D read the same key through the module: that line is what a server's
    authorized_keys needs for 'ssh -I $MODULE'.
EOF
if [ "$SERVE_DONE" = 1 ]; then
  cat <<EOF
  - devicekey serve created a proof key over JSON-RPC and signed a device-key proof; openssl
    verified the signature over the exact bytes the server reported.
EOF
else
  echo "  - The JSON-RPC step was skipped (no working 'devicekey serve' in this build)."
fi
if [ "$DEMO_HSM" = 1 ]; then
  echo "  - A second slot wrapped a SoftHSM token declared hardware_tpm; a key made there signed, and openssl verified it."
fi
if [ "$DEMO_TPM" = 1 ]; then
  echo "  - A TPM slot on a throwaway swtpm made a key inside the TPM, signed with CKM_ECDSA and CKM_ECDSA_SHA256 (verified by openssl), and ssh-keygen -D listed it; swtpm is stopped at exit."
fi
if [ "$ATTEST_DONE" = 1 ]; then
  echo "  - Attestation verified: devicekey attest verify proved that a new key was generated in that TPM and cannot leave it, and that the TPM is vouched for by its maker's certificate (here swtpm's test CA)."
fi
if [ "$KEEP" = 1 ]; then
  echo "  Key store and files kept in $DEMO."
else
  echo "  The temporary key store has been removed."
fi
