#!/usr/bin/env bash
# Build the Debian package: target/debian/devicekey_<version>_<arch>.deb
#
#   scripts/package.sh            build the release binaries (cargo), then the package
#   scripts/package.sh --print    print the path of the package this would build, and exit
#
# The package holds
#   /usr/lib/<multiarch>/pkcs11/libdevicekey_pkcs11.so   the PKCS#11 module (p11-kit's module
#                                                        directory; on ssh-agent's default allowlist)
#   /usr/share/p11-kit/modules/devicekey.module           the p11-kit registration: every
#                                                        p11-kit-aware program finds the token
#   /usr/bin/devicekey                                    the command line
#   /usr/lib/systemd/user/devicekey.socket, .service      `devicekey serve` as a user service,
#                                                        started by its socket (%t/devicekey/socket)
#   /usr/share/doc/devicekey/                             README, docs, copyright
# Depends comes from the libraries the binaries link (dpkg-shlibdeps). No maintainer scripts: the
# user units are enabled by each user (systemctl --user enable --now devicekey.socket).
#
# Needs dpkg-deb (package dpkg) and dpkg-shlibdeps (package dpkg-dev). Environment:
# DEVICEKEY_BUILD_DIR (default target/release; set it to package binaries built elsewhere, and
# nothing is built), DEVICEKEY_PACKAGE_DIR (default target/debian).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${DEVICEKEY_PACKAGE_DIR:-$ROOT/target/debian}

die() {
  echo "package.sh: $*" >&2
  exit 1
}

for tool in dpkg-deb dpkg; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install dpkg)"
done

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -n 1)
[ -n "$VERSION" ] || die "no version in Cargo.toml"
ARCH=$(dpkg --print-architecture)
if command -v dpkg-architecture >/dev/null 2>&1; then
  MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null)
else
  MULTIARCH=$(gcc -print-multiarch 2>/dev/null || true)
fi
[ -n "$MULTIARCH" ] || die "cannot tell the multiarch triplet (dpkg-architecture or gcc -print-multiarch)"
DEB=$OUT_DIR/devicekey_${VERSION}_${ARCH}.deb

case "${1:-}" in
  "") ;;
  --print) echo "$DEB"; exit 0 ;;
  -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument $1" ;;
esac

if [ -n "${DEVICEKEY_BUILD_DIR:-}" ]; then
  BUILD_DIR=$DEVICEKEY_BUILD_DIR
else
  BUILD_DIR=$ROOT/target/release
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
  fi
  (cd "$ROOT" && cargo build --release --locked --quiet --lib --bin devicekey) || die "cargo build failed"
fi
LIB=$BUILD_DIR/libdevicekey_pkcs11.so
BIN=$BUILD_DIR/devicekey
[ -f "$LIB" ] || die "$LIB not found"
[ -x "$BIN" ] || die "$BIN not found"

mkdir -p "$OUT_DIR"
STAGE=$(mktemp -d "$OUT_DIR/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
PKG=$STAGE/root
DOC=$PKG/usr/share/doc/devicekey

# Files: directories 0755, files 0644, programs and the module 0755; owner root (--root-owner-group).
install -d -m 0755 "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/usr/lib/$MULTIARCH/pkcs11" \
  "$PKG/usr/share/p11-kit/modules" "$PKG/usr/lib/systemd/user" "$DOC/docs"
install -m 0755 "$BIN" "$PKG/usr/bin/devicekey"
install -m 0644 "$LIB" "$PKG/usr/lib/$MULTIARCH/pkcs11/libdevicekey_pkcs11.so"
if command -v strip >/dev/null 2>&1; then
  strip --strip-unneeded "$PKG/usr/bin/devicekey" "$PKG/usr/lib/$MULTIARCH/pkcs11/libdevicekey_pkcs11.so"
fi
install -m 0644 "$ROOT/packaging/devicekey.module" "$PKG/usr/share/p11-kit/modules/devicekey.module"
install -m 0644 "$ROOT/packaging/systemd/devicekey.socket" "$ROOT/packaging/systemd/devicekey.service" \
  "$PKG/usr/lib/systemd/user/"
install -m 0644 "$ROOT/README.md" "$DOC/README.md"
install -m 0644 "$ROOT"/docs/*.md "$DOC/docs/"
cat >"$DOC/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: devicekey

Files: *
Copyright: the devicekey authors
License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file
 except in compliance with the License. You may obtain a copy of the License at
 http://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software distributed under the
 License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
 either express or implied. See the License for the specific language governing permissions
 and limitations under the License.
 .
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF

# Depends: the shared libraries the module and the CLI link, as dpkg-shlibdeps resolves them to
# packages (libc6, libssl3, libtss2-*); by hand when dpkg-shlibdeps is missing.
depends() {
  local work out
  if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    work=$STAGE/shlibdeps
    mkdir -p "$work/debian"
    printf 'Source: devicekey\n\nPackage: devicekey\nArchitecture: any\n' >"$work/debian/control"
    if out=$(cd "$work" && dpkg-shlibdeps -O -e"$PKG/usr/bin/devicekey" \
      -e"$PKG/usr/lib/$MULTIARCH/pkcs11/libdevicekey_pkcs11.so" 2>"$work/err"); then
      out=$(sed -n 's/^shlibs:Depends=//p' <<<"$out")
      if [ -n "$out" ]; then
        echo "$out"
        return
      fi
    fi
    echo "package.sh: dpkg-shlibdeps failed; Depends stated by hand:" >&2
    cat "$work/err" >&2
  fi
  echo "libc6 (>= 2.34), libgcc-s1 (>= 4.2), libssl3 (>= 3.0.0), libtss2-esys-3.0.2-0 (>= 3.0.1), libtss2-mu0 (>= 3.0.1), libtss2-tctildr0 (>= 3.0.1)"
}
DEPENDS=$(depends)

SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
cat >"$PKG/DEBIAN/control" <<EOF
Package: devicekey
Version: $VERSION
Architecture: $ARCH
Maintainer: devicekey maintainers <devicekey@localhost>
Installed-Size: $SIZE
Depends: $DEPENDS
Recommends: p11-kit, libp11-kit0
Suggests: opensc, libengine-pkcs11-openssl, gnutls-bin
Section: utils
Priority: optional
Description: one device-bound ECDSA P-256 key as a PKCS#11 token
 devicekey keeps one non-extractable ECDSA P-256 key in the device's TPM, behind
 another PKCS#11 token, or in a protected software store, and offers it as a
 PKCS#11 module (registered with p11-kit, so GnuTLS, NSS, OpenSSL, OpenSSH and
 Java find it) and as a device-key JSON-RPC server (devicekey serve, a systemd
 user service started by its socket).
EOF
(cd "$PKG" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$PKG/DEBIAN/md5sums"
chmod 0644 "$PKG/DEBIAN/control" "$PKG/DEBIAN/md5sums"

rm -f "$DEB"
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$DEB" >/dev/null || die "dpkg-deb failed"
echo "$DEB"
