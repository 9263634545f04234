#!/usr/bin/env bash
# The cost of one forward hop: a request entering a non-owner node (forwarded to the owner over
# the cluster's pooled connections) against the same request entering the owner, next to nginx
# proxying through a second nginx against one nginx, all measured the same way (wrk -t1 -c64).
# nginx runs twice: as configured by default (one busy worker may accept every connection) and
# with `reuseport` (the kernel spreads connections over its workers, as it does over loraplex's).
#
#   usage: [KERNEL=1] [PROFILE=dir] [WORKERS=n] [DRIVER=epoll] [CONNS=n] [LORAPLEX_BIN=path] scripts/bench-forward.sh [ROUNDS] [SECONDS]
#          (defaults: 3 rounds of 8 s; KERNEL=1 adds syscalls, io_uring submissions and context
#          switches per request, from one more run of each case under `perf stat`; PROFILE=dir
#          adds `perf record -g` of the loraplex cases and nginx's two proxies; DRIVER: the
#          nodes' `server.driver` (auto: io_uring where the kernel allows); CONNS: wrk's
#          connections, 64 by default, which saturates two cores; 1 or 8 measure the hop's own
#          latency rather than a queue's)
#   output: a markdown table on stdout, and target/bench/forward.{md,csv}
#
# Two loraplex nodes (127.0.0.1 and 127.0.0.2, one port), `hash_on: header:X-Session-ID`, a
# session owned by the second node; the upstream "vLLM" is nginx `return 200`.
set -euo pipefail
ROUNDS=${1:-3}
SECS=${2:-8}
# Workers per loraplex node (nginx runs 2; under this load one nginx worker takes every
# connection, docs/hotpath.md).
WORKERS=${WORKERS:-2}
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
for tool in wrk nginx curl; do need "$tool" "$tool"; done

UP_PORT=18510 NGX1_PORT=18511 NGX2_PORT=18512 LP_PORT=18513 RP1_PORT=18514 RP2_PORT=18515
A=127.0.0.1:$LP_PORT B=127.0.0.2:$LP_PORT
PIDS=()
cleanup() {
  stop_nginx
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
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
start_nginx_proxy px1 "127.0.0.1:$NGX1_PORT" "127.0.0.1:$UP_PORT"
start_nginx_proxy px2 "127.0.0.1:$NGX2_PORT" "127.0.0.1:$NGX1_PORT"
REUSEPORT=1 start_nginx_proxy rp1 "127.0.0.1:$RP1_PORT" "127.0.0.1:$UP_PORT"
REUSEPORT=1 start_nginx_proxy rp2 "127.0.0.1:$RP2_PORT" "127.0.0.1:$RP1_PORT"
for node in "$A" "$B"; do
  cat > "$WORK/$node.yaml" <<CONF
listen: "$node"
vllm_url: "http://127.0.0.1:$UP_PORT"
vllm: { model_name: "base-model", health_check_interval: 1s }
storage: { dir: "$WORK/store-$node", max_size: "1GB" }
server: { workers: $WORKERS, driver: ${DRIVER:-auto} }
routing: { hash_on: "header:X-Session-ID" }
discovery: { mode: static, static: { peers: ["$A", "$B"] } }
CONF

  RUST_LOG=warn "$BIN" --config "$WORK/$node.yaml" >"$WORK/$node.log" 2>&1 &
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

NGX1=http://127.0.0.1:$NGX1_PORT/v1/chat/completions NGX2=http://127.0.0.1:$NGX2_PORT/v1/chat/completions
RP1=http://127.0.0.1:$RP1_PORT/v1/chat/completions RP2=http://127.0.0.1:$RP2_PORT/v1/chat/completions
OWNER=http://$B/v1/chat/completions NONOWNER=http://$A/v1/chat/completions
for u in "$OWNER" "$NONOWNER" "$NGX1" "$NGX2" "$RP1" "$RP2"; do wrk_run warmup "$u" 2 >/dev/null; done

TCK=$(getconf CLK_TCK)
# url_pids CASE: the URL a case loads, and the processes whose CPU it costs (every proxy the
# request passes through; the upstream and wrk are the same for all).
url_pids() {
  case "$1" in
    nginx-1hop) echo "$NGX1 $(nginx_pids px1)" ;;
    nginx-2hop) echo "$NGX2 $(nginx_pids px1) $(nginx_pids px2)" ;;
    nginx-rp-1hop) echo "$RP1 $(nginx_pids rp1)" ;;
    nginx-rp-2hop) echo "$RP2 $(nginx_pids rp1) $(nginx_pids rp2)" ;;
    owner) echo "$OWNER ${PIDS[1]}" ;;
    non-owner) echo "$NONOWNER ${PIDS[0]} ${PIDS[1]}" ;;
  esac
}
# run CASE: one wrk run; appends "CASE rps p50 p99 requests cpu_us_per_request".
run() {
  local up url before after line
  # shellcheck disable=SC2207
  up=($(url_pids "$1"))
  url=${up[0]}
  before=$(cpu_ticks "${up[@]:1}")
  line=$(wrk_run "$1" "$url")
  after=$(cpu_ticks "${up[@]:1}")
  echo "$line" | awk -v d=$((after - before)) -v tck="$TCK" \
    '{ printf "%s %.2f\n", $0, ($5 > 0) ? d * 1e6 / tck / $5 : 0 }' >> "$WORK/runs"
}
# Every round runs the six cases, the order reversed every other round, so no case always
# runs first (after a pause) or last (after the others warmed the caches).
CASES="nginx-1hop owner nginx-rp-1hop nginx-2hop non-owner nginx-rp-2hop"
: > "$WORK/runs"
for r in $(seq "$ROUNDS"); do
  order=$CASES
  [ $((r % 2)) = 0 ] && order=$(echo "$CASES" | tr ' ' '\n' | tac | tr '\n' ' ')
  for c in $order; do run "$c"; done
  echo "round $r/$ROUNDS ($order): $(tail -6 "$WORK/runs" | tr '\n' ' ')" >&2
done
FWD=$(forwards)
# KERNEL=1: one more run of each case under `perf stat`: syscalls, io_uring submissions and
# context switches per request of the proxies a case passes through.
: > "$WORK/kernel"
if [ "${KERNEL:-0}" = 1 ]; then
  need perf linux-perf
  for c in $CASES; do
    # shellcheck disable=SC2207
    up=($(url_pids "$c"))
    kernel_work "$c" "${up[@]}" >> "$WORK/kernel"
  done
fi
# PROFILE=DIR: one more run of each loraplex case and of nginx's two proxies under
# `perf record -g` (every proxy the case passes through), into DIR/CASE.perf.
if [ -n "${PROFILE:-}" ]; then
  need perf linux-perf
  for c in owner non-owner nginx-2hop; do
    # shellcheck disable=SC2207
    up=($(url_pids "$c"))
    profile_run "$c" "${up[@]:0:1}" "$PROFILE" "${up[@]:1}" >&2
  done
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

col() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/runs" | median; }
kcol() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/kernel"; }
row() {
  local k=""
  [ -s "$WORK/kernel" ] && k=" $(kcol "$1" 2) | $(kcol "$1" 3) | $(kcol "$1" 4) |"
  echo "| $2 | $(col "$1" 2) | $(col "$1" 3) | $(col "$1" 4) | $(col "$1" 6) |$k"
}
added() { awk -v a="$(col "$2" "$3")" -v b="$(col "$1" "$3")" 'BEGIN { printf "%+.3f", a-b }'; }
ratio() { awk -v a="$(col "$2" 2)" -v b="$(col "$1" 2)" 'BEGIN { printf "%.2f", a/b }'; }
# The p99 each round's hop added, loraplex's over nginx's (NGINX: nginx or nginx-rp): the median
# of the rounds' ratios.
hop_p99_ratio() {
  awk -v n="$1" '$1==n"-1hop" { i++; a1[i]=$4 } $1==n"-2hop" { j++; a2[j]=$4 }
       $1=="owner" { k++; o[k]=$4 } $1=="non-owner" { l++; f[l]=$4 }
       END { for (r = 1; r <= i; r++) { d = a2[r] - a1[r]; if (d > 0) printf "%.2f\n", (f[r] - o[r]) / d; else print "n/a" } }' "$WORK/runs"
}
{
  h=""; hs=""
  [ -s "$WORK/kernel" ] && h=" syscalls/req | io_uring SQEs/req | switches/req |" hs="---:|---:|---:|"
  echo "| forward hop (wrk -t1 -c${CONNS:-64}, ${SECS}s x $ROUNDS, medians) | req/s | p50 ms | p99 ms | proxy CPU µs/req |$h"
  echo "|---|---:|---:|---:|---:|$hs"
  row owner "loraplex, entering the owner"
  row non-owner "loraplex, entering a non-owner (one forward hop)"
  row nginx-1hop "nginx, one proxy"
  row nginx-2hop "nginx, two proxies (one extra hop)"
  row nginx-rp-1hop "nginx with reuseport, one proxy"
  row nginx-rp-2hop "nginx with reuseport, two proxies (one extra hop)"
  echo
  echo "Added by the hop: loraplex p50 $(added owner non-owner 3) ms, p99 $(added owner non-owner 4) ms," \
       "CPU $(added owner non-owner 6) µs/req, req/s x$(ratio owner non-owner); nginx p50 $(added nginx-1hop nginx-2hop 3) ms," \
       "p99 $(added nginx-1hop nginx-2hop 4) ms, CPU $(added nginx-1hop nginx-2hop 6) µs/req, req/s x$(ratio nginx-1hop nginx-2hop);" \
       "nginx with reuseport p50 $(added nginx-rp-1hop nginx-rp-2hop 3) ms, p99 $(added nginx-rp-1hop nginx-rp-2hop 4) ms," \
       "CPU $(added nginx-rp-1hop nginx-rp-2hop 6) µs/req, req/s x$(ratio nginx-rp-1hop nginx-rp-2hop)." \
       "Per round, loraplex's added p99 / nginx's (n/a: nginx's hop added none): $(hop_p99_ratio nginx | tr '\n' ' ')(median $(hop_p99_ratio nginx | grep -v n/a | median));" \
       "/ nginx with reuseport's: $(hop_p99_ratio nginx-rp | tr '\n' ' ')(median $(hop_p99_ratio nginx-rp | grep -v n/a | median))." \
       "Forwards counted by the entry node: $FWD."
  echo "Machine: $MACHINE, after: $LOAD_AFTER (two loraplex nodes of $WORKERS workers and four nginx proxies of 2 workers, all on it)."
} | tee "$OUT/forward.md"
{
  echo "name,rps,p50_ms,p99_ms,cpu_us_per_request"
  for n in owner non-owner nginx-1hop nginx-2hop nginx-rp-1hop nginx-rp-2hop; do echo "$n,$(col $n 2),$(col $n 3),$(col $n 4),$(col $n 6)"; done
} > "$OUT/forward.csv"
