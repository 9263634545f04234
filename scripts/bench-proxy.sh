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
ROOT=$PWD
OUT=$ROOT/target/bench
WORK=$(mktemp -d)
mkdir -p "$OUT"

need() { command -v "$1" >/dev/null 2>&1 || { echo "installing $2"; apt-get install -y -q "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx

UP_PORT=18500 NGX_PORT=18501 LP_PORT=18502
cleanup() {
  [ -f "$WORK/up.pid" ] && kill "$(cat "$WORK/up.pid")" 2>/dev/null || true
  [ -f "$WORK/px.pid" ] && kill "$(cat "$WORK/px.pid")" 2>/dev/null || true
  [ -n "${LP_PID:-}" ] && kill "$LP_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cat > "$WORK/up.conf" <<EOF
worker_processes 1;
pid $WORK/up.pid;
error_log $WORK/up.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK;
  server {
    listen 127.0.0.1:$UP_PORT;
    keepalive_requests 1000000;
    location /health { return 200 ''; }
    location /v1/models { default_type application/json; return 200 '{"object":"list","data":[{"id":"base-model","object":"model","parent":null}]}'; }
    location / { default_type application/json; return 200 '{"id":"chatcmpl-1","object":"chat.completion","model":"base-model","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":31,"completion_tokens":11,"total_tokens":42}}'; }
  }
}
EOF
cat > "$WORK/px.conf" <<EOF
worker_processes 2;
pid $WORK/px.pid;
error_log $WORK/px.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK;
  proxy_temp_path $WORK;
  upstream vllm { server 127.0.0.1:$UP_PORT; keepalive 256; }
  server {
    listen 127.0.0.1:$NGX_PORT;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://vllm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
cat > "$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body   = '{"model":"base-model","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Summarize in one sentence: the quick brown fox jumps over the lazy dog, twice."}],"max_tokens":64,"temperature":0.0,"stream":false}'
wrk.headers["Content-Type"] = "application/json"
EOF

echo "building loraplex (release)..." >&2
cargo build --release -q
nginx -c "$WORK/up.conf"
nginx -c "$WORK/px.conf"
cat > "$WORK/lp.yaml" <<EOF
listen: "127.0.0.1:$LP_PORT"
vllm_url: "http://127.0.0.1:$UP_PORT"
vllm: { model_name: "base-model" }
storage: { dir: "$WORK/store", max_size: "1GB" }
server: { workers: 2 }
EOF
RUST_LOG=warn "$ROOT/target/release/loraplex" --config "$WORK/lp.yaml" >"$WORK/lp.log" 2>&1 &
LP_PID=$!
for _ in $(seq 50); do curl -sf "127.0.0.1:$LP_PORT/healthz" >/dev/null && break; sleep 0.1; done

run() { # name port -> "rps p50_ms p99_ms"
  wrk -t1 -c64 -d"${SECS}s" -s "$WORK/post.lua" --latency "http://127.0.0.1:$2/v1/chat/completions" \
    | awk -v name="$1" '
      function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
      /Requests\/sec/ { rps=$2 } / 50%/ { p50=ms($2) } / 99%/ { p99=ms($2) }
      /Non-2xx/ { bad=$4 }
      END { if (bad>0) print "ERROR " name " non-2xx " bad > "/dev/stderr"; printf "%s %.0f %.3f %.3f\n", name, rps, p50, p99 }'
}
# Warm up both.
wrk -t1 -c64 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$NGX_PORT/v1/chat/completions" >/dev/null
wrk -t1 -c64 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$LP_PORT/v1/chat/completions" >/dev/null
: > "$WORK/runs"
for r in $(seq "$ROUNDS"); do
  run nginx "$NGX_PORT" >> "$WORK/runs"
  run loraplex "$LP_PORT" >> "$WORK/runs"
  echo "round $r/$ROUNDS: $(tail -2 "$WORK/runs" | tr '\n' ' ')" >&2
done
RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$LP_PID/status")
UPSTREAM=$(run upstream-alone "$UP_PORT")

median() { sort -n | awk '{a[NR]=$1} END { print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2 }'; }
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
  echo "Machine: $(nproc) cores, $(awk '/model name/ {sub(/.*: /,""); print; exit}' /proc/cpuinfo), kernel $(uname -r)."
} | tee "$OUT/proxy.md"
{
  echo "name,rps,p50_ms,p99_ms"
  echo "nginx,$N_RPS,$N_P50,$N_P99"
  echo "loraplex,$L_RPS,$L_P50,$L_P99"
} > "$OUT/proxy.csv"
