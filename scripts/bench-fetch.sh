#!/usr/bin/env bash
# Cold fetch of a large adapter through loraplex, against `curl -o` + fsync of the same file and
# against the disk's own limit (fio, 1 MiB O_DIRECT sequential writes).
#
#   usage: scripts/bench-fetch.sh [SIZE_MIB] [ROUNDS]     (defaults: 1024 MiB, 3 rounds)
#   output: a markdown table on stdout, and target/bench/fetch.{md,csv}
#
# The origin is nginx serving the adapter from the page cache (so the network side is not the
# bottleneck for either contender), a plain HTTP origin: it publishes no checksum, so this fetch
# hashes nothing (the Hub and S3 origins verify SHA-256: scripts/bench-origins.sh). "vLLM" is
# nginx answering 200, so the time to the first response byte of the cold request is the
# fetch + checks + publish time. Each round runs loraplex, curl and fio in a rotated order.
# The storage directory is under target/ on the machine's real disk.
set -euo pipefail
SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
STORE=$ROOT/target/bench-fetch-store
need nginx nginx
need fio fio
need curl curl

ORIGIN_PORT=18600 VLLM_PORT=18601 LP_PORT=18602
cleanup() {
  stop_nginx
  [ -n "${LP_PID:-}" ] && kill "$LP_PID" 2>/dev/null
  rm -rf "$WORK" "$STORE"
}
trap cleanup EXIT

# A valid safetensors file: 8-byte header length, JSON header padded to 8, one U8 tensor.
ADIR=$WORK/origin/bench/big-lora
mkdir -p "$ADIR"
BYTES=$((SIZE_MIB * 1024 * 1024))
python3 - "$ADIR" "$BYTES" <<'EOF'
import json, os, struct, sys
d, n = sys.argv[1], int(sys.argv[2])
hdr = json.dumps({"lora.weight": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
hdr += b" " * (-len(hdr) % 8)
with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(hdr)) + hdr)
    chunk = os.urandom(1 << 20)
    for _ in range(n >> 20):
        f.write(chunk)
json.dump({"peft_type": "LORA", "base_model_name_or_path": "base-model", "r": 8,
           "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
          open(os.path.join(d, "adapter_config.json"), "w"))
EOF
FILE=$ADIR/adapter_model.safetensors
FILE_BYTES=$(stat -c %s "$FILE")

cat > "$WORK/origin.conf" <<EOF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/origin.err;
events { worker_connections 1024; }
http {
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path $WORK;
  server { listen 127.0.0.1:$ORIGIN_PORT; root $WORK/origin; }
}
EOF
echo "building loraplex (release)..." >&2
cargo build --release -q
MACHINE=$(machine)
nginx -c "$WORK/origin.conf"
start_fake_vllm vllm "$VLLM_PORT"
cat "$FILE" > /dev/null # into the page cache: the origin serves from memory
mkdir -p "$STORE"
cat > "$WORK/lp.yaml" <<EOF
listen: "127.0.0.1:$LP_PORT"
vllm_url: "http://127.0.0.1:$VLLM_PORT"
vllm: { model_name: "base-model" }
storage: { dir: "$STORE", max_size: "$((SIZE_MIB * 3))MB" }
origins: [ { type: http, base_url: "http://127.0.0.1:$ORIGIN_PORT" } ]
server: { workers: 2 }
EOF
RUST_LOG=warn "$ROOT/target/release/loraplex" --config "$WORK/lp.yaml" >"$WORK/lp.log" 2>&1 &
LP_PID=$!
wait_healthz "127.0.0.1:$LP_PORT"
RSS0=$(awk '/VmRSS/ {print $2}' "/proc/$LP_PID/status")

mbps() { awk -v b="$FILE_BYTES" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
# CPU seconds (user + system, all threads) loraplex has used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$LP_PID/stat"; }
: > "$WORK/runs"
# The three contenders of a round, as functions; each round runs them in a rotated order
# (loraplex first, then curl first, then fio first, ...), so none always runs on a disk the
# others have just written to (or just left idle).
fetch_loraplex() {
  local cpu0 t
  cat "$FILE" > /dev/null # the origin serves from memory
  cpu0=$(cpu_s)
  t=$(curl -s -o /dev/null -w '%{time_starttransfer}' -X POST "127.0.0.1:$LP_PORT/v1/chat/completions" \
        -H 'content-type: application/json' -d '{"model":"bench/big-lora","messages":[]}')
  test -f "$STORE/bench/big-lora/adapter_model.safetensors" || { echo "fetch failed: $(tail -5 "$WORK/lp.log")" >&2; exit 1; }
  T_LP=$t
  echo "loraplex $t" >> "$WORK/runs"
  echo "cpu $(awk -v a="$cpu0" -v b="$(cpu_s)" 'BEGIN { printf "%.2f", b - a }')" >> "$WORK/runs"
  curl -sf -X POST "127.0.0.1:$LP_PORT/admin/cache/evict" -d '{"adapter":"bench/big-lora"}' >/dev/null
  sync
}
fetch_curl() {
  local t
  cat "$FILE" > /dev/null
  t=$( { /usr/bin/time -f %e sh -c "curl -s -o '$STORE/curl.out' http://127.0.0.1:$ORIGIN_PORT/bench/big-lora/adapter_model.safetensors && sync '$STORE/curl.out'"; } 2>&1 )
  echo "curl $t" >> "$WORK/runs"
  rm -f "$STORE/curl.out"
  sync
}
fetch_fio() {
  FIO=$(fio --name=w --filename="$STORE/fio.dat" --rw=write --bs=1M --size="${SIZE_MIB}M" --direct=1 \
        --ioengine=io_uring --iodepth=4 --end_fsync=1 --output-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6)')
  rm -f "$STORE/fio.dat"
  echo "fio_mbps $FIO" >> "$WORK/runs"
}
CONTENDERS=(loraplex curl fio)
for r in $(seq "$ROUNDS"); do
  sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true
  k=$(( (r - 1) % 3 ))
  order="${CONTENDERS[*]:k} ${CONTENDERS[*]:0:k}"
  for c in $order; do "fetch_$c"; done
  # The disk's speed swings by 2x between minutes here, so each round's fetch is also set
  # against the fio run of the same round.
  echo "ratio $(awk -v b="$FILE_BYTES" -v t="$T_LP" -v f="$FIO" 'BEGIN { printf "%.2f", b / t / 1e6 / f }')" >> "$WORK/runs"
  echo "round $r/$ROUNDS ($order): $(tail -5 "$WORK/runs" | tr '\n' ' ')" >&2
done
HWM=$(awk '/VmHWM/ {print $2}' "/proc/$LP_PID/status")

L=$(awk '$1=="loraplex" {print $2}' "$WORK/runs" | median)
C=$(awk '$1=="curl" {print $2}' "$WORK/runs" | median)
F=$(awk '$1=="fio_mbps" {print $2}' "$WORK/runs" | median)
CPU=$(awk '$1=="cpu" {print $2}' "$WORK/runs" | median)
RATIO=$(awk '$1=="ratio" {print $2}' "$WORK/runs" | median)
RATIOS=$(awk '$1=="ratio" {print $2}' "$WORK/runs" | tr '\n' ' ')
LM=$(mbps "$L"); CM=$(mbps "$C")
{
  echo "| ${SIZE_MIB} MiB adapter, cold (median of $ROUNDS) | seconds | MB/s |"
  echo "|---|---:|---:|"
  echo "| loraplex: time to first response byte (fetch, safetensors header and size checks, O_DIRECT write, fsync, publish; no hash) | $L | $LM |"
  echo "| curl -o + fsync of the same file | $C | $CM |"
  echo "| fio, 1 MiB O_DIRECT writes, io_uring, end fsync (disk limit) | | $(printf %.0f "$F") |"
  echo
  echo "loraplex vs curl+fsync: **$(awk -v a="$C" -v b="$L" 'BEGIN{printf "%.2f", a/b}')x** faster;" \
       "vs fio bandwidth: **$(awk -v a="$LM" -v b="$F" 'BEGIN{printf "%.2f", a/b}')x** of the medians," \
       "**${RATIO}x** as the median of the per-round ratios (${RATIOS% });" \
       "loraplex CPU per fetch: ${CPU} s (user + system, all threads);" \
       "RSS growth during the fetch: $(( (HWM - RSS0) / 1024 )) MiB (peak $((HWM / 1024)) MiB)."
  echo "The HTTP origin publishes no checksum, so this fetch hashes nothing; the Hugging Face and S3 origins verify SHA-256 (scripts/bench-origins.sh measures what that costs)."
  echo "Machine: $MACHINE, after: $(cut -d' ' -f1-3 /proc/loadavg); storage: $(df -T "$STORE" | awk 'NR==2 {print $1 " (" $2 ")"}')."
} | tee "$OUT/fetch.md"
{
  echo "name,seconds,mbps"
  echo "loraplex,$L,$LM"
  echo "curl+fsync,$C,$CM"
  echo "fio,,$F"
} > "$OUT/fetch.csv"
