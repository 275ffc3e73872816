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

sshd_setup "$T/sshkey.pub.pem"

check_keygen_D() {
  run ssh-keygen -D "$MODULE"
  expect "ecdsa-sha2-nistp256 "
  local want
  want=$(awk '{print $2}' "$SSH_PUB")
  awk -v k="$want" '$1 == "ecdsa-sha2-nistp256" && $2 == k { f = 1 } END { exit !f }' <<<"$OUT" ||
    fail "ssh-keygen -D did not print the token's key"
  printf '%s\n' "$OUT" | grep '^ecdsa-sha2-nistp256 ' >"$S/authorized_keys"
  run ssh-keygen -l -f "$S/authorized_keys"
  expect "256 $FPR"
  expect "(ECDSA)"
}

check_ssh_I() {
  ssh_key_login a -I "$MODULE"
}

check_ssh_agent() {
  start_ssh_agent "$INSTALLED_MODULE"
  # No PIN: an askpass that answers nothing, so nothing can wait on a terminal.
  printf '#!/bin/sh\necho\n' >"$T/askpass"
  chmod 700 "$T/askpass"
  run env SSH_ASKPASS="$T/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY=:0 setsid -w ssh-add -s "$INSTALLED_MODULE"
  expect "Card added"
  ssh_agent_login
  run ssh-add -e "$INSTALLED_MODULE"
}

negative_ssh_I() { ssh_login_fails -I "$MODULE"; }

check keygen_D check_keygen_D
start_sshd
check ssh_I_module check_ssh_I
use_installed
check ssh_agent_installed check_ssh_agent
negative negative_broken_key_ssh_I negative_ssh_I
e2e_finish
