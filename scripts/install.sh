#!/usr/bin/env bash
# Install devicekey system-wide, or remove it.
#
#   scripts/install.sh              install (builds the release binaries first when they are missing)
#   scripts/install.sh --uninstall  remove what install.sh installed
#   scripts/install.sh --status     say what is installed (exit 0 when everything is in place)
#
# Installs
#   /usr/local/lib/devicekey/libdevicekey_pkcs11.so   the PKCS#11 module (a trusted path: ssh-agent
#                                                      loads modules only from /usr/lib* and /usr/local/lib*)
#   /usr/local/bin/devicekey                          the command line
#   /etc/pkcs11/modules/devicekey.module               the p11-kit registration (as root, p11-kit
#                                                      ignores ~/.config/pkcs11/modules)
# Safe to run twice: files that are already up to date are left alone, and files are replaced by
# rename, so a process that has the old module loaded keeps working.
#
# Environment: DEVICEKEY_BUILD_DIR (default target/release), DEVICEKEY_PREFIX (default /usr/local),
# P11_KIT_MODULE_DIR (default /etc/pkcs11/modules). Needs root, or sudo without a password.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${DEVICEKEY_BUILD_DIR:-$ROOT/target/release}
PREFIX=${DEVICEKEY_PREFIX:-/usr/local}
MODULE_DIR=${P11_KIT_MODULE_DIR:-/etc/pkcs11/modules}

LIB_DIR=$PREFIX/lib/devicekey
LIB=$LIB_DIR/libdevicekey_pkcs11.so
BIN=$PREFIX/bin/devicekey
REG=$MODULE_DIR/devicekey.module

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=install
case "${1:-}" in
  "") ;;
  --uninstall) MODE=uninstall ;;
  --status) MODE=status ;;
  -h | --help) usage; exit 0 ;;
  *) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
esac

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  elif [ "$MODE" != status ]; then
    echo "install.sh: needs root (or sudo without a password) to write $PREFIX and $MODULE_DIR" >&2
    exit 1
  fi
fi

registration() {
  printf '# Registered by devicekey scripts/install.sh; remove with scripts/install.sh --uninstall.\n'
  printf 'module: %s\n' "$LIB"
  printf 'critical: no\n'
}

# put SRC DEST MODE: copy SRC to DEST unless identical; via a temporary file and a rename.
put() {
  local src=$1 dest=$2 mode=$3 tmp
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    echo "up to date: $dest"
    return
  fi
  "${SUDO[@]}" mkdir -p "$(dirname "$dest")"
  tmp="$dest.tmp.$$"
  "${SUDO[@]}" install -m "$mode" "$src" "$tmp"
  "${SUDO[@]}" mv -f "$tmp" "$dest"
  echo "installed: $dest"
}

status() {
  local missing=0
  for f in "$LIB" "$BIN" "$REG"; do
    if [ -e "$f" ]; then echo "present: $f"; else echo "missing: $f"; missing=1; fi
  done
  return $missing
}

case "$MODE" in
  status)
    status
    ;;
  uninstall)
    for f in "$REG" "$BIN" "$LIB"; do
      if [ -e "$f" ] || [ -L "$f" ]; then
        "${SUDO[@]}" rm -f "$f"
        echo "removed: $f"
      fi
    done
    if [ -d "$LIB_DIR" ]; then
      "${SUDO[@]}" rmdir "$LIB_DIR" 2>/dev/null && echo "removed: $LIB_DIR" ||
        echo "kept $LIB_DIR (not empty)"
    fi
    ;;
  install)
    src_lib=$BUILD_DIR/libdevicekey_pkcs11.so
    src_bin=$BUILD_DIR/devicekey
    if [ ! -f "$src_lib" ] || [ ! -f "$src_bin" ]; then
      if [ -z "${DEVICEKEY_BUILD_DIR:-}" ] && command -v cargo >/dev/null 2>&1; then
        echo "install.sh: building the release binaries"
        (cd "$ROOT" && cargo build --release --quiet)
      fi
    fi
    for f in "$src_lib" "$src_bin"; do
      if [ ! -f "$f" ]; then
        echo "install.sh: $f not found (build with: cargo build --release)" >&2
        exit 1
      fi
    done
    put "$src_lib" "$LIB" 0755
    put "$src_bin" "$BIN" 0755
    reg_tmp=$(mktemp "${TMPDIR:-/tmp}/devicekey-module.XXXXXX")
    trap 'rm -f "$reg_tmp"' EXIT
    registration >"$reg_tmp"
    put "$reg_tmp" "$REG" 0644
    ;;
esac
