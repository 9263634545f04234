#!/usr/bin/env bash
# Copies deploy/ into the Kubernetes example, which kustomize cannot read from outside
# examples/k8s: the Grafana dashboard as it is, and the Prometheus rules wrapped in a
# PrometheusRule. Run after editing deploy/grafana/loraplex.json or
# deploy/prometheus/loraplex.rules.yml; tests/k8s_example.rs fails while the copies differ.
#
#   usage: scripts/sync-k8s-monitoring.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=examples/k8s/monitoring

cp deploy/grafana/loraplex.json "$out/loraplex.json"
{
  cat <<'HEAD'
# Generated from deploy/prometheus/loraplex.rules.yml by scripts/sync-k8s-monitoring.sh: edit that
# file and run the script. The rules expect the scrape job `loraplex` (podmonitor.yaml sets it).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: loraplex
spec:
HEAD
  # The rules file's header comment dropped, everything else indented under `spec:`.
  sed -e '/^#/d' -e 's/^./  &/' deploy/prometheus/loraplex.rules.yml
} >"$out/prometheusrule.yaml"
