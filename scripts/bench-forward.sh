#!/usr/bin/env bash
# The cost of one forward hop: a request entering a non-owner node (forwarded to the owner over
# the cluster's pooled connections) against the same request entering the owner, next to nginx
# proxying through a second nginx against one nginx, all measured the same way (wrk -t1 -c64).
#
#   usage: scripts/bench-forward.sh [ROUNDS] [SECONDS]     (defaults: 3 rounds of 8 s)
#   output: a markdown table on stdout, and target/bench/forward.{md,csv}
#
# Two loraplex nodes (127.0.0.1 and 127.0.0.2, one port), `hash_on: header:X-Session-ID`, a
# session owned by the second node; the upstream "vLLM" is nginx `return 200`.
set -euo pipefail
ROUNDS=${1:-3}
SECS=${2:-8}
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
for tool in wrk nginx curl; do need "$tool" "$tool"; done

UP_PORT=18510 NGX1_PORT=18511 NGX2_PORT=18512 LP_PORT=18513
A=127.0.0.1:$LP_PORT B=127.0.0.2:$LP_PORT
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
start_nginx_proxy px1 "127.0.0.1:$NGX1_PORT" "127.0.0.1:$UP_PORT"
start_nginx_proxy px2 "127.0.0.1:$NGX2_PORT" "127.0.0.1:$NGX1_PORT"
for node in "$A" "$B"; do
  cat > "$WORK/$node.yaml" <<CONF
listen: "$node"
vllm_url: "http://127.0.0.1:$UP_PORT"
vllm: { model_name: "base-model", health_check_interval: 1s }
storage: { dir: "$WORK/store-$node", max_size: "1GB" }
server: { workers: 2 }
routing: { hash_on: "header:X-Session-ID" }
discovery: { mode: static, static: { peers: ["$A", "$B"] } }
CONF

  RUST_LOG=warn "$ROOT/target/release/loraplex" --config "$WORK/$node.yaml" >"$WORK/$node.log" 2>&1 &
  PIDS+=($!)
done
wait_healthz "$A"
wait_healthz "$B"
# Until each node has seen the other healthy (its first checks may have run before the other
# was up).
for _ in $(seq 100); do
  ok=0
  for node in "$A" "$B"; do
    curl -sf "$node/admin/peers" | python3 -c 'import json,sys; p=json.load(sys.stdin)["peers"]; sys.exit(0 if all(x["self"] or (x["healthy"] and x["vllm_healthy"]) for x in p) else 1)' && ok=$((ok + 1))
  done
  [ "$ok" = 2 ] && break
  sleep 0.2
done

forwards() { curl -sf "$A/metrics" | awk '/^loraplex_peer_forwards_total/ {s+=$NF} END {print s+0}'; }
SESSION=
for i in $(seq 0 50); do
  before=$(forwards)
  curl -sf -o /dev/null "http://$A/v1/chat/completions" -H "X-Session-ID: bench-$i" \
    -H 'content-type: application/json' -d '{"model":"base-model","messages":[]}'
  if [ "$(forwards)" -gt "$before" ]; then SESSION=bench-$i; break; fi
done
[ -n "$SESSION" ] || { echo "no session forwarded from $A to $B" >&2; tail "$WORK/$A.log" >&2; exit 1; }
echo "session $SESSION is owned by $B" >&2
write_post_lua "X-Session-ID: $SESSION"

for u in "http://$A" "http://$B" "http://127.0.0.1:$NGX1_PORT" "http://127.0.0.1:$NGX2_PORT"; do
  wrk_run warmup "$u/v1/chat/completions" 2 >/dev/null
done
: > "$WORK/runs"
for r in $(seq "$ROUNDS"); do
  wrk_run nginx-1hop "http://127.0.0.1:$NGX1_PORT/v1/chat/completions" >> "$WORK/runs"
  wrk_run nginx-2hop "http://127.0.0.1:$NGX2_PORT/v1/chat/completions" >> "$WORK/runs"
  wrk_run owner "http://$B/v1/chat/completions" >> "$WORK/runs"
  wrk_run non-owner "http://$A/v1/chat/completions" >> "$WORK/runs"
  echo "round $r/$ROUNDS: $(tail -4 "$WORK/runs" | tr '\n' ' ')" >&2
done
FWD=$(forwards)

col() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/runs" | median; }
row() { echo "| $2 | $(col "$1" 2) | $(col "$1" 3) | $(col "$1" 4) |"; }
added() { awk -v a="$(col "$2" "$3")" -v b="$(col "$1" "$3")" 'BEGIN { printf "%+.3f", a-b }'; }
ratio() { awk -v a="$(col "$2" 2)" -v b="$(col "$1" 2)" 'BEGIN { printf "%.2f", a/b }'; }
{
  echo "| forward hop (wrk -t1 -c64, ${SECS}s x $ROUNDS, median) | req/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|"
  row owner "loraplex, entering the owner"
  row non-owner "loraplex, entering a non-owner (one forward hop)"
  row nginx-1hop "nginx, one proxy"
  row nginx-2hop "nginx, two proxies (one extra hop)"
  echo
  echo "Added by the hop: loraplex p50 $(added owner non-owner 3) ms, p99 $(added owner non-owner 4) ms," \
       "req/s x$(ratio owner non-owner); nginx p50 $(added nginx-1hop nginx-2hop 3) ms," \
       "p99 $(added nginx-1hop nginx-2hop 4) ms, req/s x$(ratio nginx-1hop nginx-2hop)." \
       "Forwards counted by the entry node: $FWD."
  echo "Machine: $MACHINE (two loraplex nodes and two nginx proxies of 2 workers each, all on it)."
} | tee "$OUT/forward.md"
{
  echo "name,rps,p50_ms,p99_ms"
  for n in owner non-owner nginx-1hop nginx-2hop; do echo "$n,$(col $n 2),$(col $n 3),$(col $n 4)"; done
} > "$OUT/forward.csv"
