#!/usr/bin/env bash
# Start a throwaway swtpm (TPM 2.0 simulator) on a free loopback port, or stop one by its pid.
#
#   scripts/swtpm.sh start [STATE_DIR]
#       Starts swtpm in the background on 127.0.0.1 (server port P, control port P+1), with its
#       state in STATE_DIR (default: a new directory under $TMPDIR; reuse a directory to keep the
#       TPM's keys and seeds across restarts). Prints, one per line, shell-quoted and eval-able:
#         SWTPM_PORT=P  SWTPM_CTRL_PORT=P+1  SWTPM_PID=N  SWTPM_STATE=DIR  SWTPM_PIDFILE=FILE
#         SWTPM_TCTI=swtpm:host=127.0.0.1,port=P
#       Use:  eval "$(scripts/swtpm.sh start)"; export DEVICEKEY_TPM_TCTI=$SWTPM_TCTI
#   scripts/swtpm.sh stop PID|PIDFILE
#       Stops that swtpm (TERM, then KILL after 5 seconds). Only that process is touched.
#
# swtpm accepts one client connection at a time and has no resource manager: transient objects
# stay loaded until flushed, and it runs out of object slots after three.
set -euo pipefail

die() {
  echo "swtpm.sh: $*" >&2
  exit 1
}

need_swtpm() {
  if command -v swtpm >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "swtpm.sh: installing swtpm" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y swtpm swtpm-tools >&2 \
      || die "apt-get install swtpm failed; run scripts/setup.sh"
  fi
  command -v swtpm >/dev/null 2>&1 || die "swtpm not found; run scripts/setup.sh (apt-get install swtpm)"
}

port_busy() {
  # A port is busy when something listens on it (ss is in iproute2, present on Debian).
  ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

start() {
  need_swtpm
  local dir=${1:-}
  if [ -n "$dir" ]; then
    mkdir -p "$dir"
  else
    dir=$(mktemp -d "${TMPDIR:-/tmp}/devicekey-swtpm.XXXXXX")
  fi
  dir=$(cd "$dir" && pwd)
  chmod 700 "$dir"
  local pidfile="$dir/swtpm.pid" log="$dir/swtpm.log"

  local attempt port
  for attempt in $(seq 1 20); do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    if port_busy "$port" || port_busy $((port + 1)); then
      continue
    fi
    rm -f "$pidfile"
    if swtpm socket --tpm2 \
        --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
        --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
        --flags not-need-init,startup-clear \
        --tpmstate "dir=$dir" \
        --log "file=$log" \
        --pid "file=$pidfile" \
        --daemon 2>>"$log"; then
      local i
      for i in $(seq 1 50); do
        [ -s "$pidfile" ] && port_busy "$port" && break
        sleep 0.1
      done
      [ -s "$pidfile" ] || die "swtpm started but wrote no pid file (see $log)"
      local pid
      pid=$(cat "$pidfile")
      printf 'SWTPM_PORT=%q\n' "$port"
      printf 'SWTPM_CTRL_PORT=%q\n' "$((port + 1))"
      printf 'SWTPM_PID=%q\n' "$pid"
      printf 'SWTPM_STATE=%q\n' "$dir"
      printf 'SWTPM_PIDFILE=%q\n' "$pidfile"
      printf 'SWTPM_TCTI=%q\n' "swtpm:host=127.0.0.1,port=$port"
      return 0
    fi
  done
  die "could not start swtpm on a free port after $attempt attempts (see $log)"
}

stop() {
  local arg=${1:-}
  [ -n "$arg" ] || die "usage: swtpm.sh stop PID|PIDFILE"
  local pid=$arg
  if [ -f "$arg" ]; then
    pid=$(cat "$arg")
  fi
  case $pid in
    '' | *[!0-9]*) die "not a pid: $pid" ;;
  esac
  # Only stop the process if it is a swtpm.
  if [ ! -r "/proc/$pid/cmdline" ]; then
    return 0
  fi
  if ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q '^swtpm\|/swtpm '; then
    die "pid $pid is not a swtpm process"
  fi
  kill "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) die "usage: swtpm.sh start [STATE_DIR] | stop PID|PIDFILE" ;;
esac
