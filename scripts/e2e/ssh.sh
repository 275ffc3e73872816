#!/usr/bin/env bash
# End to end: OpenSSH. `ssh-keygen -D` feeds a throwaway sshd's authorized_keys on 127.0.0.1;
# `ssh -I <module>` logs in and runs a command with no TTY and no PIN prompt; `ssh-agent -P` with
# `ssh-add -s` (the installed module) logs in too. The sshd log must show our key's fingerprint.
# Negative control: with the token's key broken, the login fails.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need ssh sshd ssh-keygen ssh-agent ssh-add pkcs11-tool setsid
e2e_setup
make_key 01 sshkey "ssh user"

SSHD=$(command -v sshd)
USER_NAME=$(id -un)
PORT=$(free_port)
S=$T/sshd
mkdir -p "$S" /run/sshd 2>/dev/null
chmod 700 "$S"

setup_step "sshd host key" ssh-keygen -q -t ed25519 -N '' -f "$S/host_key"
write_sshd_config "$S" "$PORT" prohibit-password
printf '[127.0.0.1]:%s %s\n' "$PORT" "$(cut -d' ' -f1,2 "$S/host_key.pub")" >"$T/known_hosts"

# The token key's OpenSSH form and fingerprint, from the public key the token reports.
setup_step "public key" ssh-keygen -i -m PKCS8 -f "$T/sshkey.pub.pem"
ssh-keygen -i -m PKCS8 -f "$T/sshkey.pub.pem" >"$T/sshkey.ssh.pub"
FPR=$(ssh-keygen -l -E sha256 -f "$T/sshkey.ssh.pub" | awk '{print $2}')

SSH_OPTS=(-F /dev/null -p "$PORT" -o UserKnownHostsFile="$T/known_hosts" -o GlobalKnownHostsFile=/dev/null
  -o StrictHostKeyChecking=yes -o BatchMode=yes -o PasswordAuthentication=no
  -o KbdInteractiveAuthentication=no -o ConnectTimeout=10 -o LogLevel=ERROR)

# ssh_login [SSH ARGS...]: run a command over ssh with no TTY (setsid -w, stdin /dev/null).
ssh_login() {
  run setsid -w ssh "${SSH_OPTS[@]}" "$@" "$USER_NAME@127.0.0.1" 'echo devicekey-ssh-ok $((6 * 7))'
  expect "devicekey-ssh-ok 42"
}

check_keygen_D() {
  run ssh-keygen -D "$MODULE"
  expect "ecdsa-sha2-nistp256 "
  local want
  want=$(awk '{print $2}' "$T/sshkey.ssh.pub")
  awk -v k="$want" '$1 == "ecdsa-sha2-nistp256" && $2 == k { f = 1 } END { exit !f }' <<<"$OUT" ||
    fail "ssh-keygen -D did not print the token's key"
  printf '%s\n' "$OUT" | grep '^ecdsa-sha2-nistp256 ' >"$S/authorized_keys"
  run ssh-keygen -l -f "$S/authorized_keys"
  expect "256 $FPR"
  expect "(ECDSA)"
}

start_sshd() {
  start_bg sshd "$SSHD" -D -f "$S/sshd_config" -E "$S/sshd.log"
  wait_port "$PORT" 10 || abort "sshd did not start: $(cat "$S/sshd.log" "$T/sshd.out" 2>/dev/null)"
}

# accepted_since LINE: the sshd log has a publickey login with our key after line LINE.
accepted_since() {
  sed -n "$(($1 + 1)),\$p" "$S/sshd.log" | grep "Accepted publickey for $USER_NAME" | grep -qF "ECDSA $FPR"
}

check_ssh_I() {
  local before
  before=$(wc -l <"$S/sshd.log")
  ssh_login -I "$MODULE"
  accepted_since "$before" || { cat "$S/sshd.log"; fail "sshd did not log a login with key $FPR"; }
}

check_ssh_agent() {
  local sock=$T/agent.sock dir
  dir=$(dirname "$INSTALLED_MODULE")
  start_bg ssh-agent ssh-agent -D -a "$sock" -P "$dir/*"
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || fail "ssh-agent did not start: $(cat "$T/ssh-agent.out")"
  export SSH_AUTH_SOCK=$sock
  # No PIN: an askpass that answers nothing, so nothing can wait on a terminal.
  printf '#!/bin/sh\necho\n' >"$T/askpass"
  chmod 700 "$T/askpass"
  run env SSH_ASKPASS="$T/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY=:0 setsid -w ssh-add -s "$INSTALLED_MODULE"
  expect "Card added"
  run ssh-add -l
  expect "256 $FPR"
  local before
  before=$(wc -l <"$S/sshd.log")
  ssh_login -o IdentityAgent="$sock"
  accepted_since "$before" || { cat "$S/sshd.log"; fail "sshd did not log an agent login with key $FPR"; }
  run ssh-add -e "$INSTALLED_MODULE"
}

negative_ssh_I() {
  run_fails setsid -w ssh "${SSH_OPTS[@]}" -I "$MODULE" "$USER_NAME@127.0.0.1" 'echo devicekey-ssh-ok'
  reject "devicekey-ssh-ok"
}

check keygen_D check_keygen_D
start_sshd
check ssh_I_module check_ssh_I
use_installed
check ssh_agent_installed check_ssh_agent
negative negative_broken_key_ssh_I negative_ssh_I
e2e_finish
