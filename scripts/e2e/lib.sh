# shellcheck shell=bash
# Shared helpers of the end-to-end tests (sourced by each scripts/e2e/<tool>.sh).
#
# The one harness of the shell tests. A test script sources this file, calls `e2e_setup`, makes
# keys with `make_key` (or `gen_key` inside a check), runs its checks with `check NAME FUNCTION`
# (`skip NAME REASON` where a check does not apply to the key store), ends with a negative control
# (`negative NAME FUNCTION`: the same consumer with the token's key broken must fail), and calls
# `e2e_finish`, which prints `N passed, N failed` and sets the exit status. Every check runs in a
# subshell; inside it `run` runs a tool (timeout, no stdin) and keeps its output in $OUT,
# `expect`/`reject` assert on $OUT, `fail` ends the check.
#
# Environment:
#   DEVICEKEY_MODULE  the module under test (default target/release/libdevicekey_pkcs11.so)
#   DEVICEKEY_BIN     the CLI (default target/release/devicekey)
#   E2E_BACKEND       software (default), softhsm or tpm: the key store behind our token
#                     (tpm: a `backend = "tpm"` slot on a throwaway swtpm, one per test script)
#   E2E_TIMEOUT       seconds per tool call (default 60)
#   E2E_VERBOSE=1     print the output of passing checks too
#   E2E_KEEP=1        keep the temporary directory

E2E_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
E2E_NAME=$(basename "$0" .sh)
MODULE=${DEVICEKEY_MODULE:-$E2E_ROOT/target/release/libdevicekey_pkcs11.so}
DEVICEKEY=${DEVICEKEY_BIN:-$E2E_ROOT/target/release/devicekey}
E2E_BACKEND=${E2E_BACKEND:-software}
TIMEOUT=${E2E_TIMEOUT:-60}
TOKEN_LABEL=devicekey
TOKEN_MODEL=os_protected
INSTALLED_MODULE=/usr/local/lib/devicekey/libdevicekey_pkcs11.so
SOFTHSM_LIB=/usr/lib/softhsm/libsofthsm2.so
# The OpenSSL pkcs11 engine (libp11).
ENGINES_DIR=$(openssl version -e 2>/dev/null | sed -n 's/^ENGINESDIR: "\(.*\)"$/\1/p')
PKCS11_ENGINE=${ENGINES_DIR:-/usr/lib/x86_64-linux-gnu/engines-3}/pkcs11.so

E2E_PASSED=0
E2E_FAILED=0
E2E_SKIPPED=0
E2E_FAILED_NAMES=()
E2E_CLEANUPS=()

case "$MODULE" in /*) ;; *) MODULE=$PWD/$MODULE ;; esac
case "$DEVICEKEY" in /*) ;; *) DEVICEKEY=$PWD/$DEVICEKEY ;; esac

T=$(mktemp -d "${TMPDIR:-/tmp}/devicekey-e2e-$E2E_NAME.XXXXXX")
chmod 700 "$T"
: >"$T/pids"

# on_exit CMD: run CMD (a string) when the script ends, most recent first.
on_exit() { E2E_CLEANUPS+=("$1"); }

e2e_cleanup() {
  local i pid
  while read -r pid; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
  done <"$T/pids"
  for ((i = ${#E2E_CLEANUPS[@]} - 1; i >= 0; i--)); do
    eval "${E2E_CLEANUPS[$i]}" || true
  done
  if [ "${E2E_KEEP:-0}" = 1 ]; then
    echo "kept $T"
  else
    rm -rf "$T"
  fi
}
trap e2e_cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Assertions (inside a check).

# fail MESSAGE: end the check (its subshell) as failed.
fail() {
  echo "ASSERTION FAILED: $*"
  exit 1
}

# run CMD...: run a command (with a timeout, no stdin), print and keep its output in $OUT,
# fail when it exits non-zero.
run() {
  echo "\$ $*"
  OUT=$(timeout -k 5 "$TIMEOUT" "$@" </dev/null 2>&1)
  local rc=$?
  [ -n "$OUT" ] && printf '%s\n' "$OUT"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    fail "timed out after ${TIMEOUT}s: $*"
  fi
  [ $rc -eq 0 ] || fail "exit status $rc: $*"
}

# expect TEXT: the last command's output contains TEXT (fixed string).
expect() {
  grep -qF -- "$1" <<<"$OUT" || fail "expected output to contain: $1"
}

# expect_re REGEX: the last command's output matches an extended regex.
expect_re() {
  grep -qE -- "$1" <<<"$OUT" || fail "expected output to match: $1"
}

# reject TEXT: the last command's output does not contain TEXT.
reject() {
  if grep -qF -- "$1" <<<"$OUT"; then fail "output must not contain: $1"; fi
}

# run_fails CMD...: like run, but the command must fail (a negative control).
run_fails() {
  echo "\$ $*   (must fail)"
  OUT=$(timeout -k 5 "$TIMEOUT" "$@" </dev/null 2>&1)
  local rc=$?
  [ -n "$OUT" ] && printf '%s\n' "$OUT" | tail -n 15
  [ $rc -ne 0 ] || fail "succeeded but must fail: $*"
  echo "(failed as it must, exit $rc)"
}

# reject_re ERE: no line of $OUT matches ERE (case-insensitive). On the TPM store, the lines of
# TPM_RECOVERY_NOISE are left out first (and counted): see there.
reject_re() {
  local out=$OUT n
  if [ "$E2E_BACKEND" = tpm ]; then
    n=$(grep -cE -- "$TPM_RECOVERY_NOISE" <<<"$OUT")
    if [ "$n" -gt 0 ]; then
      out=$(grep -vE -- "$TPM_RECOVERY_NOISE" <<<"$OUT")
      echo "(reject_re: $n line(s) of TPM object-memory recovery left out)"
    fi
  fi
  if grep -qiE -- "$1" <<<"$out"; then fail "output must not match: $1"; fi
}

# The TPM store on swtpm has no resource manager: a process that exits without C_Finalize (libp11,
# `devicekey cert`) or is killed (the test servers) leaves its objects loaded, and swtpm has three
# object slots. The next process to find the TPM full flushes every transient object and says so
# (the module at warn level, libtss2 on stderr); a process whose objects were flushed meanwhile
# reconnects. These lines are about the TPM's memory, not about the consumer under test. With the
# kernel resource manager (/dev/tpmrm0, the default TCTI) they do not occur.
TPM_RECOVERY_NOISE='^(WARNING:esys:.*Received TPM Error *$|ERROR:esys:.*ErrorCode \(0x00000(902|910|18b|1cb)\) *$|devicekey\[[0-9]+\] WARN: tpm: (TPM full; flushed (transient object|session) |out of object memory while loading a key|TPM out of object memory \(|connection to swtpm:[^ ]* lost or stale \())'

# ---------------------------------------------------------------------------------------------
# Checks and the summary.

# check NAME FUNCTION [ARGS...]: run FUNCTION in a subshell in $T/work, record PASS or FAIL.
check() {
  local name=$1 log="$T/check-$1.log" rc
  shift
  (
    cd "$T/work" || exit 1
    "$@"
  ) >"$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    E2E_PASSED=$((E2E_PASSED + 1))
    echo "PASS $E2E_NAME/$name"
    [ "${E2E_VERBOSE:-0}" = 1 ] && sed 's/^/    /' "$log"
  else
    E2E_FAILED=$((E2E_FAILED + 1))
    E2E_FAILED_NAMES+=("$name")
    echo "FAIL $E2E_NAME/$name"
    sed 's/^/    /' "$log"
  fi
  return 0
}

skip() { # skip NAME REASON
  E2E_SKIPPED=$((E2E_SKIPPED + 1))
  echo "SKIP $E2E_NAME/$1 ($2)"
}

# abort REASON: the test cannot go on (setup failed); counts one failure and ends the script.
abort() {
  echo "FAIL $E2E_NAME/setup: $*"
  E2E_FAILED=$((E2E_FAILED + 1))
  e2e_finish
}

e2e_finish() {
  [ $E2E_SKIPPED -gt 0 ] && echo "($E2E_SKIPPED skipped)"
  [ $E2E_FAILED -gt 0 ] && echo "failed: ${E2E_FAILED_NAMES[*]:-setup}"
  echo "$E2E_PASSED passed, $E2E_FAILED failed"
  if [ $E2E_FAILED -eq 0 ]; then exit 0; else exit 1; fi
}

# need CMD...: abort unless every command exists.
need() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || abort "$c not found (run scripts/e2e/run.sh, which installs it)"
  done
}

# ---------------------------------------------------------------------------------------------
# The environment: a fresh key store, HOME and XDG directories inside $T.

e2e_setup() {
  mkdir -p "$T/home" "$T/config" "$T/data" "$T/cache" "$T/run" "$T/work" "$T/keys"
  chmod 700 "$T/run" "$T/keys"
  export HOME="$T/home"
  export XDG_CONFIG_HOME="$T/config" XDG_DATA_HOME="$T/data" XDG_CACHE_HOME="$T/cache"
  export XDG_RUNTIME_DIR="$T/run"
  export DEVICEKEY_LOG="${DEVICEKEY_LOG:-warn}"
  unset OPENSSL_CONF SSH_AUTH_SOCK SSH_AGENT_PID PKCS11_MODULE_PATH PKCS11SPY
  [ -f "$MODULE" ] || abort "module $MODULE not found (cargo build --release)"
  [ -x "$DEVICEKEY" ] || abort "CLI $DEVICEKEY not found (cargo build --release)"
  case "$E2E_BACKEND" in
    software)
      printf '[[slot]]\nlabel = "%s"\nbackend = "software"\ndir = "%s/keys"\n' \
        "$TOKEN_LABEL" "$T" >"$T/devicekey.toml"
      ;;
    softhsm)
      # shellcheck source=scripts/softhsm-token.sh
      . "$E2E_ROOT/scripts/softhsm-token.sh" "$T/softhsm" >/dev/null || abort "no SoftHSM token"
      export E2E_SOFTHSM_PIN=$SOFTHSM_PIN
      printf '[[slot]]\nlabel = "%s"\nbackend = "pkcs11"\nmodule = "%s"\ntoken = "%s"\npin_env = "E2E_SOFTHSM_PIN"\nprotection_class = "hardware_tpm"\n' \
        "$TOKEN_LABEL" "$SOFTHSM_MODULE" "$SOFTHSM_TOKEN_LABEL" >"$T/devicekey.toml"
      TOKEN_MODEL=hardware_tpm
      ;;
    tpm)
      # A throwaway swtpm for this test script, stopped (by its pid) when the script ends. The
      # module's TPM store reaches it through the swtpm TCTI, which opens a TCP connection per
      # command, so the processes of one test (an s_server holding the module while s_client
      # loads it too) share it; without a resource manager they may flush each other's objects,
      # which the store notices and answers by reconnecting (docs/CONSUMERS.md, TPM store).
      command -v swtpm >/dev/null 2>&1 || abort "swtpm not found (scripts/setup.sh installs it)"
      local swtpm_env
      swtpm_env=$(bash "$E2E_ROOT/scripts/swtpm.sh" start "$T/swtpm" 2>"$T/swtpm-start.log") ||
        abort "swtpm did not start: $(cat "$T/swtpm-start.log")"
      eval "$swtpm_env"
      on_exit "bash '$E2E_ROOT/scripts/swtpm.sh' stop '$SWTPM_PID' >/dev/null 2>&1"
      # allow_simulator: swtpm counts as a TPM here, so the token's model is hardware_tpm.
      printf '[[slot]]\nlabel = "%s"\nbackend = "tpm"\ntcti = "%s"\ndir = "%s/keys"\nallow_simulator = true\n' \
        "$TOKEN_LABEL" "$SWTPM_TCTI" "$T" >"$T/devicekey.toml"
      TOKEN_MODEL=hardware_tpm
      ;;
    *) abort "unknown E2E_BACKEND $E2E_BACKEND (software, softhsm or tpm)" ;;
  esac
  export DEVICEKEY_CONFIG="$T/devicekey.toml"
}

# setup_step DESCRIPTION CMD...: run a setup command; abort with its output when it fails.
setup_step() {
  local what=$1 out
  shift
  if ! out=$(timeout -k 5 "$TIMEOUT" "$@" </dev/null 2>&1); then
    printf '%s\n' "$out" | sed 's/^/    /'
    abort "$what: $*"
  fi
  [ "${E2E_VERBOSE:-0}" = 1 ] && printf '%s\n' "$out" | sed 's/^/    /'
  return 0
}

# make_key ID LABEL CN: a P-256 key pair on our token (pkcs11-tool), and a self-signed certificate
# made and stored by `devicekey cert` (signed through the module). Writes $T/<LABEL>.pem (the
# certificate), $T/<LABEL>.pub.pem (the public key from the token).
make_key() {
  local id=$1 label=$2 cn=$3
  setup_step "key generation" pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" \
    --keypairgen --key-type EC:prime256v1 --id "$id" --label "$label"
  setup_step "certificate" "$DEVICEKEY" cert --module "$MODULE" --token "$TOKEN_LABEL" --id "$id" \
    --subject "CN=$cn,O=devicekey e2e" --dns localhost --ip 127.0.0.1 -o "$T/$label.pem"
  setup_step "public key" pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" \
    --read-object --type pubkey --id "$id" -o "$T/$label.pub.der"
  setup_step "public key" openssl pkey -pubin -inform DER -in "$T/$label.pub.der" -out "$T/$label.pub.pem"
}

# key_uri ID [TYPE]: the RFC 7512 URI `devicekey uri` prints for key ID (private by default).
key_uri() {
  "$DEVICEKEY" uri --module "$MODULE" --token "$TOKEN_LABEL" --id "$1" --type "${2:-private}"
}

# A software-only P-256 key and self-signed certificate (the peer that is not under test).
make_soft_cert() { # make_soft_cert NAME CN
  setup_step "software key" openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -nodes -keyout "$T/$1.key" -out "$T/$1.pem" -days 30 -subj "/CN=$2" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1"
}

# ---------------------------------------------------------------------------------------------
# pkcs11-tool and openssl inside a check (scripts/e2e/pkcs11tool.sh, openssl-engine.sh).

# p11 ARGS...: pkcs11-tool on our token (it needs no login on any store).
p11() { run pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" "$@"; }

# gen_key ID LABEL: a P-256 key pair made by pkcs11-tool; asserts the tool's report.
gen_key() {
  p11 --keypairgen --key-type EC:prime256v1 --id "$1" --label "$2"
  expect "Key pair generated"
  expect "Private Key Object; EC"
  expect "Public Key Object; EC  EC_POINT 256 bits"
  expect "EC_PARAMS:  06082a8648ce3d030107"
  expect "label:      $2"
  expect "ID:         $1"
}

# pub_pem ID: key ID's public key as SPKI DER from the token, in pub.der and pub.pem (P-256).
pub_pem() {
  p11 --read-object --type pubkey --id "$1" -o pub.der
  [ -s pub.der ] || fail "pub.der is empty"
  run openssl pkey -pubin -inform DER -in pub.der -out pub.pem
  run openssl pkey -pubin -in pub.pem -noout -text
  expect "ASN1 OID: prime256v1"
  expect "NIST CURVE: P-256"
}

# rs_to_der RAW DER: a raw r||s signature (64 bytes) as DER SEQUENCE { r, s }.
rs_to_der() {
  local size hex
  size=$(stat -c %s "$1")
  [ "$size" = 64 ] || fail "raw signature $1 is $size bytes, expected 64"
  hex=$(od -An -v -tx1 "$1" | tr -d ' \n')
  printf 'asn1=SEQUENCE:sig\n[sig]\nr=INTEGER:0x%s\ns=INTEGER:0x%s\n' "${hex:0:64}" "${hex:64:64}" >"$1.cnf"
  run openssl asn1parse -genconf "$1.cnf" -out "$2" -noout
}

# verify_ok SIG DATA / verify_fails SIG DATA: openssl accepts / rejects the DER signature SIG
# over DATA with pub.pem.
verify_ok() {
  run openssl dgst -sha256 -verify pub.pem -signature "$1" "$2"
  expect "Verified OK"
}
verify_fails() { run_fails openssl dgst -sha256 -verify pub.pem -signature "$1" "$2"; }

# no_valid_signature SIG DATA CMD...: for a negative control, CMD (which signs into SIG) fails, or
# SIG does not verify over DATA (a broken TPM key fails to sign; another store's signs wrongly).
no_valid_signature() {
  local sig=$1 data=$2
  shift 2
  echo "\$ $*   (must not give a valid signature)"
  if timeout -k 5 "$TIMEOUT" "$@" </dev/null 2>&1; then
    verify_fails "$sig" "$data"
  else
    echo "(signing failed, as it may)"
  fi
}

# ---------------------------------------------------------------------------------------------
# The negative control: break the token's key, as a module that signs with the wrong key would.
# The public key and the certificate stay; the private key behind them is replaced by another:
# software store: the stored private scalar is overwritten (restore_key puts it back);
# softhsm: the wrapped SoftHSM private key is deleted and a new one takes its CKA_ID (for good:
#   run the negative control last).
# tpm: one byte of the key's SRK-encrypted private area (the last byte of its TSS2 PRIVATE KEY
#   file) is flipped: the TPM refuses to load the blob (TPM_RC_INTEGRITY), as it refuses a blob
#   made by another TPM, and every signature fails (restore_key puts the file back). A TPM key
#   cannot be made to sign with another private key behind the same public key: the blob binds
#   both, and the store checks every signature against the public point before it leaves.
# Every consumer must then fail.

break_key() { # break_key ID
  if [ "$E2E_BACKEND" = softhsm ]; then
    local hsm=(pkcs11-tool --module "$SOFTHSM_MODULE" --token-label "$SOFTHSM_TOKEN_LABEL" --login --pin "$SOFTHSM_PIN")
    local label
    run "${hsm[@]}" --list-objects --type privkey --id "$1"
    label=$(sed -n 's/^  label: *//p' <<<"$OUT" | head -n 1)
    [ -n "$label" ] || fail "no label on private key $1"
    run "${hsm[@]}" --delete-object --type privkey --id "$1"
    run "${hsm[@]}" --keypairgen --key-type EC:prime256v1 --id eeee --label "$label"
    run "${hsm[@]}" --set-id "$1" --id eeee --type privkey
    run "${hsm[@]}" --delete-object --type pubkey --id eeee
    echo "(negative control: key $1's private key replaced in the wrapped SoftHSM token)"
    return
  fi
  if [ "$E2E_BACKEND" = tpm ]; then
    local meta pem n last
    meta=$(grep -l "\"id\": \"$1\"" "$T"/keys/key-*.json 2>/dev/null | head -n 1)
    [ -n "$meta" ] || fail "no key with id $1 in the TPM store"
    pem=${meta%.json}.pem
    grep -q -- "-----BEGIN TSS2 PRIVATE KEY-----" "$pem" || fail "$pem is not a TSS2 PRIVATE KEY file"
    cp -p "$pem" "$T/broken-key.bak"
    echo "$pem" >"$T/broken-key.path"
    sed '/^-----/d' "$pem" | base64 -d >"$T/broken-key.der" || fail "cannot decode $pem"
    n=$(stat -c %s "$T/broken-key.der")
    last=$(tail -c 1 "$T/broken-key.der" | od -An -tu1 | tr -d ' ')
    {
      echo "-----BEGIN TSS2 PRIVATE KEY-----"
      # shellcheck disable=SC2059
      { head -c $((n - 1)) "$T/broken-key.der"; printf "\\$(printf '%03o' $((last ^ 0x5a)))"; } | base64 -w 64
      echo "-----END TSS2 PRIVATE KEY-----"
    } >"$pem"
    cmp -s "$pem" "$T/broken-key.bak" && fail "the key file did not change"
    echo "(negative control: key $1's TPM blob corrupted: one byte of its encrypted private area flipped)"
    return
  fi
  local file scalar
  file=$(grep -l "\"id\": \"$1\"" "$T"/keys/*.key 2>/dev/null | head -n 1)
  [ -n "$file" ] || fail "no key file with id $1 in the store"
  cp -p "$file" "$T/broken-key.bak"
  echo "$file" >"$T/broken-key.path"
  # Another valid scalar (random 256 bits with the top bit clear are below the group order).
  scalar=$(head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n')
  scalar="3${scalar:1}"
  [ ${#scalar} -eq 64 ] || fail "could not make a scalar"
  sed -i "s/\"private_scalar\": \"[0-9a-f]*\"/\"private_scalar\": \"$scalar\"/" "$file"
  echo "(negative control: key $1's private scalar replaced in the store)"
}

restore_key() {
  [ -f "$T/broken-key.bak" ] || return 0
  cp -p "$T/broken-key.bak" "$(cat "$T/broken-key.path")"
  rm -f "$T/broken-key.bak" "$T/broken-key.path"
}

# negative NAME FUNCTION: run FUNCTION (which must end in failure) with key 01 broken, then restore.
negative() {
  local name=$1 fn=$2
  _negative_body() {
    break_key 01
    "$fn"
  }
  check "$name" _negative_body
  restore_key
}

# ---------------------------------------------------------------------------------------------
# Servers on 127.0.0.1.

# free_port: a TCP port no socket uses, outside the kernel's ephemeral range (outgoing
# connections, e.g. the swtpm TCTI's one connection per TPM command, take their local ports from
# that range; a server could not bind a port one of them holds).
free_port() {
  local p lo=32768 hi=60999 range
  range=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null) && read -r lo hi <<<"$range"
  while :; do
    if [ "$lo" -gt 12000 ]; then
      p=$((10000 + RANDOM % (lo - 10000)))
    elif [ "$hi" -lt 64000 ]; then
      p=$((hi + 1 + RANDOM % (65535 - hi)))
    else
      p=$((20000 + RANDOM % 40000))
    fi
    if ! ss -Htan "sport = :$p" 2>/dev/null | grep -q .; then
      echo "$p"
      return
    fi
  done
}

# wait_port PORT [SECONDS]: until something listens on PORT.
wait_port() {
  local i
  for ((i = 0; i < ${2:-20} * 10; i++)); do
    ss -Htln "sport = :$1" 2>/dev/null | grep -q . && return 0
    sleep 0.1
  done
  return 1
}

# start_bg NAME CMD...: start a server in the background (output in $T/NAME.out); it is killed
# when the script ends. The PID is in $BG_PID.
start_bg() {
  local name=$1
  shift
  setsid "$@" </dev/null >"$T/$name.out" 2>&1 &
  BG_PID=$!
  echo "$BG_PID" >>"$T/pids"
}

# stop_bg PID: stop a background server.
stop_bg() {
  kill "$1" 2>/dev/null
  wait "$1" 2>/dev/null
  return 0
}

# openssl_engine_conf FILE [MODULE]: an openssl.cnf loading the pkcs11 engine, with MODULE_PATH
# when MODULE is given (else libp11 goes through p11-kit-proxy).
openssl_engine_conf() {
  {
    echo "openssl_conf = openssl_init"
    echo "[openssl_init]"
    echo "engines = engine_section"
    echo "[engine_section]"
    echo "pkcs11 = pkcs11_section"
    echo "[pkcs11_section]"
    echo "engine_id = pkcs11"
    echo "dynamic_path = $PKCS11_ENGINE"
    [ -n "${2:-}" ] && echo "MODULE_PATH = $2"
    echo "init = 0"
  } >"$1"
}

# ---------------------------------------------------------------------------------------------
# install.sh, for the tests that need the module in its installed place.

# use_installed: run scripts/install.sh now, and --uninstall when the script ends unless it was
# installed before.
use_installed() {
  local was_installed=0
  [ -f /etc/pkcs11/modules/devicekey.module ] && was_installed=1
  setup_step "install.sh" env DEVICEKEY_BUILD_DIR="$(dirname "$MODULE")" bash "$E2E_ROOT/scripts/install.sh"
  if [ $was_installed = 0 ]; then
    on_exit "bash '$E2E_ROOT/scripts/install.sh' --uninstall >/dev/null"
  fi
}

# write_sshd_config DIR PORT ROOT_LOGIN: a throwaway sshd's config in DIR/sshd_config (host key,
# pid file and authorized_keys in DIR; public keys only; PermitRootLogin ROOT_LOGIN).
write_sshd_config() {
  cat >"$1/sshd_config" <<EOF
Port $2
ListenAddress 127.0.0.1
HostKey $1/host_key
PidFile $1/sshd.pid
AuthorizedKeysFile $1/authorized_keys
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin $3
LogLevel VERBOSE
EOF
}

# sshd_setup PUB_PEM: a throwaway sshd for one token key (not started: start_sshd), in $S
# ($T/sshd) on port $PORT, as the user $USER_NAME. PUB_PEM (NAME.pub.pem) is the key's public key:
# its OpenSSH form goes to NAME.ssh.pub ($SSH_PUB), its fingerprint to $FPR. $SSH_OPTS are the
# client's options (this host key only, no password, no prompt of ssh's own).
sshd_setup() {
  SSHD=$(command -v sshd)
  USER_NAME=$(id -un)
  PORT=$(free_port)
  S=$T/sshd
  mkdir -p "$S" /run/sshd 2>/dev/null
  chmod 700 "$S"
  setup_step "sshd host key" ssh-keygen -q -t ed25519 -N '' -f "$S/host_key"
  write_sshd_config "$S" "$PORT" prohibit-password
  printf '[127.0.0.1]:%s %s\n' "$PORT" "$(cut -d' ' -f1,2 "$S/host_key.pub")" >"$T/known_hosts"
  SSH_PUB=${1%.pub.pem}.ssh.pub
  setup_step "public key" ssh-keygen -i -m PKCS8 -f "$1"
  ssh-keygen -i -m PKCS8 -f "$1" >"$SSH_PUB"
  FPR=$(ssh-keygen -l -E sha256 -f "$SSH_PUB" | awk '{print $2}')
  SSH_OPTS=(-F /dev/null -p "$PORT" -o UserKnownHostsFile="$T/known_hosts" -o GlobalKnownHostsFile=/dev/null
    -o StrictHostKeyChecking=yes -o BatchMode=yes -o PasswordAuthentication=no
    -o KbdInteractiveAuthentication=no -o ConnectTimeout=10 -o LogLevel=ERROR)
}

start_sshd() {
  start_bg sshd "$SSHD" -D -f "$S/sshd_config" -E "$S/sshd.log"
  wait_port "$PORT" 10 || abort "sshd did not start: $(cat "$S/sshd.log" "$T/sshd.out" 2>/dev/null)"
}

# ssh_login [SSH ARGS...]: run a command over ssh with no TTY (setsid -w, stdin /dev/null).
ssh_login() {
  run setsid -w ssh "${SSH_OPTS[@]}" "$@" "$USER_NAME@127.0.0.1" 'echo devicekey-ssh-ok $((6 * 7))'
  expect "devicekey-ssh-ok 42"
}

# ssh_login_fails [SSH ARGS...]: the same login must fail.
ssh_login_fails() {
  run_fails setsid -w ssh "${SSH_OPTS[@]}" "$@" "$USER_NAME@127.0.0.1" 'echo devicekey-ssh-ok'
  reject "devicekey-ssh-ok"
}

# ssh_key_login HOW [SSH ARGS...]: ssh_login, and the sshd log shows that login made with our key
# ($FPR); HOW names the login in the message ("a", "an agent").
ssh_key_login() {
  local how=$1 before
  shift
  before=$(wc -l <"$S/sshd.log")
  ssh_login "$@"
  sed -n "$((before + 1)),\$p" "$S/sshd.log" | grep "Accepted publickey for $USER_NAME" | grep -qF "ECDSA $FPR" ||
    { cat "$S/sshd.log"; fail "sshd did not log $how login with key $FPR"; }
}

# ssh_agent_login: the agent at $SSH_AUTH_SOCK holds our key, and ssh logs in through it.
ssh_agent_login() {
  run ssh-add -l
  expect "256 $FPR"
  ssh_key_login "an agent" -o IdentityAgent="$SSH_AUTH_SOCK"
}

# start_ssh_agent MODULE: an ssh-agent for this check on $T/agent.sock (SSH_AUTH_SOCK exported,
# pid in $AGENT_PID) that loads PKCS#11 modules from the directory of MODULE (its real path) only.
start_ssh_agent() {
  local sock=$T/agent.sock
  rm -f "$sock"
  start_bg ssh-agent ssh-agent -D -a "$sock" -P "$(dirname "$(realpath "$1")")/*"
  # shellcheck disable=SC2034 # used by the scripts that source this file
  AGENT_PID=$BG_PID
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || fail "ssh-agent did not start: $(cat "$T/ssh-agent.out")"
  export SSH_AUTH_SOCK=$sock
}

# s_server_start NAME CLIENT_CERT: `openssl s_server` on a new $PORT (pid in $SERVER_PID) with the
# software server key, asking for a client certificate and verifying it against CLIENT_CERT.
s_server_start() {
  PORT=$(free_port)
  start_bg "$1" openssl s_server -accept "127.0.0.1:$PORT" -www -naccept 1 \
    -key "$T/softserver.key" -cert "$T/softserver.pem" \
    -Verify 1 -verify_return_error -CAfile "$2"
  # shellcheck disable=SC2034 # used by the scripts that source this file
  SERVER_PID=$BG_PID
  wait_port "$PORT" 15 || { cat "$T/$1.out"; fail "s_server did not start"; }
}

# tstclnt_get PORT [PIN]: NSS's tstclnt GETs the page of the server on PORT with the certificate
# $NICK of the NSS database $DB and its key (the token's PIN given with -w; none by default);
# output in $OUT.
tstclnt_get() {
  [ -f "$T/get.txt" ] || printf 'GET / HTTP/1.0\r\n\r\n' >"$T/get.txt"
  echo "\$ tstclnt -h 127.0.0.1 -p $1 -d sql:$DB -n $NICK -w <PIN> -a localhost"
  OUT=$(timeout -k 5 "$TIMEOUT" tstclnt -h 127.0.0.1 -p "$1" -d "sql:$DB" -n "$NICK" -w "${2:-}" \
    -a localhost <"$T/get.txt" 2>&1)
  echo "(exit $?)"
  printf '%s\n' "$OUT" | grep -vE '^[A-Za-z0-9+/=]{64}$'
}
