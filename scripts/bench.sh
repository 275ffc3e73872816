#!/usr/bin/env bash
# Benchmarks devicekey side by side with SoftHSM, tpm2-pkcs11 (on swtpm) and the raw signing
# primitive, in one run on this machine. Prints one JSON line per
# measurement, then a table and the issue's targets as ratios. Not part of CI.
#
#   scripts/bench.sh [--quick] [--record] [--no-build] [--no-tpm]
#
#   --quick     fewer, shorter runs and no 100,000-key store: a smoke test, figures are noisy
#   --record    write the results (date, machine) into docs/BENCHMARKS.md between its markers
#   --no-build  use the binaries already in target/release and bench/target/release
#   --no-tpm    skip the TPM part (our TPM store vs tpm2-pkcs11 on swtpm; it needs --features tpm,
#               swtpm, tpm2-abrmd and tpm2-pkcs11, which it installs)
#
# Environment: BENCH_DIR (default target/bench: results.jsonl with every run of the last run,
# summary.jsonl with the pooled figures, and the key stores of the scale test, made once and
# reused), BENCH_RUNS (5), BENCH_SECONDS (1), BENCH_ITERATIONS (2000).
# The machine should be otherwise idle: on 2 cores, a compile in the background halves the figures.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

quick=0 record=0 build=1 tpm=1
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    --record) record=1 ;;
    --no-build) build=0 ;;
    --no-tpm) tpm=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

runs=${BENCH_RUNS:-5} seconds=${BENCH_SECONDS:-1} iterations=${BENCH_ITERATIONS:-2000}
cold_samples=20 rpc_requests=2000 tpm_cold_samples=10
# Key store sizes of the scale part (made once under $BENCH_DIR/scale and reused).
counts=(10 1000 10000 100000)
if [ "$quick" = 1 ]; then
  runs=${BENCH_RUNS:-3} seconds=${BENCH_SECONDS:-0.3} iterations=${BENCH_ITERATIONS:-500}
  cold_samples=5 rpc_requests=300 tpm_cold_samples=3
  counts=(10 1000 10000)
  echo "bench.sh: --quick skips the 100,000-key store (the scale part stops at 10,000 keys)" >&2
fi

start_all=$(date +%s)
phase() { printf '\n== %s (%ss)\n' "$1" "$(( $(date +%s) - start_all ))" >&2; }

phase "setup"
scripts/setup.sh
if [ "$build" = 1 ]; then
  features=()
  [ "$tpm" = 1 ] && features=(--features tpm)
  cargo build --release --quiet "${features[@]}"
  # The harness is its own crate (bench/, beside fuzz/), built against the library by path.
  cargo build --release --quiet --manifest-path bench/Cargo.toml "${features[@]}"
fi
bench=$repo/bench/target/release/devicekey-bench
ours=$repo/target/release/libdevicekey_pkcs11.so
devicekey=$repo/target/release/devicekey
softhsm=/usr/lib/softhsm/libsofthsm2.so
for f in "$bench" "$ours" "$devicekey" "$softhsm"; do
  [ -e "$f" ] || { echo "bench.sh: $f is missing" >&2; exit 1; }
done

bench_dir=${BENCH_DIR:-$repo/target/bench}
mkdir -p "$bench_dir"
chmod 700 "$bench_dir"
run_dir=$(mktemp -d "$bench_dir/run.XXXXXX")
cleanup() {
  rm -rf "$run_dir"
}
trap cleanup EXIT
results=$bench_dir/results.jsonl
: >"$results"

export DEVICEKEY_LOG=warn
plan=(--runs "$runs" --seconds "$seconds" --iterations "$iterations")

# Runs the harness with DEVICEKEY_CONFIG=$1; JSON lines go to the terminal and to $results.
measure() {
  local config=$1
  shift
  DEVICEKEY_CONFIG=$config "$bench" "$@" | tee -a "$results"
}

machine() {
  local cpu load
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine: $(nproc) CPUs, ${cpu:-unknown CPU}, $(uname -sr)"
  echo "load average at start: $load"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
  echo "openssl: $(openssl version 2>/dev/null || echo none); softhsm: $(softhsm2-util --version 2>/dev/null || echo none)"
  echo "plan: $runs runs per figure, ${seconds}s per throughput run, $iterations calls per latency run"
}
machine_info=$(machine)
echo "$machine_info" >&2
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" 'BEGIN { exit !(l >= 1.0) }'; then
  echo "bench.sh: warning: load average $load1 >= 1; other work on this machine will lower the figures" >&2
fi

# Configs: our software store, our module over SoftHSM, the scale stores, the JSON-RPC server.
phase "tokens and keys"
# shellcheck source=softhsm-token.sh
. scripts/softhsm-token.sh "$run_dir/softhsm" >/dev/null
export HSM_PIN=$SOFTHSM_PIN
cat >"$run_dir/ours.toml" <<EOF
[[slot]]
label = "devicekey"
backend = "software"
dir = "$run_dir/ours-keys"
EOF
cat >"$run_dir/wrap.toml" <<EOF
[[slot]]
label = "devicekey-hsm"
backend = "pkcs11"
module = "$softhsm"
token = "$SOFTHSM_TOKEN_LABEL"
pin_env = "HSM_PIN"
protection_class = "hardware_tpm"
EOF
cat >"$run_dir/rpc.toml" <<EOF
[[slot]]
label = "devicekey"
backend = "software"
dir = "$run_dir/rpc-keys"
EOF
for n in "${counts[@]}"; do
  cat >"$run_dir/scale-$n.toml" <<EOF
[[slot]]
label = "devicekey"
backend = "software"
dir = "$bench_dir/scale/keys-$n"
EOF
done

ours_t=(--module "$ours" --token devicekey --name ours)
softhsm_t=(--module "$softhsm" --token "$SOFTHSM_TOKEN_LABEL" --pin-env HSM_PIN --name softhsm)
wrap_t=(--module "$ours" --token devicekey-hsm --name ours-over-softhsm)
measure "$run_dir/ours.toml" keygen "${ours_t[@]}" --label bench-sign
measure "$run_dir/ours.toml" keygen "${softhsm_t[@]}" --label bench-sign
# The scale stores, unless an earlier run made them (store_generation says how long that took).
staging=()
[ -d /dev/shm ] && staging=(--staging /dev/shm)
measure "$run_dir/scale-10.toml" scale-prepare --dir "$bench_dir/scale" \
  --counts "$(IFS=,; echo "${counts[*]}")" "${staging[@]}"

# The subjects compared by ratio are measured in turns, one run each, so that anything else the
# machine does in the meantime hits them alike; the report pools the runs of each figure.
phase "C_Sign and CKA_EC_POINT: raw primitive, ours, SoftHSM, ours over SoftHSM (runs interleaved)"
one=(--runs 1 --seconds "$seconds" --iterations "$iterations")
for r in $(seq "$runs"); do
  echo "-- run $r of $runs" >&2
  measure "$run_dir/ours.toml" raw "${one[@]}"
  measure "$run_dir/ours.toml" sign "${ours_t[@]}" --label bench-sign "${one[@]}"
  measure "$run_dir/ours.toml" sign "${softhsm_t[@]}" --label bench-sign "${one[@]}"
  measure "$run_dir/wrap.toml" sign "${wrap_t[@]}" --label bench-sign "${one[@]}"
  openssl speed -seconds 1 ecdsap256 2>/dev/null | awk '/ecdsa \(nistp256\)/ { print $(NF-1) }' \
    | jq -c '{bench: "sign_throughput", subject: "openssl-speed", variant: "1 thread", unit: "ops/s",
        median: ., min: ., max: ., values: [.], detail: {tool: "openssl speed ecdsap256"}}' | tee -a "$results"
done

phase "cold start (a fresh process per sample)"
measure "$run_dir/scale-10.toml" cold "${ours_t[@]}" --label bench-key-00007 \
  --runs "$runs" --samples "$cold_samples" --variant "10 keys" --sign
measure "$run_dir/ours.toml" cold "${softhsm_t[@]}" --label bench-sign \
  --runs "$runs" --samples "$cold_samples" --variant "1 key"
measure "$run_dir/wrap.toml" cold "${wrap_t[@]}" --label bench-sign \
  --runs "$runs" --samples "$cold_samples" --variant "1 key"

phase "scale: FindObjects, cold start, C_Initialize and first signature with $(IFS=/; echo "${counts[*]}") keys"
for n in "${counts[@]}"; do
  # find runs first: whatever a freshly copied store does on its first open is not in the cold starts.
  measure "$run_dir/scale-$n.toml" find "${ours_t[@]}" --index 7 --variant "$n keys" "${plan[@]}"
  samples=$cold_samples
  [ "$n" -ge 10000 ] && samples=$(( (cold_samples + 3) / 4 ))
  [ "$n" -ge 100000 ] && samples=3
  [ "$n" = 10 ] || measure "$run_dir/scale-$n.toml" cold "${ours_t[@]}" --label bench-key-00007 \
    --runs "$runs" --samples "$samples" --variant "$n keys" --sign
done

phase "JSON-RPC device/key/sign over stdio"
measure "$run_dir/rpc.toml" rpc --devicekey "$devicekey" --module "$ours" \
  --runs "$runs" --requests "$rpc_requests" --iterations "$iterations"
# Again with client and server on one CPU: one request at a time over pipes between two CPUs
# pays two cross-CPU wake-ups per round trip (tens of us each on a VM), which hides the server's
# own cost; pinned, the round trip is two plain context switches.
if command -v taskset >/dev/null 2>&1; then
  DEVICEKEY_CONFIG=$run_dir/rpc.toml taskset -c 0 "$bench" rpc --devicekey "$devicekey" --module "$ours" \
    --runs "$runs" --requests "$rpc_requests" --iterations "$iterations" --tag ", 1 CPU" | tee -a "$results"
fi

if [ "$tpm" = 1 ]; then
  phase "TPM: our TPM store vs tpm2-pkcs11 on swtpm"
  BENCH_RUNS=$runs BENCH_COLD_SAMPLES=$tpm_cold_samples scripts/bench-tpm.sh "$run_dir/tpm" "$results" \
    || echo "bench.sh: the TPM part failed (see above); the other figures stand" >&2
fi

phase "report"
elapsed=$(( $(date +%s) - start_all ))
echo "$machine_info"
echo "total time: ${elapsed}s"
echo
# One JSON line per measurement, runs pooled (the per-run lines are in $results).
"$bench" report --json "$results" | tee "$bench_dir/summary.jsonl"
echo
"$bench" report "$results"

if [ "$record" = 1 ]; then
  doc=docs/BENCHMARKS.md
  section=$run_dir/section.md
  {
    echo '<!-- results:begin (written by scripts/bench.sh --record) -->'
    echo '```'
    echo "$machine_info"
    echo "total time of scripts/bench.sh: ${elapsed}s"
    echo '```'
    echo
    "$bench" report --markdown "$results"
    echo '<!-- results:end -->'
  } >"$section"
  if [ -f "$doc" ] && grep -q '<!-- results:begin' "$doc"; then
    awk -v section="$section" '
      /<!-- results:begin/ { while ((getline line < section) > 0) print line; skip = 1; next }
      /<!-- results:end/ { skip = 0; next }
      !skip { print }' "$doc" >"$run_dir/doc.md"
    cat "$run_dir/doc.md" >"$doc"
  else
    mkdir -p docs
    { echo '# Benchmarks'; echo; cat "$section"; } >>"$doc"
  fi
  echo "bench.sh: results recorded in $doc" >&2
fi
