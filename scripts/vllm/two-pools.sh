# shellcheck shell=bash
# The two-pool part of scripts/e2e-vllm.sh (sourced by it, not run): two real vLLMs serving two
# different tiny base models behind one loraplex (`vllm_urls: [A, B]`, issue 14).
#
#   base A  $WORK/tiny/base     (the first part's vLLM; 2 layers, hidden 256)
#   base B  $WORK/tiny/model-b  (a second vLLM, --served-model-name tiny-b; 3 layers, hidden 128,
#                               so an adapter of one base cannot load on the other)
#   base C  $WORK/tiny/model-c  (served by no vLLM; A's shape, so its adapters WOULD load on A
#                               and answer wrongly without a word: loraplex must refuse them)
#
# Adapters, all fetched through loraplex: acme/alpha-lora (A, Hub), acme/beta-lora (B, Hub),
# acme/beta-s3-lora (B, S3), acme/gamma-lora (C, Hub). The first part's loraplex is stopped and
# a new one started on the same storage dir (both vLLMs' resolvers read it) with both backends.
#
# Uses the first part's helpers and variables (record, gen, complete, json_get, load_direct,
# on_disk, start, start_vllm, wait_http, stop_one; WORK, CACHE, HUB, S3, VLLM, BASE, SERVED).
# Called in three steps: pools_models (with the other models), pools_origins (before the
# stand-ins start: the Hub reads its repos once), pools_checks (after the first part).

SERVED_B=tiny-b

pools_models() {
  BASE_B=$WORK/tiny/model-b
  BASE_C=$WORK/tiny/model-c
  make_models "$WORK/tiny" acme/alpha-lora
  make_models "$WORK/tiny" --base model-b --seed 1 --hidden 128 --layers 3 acme/beta-lora acme/beta-s3-lora
  make_models "$WORK/tiny" --base model-c --seed 2 acme/gamma-lora
}

pools_origins() {
  cp -r "$ADAPTERS/acme/alpha-lora" "$ADAPTERS/acme/beta-lora" "$ADAPTERS/acme/gamma-lora" "$WORK/hub/acme/"
  cp -r "$ADAPTERS/acme/beta-s3-lora" "$WORK/s3/loras/adapters/acme/"
}

# Finished requests a vLLM has counted (all models, all reasons).
vllm_requests() {
  curl -s "$1/metrics" | awk '/^vllm:request_success_total[{ ]/ { s += $NF } END { printf "%d\n", s }'
}

# Model ids vLLM $1 lists, space-separated with a space at both ends.
vllm_models() {
  curl -s "$1/v1/models" >"$WORK/models.json"
  echo " $(json_get "$WORK/models.json" '" ".join(m["id"] for m in d["data"])' 2>/dev/null) "
}

# names_in TEXT NAME...: TEXT holds one of the NAMEs as a whole word (not as the prefix of a
# longer name: $WORK/tiny/base must not match $WORK/tiny/base-x).
names_in() {
  "$PY" -c 'import re, sys
sys.exit(not any(re.search(re.escape(n) + r"(?![\w/-]|\.\w)", sys.argv[1]) for n in sys.argv[2:]))' "$@"
}

# via_lp MODEL RIGHT_VLLM OTHER_VLLM: a greedy completion through loraplex; sets OUT (as gen
# prints it) and HITS ("right+N other+M": requests each vLLM finished meanwhile).
via_lp() {
  local r0 o0 r=0 o=0
  r0=$(vllm_requests "$2") o0=$(vllm_requests "$3")
  OUT=$(gen "$LP" "$1")
  # vLLM counts a request when its output is processed, just before or after it answers.
  for _ in $(seq 20); do
    r=$(($(vllm_requests "$2") - r0)) o=$(($(vllm_requests "$3") - o0))
    [ $((r + o)) -ge 1 ] && break
    [[ "$OUT" == ERROR* ]] && break
    sleep 0.25
  done
  HITS="right+$r other+$o"
}

# The phase: vLLM B, loraplex over both, checks j-n.
pools_checks() {
  local name_a=${SERVED:-$BASE}
  log "two pools: starting a second vLLM for $BASE_B as $SERVED_B (log: $WORK/vllm-b.log)"
  VLLM_B_PORT=$(free_port)
  VLLM_B=http://127.0.0.1:$VLLM_B_PORT
  local t0
  t0=$(date +%s)
  start_vllm vllm-b "$BASE_B" "$CACHE" "$VLLM_B_PORT" --served-model-name "$SERVED_B"
  VLLM_B_PID=${PIDS[-1]}
  wait_http "$VLLM_B/health" 360 "$VLLM_B_PID" || { tail -n 30 "$WORK/vllm-b.log"; exit 1; }
  VLLM_B_SECS=$(($(date +%s) - t0))
  log "second vLLM healthy after ${VLLM_B_SECS}s"

  # Direct outputs first (each vLLM loads its own adapters by path, under names of its own).
  load_direct direct-alpha "$ADAPTERS/acme/alpha-lora"
  load_direct direct-beta "$ADAPTERS/acme/beta-lora" "$VLLM_B"
  load_direct direct-beta-s3 "$ADAPTERS/acme/beta-s3-lora" "$VLLM_B"
  local d_a d_b d_alpha d_beta d_beta_s3
  d_a=$(gen "$VLLM" "$name_a")
  d_b=$(gen "$VLLM_B" "$SERVED_B")
  d_alpha=$(gen "$VLLM" direct-alpha)
  d_beta=$(gen "$VLLM_B" direct-beta)
  d_beta_s3=$(gen "$VLLM_B" direct-beta-s3)

  # loraplex over both vLLMs, on the first part's storage dir (its adapters stay; pool A).
  log "two pools: restarting loraplex with vllm_urls: [$VLLM, $VLLM_B]"
  stop_one "$LP_PID"
  LP_PORT=$(free_port)
  LP=http://127.0.0.1:$LP_PORT
  cat >"$WORK/loraplex-pools.yaml" <<EOF
listen: 127.0.0.1:$LP_PORT
vllm_urls: [$VLLM, $VLLM_B]
storage:
  dir: $CACHE
origins:
  - type: huggingface
    endpoint: $HUB
  - type: s3
    bucket: loras
    region: us-east-1
    prefix: adapters/
    endpoint: $S3
EOF
  local why=""
  if ! "$REPO/target/release/loraplex" check-config "$WORK/loraplex-pools.yaml" >"$WORK/check-config-pools.txt" 2>&1; then
    why="check-config refused the config: $(grep -m 1 -i error "$WORK/check-config-pools.txt" || tail -n 1 "$WORK/check-config-pools.txt")"
  elif grep -q 'unknown key vllm_urls' "$WORK/check-config-pools.txt"; then
    why="this loraplex does not know vllm_urls (check-config: unknown key vllm_urls)"
  else
    cat "$WORK/check-config-pools.txt"
    start loraplex-pools "$REPO/target/release/loraplex" --config "$WORK/loraplex-pools.yaml"
    LP_PID=${PIDS[-1]}
    wait_http "$LP/readyz" 30 "$LP_PID" || why="loraplex over two vLLMs not ready in 30 s (see loraplex-pools.log)"
  fi
  if [ -n "$why" ]; then
    record "j. pools: base models" FAIL "not run: $why"
    for c in "k. pools: adapters" "l. pools: /v1/models" "m. pools: unknown model" "n. pools: unserved base"; do
      record "$c" FAIL "not run (see j)"
    done
    return 0
  fi
  # Both backends' names learnt (their first /v1/models read): up to 30 s.
  local listed=""
  for _ in $(seq 60); do
    listed=$(vllm_models "$LP")
    [[ "$listed" == *" $name_a "* && "$listed" == *" $SERVED_B "* ]] && break
    sleep 0.5
  done

  # --- i. a base-model request goes to the vLLM serving that name
  local p_a hits_a p_b hits_b
  via_lp "$name_a" "$VLLM" "$VLLM_B"
  p_a=$OUT hits_a=$HITS
  via_lp "$SERVED_B" "$VLLM_B" "$VLLM"
  p_b=$OUT hits_b=$HITS
  echo "   base A: direct $d_a | loraplex $p_a ($hits_a)"
  echo "   base B: direct $d_b | loraplex $p_b ($hits_b)"
  if [[ "$d_a" == ERROR* || "$d_b" == ERROR* ]]; then
    record "j. pools: base models" FAIL "vLLM direct failed: $d_a $d_b"
  elif [ "$d_a" = "$d_b" ]; then
    record "j. pools: base models" FAIL "bases A and B answer alike: the check would mean nothing"
  elif [ "$p_a" = "$d_a" ] && [ "$p_b" = "$d_b" ] && [ "$hits_a" = "right+1 other+0" ] && [ "$hits_b" = "right+1 other+0" ]; then
    record "j. pools: base models" PASS "$name_a and $SERVED_B each answered by its own vLLM (vllm:request_success_total), outputs == direct"
  else
    record "j. pools: base models" FAIL "A: $p_a vs $d_a ($hits_a); B: $p_b vs $d_b ($hits_b)"
  fi

  # --- j. each base's adapters, cold from the Hub and S3, on the vLLM of that base only
  local bad=() outs=("$d_a" "$d_b") a right other direct
  for a in acme/alpha-lora acme/beta-lora acme/beta-s3-lora; do
    case $a in
      acme/alpha-lora) right=$VLLM other=$VLLM_B direct=$d_alpha ;;
      acme/beta-lora) right=$VLLM_B other=$VLLM direct=$d_beta ;;
      *) right=$VLLM_B other=$VLLM direct=$d_beta_s3 ;;
    esac
    outs+=("$direct")
    on_disk "$a" && bad+=("$a on disk before any request")
    via_lp "$a" "$right" "$other"
    echo "   $a: direct $direct | loraplex $OUT ($HITS)"
    [[ "$direct" != ERROR* ]] || bad+=("$a: vLLM direct failed: $direct")
    [ "$OUT" = "$direct" ] || bad+=("$a: $OUT vs direct $direct")
    [ "$HITS" = "right+1 other+0" ] || bad+=("$a: $HITS")
    [[ "$(vllm_models "$right")" == *" $a "* ]] || bad+=("$a not in its vLLM's /v1/models")
    [[ "$(vllm_models "$other")" != *" $a "* ]] || bad+=("$a in the other vLLM's /v1/models")
    on_disk "$a" || bad+=("$a not in storage.dir")
  done
  local distinct
  distinct=$(printf '%s\n' "${outs[@]}" | sort -u | wc -l)
  [ "$distinct" -eq 5 ] || bad+=("bases and adapters not all different ($distinct distinct of 5)")
  if [ "${#bad[@]}" -eq 0 ]; then
    record "k. pools: adapters" PASS "alpha (A, Hub), beta (B, Hub), beta-s3 (B, S3): cold, each on its base's vLLM only, outputs == direct"
  else
    record "k. pools: adapters" FAIL "$(printf '%s; ' "${bad[@]}")"
  fi

  # --- k. /v1/models: every base model and the adapters on disk, each with its base as parent
  curl -s "$LP/v1/models" >"$WORK/models-pools.json"
  local problems
  problems=$("$PY" - "$WORK/models-pools.json" "$name_a $BASE" "$SERVED_B $BASE_B" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ids = {m["id"]: m for m in d.get("data", [])}
a, b = sys.argv[2].split(), sys.argv[3].split()
out = []
for names in (a, b):
    if names[0] not in ids:
        out.append(f"base {names[0]} missing")
for adapter, names in (("acme/alpha-lora", a), ("acme/beta-lora", b), ("acme/beta-s3-lora", b)):
    if adapter not in ids:
        out.append(f"{adapter} missing")
    elif ids[adapter].get("parent") not in names:
        out.append(f"{adapter} parent {ids[adapter].get('parent')!r}, not one of {names}")
print("; ".join(out))
PY
) || problems="unparsable: $(head -c 300 "$WORK/models-pools.json")"
  if [ -z "$problems" ]; then
    record "l. pools: /v1/models" PASS "lists $name_a and $SERVED_B, alpha with parent A, beta and beta-s3 with parent B"
  else
    record "l. pools: /v1/models" FAIL "$problems"
  fi

  # --- l. a model no backend serves (and no origin has): 404 in vLLM's shape, naming it
  local status vstatus shape mine theirs msg
  status=$(complete "$LP" tiny-c)
  cp "$WORK/last.json" "$WORK/404-pools.json"
  vstatus=$(complete "$VLLM_B" tiny-c)
  shape='(sorted(d["error"]), d["error"]["type"], d["error"]["code"], d["error"]["param"])'
  mine=$(json_get "$WORK/404-pools.json" "$shape" 2>/dev/null || echo "not JSON")
  theirs=$(json_get "$WORK/last.json" "$shape" 2>/dev/null || echo "not JSON")
  msg=$(json_get "$WORK/404-pools.json" 'd["error"]["message"]' 2>/dev/null || true)
  if [ "$status" = 404 ] && [ "$mine" = "$theirs" ] && [[ "$msg" == *tiny-c* ]]; then
    record "m. pools: unknown model" PASS "404 $mine like vLLM's own: \"$msg\""
  else
    record "m. pools: unknown model" FAIL "loraplex $status $mine \"$msg\"; vLLM $vstatus $theirs"
  fi

  # --- m. an adapter whose base no backend serves: 400 naming the base it needs and the served
  # ones; never on a vLLM (it would load on A and answer wrongly), its weights not stored.
  status=$(complete "$LP" acme/gamma-lora)
  cp "$WORK/last.json" "$WORK/400-pools.json"
  msg=$(json_get "$WORK/400-pools.json" 'd["error"]["message"]' 2>/dev/null || true)
  local kind
  kind=$(json_get "$WORK/400-pools.json" '(d["error"]["type"], d["error"]["code"])' 2>/dev/null || echo "not JSON")
  bad=()
  [ "$status" = 400 ] || bad+=("status $status")
  [ "$kind" = "('BadRequestError', 400)" ] || bad+=("error $kind")
  names_in "$msg" "$BASE_C" || bad+=("message does not name $BASE_C")
  names_in "$msg" "$name_a" "$BASE" || bad+=("message does not name base A")
  names_in "$msg" "$SERVED_B" "$BASE_B" || bad+=("message does not name base B")
  [[ "$(vllm_models "$VLLM")" != *" acme/gamma-lora "* ]] || bad+=("on vLLM A")
  [[ "$(vllm_models "$VLLM_B")" != *" acme/gamma-lora "* ]] || bad+=("on vLLM B")
  [ ! -e "$CACHE/acme/gamma-lora/adapter_model.safetensors" ] || bad+=("weights stored in storage.dir")
  if [ "${#bad[@]}" -eq 0 ]; then
    record "n. pools: unserved base" PASS "400 BadRequestError: \"$msg\"; on no vLLM, weights not stored"
  else
    record "n. pools: unserved base" FAIL "$(printf '%s; ' "${bad[@]}")body $(head -c 300 "$WORK/400-pools.json")"
  fi
}
