#!/usr/bin/env bash
# Chaos soak: 3 nodes (each the release loraplex + a stand-in vLLM, its own process), one
# stand-in HTTP origin, a steady mixed load at a fixed rate, and faults on a schedule. Then a
# report: requests per node by status, unanswered (must be 0), every non-success matched to a
# fault window, partial adapters seen by vLLM (0), the ledger against the disk, pins leaked (0),
# RSS and fds. Not a CI test: a script with figures.
#
#   scripts/soak.sh [DURATION]        # seconds or minutes (600, 3m); default 10m
#
# Env: RATE (requests/s, default 20), SEED (default 1), QUIET (seconds between faults, default
# 20), WORK (the run directory; default target/soak/run-DATE), NO_BUILD=1 (use the built
# binaries), PROFILE (default release; debug for a quick try while developing), FAULTS (the
# schedule, default "node_kill origin_5xx vllm_restart disk_fill origin_stall node_kill
# origin_reset vllm_restart", repeated; "none" for the load alone). Run it niced on a shared
# machine: `nice -n 10 scripts/soak.sh 3m`.
#
# The load (examples/soak/load.rs): open loop at RATE; the base model, 8 popular adapters,
# 300 cold ones (more than a node's budget: fetches and evictions all along), SSE streams,
# warm-ups, evicts (of popular and cold adapters, often in use), adapters no origin has (404),
# and soak/changing whose origin copy changes every 30 s (loraplex revalidates it,
# invalidation.ttl 15s). Each request goes to a random node over a new connection; a refused
# connection is retried on another, as behind a load balancer.
#
# The faults, in turn, QUIET seconds apart (each a window in events.log):
#   node_kill     kill -9 a random loraplex, restart it 3 s later on the same storage dir
#   vllm_restart  kill a random vLLM (it exits at once, requests in flight cut), restart 2 s later
#   origin_5xx    the origin answers 503 to everything for 10 s
#   origin_stall  every weights transfer pauses 45 s after 16 KiB, for 10 s (loraplex's
#                 idle_timeout, 30 s, notices and resumes with Range)
#   origin_reset  every weights transfer is cut after 8 KiB (connection closed), for 10 s
#   disk_fill     30 streams at once, each pinning its own 1 MiB adapter for ~15 s, against
#                 an 8 MiB budget per node
#
# Output: the run directory (logs of every process, load.jsonl, fill-N.jsonl, events.log,
# proc.log, node-N/), and the report, printed and written to target/soak/REPORT.md.
# Exit status: 0 when every check of the report passes.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
parse_duration() {
  case $1 in
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}
DURATION=$(parse_duration "${1:-10m}")
RATE=${RATE:-20}
SEED=${SEED:-1}
QUIET=${QUIET:-20}
WORK=${WORK:-$REPO/target/soak/run-$(date +%Y%m%d-%H%M%S)}
BASE=/models/soak-base
ADMIN_TOKEN=soak-admin-token
N=3
TTL=15
RANDOM=$SEED

mkdir -p "$WORK"
PROFILE=${PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
SOAK=$TARGET/$PROFILE/examples/soak
LORAPLEX=$TARGET/$PROFILE/loraplex
if [ "${NO_BUILD:-0}" != 1 ]; then
  (cd "$REPO" && cargo build --release --bin loraplex --example soak 2>&1 | tail -n 2)
fi
for tool in curl awk; do command -v "$tool" >/dev/null || apt-get install -y -qq "$tool" >/dev/null; done

now_ms() { date +%s%3N; }
ev() { echo "$(now_ms) $*" >>"$WORK/events.log"; }
log() { echo "== $(date +%T) $*"; }

CHILDREN=()
cleanup() {
  local pid
  for pid in "${CHILDREN[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${CHILDREN[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mapfile -t PORTS < <("$SOAK" ports $((2 * N + 2)))
ORIGIN_PORT=${PORTS[2 * N]}
CONTROL=http://127.0.0.1:${PORTS[2 * N + 1]}
LP_URL=() LP_PID=() VLLM_PID=() PEERS=()
for i in $(seq 0 $((N - 1))); do
  LP_URL[i]=http://127.0.0.1:${PORTS[i]}
  PEERS+=("127.0.0.1:${PORTS[i]}")
done
NODES=$(IFS=,; echo "${LP_URL[*]}")

# wait_url URL SECS: until URL answers 2xx (a loaded machine can take a while).
wait_url() {
  for _ in $(seq $(($2 * 5))); do
    curl -sf -o /dev/null --max-time 2 "$1" && return 0
    sleep 0.2
  done
  echo "timed out waiting for $1" >&2
  return 1
}

start_vllm() { # NODE
  local i=$1
  "$SOAK" vllm --port "${PORTS[N + i]}" --dir "$WORK/node-$i/store" --base "$BASE" \
    --events "$WORK/node-$i/vllm-events.jsonl" >>"$WORK/node-$i/vllm.log" 2>&1 &
  VLLM_PID[i]=$!
  CHILDREN+=($!)
  wait_url "http://127.0.0.1:${PORTS[N + i]}/health" 60
}

start_loraplex() { # NODE
  local i=$1
  RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$LORAPLEX" --config "$WORK/node-$i/loraplex.yaml" \
    >>"$WORK/node-$i/loraplex.log" 2>&1 &
  LP_PID[i]=$!
  CHILDREN+=($!)
  echo "$!" >"$WORK/node-$i/loraplex.pid"
  wait_url "${LP_URL[i]}/readyz" 120
}

# proc_snapshot PHASE: RSS and open fds of every loraplex (PHASE start, sample or end).
proc_snapshot() {
  local i pid rss fds
  for i in $(seq 0 $((N - 1))); do
    pid=$(cat "$WORK/node-$i/loraplex.pid")
    # A process just killed (or a zombie) has no VmRSS and no fd directory: skip it.
    rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) || continue
    [ -n "$rss" ] || continue
    echo "$(now_ms) proc node=$i phase=$1 pid=$pid rss_kb=$rss fds=$fds" >>"$WORK/proc.log"
  done
}

log "run directory $WORK"
"$SOAK" origin --port "$ORIGIN_PORT" --control-port "${PORTS[2 * N + 1]}" --base "$BASE" \
  --manifest "$WORK/adapters.manifest" >"$WORK/origin.log" 2>&1 &
CHILDREN+=($!)
for _ in $(seq 600); do grep -q ready "$WORK/origin.log" && break; sleep 0.1; done
grep -q ready "$WORK/origin.log" || { echo "the origin did not start" >&2; exit 1; }

for i in $(seq 0 $((N - 1))); do
  mkdir -p "$WORK/node-$i/store"
  cat >"$WORK/node-$i/loraplex.yaml" <<EOF
listen: ${PEERS[i]}
self_addr: ${PEERS[i]}
vllm_url: http://127.0.0.1:${PORTS[N + i]}
storage:
  dir: $WORK/node-$i/store
  max_size: 8MiB
origins:
  - type: http
    base_url: http://127.0.0.1:$ORIGIN_PORT/adapters
invalidation:
  ttl: ${TTL}s
discovery:
  mode: static
  static:
    peers: [$(IFS=,; echo "${PEERS[*]}")]
vllm:
  model_name: $BASE
  health_check_interval: 2s
cluster:
  token: soak-cluster-token
admin:
  token: $ADMIN_TOKEN
EOF
  start_vllm "$i"
  start_loraplex "$i"
done
log "3 nodes up: $NODES"

# --- the faults
FAULT_ID=0
node_kill() {
  local i=$((RANDOM % N))
  ev begin id=$FAULT_ID kind=node_kill node=$i
  ev kill id=$FAULT_ID target=loraplex node=$i
  kill -KILL "${LP_PID[i]}"
  wait "${LP_PID[i]}" 2>/dev/null || true
  ev killed id=$FAULT_ID
  sleep 3
  # Not ready in time: the window ends anyway; the report shows what followed.
  start_loraplex "$i" || ev not_ready target=loraplex node=$i
  ev restarted target=loraplex node=$i
  ev end id=$FAULT_ID
}
vllm_restart() {
  local i=$((RANDOM % N))
  ev begin id=$FAULT_ID kind=vllm_restart node=$i
  ev kill id=$FAULT_ID target=vllm node=$i
  kill -TERM "${VLLM_PID[i]}"
  wait "${VLLM_PID[i]}" 2>/dev/null || true
  ev killed id=$FAULT_ID
  sleep 2
  start_vllm "$i" || ev not_ready target=vllm node=$i
  ev restarted target=vllm node=$i
  ev end id=$FAULT_ID
}
origin_fault() { # 5xx|stall|reset
  ev begin id=$FAULT_ID kind=origin_$1
  curl -sf -X POST "$CONTROL/fault/$1" >/dev/null
  sleep 10
  curl -sf -X POST "$CONTROL/fault/off" >/dev/null
  ev end id=$FAULT_ID
}
disk_fill() {
  ev begin id=$FAULT_ID kind=disk_fill
  "$SOAK" load --nodes "$NODES" --base "$BASE" --admin-token "$ADMIN_TOKEN" --fill 30 \
    --tag "fill-$FAULT_ID" --log "$WORK/fill-$FAULT_ID.jsonl" --seed $((SEED + FAULT_ID)) \
    >>"$WORK/fill.log" 2>&1
  ev end id=$FAULT_ID
}

ev start nodes=$N duration="$DURATION" rate="$RATE" seed="$SEED" ttl_s=$TTL
proc_snapshot start
"$SOAK" load --nodes "$NODES" --base "$BASE" --admin-token "$ADMIN_TOKEN" --rate "$RATE" \
  --duration "$DURATION" --seed "$SEED" --log "$WORK/load.jsonl" >"$WORK/load.log" 2>&1 &
LOAD_PID=$!
CHILDREN+=($!)
T_END=$(($(date +%s) + DURATION))
log "load: $RATE req/s for $DURATION s"

# The adapter whose origin copy changes: a new version every 30 s, for the whole load.
(
  while sleep 30 && [ "$(date +%s)" -lt "$T_END" ]; do
    curl -sf -X POST "$CONTROL/change/soak/changing" >/dev/null && ev change adapter=soak/changing
  done
) &
CHILDREN+=($!)

# RSS and fds every 10 s, to tell a leak from a high-water mark.
(
  while sleep 10 && [ "$(date +%s)" -lt "$T_END" ]; do proc_snapshot sample || true; done
) &
CHILDREN+=($!)

read -r -a SCHEDULE <<<"${FAULTS:-node_kill origin_5xx vllm_restart disk_fill origin_stall node_kill origin_reset vllm_restart}"
[ "${SCHEDULE[0]:-none}" = none ] && SCHEDULE=()
k=0
[ "${#SCHEDULE[@]}" -gt 0 ] && sleep "$QUIET"
# A fault starts only if it (about 20 s) and a quiet spell fit before the load ends.
while [ "${#SCHEDULE[@]}" -gt 0 ] && [ $(($(date +%s) + 20 + QUIET)) -lt "$T_END" ]; do
  fault=${SCHEDULE[k % ${#SCHEDULE[@]}]}
  log "fault $FAULT_ID: $fault"
  case $fault in
    origin_5xx) origin_fault 5xx ;;
    origin_stall) origin_fault stall ;;
    origin_reset) origin_fault reset ;;
    *) "$fault" ;;
  esac
  FAULT_ID=$((FAULT_ID + 1))
  k=$((k + 1))
  sleep "$QUIET"
done

wait "$LOAD_PID" || true
ev load_end
tail -n 1 "$WORK/load.log"
proc_snapshot end
log "report (waits until every node is idle)"
status=0
"$SOAK" report --work "$WORK" --nodes "$NODES" --admin-token "$ADMIN_TOKEN" \
  --out "$REPO/target/soak/REPORT.md" || status=$?
cp "$REPO/target/soak/REPORT.md" "$WORK/REPORT.md"
log "logs in $WORK"
exit "$status"
