#!/usr/bin/env bash
# End to end: the Debian package. scripts/package.sh packs the module and CLI under test into a
# .deb; its contents and control fields are checked; `dpkg -i` installs it; then
# `p11-kit list-modules` shows devicekey (from /usr/share/p11-kit/modules/devicekey.module),
# p11-kit-proxy.so reaches the token and signs, and /usr/bin/devicekey doctor runs. `dpkg -r`
# removes it: every file of the package is gone and p11-kit no longer lists it.
# Negative control: after removal, the token is no longer reachable through p11-kit-proxy.
# Needs root. Leaves nothing behind (the package is removed when the script ends, whatever
# happened). It does not run when devicekey is already installed as a package, or registered in
# /etc/pkcs11/modules (scripts/install.sh), which would shadow the package's registration.
set -uo pipefail
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need dpkg dpkg-deb p11-kit pkcs11-tool openssl
e2e_setup
[ "$(id -u)" -eq 0 ] || abort "needs root (dpkg -i)"
if dpkg-query -W -f='${Status}' devicekey 2>/dev/null | grep -q 'installed'; then
  skip package "the devicekey package is installed on this system already; not touching it"
  e2e_finish
fi
if [ -e /etc/pkcs11/modules/devicekey.module ]; then
  skip package "devicekey is registered in /etc/pkcs11/modules (scripts/install.sh); it would shadow the package"
  e2e_finish
fi
[ "$(dirname "$MODULE")" = "$(dirname "$DEVICEKEY")" ] ||
  abort "the module and the CLI must come from one build directory ($MODULE, $DEVICEKEY)"

MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch 2>/dev/null)
[ -n "$MULTIARCH" ] || abort "cannot tell the multiarch triplet"
PKG_MODULE=/usr/lib/$MULTIARCH/pkcs11/libdevicekey_pkcs11.so
PROXY=/usr/lib/$MULTIARCH/p11-kit-proxy.so
[ -f "$PROXY" ] || abort "p11-kit-proxy.so not found at $PROXY (package libp11-kit0)"

OUT=$(DEVICEKEY_BUILD_DIR=$(dirname "$MODULE") DEVICEKEY_PACKAGE_DIR="$T/debian" \
  timeout -k 5 "$TIMEOUT" bash "$E2E_ROOT/scripts/package.sh" 2>&1) || abort "scripts/package.sh failed: $OUT"
DEB=$(tail -n 1 <<<"$OUT")
[ -f "$DEB" ] || abort "scripts/package.sh did not print a package path: $OUT"
# Remove the package when the script ends, whatever happened.
on_exit "dpkg-query -W -f='\${Status}' devicekey 2>/dev/null | grep -q installed && dpkg --purge devicekey >/dev/null 2>&1"
dpkg-deb -c "$DEB" | awk '{print $6}' | sed 's|^\./|/|' | grep -v '/$' >"$T/files"

check_contents() {
  run dpkg-deb -c "$DEB"
  expect "./usr/lib/$MULTIARCH/pkcs11/libdevicekey_pkcs11.so"
  expect "./usr/share/p11-kit/modules/devicekey.module"
  expect "./usr/bin/devicekey"
  expect "./usr/lib/systemd/user/devicekey.socket"
  expect "./usr/lib/systemd/user/devicekey.service"
  expect "./usr/share/doc/devicekey/README.md"
  expect "./usr/share/doc/devicekey/copyright"
  expect "./usr/share/doc/devicekey/docs/CONSUMERS.md"
  expect_re '^-rwxr-xr-x root/root .* \./usr/bin/devicekey$'
  run dpkg-deb -f "$DEB" Package Version Architecture Depends
  expect "Package: devicekey"
  expect "Architecture: $(dpkg --print-architecture)"
  expect_re 'Depends: .*libc6'
  expect_re 'Depends: .*libssl3'
  expect_re 'Depends: .*libtss2-esys'
  run sh -c "dpkg-deb --fsys-tarfile '$DEB' | tar -xO ./usr/share/p11-kit/modules/devicekey.module"
  expect "module: libdevicekey_pkcs11.so"
  run sh -c "dpkg-deb --fsys-tarfile '$DEB' | tar -xO ./usr/lib/systemd/user/devicekey.socket ./usr/lib/systemd/user/devicekey.service"
  expect "ListenStream=%t/devicekey/socket"
  expect "SocketMode=0600"
  expect "ExecStart=/usr/bin/devicekey serve --socket %t/devicekey/socket"
}

check_install() {
  run dpkg -i "$DEB"
  run dpkg-query -W -f='${Status} ${Version}\n' devicekey
  expect "install ok installed"
  local f
  while read -r f; do
    case "$f" in /usr/share/doc/*) continue ;; esac # a system may exclude docs (dpkg path-exclude)
    [ -e "$f" ] || fail "$f is not installed"
  done <"$T/files"
}

check_p11kit_lists_module() {
  run p11-kit list-modules
  expect "devicekey: libdevicekey_pkcs11.so"
  expect "library-manufacturer: devicekey"
  expect "token: $TOKEN_LABEL"
}

check_proxy_reaches_token() {
  # A key made through the installed module; found, read and used through p11-kit-proxy.
  run pkcs11-tool --module "$PKG_MODULE" --token-label "$TOKEN_LABEL" --keypairgen \
    --key-type EC:prime256v1 --id 01 --label pkgkey
  run pkcs11-tool --module "$PKG_MODULE" --token-label "$TOKEN_LABEL" --read-object --type pubkey \
    --id 01 -o pub.der
  run openssl pkey -pubin -inform DER -in pub.der -out pub.pem
  run pkcs11-tool --module "$PROXY" -L
  expect "token label        : $TOKEN_LABEL"
  run pkcs11-tool --module "$PROXY" --token-label "$TOKEN_LABEL" -O
  expect "label:      pkgkey"
  # The proxy also loads every other module registered on the machine, and some print errors of
  # their own (tpm2-pkcs11 when no TPM answers at its default TCTI): what must be clean is ours
  # (its log lines), the token's answers and p11-kit's own messages.
  reject_re '^devicekey\[|CKR_|^p11-kit:'
  head -c 500 /dev/urandom >data.bin
  openssl dgst -sha256 -binary -out data.sha256 data.bin
  run pkcs11-tool --module "$PROXY" --token-label "$TOKEN_LABEL" --sign -m ECDSA --id 01 \
    --signature-format openssl -i data.sha256 -o sig.der
  run openssl dgst -sha256 -verify pub.pem -signature sig.der data.bin
  expect "Verified OK"
}

check_user_units() {
  command -v systemd-analyze >/dev/null 2>&1 || { echo "(systemd-analyze not installed: unit files not verified)"; return 0; }
  # systemd's own parser, for the user manager (it needs a runtime directory for %t).
  run env XDG_RUNTIME_DIR="$T/run" systemd-analyze verify --user \
    /usr/lib/systemd/user/devicekey.socket /usr/lib/systemd/user/devicekey.service
  [ -z "$OUT" ] || fail "systemd-analyze verify reported problems"
}

check_doctor() {
  run /usr/bin/devicekey --version
  run /usr/bin/devicekey doctor
  expect "config: $DEVICEKEY_CONFIG"
  expect "reachable:        yes"
}

check_cli_finds_packaged_module() {
  # The server side (devicekey list, devicekey serve) finds the module where the package put it.
  run /usr/bin/devicekey list
  reject "not found"
  expect "pkgkey"
}

check_remove() {
  run dpkg -r devicekey
  local f left=0
  while read -r f; do
    if [ -e "$f" ]; then
      echo "left behind: $f"
      left=1
    fi
  done <"$T/files"
  [ $left = 0 ] || fail "dpkg -r left files behind"
  [ ! -e /usr/share/doc/devicekey ] || fail "/usr/share/doc/devicekey is still there"
  run p11-kit list-modules
  reject "devicekey"
}

negative_proxy_after_removal() {
  run_fails pkcs11-tool --module "$PROXY" --token-label "$TOKEN_LABEL" -O
}

check contents check_contents
check install check_install
check p11kit_lists_module check_p11kit_lists_module
check proxy_reaches_token check_proxy_reaches_token
check doctor_from_usr_bin check_doctor
check user_units_verify check_user_units
check cli_finds_packaged_module check_cli_finds_packaged_module
check remove check_remove
check negative_proxy_after_removal negative_proxy_after_removal
e2e_finish
