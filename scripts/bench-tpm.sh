#!/usr/bin/env bash
# The TPM part of scripts/bench.sh (which runs it; it can also run alone after a
# `cargo build --release --features tpm` and the same in bench/): our TPM store and tpm2-pkcs11 on the same swtpm, both
# through tpm2-abrmd (swtpm serves one client and has no resource manager; tpm2-pkcs11 needs one
# to set up its token); one TPM signature through our TPM store in-process; the number of
# TPM2_Sign commands per C_Sign (a length query must send none); cold starts up to one signature
# (ours before and after `devicekey tpm persist-srk`, with the TPM2_CreatePrimary commands per
# process counted, and tpm2-pkcs11); and our TPM stores of 10 and 1,000 keys.
#
#   scripts/bench-tpm.sh WORK_DIR RESULTS_FILE
#
# Environment: BENCH_RUNS (5), BENCH_COLD_SAMPLES (10 processes per cold-start run),
# BENCH_TPM_KEYS (1000, the bigger TPM store). Appends JSON lines to RESULTS_FILE. Stops what it
# started (swtpm, a private D-Bus session bus, tpm2-abrmd) on exit.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
[ $# -eq 2 ] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
run_dir=$1 results=$2
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
runs=${BENCH_RUNS:-5} cold_samples=${BENCH_COLD_SAMPLES:-10} tpm_keys=${BENCH_TPM_KEYS:-1000}
bench=$repo/bench/target/release/devicekey-bench
ours=$repo/target/release/libdevicekey_pkcs11.so
devicekey=$repo/target/release/devicekey
measure() {
  local config=$1
  shift
  DEVICEKEY_CONFIG=$config "$bench" "$@" | tee -a "$results"
}
# Appends a measurement of one value: record BENCH SUBJECT VARIANT UNIT VALUE DETAIL_JSON
record() {
  jq -cn --arg b "$1" --arg s "$2" --arg v "$3" --arg u "$4" --argjson x "$5" --argjson d "$6" \
    '{bench: $b, subject: $s, variant: $v, unit: $u, median: $x, min: $x, max: $x, values: [$x],
      detail: $d}' | tee -a "$results"
}
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
if ! "$bench" --help | grep -q tpm-raw; then
  echo "bench-tpm: $bench was built without --features tpm" >&2
  exit 1
fi

tpm_packages=(swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus)
tpm_missing=()
for p in "${tpm_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || tpm_missing+=("$p")
done
if [ "${#tpm_missing[@]}" -gt 0 ]; then
  echo "bench-tpm: installing ${tpm_missing[*]}" >&2
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo -n); fi
  { "${sudo_cmd[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${tpm_missing[@]}"; } >"$run_dir/apt-tpm.log" 2>&1 \
    || { cat "$run_dir/apt-tpm.log" >&2; echo "bench-tpm: apt-get failed" >&2; exit 1; }
fi
tpm2_module=/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so
[ -e "$tpm2_module" ] || tpm2_module=$(dpkg -L libtpm2-pkcs11-1 | grep '/libtpm2_pkcs11\.so$' | head -1)

# swtpm, then a private D-Bus session bus and tpm2-abrmd on it.
eval "$(scripts/swtpm.sh start "$run_dir/swtpm")"
pids+=("$SWTPM_PID")
dbus_out=$(dbus-daemon --session --fork --print-address=1 --print-pid=1)
DBUS_SESSION_BUS_ADDRESS=$(sed -n 1p <<<"$dbus_out")
pids+=("$(sed -n 2p <<<"$dbus_out")")
export DBUS_SESSION_BUS_ADDRESS
abrmd_args=(--session --tcti="$SWTPM_TCTI" --flush-all)
if [ "$(id -u)" = 0 ]; then abrmd_args+=(--allow-root); fi
tpm2-abrmd "${abrmd_args[@]}" >"$run_dir/abrmd.log" 2>&1 &
pids+=("$!")
tcti=tabrmd:bus_type=session
for _ in $(seq 50); do
  tpm2_getcap -T "$tcti" properties-fixed >/dev/null 2>&1 && break
  sleep 0.1
done

cat >"$run_dir/tpm.toml" <<EOF
[[slot]]
label = "devicekey-tpm"
backend = "tpm"
tcti = "$tcti"
allow_simulator = true
dir = "$run_dir/ours-tpm"
EOF

tpm_plan=(--runs "$runs" --seconds 2 --iterations 50 --warmup 5 --threads 1)
cold_plan=(--runs "$runs" --samples "$cold_samples" --sign)
ours_tpm_t=(--module "$ours" --token devicekey-tpm --name ours-tpm)
tpm2_t=(--module "$tpm2_module" --token tpm2bench --pin-env TPM2_PIN --name tpm2-pkcs11)
measure "$run_dir/tpm.toml" keygen "${ours_tpm_t[@]}" --label bench-sign
# Our TPM stores of 10 and $tpm_keys keys (this swtpm's keys, so made on every run).
staging=()
[ -d /dev/shm ] && staging=(--staging /dev/shm)
DEVICEKEY_CONFIG=$run_dir/tpm.toml "$bench" scale-prepare --tpm --dir "$run_dir/tpm-scale" \
  --counts "10,$tpm_keys" "${staging[@]}" | tee -a "$results"

# Cold start up to one signature, and the TPM2_CreatePrimary commands per process (our debug log
# names each one): the first time before 0x81000001 holds the SRK (each process derives it),
# then after `devicekey tpm persist-srk` (none should).
cold_primaries() {
  local variant=$1 log=$run_dir/primary-${1// /-}.log processes=3
  measure "$run_dir/tpm.toml" cold "${ours_tpm_t[@]}" --label bench-sign "${cold_plan[@]}" \
    --variant "1 key, $variant"
  DEVICEKEY_LOG=debug DEVICEKEY_LOG_FILE=$log DEVICEKEY_CONFIG=$run_dir/tpm.toml \
    "$bench" cold "${ours_tpm_t[@]}" --label bench-sign --runs 1 --samples "$processes" --sign >/dev/null 2>&1
  local primaries
  primaries=$(grep -c 'tpm: TPM2_CreatePrimary (owner hierarchy' "$log" || true)
  record tpm_create_primary_per_process ours-tpm "$variant" x "$(jq -n "$primaries / $processes")" \
    "{\"processes\": $processes, \"create_primary_commands\": $primaries}"
}
cold_primaries "derived SRK"
DEVICEKEY_CONFIG=$run_dir/tpm.toml "$devicekey" tpm persist-srk --slot devicekey-tpm >&2
cold_primaries "persistent SRK"
for n in 10 "$tpm_keys"; do
  sed "s|^dir = .*|dir = \"$run_dir/tpm-scale/keys-$n\"|" "$run_dir/tpm.toml" >"$run_dir/tpm-$n.toml"
  measure "$run_dir/tpm-$n.toml" cold "${ours_tpm_t[@]}" --label bench-key-00007 "${cold_plan[@]}" \
    --variant "$n keys"
done

# tpm2-pkcs11: a token in a private store. 0x81000001 holds our SRK by now, so tpm2_ptool
# persists its own primary at another handle: neither side runs TPM2_CreatePrimary per process.
export TPM2_PKCS11_TCTI=$tcti TPM2TOOLS_TCTI=$tcti TPM2_PKCS11_STORE=$run_dir/tpm2-pkcs11 TPM2_PKCS11_LOG_LEVEL=0
export TPM2_PIN=1234
mkdir -p "$TPM2_PKCS11_STORE"
tpm2_ptool init --path "$TPM2_PKCS11_STORE" >/dev/null
tpm2_ptool addtoken --pid=1 --label=tpm2bench --userpin="$TPM2_PIN" --sopin=5678 --path "$TPM2_PKCS11_STORE" >/dev/null
measure "$run_dir/tpm.toml" keygen "${tpm2_t[@]}" --label bench-sign
measure "$run_dir/tpm.toml" cold "${tpm2_t[@]}" --label bench-sign "${cold_plan[@]}" --variant "1 key"

measure "$run_dir/tpm.toml" sign "${ours_tpm_t[@]}" --label bench-sign "${tpm_plan[@]}"
measure "$run_dir/tpm.toml" sign "${tpm2_t[@]}" --label bench-sign "${tpm_plan[@]}"
measure "$run_dir/tpm.toml" tpm-raw --label bench-sign "${tpm_plan[@]}"

# Count the TPM2_Sign commands our module sends (its debug log names each one) for a known number
# of C_Sign calls, each with its length query: exactly one per call means the query did not sign.
count_log=$run_dir/tpm-count.log
count_json=$(DEVICEKEY_LOG=debug DEVICEKEY_LOG_FILE=$count_log DEVICEKEY_CONFIG=$run_dir/tpm.toml \
  "$bench" sign "${ours_tpm_t[@]}" --label bench-sign --runs 1 --seconds 0.3 --iterations 20 --warmup 0 --threads 1 2>/dev/null)
calls=$(jq -s '[.[] | select(.bench == "sign_throughput") | .detail.signatures] | add + 20' <<<"$count_json")
signs=$(grep -c 'tpm: TPM2_Sign' "$count_log" || true)
record tpm_signatures_per_c_sign ours-tpm "with length query" x "$(jq -n "$signs / $calls")" \
  "{\"c_sign_calls\": $calls, \"tpm2_sign_commands\": $signs}"
