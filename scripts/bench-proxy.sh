#!/usr/bin/env bash
# Proxy overhead: loraplex next to nginx, both as a keep-alive reverse proxy in front of the
# same upstream (nginx `return 200` with a JSON body), on this machine.
#
#   usage: scripts/bench-proxy.sh [ROUNDS] [SECONDS]      (defaults: 5 rounds of 10 s)
#   output: a markdown table on stdout, and target/bench/proxy.{md,csv}
#   LORAPLEX_BIN=path: that binary instead of this tree's release build (before/after runs)
#   KERNEL=1: then one more run of each proxy and case under `perf stat`: syscalls, io_uring
#   submissions and context switches per request (docs/hotpath.md)
#   PROFILE=DIR: then one more base-model run of each proxy under `perf record -g`, into
#   DIR/{nginx,loraplex}.perf, with the kernel's share of the samples
#
# wrk -t1 -c64 POSTs a ~300 B chat body, three cases:
# - base model: body read, `model` parsed, request streamed to the upstream and back;
# - warm adapter: the same naming an adapter stored on local disk (name validated, adapter
#   looked up and pinned while the answer streams); nginx proxies the same request;
# - TLS: the base-model request over TLS to clients (`server.tls`, and nginx `listen ssl`
#   beside it, the same self-signed P-256 certificate, keep-alive connections: the cost per
#   request, not per handshake); `TLS=0` leaves the TLS runs out.
# Every round runs both proxies on every case, the order alternating (nginx first in odd
# rounds, loraplex first in even ones). A proxy's CPU per request is the user + system time of
# its processes over a run (/proc/PID/stat, every thread; nginx: its master and workers)
# divided by the run's requests; the upstream's CPU counts for neither. Medians over rounds.
set -euo pipefail
ROUNDS=${1:-5}
SECS=${2:-10}
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
for tool in wrk nginx curl; do need "$tool" "$tool"; done
command -v pgrep >/dev/null || need pgrep procps

TLS=${TLS:-1}
# Ports PORT..PORT+4 (another run on this machine picks another PORT).
PORT=${PORT:-18500}
UP_PORT=$PORT NGX_PORT=$((PORT + 1)) LP_PORT=$((PORT + 2)) NGXS_PORT=$((PORT + 3)) LPS_PORT=$((PORT + 4))
ADAPTER=bench/warm-lora
cleanup() {
  stop_nginx
  [ -n "${LP_PID:-}" ] && kill "$LP_PID" 2>/dev/null
  [ -n "${LPS_PID:-}" ] && kill "$LPS_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

BIN=${LORAPLEX_BIN:-}
if [ -z "$BIN" ]; then
  echo "building loraplex (release)..." >&2
  cargo build --release -q
  BIN=$ROOT/target/release/loraplex
fi
MACHINE=$(machine)
start_fake_vllm up "$UP_PORT"
start_nginx_proxy px "127.0.0.1:$NGX_PORT" "127.0.0.1:$UP_PORT"
LUA=$WORK/base.lua write_post_lua
LUA=$WORK/adapter.lua MODEL=$ADAPTER write_post_lua

# The adapter, in a file origin: a valid safetensors file (8-byte header length, JSON header
# padded to 8, one 1 MiB U8 tensor) and its config.
mkdir -p "$WORK/origin/$ADAPTER"
python3 - "$WORK/origin/$ADAPTER" <<'PY'
import json, os, struct, sys
d, n = sys.argv[1], 1 << 20
hdr = json.dumps({"lora.weight": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
hdr += b" " * (-len(hdr) % 8)
with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(hdr)) + hdr + os.urandom(n))
json.dump({"peft_type": "LORA", "base_model_name_or_path": "base-model", "r": 8,
           "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
          open(os.path.join(d, "adapter_config.json"), "w"))
PY
cat > "$WORK/lp.yaml" <<CONF
listen: "127.0.0.1:$LP_PORT"
vllm_url: "http://127.0.0.1:$UP_PORT"
vllm: { model_name: "base-model" }
storage: { dir: "$WORK/store", max_size: "1GB" }
origins: [ { type: file, path: "$WORK/origin" } ]
server: { workers: 2 }
CONF
RUST_LOG=warn "$BIN" --config "$WORK/lp.yaml" >"$WORK/lp.log" 2>&1 &
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
  RUST_LOG=warn "$BIN" --config "$WORK/lps.yaml" >"$WORK/lps.log" 2>&1 &
  LPS_PID=$!
  wait_healthz "https://127.0.0.1:$LPS_PORT"
fi

NGX=http://127.0.0.1:$NGX_PORT/v1/chat/completions
LP=http://127.0.0.1:$LP_PORT/v1/chat/completions
# The adapter fetched once: every measured request finds it on disk.
curl -sf -o /dev/null -H 'Content-Type: application/json' \
  -d "{\"model\":\"$ADAPTER\",\"messages\":[]}" "$LP" \
  || { echo "the adapter request failed:" >&2; cat "$WORK/lp.log" >&2; exit 1; }
NGXS=https://127.0.0.1:$NGXS_PORT/v1/chat/completions
LPS=https://127.0.0.1:$LPS_PORT/v1/chat/completions
CASES="base adapter"
[ "$TLS" = 1 ] && CASES="base adapter tls"
for c in base adapter; do
  LUA=$WORK/$c.lua wrk_run warmup "$NGX" 2 >/dev/null
  LUA=$WORK/$c.lua wrk_run warmup "$LP" 2 >/dev/null
done
if [ "$TLS" = 1 ]; then
  LUA=$WORK/base.lua wrk_run warmup "$NGXS" 2 >/dev/null
  LUA=$WORK/base.lua wrk_run warmup "$LPS" 2 >/dev/null
fi

TCK=$(getconf CLK_TCK)
# run CASE PROXY: one wrk run; appends "CASE-PROXY rps p50 p99 requests cpu_us_per_request".
run() {
  local pids url lua=$WORK/$1.lua before after line
  case "$1-$2" in
    tls-nginx) pids=$(nginx_pids pxs) url=$NGXS lua=$WORK/base.lua ;;
    tls-loraplex) pids=$LPS_PID url=$LPS lua=$WORK/base.lua ;;
    *-nginx) pids=$(nginx_pids px) url=$NGX ;;
    *) pids=$LP_PID url=$LP ;;
  esac
  # shellcheck disable=SC2086
  before=$(cpu_ticks $pids)
  line=$(LUA=$lua wrk_run "$1-$2" "$url")
  # shellcheck disable=SC2086
  after=$(cpu_ticks $pids)
  echo "$line" | awk -v d=$((after - before)) -v tck="$TCK" \
    '{ printf "%s %.2f\n", $0, ($5 > 0) ? d * 1e6 / tck / $5 : 0 }' >> "$WORK/runs"
}
: > "$WORK/runs"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="nginx loraplex"; else order="loraplex nginx"; fi
  n=0
  for c in $CASES; do
    for p in $order; do run "$c" "$p"; n=$((n + 1)); done
  done
  echo "round $r/$ROUNDS ($order): $(tail -$n "$WORK/runs" | tr '\n' ' ')" >&2
done
# The extra runs, the order alternating as above.
: > "$WORK/kernel"
: > "$WORK/profile"
if [ "${KERNEL:-0}" = 1 ] || [ -n "${PROFILE:-}" ]; then need perf linux-perf; fi
if [ "${KERNEL:-0}" = 1 ]; then
  i=0
  for c in base adapter; do
    order="nginx loraplex"
    [ $((i % 2)) = 1 ] && order="loraplex nginx"
    i=$((i + 1))
    for p in $order; do
      # shellcheck disable=SC2046
      case $p in
        nginx) LUA=$WORK/$c.lua kernel_work "$c-nginx" "$NGX" $(nginx_pids px) ;;
        loraplex) LUA=$WORK/$c.lua kernel_work "$c-loraplex" "$LP" "$LP_PID" ;;
      esac >> "$WORK/kernel"
    done
  done
fi
if [ -n "${PROFILE:-}" ]; then
  # shellcheck disable=SC2046
  LUA=$WORK/base.lua profile_run nginx "$NGX" "$PROFILE" $(nginx_pids px) >> "$WORK/profile"
  LUA=$WORK/base.lua profile_run loraplex "$LP" "$PROFILE" "$LP_PID" >> "$WORK/profile"
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$LP_PID/status")
UPSTREAM=$(LUA=$WORK/base.lua wrk_run upstream-alone "http://127.0.0.1:$UP_PORT/v1/chat/completions")

col() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/runs" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }'; }
NGINX_V=$(nginx -v 2>&1 | sed 's/.*\///')
what() {
  case "$1" in
    base) echo "base model" ;;
    adapter) echo "warm adapter" ;;
    tls) echo "base model, TLS to clients" ;;
  esac
}
{
  echo "| wrk -t1 -c64, ${SECS}s x $ROUNDS, medians | req/s | p50 ms | p99 ms | CPU µs/request |"
  echo "|---|---:|---:|---:|---:|"
  for c in $CASES; do
    echo "| $(what "$c"): nginx $NGINX_V (2 workers, keepalive upstream) | $(col "$c-nginx" 2) | $(col "$c-nginx" 3) | $(col "$c-nginx" 4) | $(col "$c-nginx" 6) |"
    echo "| $(what "$c"): loraplex (2 workers) | $(col "$c-loraplex" 2) | $(col "$c-loraplex" 3) | $(col "$c-loraplex" 4) | $(col "$c-loraplex" 6) |"
  done
  echo "| upstream alone (no proxy) | $(echo "$UPSTREAM" | awk '{print $2 " | " $3 " | " $4}') | |"
  echo
  for c in $CASES; do
    echo "- $(what "$c"), loraplex / nginx: CPU per request **$(ratio "$(col "$c-loraplex" 6)" "$(col "$c-nginx" 6)")x**, req/s $(ratio "$(col "$c-loraplex" 2)" "$(col "$c-nginx" 2)")x, p99 $(ratio "$(col "$c-loraplex" 4)" "$(col "$c-nginx" 4)")x."
  done
  if [ "$TLS" = 1 ]; then
    echo "- TLS / plain req/s (base model): loraplex **$(ratio "$(col tls-loraplex 2)" "$(col base-loraplex 2)")x**, nginx **$(ratio "$(col tls-nginx 2)" "$(col base-nginx 2)")x**."
  fi
  if [ -s "$WORK/kernel" ]; then
    echo
    echo "| one more run each, under perf stat | syscalls/request | io_uring SQEs/request | context switches/request |"
    echo "|---|---:|---:|---:|"
    while read -r n s q w; do echo "| $n | $s | $q | $w |"; done < "$WORK/kernel"
  fi
  if [ -s "$WORK/profile" ]; then
    echo
    while read -r n k u _; do echo "- perf record -g of $n (base model, $PROFILE/$n.perf): $k% of samples in the kernel, $u% in user space."; done < "$WORK/profile"
  fi
  echo
  echo "loraplex peak RSS: $((RSS_KB / 1024)) MiB. Machine: $MACHINE, after: $LOAD_AFTER."
} | tee "$OUT/proxy.md"
{
  echo "name,rps,p50_ms,p99_ms,cpu_us_per_request"
  for c in $CASES; do
    for p in nginx loraplex; do
      echo "$c-$p,$(col "$c-$p" 2),$(col "$c-$p" 3),$(col "$c-$p" 4),$(col "$c-$p" 6)"
    done
  done
} > "$OUT/proxy.csv"
