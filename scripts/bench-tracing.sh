#!/usr/bin/env bash
# Tracing's cost, in bench-proxy.sh's setup (the same nginx stand-in for vLLM, the same wrk
# load, runs alternating): loraplex with tracing off, loraplex with tracing on (every request
# sampled, its spans exported to an OTLP/HTTP sink on this machine), and, with BASELINE, a
# build without the tracing code (a release build of an older commit) beside them, which is
# what "tracing off costs nothing" is measured against.
#
#   usage: [BASELINE=path/to/loraplex] scripts/bench-tracing.sh [ROUNDS] [SECONDS]
#          (defaults: 5 rounds of 10 s)
#   output: a markdown table on stdout, and target/bench/tracing.{md,csv}
#
# CPU per request is the loraplex process's user+system time over its runs, divided by the
# requests they served.
set -euo pipefail
ROUNDS=${1:-5}
SECS=${2:-10}
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
for tool in wrk nginx curl; do need "$tool" "$tool"; done

UP_PORT=18510 SINK_PORT=18511 OFF_PORT=18512 ON_PORT=18513 BASE_PORT=18514
PIDS=()
cleanup() {
  stop_nginx
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "building loraplex (release)..." >&2
cargo build --release -q
MACHINE=$(machine)
start_fake_vllm up "$UP_PORT"
# The OTLP sink: takes every export with a 200 and an empty (valid) protobuf answer.
cat > "$WORK/sink.conf" <<CONF
worker_processes 1;
pid $WORK/sink.pid;
error_log $WORK/sink.err;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK;
  client_max_body_size 64m;
  server {
    listen 127.0.0.1:$SINK_PORT;
    location /v1/traces { default_type application/x-protobuf; return 200 ''; }
  }
}
CONF
nginx -c "$WORK/sink.conf"
write_post_lua

# start_lp NAME PORT BINARY [YAML...]: a loraplex with 2 workers; sets the NAME_PID variable.
start_lp() {
  local name=$1 port=$2 bin=$3
  shift 3
  {
    echo "listen: \"127.0.0.1:$port\""
    echo "vllm_url: \"http://127.0.0.1:$UP_PORT\""
    echo 'vllm: { model_name: "base-model" }'
    echo "storage: { dir: \"$WORK/$name-store\", max_size: \"1GB\" }"
    echo 'server: { workers: 2 }'
    for line in "$@"; do echo "$line"; done
  } > "$WORK/$name.yaml"
  RUST_LOG=warn "$bin" --config "$WORK/$name.yaml" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  printf -v "${name}_PID" '%s' "$!"
  wait_healthz "127.0.0.1:$port"
}

# cpu_ticks PID: user+system clock ticks of PID so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

NAMES=(off on)
start_lp off "$OFF_PORT" "$ROOT/target/release/loraplex"
start_lp on "$ON_PORT" "$ROOT/target/release/loraplex" \
  "tracing: { otlp_endpoint: \"http://127.0.0.1:$SINK_PORT\", sample_ratio: 1 }"
if [ -n "${BASELINE:-}" ]; then
  NAMES=(baseline off on)
  start_lp baseline "$BASE_PORT" "$BASELINE"
fi
declare -A PORT=([off]=$OFF_PORT [on]=$ON_PORT [baseline]=$BASE_PORT)
declare -A TICKS=([off]=0 [on]=0 [baseline]=0)
url() { echo "http://127.0.0.1:${PORT[$1]}/v1/chat/completions"; }
pid_of() { local v="${1}_PID"; echo "${!v}"; }

for n in "${NAMES[@]}"; do wrk_run warmup "$(url "$n")" 2 >/dev/null; done
: > "$WORK/runs"
for r in $(seq "$ROUNDS"); do
  # A rotated order every round: no build always runs first (or after the same one).
  k=$(( (r - 1) % ${#NAMES[@]} ))
  order=("${NAMES[@]:k}" "${NAMES[@]:0:k}")
  for n in "${order[@]}"; do
    before=$(cpu_ticks "$(pid_of "$n")")
    wrk_run "$n" "$(url "$n")" >> "$WORK/runs"
    TICKS[$n]=$(( ${TICKS[$n]} + $(cpu_ticks "$(pid_of "$n")") - before ))
  done
  echo "round $r/$ROUNDS (${order[*]}): $(tail -${#NAMES[@]} "$WORK/runs" | tr '\n' ' ')" >&2
done
sleep 2 # the last batch of spans
SPANS=$(curl -sf "127.0.0.1:$ON_PORT/metrics" | awk '
  /^loraplex_trace_spans_exported_total/ { e=$2 }
  /^loraplex_trace_spans_dropped_total/ { d+=$2 }
  END { printf "%d exported, %d dropped", e, d }')

col() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/runs" | median; }
# µs of CPU per request: ticks / (sum of rps x seconds over the runs).
cpu_us() {
  local reqs
  reqs=$(awk -v n="$1" -v s="$SECS" '$1==n {t+=$2*s} END {print t}' "$WORK/runs")
  awk -v t="${TICKS[$1]}" -v hz="$(getconf CLK_TCK)" -v r="$reqs" 'BEGIN { printf "%.1f", t/hz*1e6/r }'
}
label() {
  case $1 in
    baseline) echo "loraplex without the tracing code (BASELINE)" ;;
    off) echo "loraplex, tracing off" ;;
    on) echo "loraplex, tracing on (sample_ratio 1, OTLP/HTTP)" ;;
  esac
}
ratio() { awk -v a="$(col "$1" 2)" -v b="$(col "$2" 2)" 'BEGIN { printf "%.3f", a/b }'; }
{
  echo "| loraplex, 2 workers (wrk -t1 -c64, ${SECS}s x $ROUNDS, median) | req/s | p50 ms | p99 ms | CPU µs/req |"
  echo "|---|---:|---:|---:|---:|"
  for n in "${NAMES[@]}"; do
    echo "| $(label "$n") | $(col "$n" 2) | $(col "$n" 3) | $(col "$n" 4) | $(cpu_us "$n") |"
  done
  echo
  [ -n "${BASELINE:-}" ] && echo "off / without tracing code req/s: **$(ratio off baseline)x**."
  echo "on / off req/s: **$(ratio on off)x**; spans: $SPANS."
  echo "Machine: $MACHINE."
} | tee "$OUT/tracing.md"
{
  echo "name,rps,p50_ms,p99_ms,cpu_us_per_req"
  for n in "${NAMES[@]}"; do echo "$n,$(col "$n" 2),$(col "$n" 3),$(col "$n" 4),$(cpu_us "$n")"; done
} > "$OUT/tracing.csv"
