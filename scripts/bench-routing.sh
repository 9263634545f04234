#!/usr/bin/env bash
# The benchmark that decides the routing (issue 11): four loraplex nodes (`server.workers: 1`),
# each in front of a stand-in vLLM that models the engine (a batch of 32, 16 LoRA slots LRU, a
# 150 ms engine stall per adapter entering a slot, 200 ms prefill, 200 ms per output token, 15
# tokens on average), one
# seeded open-loop trace (1,000 adapters with Zipf popularity s=1.1, one flash-crowd adapter at
# 50% of the traffic for 30 s, Poisson arrivals) replayed against:
#   (a) round-robin: a plain load balancer over four nodes that don't route (each alone),
#   (b) hash: round 1's routing (`routing.policy: hash`),
#   (c) least-load: the least loaded node by vLLM's queue, ignoring residency,
#   (d) auto: the new routing.
# The load generator enters the nodes in turn in every case.
#
#   usage: scripts/bench-routing.sh [SECS] [RATE]       (defaults: 90 s at 20 requests/s)
#   ONLY="b d" scripts/bench-routing.sh ...: rerun only some policies (the others' last results
#   stay in the table)
#   output: a markdown table on stdout and in target/bench/routing.md, the raw results in
#   target/bench/routing-*.json, and the plot docs/bench-routing.png
#
# Everything runs on this machine: the CPU columns show how busy it was (a run whose CPU was
# saturated measures the machine, not the routing; rerun it when the machine is quieter).
set -euo pipefail
SECS=${1:-90}
RATE=${2:-20}
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
for tool in curl python3; do need "$tool" "$tool"; done

VPORT=18600 OPORT=18610 LPORT=18620
NODES=(127.0.0.1:$LPORT 127.0.0.2:$LPORT 127.0.0.3:$LPORT 127.0.0.4:$LPORT)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "building loraplex and the load generator (release)..." >&2
cargo build --release -q --bin loraplex --example routing_load
MACHINE=$(machine)
LOAD="$ROOT/target/release/examples/routing_load"

# run LABEL POLICY CLUSTERED: one pass of the trace.
run() {
  local label=$1 policy=$2 clustered=$3 dir="$WORK/$1"
  mkdir -p "$dir"
  local stores=() vports=()
  for i in 0 1 2 3; do stores+=("$dir/store$i"); vports+=($((VPORT + i))); done
  "$LOAD" --label "$label" --out "$OUT/routing-$label.json" --secs "$SECS" --rate "$RATE" \
    --vllm-ports "$(IFS=,; echo "${vports[*]}")" --stores "$(IFS=,; echo "${stores[*]}")" \
    --origin-port "$OPORT" --nodes "$(IFS=,; echo "${NODES[*]}")" --clustered "$clustered" \
    --pids-file "$dir/pids" > "$dir/load.out" 2> "$dir/load.err" &
  local load_pid=$!
  PIDS+=("$load_pid")
  for _ in $(seq 300); do grep -q '^ready ' "$dir/load.out" 2>/dev/null && break; sleep 0.1; done
  local origin
  origin=$(awk '/^ready / {print $2}' "$dir/load.out")
  [ -n "$origin" ] || { echo "$label: the load generator did not start" >&2; cat "$dir/load.err" >&2; exit 1; }
  local node_pids=()
  for i in 0 1 2 3; do
    local peers
    if [ "$clustered" = true ]; then
      peers=$(printf '"%s",' "${NODES[@]}"); peers="[${peers%,}]"
    else
      peers="[\"${NODES[$i]}\"]"
    fi
    cat > "$dir/node$i.yaml" <<CONF
listen: "${NODES[$i]}"
vllm_url: "http://127.0.0.1:$((VPORT + i))"
vllm: { model_name: "bench-base", health_check_interval: 1s, metrics_interval: 1s }
storage: { dir: "${stores[$i]}", max_size: "10GB" }
origins: [ { type: http, base_url: "$origin" } ]
server: { workers: 1 }
routing: { policy: "$policy" }
discovery: { mode: static, static: { peers: $peers } }
CONF
    RUST_LOG=warn "$ROOT/target/release/loraplex" --config "$dir/node$i.yaml" >"$dir/node$i.log" 2>&1 &
    node_pids+=($!)
    PIDS+=($!)
  done
  (IFS=,; echo "${node_pids[*]}") > "$dir/pids"
  if ! wait "$load_pid"; then
    echo "$label: the load generator failed:" >&2
    tail -20 "$dir/load.err" >&2
    for i in 0 1 2 3; do tail -5 "$dir/node$i.log" >&2; done
    exit 1
  fi
  grep -v '^\s*$' "$dir/load.err" | tail -1 >&2
  for p in "${node_pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}

# ONLY=d (or "b d", ...) reruns some of them; the table then reads the others' last results.
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
want a && run a-round-robin auto false
want b && run b-hash hash true
want c && run c-least-load least-load true
want d && run d-auto auto true

python3 - "$OUT" "$SECS" "$RATE" "$MACHINE" <<'PY' | tee "$OUT/routing.md"
import json, sys
out, secs, rate, machine = sys.argv[1:]
rows = [json.load(open(f"{out}/routing-{l}.json")) for l in ("a-round-robin", "b-hash", "c-least-load", "d-auto")]
# The capacity each node learnt of its vLLM (completions per second while requests wait; 0
# for a vLLM that never queued), to set the offered rate against.
cap = lambda r: " / ".join(f"{c:.1f}" for c in r.get("learnt_capacity_rps", [])) or "-"
print(f"| routing ({secs} s at {rate} req/s, 4 nodes) | req/s | TTFB p50 ms | TTFB p99 ms | errors | slot loads / 1k req | disk copies / adapter | forwards / req | CPU busy avg / max % | s at >= 95% CPU | loraplex CPU ms / req | learnt capacity per node, req/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['label']} | {r['throughput']:.1f} | {r['ttfb_p50_ms']:.0f} | {r['ttfb_p99_ms']:.0f} | {r['errors']} | {r['slot_loads_per_1k']:.0f} | {r['copies_per_adapter']:.2f} | {r['forwards_per_request']:.2f} | {r['cpu_busy_avg_pct']:.0f} / {r['cpu_busy_max_pct']:.0f} | {r['cpu_saturated_secs']} | {r['loraplex_cpu_ms_per_request']:.2f} | {cap(r)} |")
best = min(r["ttfb_p99_ms"] for r in rows[:3])
d = rows[3]
print()
print(f"auto p99 / best of (a)-(c): {d['ttfb_p99_ms'] / best:.2f} (goal <= 0.5); slot loads auto / hash: "
      f"{d['slot_loads_per_1k'] / max(rows[1]['slot_loads_per_1k'], 1e-9):.2f} (goal <= 1); "
      f"disk copies per adapter: {d['copies_per_adapter']:.2f} (goal <= 1.3). auto's decisions: "
      + ", ".join(f"{k} {v:.0f}" for k, v in d["reasons"].items()))
print(f"Machine: {machine}; seconds at >= 95% CPU: "
      + ", ".join(f"{r['label']} {r['cpu_saturated_secs']}" for r in rows))
PY

# The plot: p99 TTFB per second for each policy (the flash crowd shaded), and the totals.
if [ ! -x "$ROOT/target/bench-venv/bin/python" ]; then
  python3 -m venv "$ROOT/target/bench-venv" >&2
  "$ROOT/target/bench-venv/bin/pip" install -q matplotlib >&2
fi
"$ROOT/target/bench-venv/bin/python" - "$OUT" "$ROOT/docs/bench-routing.png" <<'PY'
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, png = sys.argv[1:]
labels = ("a-round-robin", "b-hash", "c-least-load", "d-auto")
rows = [json.load(open(f"{out}/routing-{l}.json")) for l in labels]
fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
for r in rows:
    t = [p["t"] for p in r["timeline"] if p["n"]]
    p99 = [p["p99"] * 1000 for p in r["timeline"] if p["n"]]
    ax.plot(t, p99, label=r["label"], lw=1.4)
ax.axvspan(30, 60, color="orange", alpha=0.12, label="flash crowd")
ax.set_yscale("log"); ax.set_xlabel("seconds"); ax.set_ylabel("TTFB p99 per second (ms, log)")
ax.legend(fontsize=8); ax.grid(alpha=0.3)
names = [r["label"] for r in rows]
x = range(len(rows))
bx.bar([i - 0.2 for i in x], [r["ttfb_p99_ms"] for r in rows], 0.4, label="TTFB p99 (ms)")
bx2 = bx.twinx()
bx2.bar([i + 0.2 for i in x], [r["slot_loads_per_1k"] for r in rows], 0.4, color="tab:red", label="slot loads / 1k")
bx.set_xticks(list(x)); bx.set_xticklabels(names, rotation=20, fontsize=8)
bx.set_ylabel("TTFB p99 (ms)"); bx2.set_ylabel("slot loads per 1,000 requests")
bx.legend(loc="upper left", fontsize=8); bx2.legend(loc="upper right", fontsize=8)
fig.suptitle("loraplex routing: 4 nodes, 1,000 adapters (Zipf 1.1) + a flash crowd, stand-in vLLMs")
fig.tight_layout()
fig.savefig(png, dpi=110)
print(f"plot: {png}", file=sys.stderr)
PY
