#!/usr/bin/env bash
# End to end: git commit signing with the token key through ssh-agent (`gpg.format = ssh`).
# `ssh-agent -P` with an allowlist that covers the module's directory, `ssh-add -s` the module,
# `ssh-keygen -Y sign -n git` and `-Y verify` with an allowed-signers file, then a real
# `git commit -S` whose `user.signingkey` is the agent's key line, which `git verify-commit`
# reports as good.
# Negative controls: a changed commit message and a tampered signature fail verification, and
# with the token's key broken the signature is not made or does not verify.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need ssh-agent ssh-add ssh-keygen git pkcs11-tool setsid
e2e_setup
make_key 01 signer "git signer"
SIGNER=signer@devicekey.test
# The token key as an OpenSSH public key line, from the public key the token gave.
KEY_LINE=$(ssh-keygen -i -m PKCS8 -f "$T/signer.pub.pem") || abort "ssh-keygen -i"
printf '%s namespaces="git" %s\n' "$SIGNER" "$KEY_LINE" >"$T/allowed_signers"
printf '#!/bin/sh\necho\n' >"$T/askpass"
chmod 700 "$T/askpass"
MODULE_DIR=$(dirname "$(realpath "$MODULE")")

# start_agent NAME: an ssh-agent that loads PKCS#11 modules only from the module's directory,
# with the module added (no PIN: the askpass answers nothing). Sets SSH_AUTH_SOCK.
start_agent() {
  local sock=$T/$1.sock
  start_bg "$1" ssh-agent -D -a "$sock" -P "$MODULE_DIR/*"
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || abort "ssh-agent did not start: $(cat "$T/$1.out")"
  export SSH_AUTH_SOCK=$sock
  setup_step "ssh-add -s" env SSH_ASKPASS="$T/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY=:0 \
    setsid -w ssh-add -s "$MODULE"
}

start_agent agent
echo "the signed text" >"$T/message.txt"

check_agent_holds_token_key() {
  run ssh-add -L
  grep -qF -- "$KEY_LINE" <<<"$OUT" || fail "the agent does not hold the token key ($KEY_LINE)"
}

# Outside the allowlist the agent refuses to load the module.
check_allowlist_refuses_other_paths() {
  local sock=$T/strict.sock
  start_bg strict ssh-agent -D -a "$sock" -P "/nonexistent/*"
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  run_fails env SSH_AUTH_SOCK="$sock" SSH_ASKPASS="$T/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY=:0 \
    setsid -w ssh-add -s "$MODULE"
  run_fails env SSH_AUTH_SOCK="$sock" ssh-add -L
  expect "The agent has no identities."
}

check_keygen_sign_verify() {
  cp "$T/message.txt" msg.txt
  printf '%s\n' "$KEY_LINE" >key.pub
  run ssh-keygen -Y sign -f key.pub -n git msg.txt
  [ -s msg.txt.sig ] || fail "no signature written"
  expect_re "Signing file msg.txt"
  echo "\$ ssh-keygen -Y verify -f allowed_signers -I $SIGNER -n git -s msg.txt.sig < msg.txt"
  OUT=$(ssh-keygen -Y verify -f "$T/allowed_signers" -I "$SIGNER" -n git -s msg.txt.sig <msg.txt 2>&1) ||
    fail "verify failed: $OUT"
  echo "$OUT"
  expect "Good \"git\" signature for $SIGNER"
  cp msg.txt.sig "$T/good.sig"
}

# A real signed commit, verified by git.
check_git_commit_signed() {
  run git init -q repo
  cd repo || fail "no repo"
  git config user.name "Git Signer"
  git config user.email "$SIGNER"
  git config gpg.format ssh
  git config user.signingkey "key::$KEY_LINE"
  git config gpg.ssh.allowedSignersFile "$T/allowed_signers"
  run git commit --allow-empty -S -m "signed by the device key"
  run git verify-commit -v HEAD
  expect "Good \"git\" signature for $SIGNER"
  run git log --show-signature -1
  expect "Good \"git\" signature for $SIGNER"
  git cat-file commit HEAD >"$T/commit.txt"
  grep -q "^gpgsig -----BEGIN SSH SIGNATURE-----" "$T/commit.txt" || fail "the commit carries no SSH signature"
}

# Negative: the same signed commit with its message changed fails verification; so does the
# signed file changed, and the signature with one byte changed.
negative_changed_message() {
  [ -f "$T/commit.txt" ] || fail "no signed commit to change (git_commit_signed failed)"
  cd repo || fail "no repo"
  git config gpg.format ssh
  git config gpg.ssh.allowedSignersFile "$T/allowed_signers"
  local forged
  forged=$(sed 's/^signed by the device key$/signed by someone else/' "$T/commit.txt" |
    git hash-object -t commit -w --stdin) || fail "cannot write the changed commit"
  run git cat-file commit "$forged"
  expect "signed by someone else"
  run_fails git verify-commit -v "$forged"
  reject "Good \"git\" signature"
  cd .. || fail "no work directory"
  cp "$T/message.txt" changed.txt
  echo "tampered" >>changed.txt
  echo "\$ ssh-keygen -Y verify -s good.sig < changed.txt   (must fail)"
  if ssh-keygen -Y verify -f "$T/allowed_signers" -I "$SIGNER" -n git -s "$T/good.sig" <changed.txt; then
    fail "a changed file verified"
  fi
  echo "(failed as it must)"
}

check_tampered_signature_fails() {
  [ -f "$T/good.sig" ] || fail "no signature (keygen_sign_verify failed)"
  local body
  # Flip one character in the middle of the signature's base64 body.
  body=$(sed '1d;$d' "$T/good.sig" | tr -d '\n')
  local i=$(( ${#body} * 3 / 4 )) c
  c=${body:$i:1}
  if [ "$c" = A ]; then c=B; else c=A; fi
  { echo "-----BEGIN SSH SIGNATURE-----"; printf '%s\n' "${body:0:$i}$c${body:$((i + 1))}" | fold -w 70; echo "-----END SSH SIGNATURE-----"; } >bad.sig
  cmp -s bad.sig "$T/good.sig" && fail "the signature did not change"
  echo "\$ ssh-keygen -Y verify -s bad.sig < message.txt   (must fail)"
  if ssh-keygen -Y verify -f "$T/allowed_signers" -I "$SIGNER" -n git -s bad.sig <"$T/message.txt"; then
    fail "a tampered signature verified"
  fi
  echo "(failed as it must)"
}

# Negative: with the key broken, a fresh agent either cannot sign or makes a signature that does
# not verify.
negative_broken_key_signing() {
  start_agent agent2
  cp "$T/message.txt" neg.txt
  printf '%s\n' "$KEY_LINE" >key.pub
  if timeout -k 5 "$TIMEOUT" ssh-keygen -Y sign -f key.pub -n git neg.txt </dev/null; then
    echo "\$ ssh-keygen -Y verify ... -s neg.txt.sig   (must fail)"
    if ssh-keygen -Y verify -f "$T/allowed_signers" -I "$SIGNER" -n git -s neg.txt.sig <neg.txt; then
      fail "a signature by the broken key verified"
    fi
  else
    echo "(signing failed, as it may with a broken key)"
  fi
}

check agent_holds_token_key check_agent_holds_token_key
check allowlist_refuses_other_paths check_allowlist_refuses_other_paths
check keygen_sign_verify check_keygen_sign_verify
check git_commit_signed check_git_commit_signed
check negative_changed_message negative_changed_message
check negative_tampered_signature check_tampered_signature_fails
negative negative_broken_key_signing negative_broken_key_signing
e2e_finish
