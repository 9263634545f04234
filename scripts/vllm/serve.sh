#!/usr/bin/env bash
# Runs a real vLLM (CPU build, from scripts/vllm-cpu-setup.sh) on a base model, with its
# filesystem LoRA resolver reading adapters from CACHE_DIR, the directory loraplex fills.
#
#   scripts/vllm/serve.sh VENV MODEL_DIR CACHE_DIR PORT [VLLM_ARG ...]
#
# Extra arguments go to `vllm serve`, e.g. `--served-model-name tiny`. The resolver compares an
# adapter's base_model_name_or_path with MODEL_DIR as given, so pass the same string the
# adapters name (make_tiny_model.py writes absolute paths). Ready when GET /health answers 200:
# 40 s to 3 minutes on 2 cores. Binds 127.0.0.1 only.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,10s/^# \{0,1\}//p' "$0" >&2; exit 2; }
VENV=$1 MODEL=$2 CACHE=$3 PORT=$4
shift 4
mkdir -p "$CACHE"

# The CPU platform (the wheel is the CPU build, but vLLM looks for CUDA first).
export VLLM_TARGET_DEVICE=cpu
# KV cache size in GiB: the default takes a share of RAM that a shared machine cannot spare.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# Everything is local; never ask the Hub.
export HF_HUB_OFFLINE=1
# Runtime adapters: the resolver plugin runs only with runtime LoRA updating allowed, and
# /v1/load_lora_adapter and /v1/unload_lora_adapter exist only then.
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=true
export VLLM_PLUGINS=lora_filesystem_resolver
export VLLM_LORA_RESOLVER_CACHE_DIR=$CACHE
# No usage report to vLLM's servers (there is no network beyond the package registries).
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

# --max-loras 4: enough for the e2e's adapters at once; --max-lora-rank 16 covers rank 8;
# a short --max-model-len keeps the KV cache small.
exec "$VENV/bin/vllm" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --enable-lora \
  --max-loras 4 --max-lora-rank 16 --max-model-len 256 --dtype bfloat16 "$@"
