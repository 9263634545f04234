#!/usr/bin/env bash
# Installs Debian's `prometheus` package (prometheus and promtool, 2.42 on bookworm) when either is
# missing, for the tests of deploy/prometheus and the scrape test (tests/prometheus.rs). Run by
# .ci/run, and by those tests themselves when the tools are missing.
#
# The package's postinst starts its service through invoke-rc.d (a Prometheus on :9090 reading
# /etc/prometheus). In a container without systemd nothing must be left running, so a
# policy-rc.d that refuses every service start is put in place for the install when the
# machine has none (and removed afterwards); the recommended node exporter is not installed.
#
#   usage: scripts/install-prometheus.sh     (exit 0: both tools on PATH; 1: could not install)
set -euo pipefail

have() { command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; }
have && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-prometheus: promtool/prometheus missing, and not root with apt-get:" \
    "install Debian's prometheus package (or put promtool and prometheus on PATH)" >&2
  exit 1
fi

POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# added by loraplex scripts/install-prometheus.sh for one install\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  trap 'rm -f "$POLICY"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
install() {
  apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends prometheus >/dev/null
}
echo "install-prometheus: installing Debian's prometheus package" >&2
install || { apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null && install; }
have || { echo "install-prometheus: installed, but promtool/prometheus are not on PATH" >&2; exit 1; }
promtool --version 2>&1 | head -n 1 >&2
