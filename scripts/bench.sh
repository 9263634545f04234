#!/usr/bin/env bash
# Every benchmark, one report: proxy vs nginx, the forward hop, cold fetch vs curl+fsync and
# fio, origins (Hub stand-in, S3) vs curl, and the criterion benches (codec, placement, index),
# plus the eviction policy's miss-ratio table. Writes target/bench/REPORT.md and
# target/bench/chart.png (req/s and p50/p99 latency, loraplex next to nginx).
#
#   usage: scripts/bench.sh [--quick]      (--quick: fewer, shorter rounds; 13 min without it here)
#
# The machine should be otherwise idle: every figure is relative to nginx/curl/fio measured in
# the same run, on the same machine, but absolute numbers move with load.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
OUT=target/bench
trap 'rm -rf "$WORK"' EXIT
need gnuplot gnuplot-nox
need python3 python3

if [ "${1:-}" = "--quick" ]; then
  PROXY=(3 5) FORWARD=(2 5) FETCH=(512 2) ORIGINS=(2 512)
else
  PROXY=(5 10) FORWARD=(3 8) FETCH=(1024 3) ORIGINS=(3 1024)
fi

step() { echo; echo "== $*" >&2; }
step "proxy vs nginx";  scripts/bench-proxy.sh "${PROXY[@]}" > "$OUT/proxy.out"
step "forward hop";     scripts/bench-forward.sh "${FORWARD[@]}" > "$OUT/forward.out"
step "cold fetch";      scripts/bench-fetch.sh "${FETCH[@]}" > "$OUT/fetch.out"
step "origins";         MAX_LOAD=100 scripts/bench-origins.sh "${ORIGINS[@]}" > "$OUT/origins.md"
step "criterion: codec, placement, index"
for b in codec placement index; do
  cargo bench -q --bench "$b" > "$OUT/criterion-$b.txt" 2>&1
done
step "eviction policy"; cargo bench -q --bench eviction > "$OUT/eviction.txt" 2>/dev/null

# Criterion's estimates, one row per benchmark.
python3 - "$OUT/criterion.md" <<'PY'
import json, pathlib, sys
rows = []
for est in sorted(pathlib.Path("target/criterion").glob("**/new/estimates.json")):
    bench = json.loads((est.parent / "benchmark.json").read_text())
    e = json.loads(est.read_text())
    mean = e["mean"]["point_estimate"]
    lo, hi = e["mean"]["confidence_interval"]["lower_bound"], e["mean"]["confidence_interval"]["upper_bound"]
    unit = lambda ns: f"{ns:.1f} ns" if ns < 1e3 else f"{ns/1e3:.2f} µs" if ns < 1e6 else f"{ns/1e6:.2f} ms"
    rows.append(f"| {bench['full_id']} | {unit(mean)} | {unit(lo)} .. {unit(hi)} |")
with open(sys.argv[1], "w") as f:
    f.write("| criterion benchmark | mean | 95% CI |\n|---|---:|---:|\n" + "\n".join(rows) + "\n")
PY

# The chart: req/s and latency percentiles, loraplex next to nginx.
{
  tail -n +2 "$OUT/proxy.csv" | awk -F, '{print "proxy:" $1, $2, $3, $4}'
  tail -n +2 "$OUT/forward.csv" | awk -F, '{print "hop:" $1, $2, $3, $4}'
} > "$WORK/chart.dat"
gnuplot <<GP
set terminal pngcairo size 1200,500 font "sans,10"
set output "$OUT/chart.png"
set multiplot layout 1,2 title "loraplex next to nginx ($(nproc) cores, wrk -t1 -c64, medians)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set xtics rotate by -30
set grid ytics
set yrange [0:*]
set key top right
set title "throughput (req/s, higher is better)"
plot "$WORK/chart.dat" using 2:xtic(1) title "req/s" lc rgb "#3a7bd5"
set title "latency (ms, lower is better)"
plot "$WORK/chart.dat" using 3:xtic(1) title "p50" lc rgb "#2ca02c", "" using 4 title "p99" lc rgb "#d62728"
unset multiplot
GP

{
  echo "# loraplex benchmark report"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) with \`scripts/bench.sh ${1:-}\` on $(machine)."
  echo
  echo "![chart](chart.png)"
  for part in proxy forward fetch; do echo; cat "$OUT/$part.md"; done
  echo; echo '```'; cat "$OUT/origins.md"; echo '```'
  echo; cat "$OUT/criterion.md"
  echo; echo '```'; grep -E '^(placement|  peers)' "$OUT/criterion-placement.txt"; echo '```'
  echo; echo '```'; grep -E '^(index|case|[0-9])' "$OUT/criterion-index.txt"; echo '```'
  echo; echo '```'; cat "$OUT/eviction.txt"; echo '```'
} > "$OUT/REPORT.md"
echo "report: $OUT/REPORT.md, chart: $OUT/chart.png" >&2
