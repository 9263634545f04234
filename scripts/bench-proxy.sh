#!/usr/bin/env bash
# Proxy overhead: loraplex next to nginx, both as a keep-alive reverse proxy in front of the
# same upstream (nginx `return 200` with a JSON body), on this machine, alternating runs.
#
#   usage: scripts/bench-proxy.sh [ROUNDS] [SECONDS]      (defaults: 5 rounds of 10 s)
#   output: a markdown table on stdout, and target/bench/proxy.{md,csv}
#
# wrk -t1 -c64 POSTs a ~300 B chat body with a base-model `model` (the pass-through path:
# body read, `model` parsed, request streamed to the upstream and back).
# Then the same over TLS to clients (`server.tls`, and nginx `listen ssl` beside it, the same
# self-signed P-256 certificate, keep-alive connections: the cost per request, not per
# handshake); `TLS=0` leaves the TLS runs out.
set -euo pipefail
ROUNDS=${1:-5}
SECS=${2:-10}
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
for tool in wrk nginx curl; do need "$tool" "$tool"; done

TLS=${TLS:-1}
# Ports PORT..PORT+4 (another run on this machine picks another PORT).
PORT=${PORT:-18500}
UP_PORT=$PORT NGX_PORT=$((PORT + 1)) LP_PORT=$((PORT + 2)) NGXS_PORT=$((PORT + 3)) LPS_PORT=$((PORT + 4))
cleanup() {
  stop_nginx
  [ -n "${LP_PID:-}" ] && kill "$LP_PID" 2>/dev/null
  [ -n "${LPS_PID:-}" ] && kill "$LPS_PID" 2>/dev/null
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
if [ "$TLS" = 1 ]; then
  make_tls_cert
  start_nginx_proxy pxs "127.0.0.1:$NGXS_PORT" "127.0.0.1:$UP_PORT" tls
  cat > "$WORK/lps.yaml" <<CONF
listen: "127.0.0.1:$LPS_PORT"
vllm_url: "http://127.0.0.1:$UP_PORT"
vllm: { model_name: "base-model" }
storage: { dir: "$WORK/store-tls", max_size: "1GB" }
server: { workers: 2, tls: { cert: "$WORK/tls.crt", key: "$WORK/tls.key" } }
CONF
  RUST_LOG=warn "$ROOT/target/release/loraplex" --config "$WORK/lps.yaml" >"$WORK/lps.log" 2>&1 &
  LPS_PID=$!
  wait_healthz "https://127.0.0.1:$LPS_PORT"
fi

NGX=http://127.0.0.1:$NGX_PORT/v1/chat/completions
LP=http://127.0.0.1:$LP_PORT/v1/chat/completions
wrk_run warmup "$NGX" 2 >/dev/null
wrk_run warmup "$LP" 2 >/dev/null
NGXS=https://127.0.0.1:$NGXS_PORT/v1/chat/completions
LPS=https://127.0.0.1:$LPS_PORT/v1/chat/completions
if [ "$TLS" = 1 ]; then
  wrk_run warmup "$NGXS" 2 >/dev/null
  wrk_run warmup "$LPS" 2 >/dev/null
fi
: > "$WORK/runs"
for r in $(seq "$ROUNDS"); do
  wrk_run nginx "$NGX" >> "$WORK/runs"
  wrk_run loraplex "$LP" >> "$WORK/runs"
  n=2
  if [ "$TLS" = 1 ]; then
    wrk_run nginx-tls "$NGXS" >> "$WORK/runs"
    wrk_run loraplex-tls "$LPS" >> "$WORK/runs"
    n=4
  fi
  echo "round $r/$ROUNDS: $(tail -$n "$WORK/runs" | tr '\n' ' ')" >&2
done
RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$LP_PID/status")
UPSTREAM=$(wrk_run upstream-alone "http://127.0.0.1:$UP_PORT/v1/chat/completions")

col() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/runs" | median; }
N_RPS=$(col nginx 2); N_P50=$(col nginx 3); N_P99=$(col nginx 4)
L_RPS=$(col loraplex 2); L_P50=$(col loraplex 3); L_P99=$(col loraplex 4)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a/b }'; }
RATIO=$(ratio "$L_RPS" "$N_RPS")
if [ "$TLS" = 1 ]; then
  NS_RPS=$(col nginx-tls 2); NS_P50=$(col nginx-tls 3); NS_P99=$(col nginx-tls 4)
  LS_RPS=$(col loraplex-tls 2); LS_P50=$(col loraplex-tls 3); LS_P99=$(col loraplex-tls 4)
fi
{
  echo "| proxy (wrk -t1 -c64, ${SECS}s x $ROUNDS, median) | req/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|"
  echo "| nginx $(nginx -v 2>&1 | sed 's/.*\///') (2 workers, keepalive upstream) | $N_RPS | $N_P50 | $N_P99 |"
  echo "| loraplex (2 workers) | $L_RPS | $L_P50 | $L_P99 |"
  if [ "$TLS" = 1 ]; then
    echo "| nginx, TLS to clients | $NS_RPS | $NS_P50 | $NS_P99 |"
    echo "| loraplex, TLS to clients (\`server.tls\`) | $LS_RPS | $LS_P50 | $LS_P99 |"
  fi
  echo "| upstream alone (no proxy) | $(echo "$UPSTREAM" | awk '{print $2 " | " $3 " | " $4}') |"
  echo
  echo "loraplex / nginx req/s: **${RATIO}x**; loraplex peak RSS: $((RSS_KB / 1024)) MiB."
  if [ "$TLS" = 1 ]; then
    echo "TLS / plain req/s: loraplex **$(ratio "$LS_RPS" "$L_RPS")x**, nginx **$(ratio "$NS_RPS" "$N_RPS")x**;" \
      "loraplex / nginx over TLS: **$(ratio "$LS_RPS" "$NS_RPS")x**."
  fi
  echo "Machine: $MACHINE."
} | tee "$OUT/proxy.md"
{
  echo "name,rps,p50_ms,p99_ms"
  echo "nginx,$N_RPS,$N_P50,$N_P99"
  echo "loraplex,$L_RPS,$L_P50,$L_P99"
  if [ "$TLS" = 1 ]; then
    echo "nginx-tls,$NS_RPS,$NS_P50,$NS_P99"
    echo "loraplex-tls,$LS_RPS,$LS_P50,$LS_P99"
  fi
} > "$OUT/proxy.csv"
