#!/usr/bin/env bash
# Install the system packages devicekey's build, tests and demo need (Debian/Ubuntu).
# Idempotent: runs apt-get only when a package is missing. Quiet unless something fails.
set -euo pipefail

PACKAGES=(
  softhsm2 opensc opensc-pkcs11 libengine-pkcs11-openssl
  openssh-client openssh-server gnutls-bin libnss3-tools p11-kit
  pkg-config libssl-dev libtss2-dev swtpm swtpm-tools tpm2-tools
  # systemd-socket-activate: the socket-activation test of `devicekey serve --socket`.
  systemd
)

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup.sh: this is not a Debian-family system; install these packages by hand: ${PACKAGES[*]}" >&2
  exit 0
fi

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    echo "setup.sh: missing packages (${missing[*]}) and not root, no sudo; install them by hand" >&2
    exit 1
  fi
fi

echo "setup.sh: installing ${missing[*]}"
log=$(mktemp "${TMPDIR:-/tmp}/devicekey-setup.XXXXXX")
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get update -qq >"$log" 2>&1 \
  || ! "${SUDO[@]}" apt-get install -y -qq "${missing[@]}" >>"$log" 2>&1; then
  cat "$log" >&2
  echo "setup.sh: apt-get failed" >&2
  exit 1
fi
