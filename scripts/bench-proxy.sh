#!/usr/bin/env bash
# Proxy overhead: loraplex next to nginx, both as a keep-alive reverse proxy in front of the
# same upstream (nginx `return 200` with a JSON body), on this machine, alternating runs.
#
#   usage: scripts/bench-proxy.sh [ROUNDS] [SECONDS]      (defaults: 5 rounds of 10 s)
#   output: a markdown table on stdout, and target/bench/proxy.{md,csv}
#
# wrk -t1 -c64 POSTs a ~300 B chat body with a base-model `model` (the pass-through path:
# body read, `model` parsed, request streamed to the upstream and back).
set -euo pipefail
ROUNDS=${1:-5}
SECS=${2:-10}
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
for tool in wrk nginx curl; do need "$tool" "$tool"; done

UP_PORT=18500 NGX_PORT=18501 LP_PORT=18502
cleanup() {
  stop_nginx
  [ -n "${LP_PID:-}" ] && kill "$LP_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "building loraplex (release)..." >&2
cargo build --release -q
MACHINE=$(machine)
start_fake_vllm up "$UP_PORT"
start_nginx_proxy px "127.0.0.1:$NGX_PORT" "127.0.0.1:$UP_PORT"
write_post_lua
cat > "$WORK/lp.yaml" <<CONF
listen: "127.0.0.1:$LP_PORT"
vllm_url: "http://127.0.0.1:$UP_PORT"
vllm: { model_name: "base-model" }
storage: { dir: "$WORK/store", max_size: "1GB" }
server: { workers: 2 }
CONF
RUST_LOG=warn "$ROOT/target/release/loraplex" --config "$WORK/lp.yaml" >"$WORK/lp.log" 2>&1 &
LP_PID=$!
wait_healthz "127.0.0.1:$LP_PORT"

NGX=http://127.0.0.1:$NGX_PORT/v1/chat/completions
LP=http://127.0.0.1:$LP_PORT/v1/chat/completions
wrk_run warmup "$NGX" 2 >/dev/null
wrk_run warmup "$LP" 2 >/dev/null
: > "$WORK/runs"
for r in $(seq "$ROUNDS"); do
  wrk_run nginx "$NGX" >> "$WORK/runs"
  wrk_run loraplex "$LP" >> "$WORK/runs"
  echo "round $r/$ROUNDS: $(tail -2 "$WORK/runs" | tr '\n' ' ')" >&2
done
RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$LP_PID/status")
UPSTREAM=$(wrk_run upstream-alone "http://127.0.0.1:$UP_PORT/v1/chat/completions")

col() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/runs" | median; }
N_RPS=$(col nginx 2); N_P50=$(col nginx 3); N_P99=$(col nginx 4)
L_RPS=$(col loraplex 2); L_P50=$(col loraplex 3); L_P99=$(col loraplex 4)
RATIO=$(awk -v a="$L_RPS" -v b="$N_RPS" 'BEGIN { printf "%.2f", a/b }')
{
  echo "| proxy (wrk -t1 -c64, ${SECS}s x $ROUNDS, median) | req/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|"
  echo "| nginx $(nginx -v 2>&1 | sed 's/.*\///') (2 workers, keepalive upstream) | $N_RPS | $N_P50 | $N_P99 |"
  echo "| loraplex (2 workers) | $L_RPS | $L_P50 | $L_P99 |"
  echo "| upstream alone (no proxy) | $(echo "$UPSTREAM" | awk '{print $2 " | " $3 " | " $4}') |"
  echo
  echo "loraplex / nginx req/s: **${RATIO}x**; loraplex peak RSS: $((RSS_KB / 1024)) MiB."
  echo "Machine: $MACHINE."
} | tee "$OUT/proxy.md"
{
  echo "name,rps,p50_ms,p99_ms"
  echo "nginx,$N_RPS,$N_P50,$N_P99"
  echo "loraplex,$L_RPS,$L_P50,$L_P99"
} > "$OUT/proxy.csv"
