#!/usr/bin/env bash
# Install the system packages devicekey's build, tests and demo need (Debian/Ubuntu).
# Idempotent: runs apt-get only when a package is missing. Quiet unless something fails.
#
# On Debian bookworm, the OpenSSL 3 provider for PKCS#11 (`pkcs11-provider`) exists only in
# bookworm-backports: the backports suite is added on the mirror the existing apt sources use,
# pinned so that pkcs11-provider is the one package taken from it (see install_backports below).
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

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    SUDO=(no-root)
  fi
fi

log=$(mktemp "${TMPDIR:-/tmp}/devicekey-setup.XXXXXX")
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive

# apt_install PACKAGE...: apt-get update and install, quiet unless it fails.
apt_install() {
  if [ "${SUDO[*]}" = no-root ]; then
    echo "setup.sh: missing packages ($*) and not root, no sudo; install them by hand" >&2
    exit 1
  fi
  echo "setup.sh: installing $*"
  if ! "${SUDO[@]}" apt-get update -qq >"$log" 2>&1 \
    || ! "${SUDO[@]}" apt-get install -y -qq "$@" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "setup.sh: apt-get failed" >&2
    exit 1
  fi
}

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

# pkcs11-provider from bookworm-backports (bookworm only; later releases have it in main).
BACKPORTS_SOURCES=/etc/apt/sources.list.d/devicekey-bookworm-backports.sources
BACKPORTS_PIN=/etc/apt/preferences.d/devicekey-bookworm-backports

# backports_mirror: the Debian mirror the existing sources use for bookworm (deb822 or one-line).
backports_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '/^URIs:/ { uri = $2 } /^Suites:/ && / bookworm( |$)/ && uri !~ /security/ { print uri; exit }' "$f"
  done | head -n 1 | grep . && return 0
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' | grep .
}

install_backports() {
  local mirror
  mirror=$(backports_mirror) || mirror=http://deb.debian.org/debian
  # Everything in bookworm-backports is pinned away (-1), except pkcs11-provider.
  printf 'Package: *\nPin: release n=bookworm-backports\nPin-Priority: -1\n\nPackage: pkcs11-provider\nPin: release n=bookworm-backports\nPin-Priority: 500\n' |
    "${SUDO[@]}" tee "$BACKPORTS_PIN" >/dev/null
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" |
    "${SUDO[@]}" tee "$BACKPORTS_SOURCES" >/dev/null
  apt_install -t bookworm-backports pkcs11-provider
}

codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ] && ! installed pkcs11-provider; then
  if [ "${SUDO[*]}" = no-root ]; then
    echo "setup.sh: pkcs11-provider is missing and not root, no sudo; install it from bookworm-backports by hand" >&2
    exit 1
  fi
  install_backports
fi
exit 0
