#!/usr/bin/env bash
# End to end: the token in a process that cannot reach the key store, through p11-kit's RPC.
# `p11-kit server --provider <our module>` serves the token on a Unix socket; the consumer runs as
# another user (nobody, through setpriv) with its own HOME and XDG directories, no devicekey
# config, and no access to the key directory, and loads p11-kit-client.so:
#   - pkcs11-tool -O lists the key pair, with no warning or error;
#   - pkcs11-tool signs, and openssl verifies the signature with the token's public key;
#   - openssl s_client (pkcs11 engine, MODULE_PATH = p11-kit-client.so) completes a TLS handshake
#     with client authentication against `openssl s_server -Verify 1`.
# Then `p11-kit remote` over a pipe: P11_KIT_SERVER_ADDRESS='|ssh ... root@127.0.0.1' (the exec
# syntax), a throwaway sshd on 127.0.0.1 whose authorized key is restricted to one forced command,
# `p11-kit remote --provider <module>`: list and sign, the way a remote host reaches the device key.
# Negative controls: with the token's key broken, a signature through the socket does not verify
# (or is refused); with the server stopped, signing through the client module fails.
# Needs root (to switch to the other user and to run sshd).
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need p11-kit pkcs11-tool openssl setpriv ssh sshd ssh-keygen
e2e_setup
[ "$(id -u)" -eq 0 ] || abort "needs root: the consumer runs as another user (setpriv) and sshd runs as root"
[ -f "$PKCS11_ENGINE" ] || abort "the OpenSSL pkcs11 engine is missing ($PKCS11_ENGINE; package libengine-pkcs11-openssl)"
CLIENT_MODULE=${P11KIT_CLIENT_MODULE:-}
if [ -z "$CLIENT_MODULE" ]; then
  for f in /usr/lib/*/pkcs11/p11-kit-client.so /usr/lib64/pkcs11/p11-kit-client.so /usr/lib/pkcs11/p11-kit-client.so; do
    [ -f "$f" ] && { CLIENT_MODULE=$f; break; }
  done
fi
[ -n "$CLIENT_MODULE" ] || abort "p11-kit-client.so not found (package p11-kit-modules or libp11-kit0)"
CLIENT_USER=nobody
CLIENT_GROUP=$(id -gn "$CLIENT_USER") || abort "no user $CLIENT_USER"

make_key 01 remoteclient "remote client"
CLIENT_URI=$(key_uri 01)
[ -n "$CLIENT_URI" ] || abort "devicekey uri printed nothing"
make_soft_cert remoteserver "remote server"

# The consumer's world: a directory of its own (outside $T, which only root may enter).
C=$(mktemp -d "${TMPDIR:-/tmp}/devicekey-e2e-remote-client.XXXXXX")
on_exit "rm -rf '$C'"
mkdir -p "$C/home" "$C/config" "$C/data" "$C/cache" "$C/run"
cp "$T/remoteclient.pem" "$T/remoteserver.pem" "$C/"
head -c 1000 /dev/urandom >"$C/payload.bin"
openssl dgst -sha256 -binary -out "$C/payload.sha256" "$C/payload.bin"
printf 'GET / HTTP/1.0\r\n\r\n' >"$C/get.txt"
openssl_engine_conf "$C/openssl.cnf" "$CLIENT_MODULE"
setup_step "client ssh key" ssh-keygen -q -t ed25519 -N '' -C devicekey-e2e-remote -f "$C/id_ed25519"
chmod 700 "$C" "$C/run"
chown -R "$CLIENT_USER:$CLIENT_GROUP" "$C"

SOCKET=$C/p11-kit.sock
# CLIENT... CMD: run CMD as the consumer (another user, a clean environment).
CLIENT=(setpriv "--reuid=$CLIENT_USER" "--regid=$CLIENT_GROUP" --clear-groups --
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
  HOME="$C/home" XDG_CONFIG_HOME="$C/config" XDG_DATA_HOME="$C/data" XDG_CACHE_HOME="$C/cache"
  XDG_RUNTIME_DIR="$C/run" P11_KIT_SERVER_ADDRESS="unix:path=$SOCKET")
P11TOOL=(pkcs11-tool --module "$CLIENT_MODULE")

# The server: only the consumer's uid may connect (-u); it runs as root with our config.
start_bg p11kit-server p11-kit server -f -u "$CLIENT_USER" -g "$CLIENT_GROUP" -n "$SOCKET" \
  --provider "$MODULE" "pkcs11:token=$TOKEN_LABEL"
SERVER_PID=$BG_PID
for ((i = 0; i < 200; i++)); do
  [ -S "$SOCKET" ] && break
  sleep 0.1
done
[ -S "$SOCKET" ] || abort "p11-kit server made no socket: $(cat "$T/p11kit-server.out")"

# A throwaway sshd on 127.0.0.1 for `p11-kit remote` over a pipe. The consumer's key may run one
# command only: p11-kit remote with our module (and the key store's environment).
S=$T/sshd
mkdir -p "$S" /run/sshd
chmod 700 "$S"
setup_step "sshd host key" ssh-keygen -q -t ed25519 -N '' -f "$S/host_key"
SSH_PORT=$(free_port)
{
  echo '#!/bin/sh'
  echo "# The forced command of the consumer's ssh key: the token over stdin/stdout."
  for v in DEVICEKEY_CONFIG DEVICEKEY_LOG SOFTHSM2_CONF E2E_SOFTHSM_PIN XDG_DATA_HOME XDG_CONFIG_HOME; do
    [ -n "${!v:-}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'exec p11-kit remote --provider %q %q\n' "$MODULE" "pkcs11:token=$TOKEN_LABEL"
} >"$S/p11kit-remote.sh"
chmod 700 "$S/p11kit-remote.sh"
printf 'command="%s",restrict %s\n' "$S/p11kit-remote.sh" "$(cut -d' ' -f1,2 "$C/id_ed25519.pub")" >"$S/authorized_keys"
write_sshd_config "$S" "$SSH_PORT" forced-commands-only
printf '[127.0.0.1]:%s %s\n' "$SSH_PORT" "$(cut -d' ' -f1,2 "$S/host_key.pub")" >"$C/known_hosts"
chown "$CLIENT_USER:$CLIENT_GROUP" "$C/known_hosts"
start_bg sshd "$(command -v sshd)" -D -f "$S/sshd_config" -E "$S/sshd.log"
wait_port "$SSH_PORT" 10 || abort "sshd did not start: $(cat "$S/sshd.log" "$T/sshd.out" 2>/dev/null)"
PIPE_ADDRESS="|ssh -F /dev/null -i $C/id_ed25519 -p $SSH_PORT -o UserKnownHostsFile=$C/known_hosts -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes -o LogLevel=ERROR root@127.0.0.1"

# Output lines that would be a warning or an error from any layer (pkcs11-tool's "warning: PKCS11
# function ... failed", p11-kit's messages, our module's log).
PROBLEMS='warning|error|failed|CKR_|p11-kit:|devicekey\['

check_client_has_no_key_store() {
  run "${CLIENT[@]}" id -un
  expect "$CLIENT_USER"
  run_fails "${CLIENT[@]}" ls "$T/keys"
  run_fails "${CLIENT[@]}" cat "$DEVICEKEY_CONFIG"
  # Our module loaded directly in the consumer's world has no such key (another store, or none).
  echo "\$ pkcs11-tool --module $MODULE -O   (as $CLIENT_USER)"
  OUT=$(timeout -k 5 "$TIMEOUT" "${CLIENT[@]}" pkcs11-tool --module "$MODULE" -O </dev/null 2>&1)
  printf '%s\n' "$OUT" | tail -n 5
  reject "remoteclient"
}

# list_clean ADDRESS: pkcs11-tool -O through the client module shows the key pair, with no warning.
list_clean() {
  run "${CLIENT[@]}" P11_KIT_SERVER_ADDRESS="$1" "${P11TOOL[@]}" --token-label "$TOKEN_LABEL" -O
  expect "Private Key Object; EC"
  expect "Public Key Object; EC"
  expect "label:      remoteclient"
  expect "Certificate Object; type = X.509 cert"
  expect "ID:         01"
  reject_re "$PROBLEMS"
}

check_list_through_socket() {
  run "${CLIENT[@]}" "${P11TOOL[@]}" -L
  expect "token label        : $TOKEN_LABEL"
  reject_re "$PROBLEMS"
  list_clean "unix:path=$SOCKET"
}

# sign_verify ADDRESS NAME: sign the payload's digest through the client module; openssl verifies.
sign_verify() {
  run "${CLIENT[@]}" P11_KIT_SERVER_ADDRESS="$1" "${P11TOOL[@]}" --token-label "$TOKEN_LABEL" \
    --sign -m ECDSA --id 01 --signature-format openssl -i "$C/payload.sha256" -o "$C/$2.der"
  reject_re "$PROBLEMS"
  run openssl dgst -sha256 -verify "$T/remoteclient.pub.pem" -signature "$C/$2.der" "$C/payload.bin"
  expect "Verified OK"
}

check_sign_through_socket() { sign_verify "unix:path=$SOCKET" sig-socket; }

check_tls_client_auth_through_socket() {
  local port pid
  port=$(free_port)
  start_bg tls-srv openssl s_server -accept "127.0.0.1:$port" -www -naccept 1 \
    -key "$T/remoteserver.key" -cert "$T/remoteserver.pem" \
    -Verify 1 -verify_return_error -CAfile "$T/remoteclient.pem"
  pid=$BG_PID
  wait_port "$port" 15 || { cat "$T/tls-srv.out"; fail "s_server did not start"; }
  echo "\$ openssl s_client -connect 127.0.0.1:$port -engine pkcs11 -key $CLIENT_URI ...   (as $CLIENT_USER, MODULE_PATH=$CLIENT_MODULE)"
  OUT=$(timeout -k 5 "$TIMEOUT" "${CLIENT[@]}" OPENSSL_CONF="$C/openssl.cnf" openssl s_client \
    -connect "127.0.0.1:$port" -ign_eof -verify_return_error -verify_hostname localhost \
    -CAfile "$C/remoteserver.pem" -engine pkcs11 -keyform engine -key "$CLIENT_URI" \
    -cert "$C/remoteclient.pem" <"$C/get.txt" 2>&1)
  printf '%s\n' "$OUT" | grep -E 'Verif|subject=|HTTP/|Subject:|error'
  stop_bg "$pid"
  expect "Verification: OK"
  expect "Verify return code: 0 (ok)"
  expect "HTTP/1.0 200 ok"
  expect "Subject: O=devicekey e2e, CN=remote client"
  grep -q "verify return:1" "$T/tls-srv.out" || { cat "$T/tls-srv.out"; fail "s_server did not verify the client certificate"; }
}

check_list_through_ssh_pipe() {
  local before
  before=$(wc -l <"$S/sshd.log")
  list_clean "$PIPE_ADDRESS"
  sed -n "$((before + 1)),\$p" "$S/sshd.log" | grep -q "Accepted publickey for root" ||
    { cat "$S/sshd.log"; fail "sshd did not log the consumer's login"; }
}

check_sign_through_ssh_pipe() { sign_verify "$PIPE_ADDRESS" sig-pipe; }

negative_sign_through_socket() {
  echo "\$ pkcs11-tool --sign through the socket (the signature must be refused or fail to verify)"
  if timeout -k 5 "$TIMEOUT" "${CLIENT[@]}" "${P11TOOL[@]}" --token-label "$TOKEN_LABEL" --sign -m ECDSA \
    --id 01 --signature-format openssl -i "$C/payload.sha256" -o "$C/sig-bad.der" </dev/null; then
    run_fails openssl dgst -sha256 -verify "$T/remoteclient.pub.pem" -signature "$C/sig-bad.der" "$C/payload.bin"
  else
    echo "(signing failed, as it must)"
  fi
}

negative_server_stopped() {
  local i
  kill "$SERVER_PID" 2>/dev/null
  for ((i = 0; i < 100; i++)); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$SERVER_PID" 2>/dev/null && fail "p11-kit server (pid $SERVER_PID) did not stop"
  echo "(p11-kit server stopped)"
  run_fails "${CLIENT[@]}" "${P11TOOL[@]}" --token-label "$TOKEN_LABEL" --sign -m ECDSA --id 01 \
    -i "$C/payload.sha256" -o "$C/sig-none.der"
}

check client_has_no_key_store check_client_has_no_key_store
check list_through_socket check_list_through_socket
check sign_through_socket check_sign_through_socket
check tls_client_auth_through_socket check_tls_client_auth_through_socket
check list_through_ssh_pipe check_list_through_ssh_pipe
check sign_through_ssh_pipe check_sign_through_ssh_pipe
negative negative_broken_key_sign_through_socket negative_sign_through_socket
check negative_server_stopped negative_server_stopped
e2e_finish
