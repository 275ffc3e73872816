#!/usr/bin/env bash
# Trace what each consumer calls in the module, through OpenSC's pkcs11-spy.
#
#   scripts/e2e/trace.sh OUTDIR [TOOL...]    TOOL: ssh-keygen ssh ssh-agent openssl-engine nss tstclnt
#                                            chromium p11tool gnutls-cli java p11-kit (default: all)
#
# For each tool, OUTDIR/<tool>.log is the raw pkcs11-spy log and OUTDIR/<tool>.txt a summary: the
# call sequence (repeats folded), the attribute types read with C_GetAttributeValue, and every
# return value other than CKR_OK. docs/CONSUMERS.md is written from these summaries. The p11-kit
# trace registers the spy with p11-kit for a moment (/etc/pkcs11/modules/devicekey-spy.module).
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUTDIR=${1:?usage: trace.sh OUTDIR [TOOL...]}
shift
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
TOOLS=("$@")
[ ${#TOOLS[@]} -eq 0 ] && TOOLS=(ssh-keygen ssh ssh-agent openssl-engine nss tstclnt chromium p11tool gnutls-cli java p11-kit)
SPY=${PKCS11_SPY:-/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so}
[ -f "$SPY" ] || { echo "pkcs11-spy not found at $SPY (package opensc-pkcs11)"; exit 1; }

e2e_setup
REAL=$MODULE

# NSS first asks C_GetInterface("PKCS 11", NULL, FORK_SAFE); our module has no fork-safe interface
# and answers an error, and pkcs11-spy then reads the (unset) interface pointer and crashes. For
# NSS-based tools the spy wraps a shim that offers only C_GetFunctionList (our 2.40 list): every
# call after the interface lookup is the same.
NSS_REAL=$REAL
if command -v cc >/dev/null 2>&1; then
  cat >"$T/shim.c" <<'EOF_SHIM'
#include <dlfcn.h>
#include <stdlib.h>
typedef unsigned long CK_RV;
CK_RV C_GetFunctionList(void **list) {
  static CK_RV (*real)(void **);
  if (!real) {
    void *h = dlopen(getenv("DEVICEKEY_SHIM_MODULE"), RTLD_NOW | RTLD_LOCAL);
    if (!h) return 5; /* CKR_GENERAL_ERROR */
    real = (CK_RV (*)(void **))dlsym(h, "C_GetFunctionList");
    if (!real) return 5;
  }
  return real(list);
}
EOF_SHIM
  if cc -shared -fPIC -o "$T/shim.so" "$T/shim.c" -ldl 2>/dev/null; then
    NSS_REAL=$T/shim.so
    export DEVICEKEY_SHIM_MODULE=$REAL
  fi
fi
make_key 01 traced "traced key"
make_soft_cert softserver "software server"
KEY_URI=$(key_uri 01 private)
CERT_URI=$(key_uri 01 cert)
printf 'GET / HTTP/1.0\r\n\r\n' >"$T/get.txt"

# spy NAME CMD...: run CMD with the spy logging to OUTDIR/NAME.log ($SPY stands in for the module).
spy() {
  local name=$1
  shift
  rm -f "$OUTDIR/$name.log"
  PKCS11SPY=$REAL PKCS11SPY_OUTPUT="$OUTDIR/$name.log" timeout -k 5 "$TIMEOUT" "$@" </dev/null >"$OUTDIR/$name.out" 2>&1
  echo "$name: exit $?"
}

summarize() { # summarize NAME
  local log=$OUTDIR/$1.log
  [ -f "$log" ] || { echo "no log for $1" >"$OUTDIR/$1.txt"; return; }
  {
    echo "# $1: call sequence (consecutive repeats folded)"
    awk '/^[0-9]+: C_/ { f = $2; if (f == last) { n++ } else { if (last != "") print last (n > 1 ? " x" n : ""); last = f; n = 1 } }
         END { if (last != "") print last (n > 1 ? " x" n : "") }' "$log"
    echo
    echo "# attribute types read (C_GetAttributeValue)"
    awk '/^[0-9]+: C_/ { inget = ($2 == "C_GetAttributeValue") } inget && /^    CKA_/ { print $1 }' "$log" | sort | uniq -c | sort -rn
    echo
    echo "# find templates (C_FindObjectsInit)"
    awk '/^[0-9]+: C_/ { infind = ($2 == "C_FindObjectsInit"); if (infind) { if (t != "") print t; t = "" } }
         infind && /^    CKA_/ { t = t " " $1 "=" $2 } END { if (t != "") print t }' "$log" | sort | uniq -c | sort -rn
    echo
    echo "# mechanisms"
    grep -oE 'CKM_[A-Z0-9_]+' "$log" | sort | uniq -c | sort -rn
    echo
    echo "# return values other than CKR_OK"
    awk '/^[0-9]+: C_/ { f = $2 } /^Returned:/ && $3 != "CKR_OK" { print f " -> " $3 }' "$log" | sort | uniq -c
  } >"$OUTDIR/$1.txt"
}

s_server_bg() { # s_server_bg [ARGS]: a server that verifies our client certificate; $PORT
  PORT=$(free_port)
  local extra=("$@")
  [ ${#extra[@]} -eq 0 ] && extra=(-naccept 1)
  start_bg "s_server-$PORT" openssl s_server -accept "127.0.0.1:$PORT" -www "${extra[@]}" \
    -key "$T/softserver.key" -cert "$T/softserver.pem" -Verify 1 -verify_return_error -CAfile "$T/traced.pem"
  wait_port "$PORT" 15
}

for tool in "${TOOLS[@]}"; do
  case "$tool" in
    ssh-keygen) spy ssh-keygen ssh-keygen -D "$SPY" ;;
    ssh)
      # The login itself is in ssh.sh; here the client side up to the signature, against a server
      # that accepts nothing (the module's calls are the same).
      PORT=$(free_port)
      mkdir -p "$T/sshd" /run/sshd
      ssh-keygen -q -t ed25519 -N '' -f "$T/sshd/hk"
      ssh-keygen -D "$REAL" 2>/dev/null >"$T/sshd/ak"
      printf 'Port %s\nListenAddress 127.0.0.1\nHostKey %s\nAuthorizedKeysFile %s\nStrictModes no\nUsePAM no\nPidFile %s\n' \
        "$PORT" "$T/sshd/hk" "$T/sshd/ak" "$T/sshd/pid" >"$T/sshd/cfg"
      start_bg sshd "$(command -v sshd)" -D -f "$T/sshd/cfg" -E "$T/sshd/log"
      wait_port "$PORT" 10
      spy ssh setsid -w ssh -F /dev/null -p "$PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o BatchMode=yes -I "$SPY" "$(id -un)@127.0.0.1" true
      ;;
    ssh-agent)
      start_bg agent env PKCS11SPY="$REAL" PKCS11SPY_OUTPUT="$OUTDIR/ssh-agent.log" ssh-agent -D -a "$T/agent.sock"
      for _ in $(seq 50); do [ -S "$T/agent.sock" ] && break; sleep 0.1; done
      printf '#!/bin/sh\necho\n' >"$T/askpass"
      chmod 700 "$T/askpass"
      SSH_AUTH_SOCK=$T/agent.sock SSH_ASKPASS=$T/askpass SSH_ASKPASS_REQUIRE=force DISPLAY=:0 \
        timeout 30 setsid -w ssh-add -s "$SPY" </dev/null >"$OUTDIR/ssh-agent.out" 2>&1
      echo "sign me" >"$T/msg"
      SSH_AUTH_SOCK=$T/agent.sock ssh-add -L >"$T/agent.pub" 2>>"$OUTDIR/ssh-agent.out"
      SSH_AUTH_SOCK=$T/agent.sock timeout 30 ssh-keygen -Y sign -n file -f "$T/agent.pub" "$T/msg" >>"$OUTDIR/ssh-agent.out" 2>&1
      SSH_AUTH_SOCK=$T/agent.sock ssh-add -e "$SPY" >>"$OUTDIR/ssh-agent.out" 2>&1
      echo "ssh-agent: done"
      ;;
    openssl-engine)
      openssl_engine_conf "$T/openssl-spy.cnf" "$SPY"
      openssl dgst -sha256 -binary -out "$T/dgst" "$T/get.txt"
      OPENSSL_CONF="$T/openssl-spy.cnf" spy openssl-engine openssl pkeyutl -engine pkcs11 -keyform engine \
        -sign -inkey "$KEY_URI" -in "$T/dgst" -out "$T/sig"
      s_server_bg
      OPENSSL_CONF="$T/openssl-spy.cnf" PKCS11SPY=$REAL PKCS11SPY_OUTPUT="$OUTDIR/openssl-s_client.log" \
        timeout 30 openssl s_client -connect "127.0.0.1:$PORT" -ign_eof -engine pkcs11 -keyform engine \
        -key "$KEY_URI" -cert "$T/traced.pem" <"$T/get.txt" >"$OUTDIR/openssl-s_client.out" 2>&1
      summarize openssl-s_client
      ;;
    nss | tstclnt)
      if [ ! -d "$T/nssdb" ]; then
        mkdir -p "$T/nssdb"
        certutil -N -d "sql:$T/nssdb" --empty-password
        PKCS11SPY=$NSS_REAL PKCS11SPY_OUTPUT=/dev/null modutil -force -add devicekey-spy -libfile "$SPY" -dbdir "sql:$T/nssdb" </dev/null >/dev/null
        PKCS11SPY=$NSS_REAL PKCS11SPY_OUTPUT=/dev/null certutil -A -d "sql:$T/nssdb" -n softserver -t "CP,," -i "$T/softserver.pem"
        echo >"$T/pw"
      fi
      if [ "$tool" = nss ]; then
        REAL=$NSS_REAL spy nss sh -c "certutil -L -h all -d 'sql:$T/nssdb' -f '$T/pw' && certutil -K -h devicekey -d 'sql:$T/nssdb' -f '$T/pw'"
      else
        s_server_bg
        PKCS11SPY=$NSS_REAL PKCS11SPY_OUTPUT="$OUTDIR/tstclnt.log" timeout 30 tstclnt -h 127.0.0.1 -p "$PORT" \
          -d "sql:$T/nssdb" -n "devicekey:traced" -w "" -a localhost <"$T/get.txt" >"$OUTDIR/tstclnt.out" 2>&1
        echo "tstclnt: exit $?"
      fi
      ;;
    chromium)
      command -v chromium >/dev/null || { echo "chromium: not installed"; continue; }
      mkdir -p "$HOME/.pki/nssdb"
      certutil -N -d "sql:$HOME/.pki/nssdb" --empty-password 2>/dev/null
      PKCS11SPY=$NSS_REAL PKCS11SPY_OUTPUT=/dev/null modutil -force -add devicekey-spy -libfile "$SPY" -dbdir "sql:$HOME/.pki/nssdb" </dev/null >/dev/null
      s_server_bg -no_ticket # no -naccept 1: Chromium may connect more than once
      policy=/etc/chromium/policies/managed/devicekey-trace-$$.json
      mkdir -p "$(dirname "$policy")"
      on_exit "rm -f '$policy'"
      printf '{"AutoSelectCertificateForUrls": ["{\\"pattern\\":\\"https://127.0.0.1:%s\\",\\"filter\\":{}}"]}\n' "$PORT" >"$policy"
      REAL=$NSS_REAL spy chromium chromium --headless=new --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
        --disable-component-update --disable-sync --disable-quic --ignore-certificate-errors \
        --user-data-dir="$T/chrome" --dump-dom "https://127.0.0.1:$PORT/"
      rm -f "$policy"
      ;;
    p11tool)
      spy p11tool sh -c "p11tool --provider '$SPY' --list-all && p11tool --provider '$SPY' --test-sign '$KEY_URI'"
      ;;
    gnutls-cli)
      s_server_bg
      PKCS11SPY=$REAL PKCS11SPY_OUTPUT="$OUTDIR/gnutls-cli.log" timeout 30 gnutls-cli --provider "$SPY" \
        --x509keyfile "$KEY_URI" --x509certfile "$CERT_URI" --x509cafile "$T/softserver.pem" \
        --verify-hostname localhost -p "$PORT" 127.0.0.1 <"$T/get.txt" >"$OUTDIR/gnutls-cli.out" 2>&1
      echo "gnutls-cli: exit $?"
      ;;
    java)
      mkdir -p "$T/classes"
      javac -d "$T/classes" "$E2E_ROOT/tests/java/DeviceKeyCheck.java"
      printf 'name = devicekey\nlibrary = %s\n' "$SPY" >"$T/spy.cfg"
      head -c 100 /dev/urandom >"$T/payload"
      spy java sh -c "keytool -list -keystore NONE -storetype PKCS11 -addprovider SunPKCS11 -providerArg '$T/spy.cfg' -storepass unused && java -cp '$T/classes' DeviceKeyCheck sign '$T/spy.cfg' traced '$T/payload' '$T/payload.sig'"
      ;;
    p11-kit)
      reg=/etc/pkcs11/modules/devicekey-spy.module
      on_exit "rm -f '$reg'"
      printf 'module: %s\n' "$SPY" >"$reg"
      spy p11-kit p11-kit list-modules
      rm -f "$reg"
      ;;
    *) echo "unknown tool $tool"; continue ;;
  esac
  summarize "$tool"
done
echo "summaries in $OUTDIR/*.txt"
