#!/usr/bin/env bash
# Create a throwaway SoftHSM token in a private temporary directory.
#
# Run it:     scripts/softhsm-token.sh [DIR]
#   prints    SOFTHSM2_CONF=<path>, SOFTHSM_TOKEN_LABEL=<label>, SOFTHSM_PIN=..., SOFTHSM_SO_PIN=...,
#             SOFTHSM_DIR=<dir>, SOFTHSM_MODULE=<module> (one per line, shell-quoted, eval-able).
# Source it:  . scripts/softhsm-token.sh [DIR]
#   exports   the same variables in the calling shell.
#
# DIR defaults to a new directory under $TMPDIR. The label is unique (p11-kit-proxy breaks when two
# tokens share a label). Remove the token with `rm -rf "$SOFTHSM_DIR"`.
# Environment: SOFTHSM_PIN (default 1234), SOFTHSM_SO_PIN (default 5678),
# SOFTHSM_LABEL_PREFIX (default dk-softhsm), SOFTHSM_MODULE (default /usr/lib/softhsm/libsofthsm2.so).

_softhsm_token_main() {
  local script_dir template dir label module pin so_pin
  script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  template="$script_dir/../softhsm-config/softhsm2.conf.in"
  module=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
  pin=${SOFTHSM_PIN:-1234}
  so_pin=${SOFTHSM_SO_PIN:-5678}

  if ! command -v softhsm2-util >/dev/null 2>&1; then
    echo "softhsm-token.sh: softhsm2-util not found; run scripts/setup.sh" >&2
    return 1
  fi
  if [ ! -f "$template" ]; then
    echo "softhsm-token.sh: template $template not found" >&2
    return 1
  fi

  if [ -n "${1:-}" ]; then
    dir=$1
    mkdir -p "$dir" || return 1
  else
    dir=$(mktemp -d "${TMPDIR:-/tmp}/devicekey-softhsm.XXXXXX") || return 1
  fi
  dir=$(cd "$dir" && pwd)
  mkdir -p "$dir/tokens" || return 1
  chmod 700 "$dir" "$dir/tokens"
  sed "s|@TOKENDIR@|$dir/tokens|" "$template" >"$dir/softhsm2.conf" || return 1

  label="${SOFTHSM_LABEL_PREFIX:-dk-softhsm}-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
  # Token labels are at most 32 characters.
  label=${label:0:32}

  local out
  if ! out=$(SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free \
      --label "$label" --pin "$pin" --so-pin "$so_pin" 2>&1); then
    echo "softhsm-token.sh: softhsm2-util --init-token failed: $out" >&2
    return 1
  fi

  SOFTHSM2_CONF="$dir/softhsm2.conf"
  SOFTHSM_TOKEN_LABEL=$label
  SOFTHSM_PIN=$pin
  SOFTHSM_SO_PIN=$so_pin
  SOFTHSM_DIR=$dir
  SOFTHSM_MODULE=$module
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: export into the caller's shell.
  if _softhsm_token_main "$@"; then
    export SOFTHSM2_CONF SOFTHSM_TOKEN_LABEL SOFTHSM_PIN SOFTHSM_SO_PIN SOFTHSM_DIR SOFTHSM_MODULE
  else
    return 1
  fi
else
  set -euo pipefail
  _softhsm_token_main "$@"
  for v in SOFTHSM2_CONF SOFTHSM_TOKEN_LABEL SOFTHSM_PIN SOFTHSM_SO_PIN SOFTHSM_DIR SOFTHSM_MODULE; do
    printf '%s=%q\n' "$v" "${!v}"
  done
fi
