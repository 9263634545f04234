#!/usr/bin/env bash
# Origin throughput benchmark: a 1 GiB adapter through the Hugging Face stand-in and S3
# (s3s-fs) from loopback, into a sink, against curl on the same bytes; SHA-256 on vs off.
#
#   scripts/bench-origins.sh [repeats=5] [MiB=1024] [paced link MB/s=500]
#
# The Hub rows run twice: unpaced (loopback, faster than SHA-256 on one core) and through a
# CDN paced to a link speed a node really gets.
#
# Release build. The machine is shared: the script waits (up to 10 min) for the 1-minute load
# average to drop below MAX_LOAD (default 1.5) and prints the load before and after, so a
# noisy run can be told apart. Figures are medians of the repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats="${1:-5}"
mib="${2:-1024}"
link_mbps="${3:-500}"
max_load="${MAX_LOAD:-1.5}"

command -v curl >/dev/null || { echo "curl is required" >&2; exit 1; }
cargo bench --bench origins --no-run >/dev/null 2>&1 || cargo bench --bench origins --no-run

load() { cut -d' ' -f1 /proc/loadavg; }
for _ in $(seq 60); do
  awk -v l="$(load)" -v m="$max_load" 'BEGIN { exit !(l < m) }' && break
  sleep 10
done
echo "load before: $(cat /proc/loadavg)"
cargo bench --bench origins -- "$repeats" "$mib" "$link_mbps" 2>/dev/null
echo "load after:  $(cat /proc/loadavg)"
