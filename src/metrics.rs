//! The `loraplex_*` Prometheus metrics, served at `GET /metrics`.
//!
//! Names and labels of the Go project are kept (`loraplex_requests_total{tenant,cache_tier}`,
//! `loraplex_cache_hits_total{tier}`, ...); new ones are added for fetches, errors and
//! unloads. Every label has a bounded set of values: the tenant label keeps the first
//! [`MAX_TENANTS`] tenants seen and folds the rest into `_other` (the Go original's tenant label
//! was unbounded), peers are bounded by the cluster size, origins by the config.
//!
//! One process-wide [`Metrics`] is shared by every thread; counters are atomics.

use std::{
    collections::HashSet,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU64},
    },
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Distinct tenant label values kept before folding into `_other`.
pub const MAX_TENANTS: usize = 100;

/// How a request was served (the Go project's `cache_tier` values, plus `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Base-model request passed straight to vLLM.
    Passthrough,
    /// Sent on to the owning peer.
    Forwarded,
    /// The adapter was missing and the request went to the base model instead.
    FallbackBase,
    /// The adapter was fetched from an origin for this request.
    Origin,
    /// The adapter was already on local disk.
    Local,
    /// Routed by a header key and served here without an adapter.
    Routed,
    /// Answered with an error by loraplex itself.
    Error,
}

impl Tier {
    pub const ALL: [Tier; 7] = [
        Tier::Passthrough,
        Tier::Forwarded,
        Tier::FallbackBase,
        Tier::Origin,
        Tier::Local,
        Tier::Routed,
        Tier::Error,
    ];

    /// The tier's place in [`Tier::ALL`] (its declaration order).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Passthrough => "passthrough",
            Tier::Forwarded => "forwarded",
            Tier::FallbackBase => "fallback-base",
            Tier::Origin => "origin",
            Tier::Local => "local",
            Tier::Routed => "routed",
            Tier::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub tenant: String,
    pub cache_tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub target_peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    pub origin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginResult {
    pub origin: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginReason {
    pub origin: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Why finished trace spans were dropped (`loraplex_trace_spans_dropped_total{reason}`): the
/// export queue was full (the collector is slower than the spans come), or the export failed
/// (collector down, refused, timed out).
pub const SPANS_QUEUE_FULL: ReasonLabel = ReasonLabel {
    reason: "queue_full",
};
pub const SPANS_EXPORT_FAILED: ReasonLabel = ReasonLabel {
    reason: "export_failed",
};
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    pub key: String,
}

/// One vLLM of the node: `backend` is its URL as configured (`vllm_urls`), `base_model` the
/// first name it serves its base model by (empty until learnt from its `/v1/models`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
    pub base_model: String,
}

/// A gauge of a fractional value.
pub type FloatGauge = Gauge<f64, AtomicU64>;

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latency buckets: the Go project's (Prometheus defaults) plus long generations.
const REQUEST_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const FORWARD_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
const FETCH_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}
fn forward_histogram() -> Histogram {
    Histogram::new(FORWARD_BUCKETS)
}
fn fetch_histogram() -> Histogram {
    Histogram::new(FETCH_BUCKETS)
}

/// Handles on the request metrics of one label set.
#[derive(Clone)]
pub struct RequestHandles {
    count: Counter,
    duration: Histogram,
}

impl RequestHandles {
    pub fn record(&self, seconds: f64) {
        self.count.inc();
        self.duration.observe(seconds);
    }
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    tenants: Mutex<HashSet<String>>,
    // Go-compatible.
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistFamily<RequestLabels>,
    pub peer_forwards: Family<PeerLabel, Counter>,
    pub overflow_local: Counter,
    pub cache_hits: Family<TierLabel, Counter>,
    pub cache_evictions: Family<TierLabel, Counter>,
    pub cache_size_bytes: Family<TierLabel, Gauge>,
    pub cache_items: Family<TierLabel, Gauge>,
    pub peers_active: Gauge,
    pub ring_rebuilds: Counter,
    pub vllm_healthy: Gauge,
    pub forward_duration: Histogram,
    // New in loraplex (Rust).
    pub cache_misses: Family<TierLabel, Counter>,
    /// The disk budget (`storage.max_size`), beside `cache_size_bytes` with the same labels so
    /// that `size / max_size` needs no `ignoring`.
    pub cache_max_size_bytes: Family<TierLabel, Gauge>,
    pub fetches: Family<OriginResult, Counter>,
    pub fetch_bytes: Family<OriginLabel, Counter>,
    pub fetch_failures: Family<OriginReason, Counter>,
    pub fetch_duration: HistFamily<OriginLabel>,
    pub errors: Family<KindLabel, Counter>,
    pub vllm_unloads: Family<ResultLabel, Counter>,
    pub revalidations: Family<ResultLabel, Counter>,
    pub inflight_requests: Gauge<i64, AtomicI64>,
    pub fetches_inflight: Gauge<i64, AtomicI64>,
    pub upstream_connects: Counter<u64, AtomicU64>,
    pub trace_spans_exported: Counter,
    pub trace_spans_dropped: Family<ReasonLabel, Counter>,
    /// New client connections on a `server.tls` listener, by what became of them.
    pub tls_connections: Family<ResultLabel, Counter>,
    pub tls_reloads: Family<ResultLabel, Counter>,
    // Routing by what vLLM holds (issue 11).
    pub route_decisions: Family<ReasonLabel, Counter>,
    pub vllm_requests_running: FloatGauge,
    pub vllm_requests_waiting: FloatGauge,
    pub vllm_kv_cache_usage: FloatGauge,
    pub vllm_lora_slots: Gauge,
    pub vllm_gpu_adapters: Gauge,
    pub vllm_capacity: FloatGauge,
    pub vllm_scrapes: Family<ResultLabel, Counter>,
    pub key_replicas: Family<KeyLabel, Gauge>,
    pub key_request_rate: Family<KeyLabel, FloatGauge>,
    // Several vLLMs per node (issue 14): one series per backend.
    pub backend_healthy: Family<BackendLabel, Gauge>,
    pub backend_requests_running: Family<BackendLabel, FloatGauge>,
    pub backend_requests_waiting: Family<BackendLabel, FloatGauge>,
    pub backend_kv_cache_usage: Family<BackendLabel, FloatGauge>,
    pub backend_unloads: Family<BackendLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("loraplex"),
            tenants: Mutex::new(HashSet::new()),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            peer_forwards: Family::default(),
            overflow_local: Counter::default(),
            cache_hits: Family::default(),
            cache_evictions: Family::default(),
            cache_size_bytes: Family::default(),
            cache_items: Family::default(),
            peers_active: Gauge::default(),
            ring_rebuilds: Counter::default(),
            vllm_healthy: Gauge::default(),
            forward_duration: forward_histogram(),
            cache_misses: Family::default(),
            cache_max_size_bytes: Family::default(),
            fetches: Family::default(),
            fetch_bytes: Family::default(),
            fetch_failures: Family::default(),
            fetch_duration: Family::new_with_constructor(fetch_histogram),
            errors: Family::default(),
            vllm_unloads: Family::default(),
            revalidations: Family::default(),
            inflight_requests: Gauge::default(),
            fetches_inflight: Gauge::default(),
            upstream_connects: Counter::default(),
            trace_spans_exported: Counter::default(),
            trace_spans_dropped: Family::default(),
            tls_connections: Family::default(),
            tls_reloads: Family::default(),
            route_decisions: Family::default(),
            vllm_requests_running: FloatGauge::default(),
            vllm_requests_waiting: FloatGauge::default(),
            vllm_kv_cache_usage: FloatGauge::default(),
            vllm_lora_slots: Gauge::default(),
            vllm_gpu_adapters: Gauge::default(),
            vllm_capacity: FloatGauge::default(),
            vllm_scrapes: Family::default(),
            key_replicas: Family::default(),
            key_request_rate: Family::default(),
            backend_healthy: Family::default(),
            backend_requests_running: Family::default(),
            backend_requests_waiting: Family::default(),
            backend_kv_cache_usage: Family::default(),
            backend_unloads: Family::default(),
        };
        // Both reasons from the start: a drop shows as a rise from 0, not a new series.
        for reason in [SPANS_QUEUE_FULL, SPANS_EXPORT_FAILED] {
            let _ = m.trace_spans_dropped.get_or_create(&reason);
        }
        let r = &mut m.registry;
        r.register(
            "requests",
            "Requests by tenant and how they were served",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Request duration, head in to last byte out",
            m.request_duration.clone(),
        );
        r.register(
            "peer_forwards",
            "Requests forwarded to a peer",
            m.peer_forwards.clone(),
        );
        r.register(
            "overflow_local",
            "Requests served by another node because the owner was overloaded",
            m.overflow_local.clone(),
        );
        r.register(
            "cache_hits",
            "Adapter requests found on local disk",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_evictions",
            "Adapters evicted",
            m.cache_evictions.clone(),
        );
        r.register(
            "cache_size_bytes",
            "Bytes of adapters stored",
            m.cache_size_bytes.clone(),
        );
        r.register("cache_items", "Adapters stored", m.cache_items.clone());
        r.register(
            "peers_active",
            "Peers in the placement table",
            m.peers_active.clone(),
        );
        r.register(
            "ring_rebuilds",
            "Placement rebuilds after a real membership change",
            m.ring_rebuilds.clone(),
        );
        r.register(
            "vllm_healthy",
            "1 when vLLM's /health answers 200",
            m.vllm_healthy.clone(),
        );
        r.register(
            "forward_duration_seconds",
            "Time to a forwarded request's response headers",
            m.forward_duration.clone(),
        );
        r.register(
            "cache_misses",
            "Adapter requests not on local disk",
            m.cache_misses.clone(),
        );
        r.register(
            "cache_max_size_bytes",
            "Disk budget for adapters (storage.max_size)",
            m.cache_max_size_bytes.clone(),
        );
        r.register(
            "fetches",
            "Adapter fetches by origin and result",
            m.fetches.clone(),
        );
        r.register(
            "fetch_bytes",
            "Bytes fetched from origins",
            m.fetch_bytes.clone(),
        );
        r.register(
            "fetch_failures",
            "Failed origin fetches by reason",
            m.fetch_failures.clone(),
        );
        r.register(
            "fetch_duration_seconds",
            "Duration of successful fetches",
            m.fetch_duration.clone(),
        );
        r.register(
            "errors",
            "Error answers of loraplex itself, by kind",
            m.errors.clone(),
        );
        r.register(
            "vllm_unloads",
            "Unload calls to vLLM by result",
            m.vllm_unloads.clone(),
        );
        r.register(
            "revalidations",
            "TTL revalidations by result",
            m.revalidations.clone(),
        );
        r.register(
            "inflight_requests",
            "Requests in flight",
            m.inflight_requests.clone(),
        );
        r.register(
            "fetches_inflight",
            "Adapter fetches in flight",
            m.fetches_inflight.clone(),
        );
        r.register(
            "upstream_connects",
            "New TCP connections to vLLM or peers",
            m.upstream_connects.clone(),
        );
        r.register(
            "trace_spans_exported",
            "Trace spans accepted by the OTLP collector",
            m.trace_spans_exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Trace spans lost: export queue full, or the export failed",
            m.trace_spans_dropped.clone(),
        );
        r.register(
            "tls_connections",
            "Client connections to a server.tls listener: tls (handshake done), plain \
             (server.tls.allow_plain), plain_refused, failed (bad or stalled handshake)",
            m.tls_connections.clone(),
        );
        r.register(
            "tls_reloads",
            "Reloads of the TLS files (SIGHUP or a change) by result",
            m.tls_reloads.clone(),
        );
        // Every result from the start at zero (with TLS off too): a rate over them works from
        // the first scrape, and the dashboard's TLS panels read 0 rather than "no data".
        for result in ["tls", "plain", "plain_refused", "failed"] {
            let _ = m.tls_connections.get_or_create(&ResultLabel { result });
        }
        for result in ["ok", "error"] {
            let _ = m.tls_reloads.get_or_create(&ResultLabel { result });
        }
        r.register(
            "route_decisions",
            "Routing decisions by reason: owner, residency, load, spread, fallback",
            m.route_decisions.clone(),
        );
        r.register(
            "vllm_requests_running",
            "Requests in vLLM's running batch, as last read from its /metrics",
            m.vllm_requests_running.clone(),
        );
        r.register(
            "vllm_requests_waiting",
            "Requests waiting in vLLM's queue, as last read from its /metrics",
            m.vllm_requests_waiting.clone(),
        );
        r.register(
            "vllm_kv_cache_usage",
            "vLLM's KV-cache use (0..1), as last read from its /metrics",
            m.vllm_kv_cache_usage.clone(),
        );
        r.register(
            "vllm_lora_slots",
            "vLLM's LoRA slots (max_lora, else vllm.max_loras)",
            m.vllm_lora_slots.clone(),
        );
        r.register(
            "vllm_gpu_adapters",
            "Adapters likely in vLLM's GPU slots (running, or sent to it last)",
            m.vllm_gpu_adapters.clone(),
        );
        r.register(
            "vllm_capacity_requests_per_second",
            "Requests per second vLLM completes when saturated (learnt; 0 until seen)",
            m.vllm_capacity.clone(),
        );
        r.register(
            "vllm_backend_healthy",
            "1 while this vLLM backend of the node is healthy (its /health answers)",
            m.backend_healthy.clone(),
        );
        r.register(
            "vllm_backend_requests_running",
            "Requests in this backend's running batch, as last read from its /metrics",
            m.backend_requests_running.clone(),
        );
        r.register(
            "vllm_backend_requests_waiting",
            "Requests waiting in this backend's queue, as last read from its /metrics",
            m.backend_requests_waiting.clone(),
        );
        r.register(
            "vllm_backend_kv_cache_usage",
            "This backend's KV-cache use (0..1), as last read from its /metrics",
            m.backend_kv_cache_usage.clone(),
        );
        r.register(
            "vllm_backend_unloads",
            "Adapter unloads sent to this backend (an eviction unloads from every backend)",
            m.backend_unloads.clone(),
        );
        r.register(
            "vllm_scrapes",
            "Reads of vLLM's /metrics by result: ok, no_metrics, error",
            m.vllm_scrapes.clone(),
        );
        r.register(
            "key_replicas",
            "Nodes serving a hot key (the adapter under hash_on: model), top keys entering this node",
            m.key_replicas.clone(),
        );
        r.register(
            "key_request_rate",
            "Requests per second of a hot key across the cluster, top keys entering this node",
            m.key_request_rate.clone(),
        );
        m
    }

    /// The tenant label for `tenant` (bounded; `_default` when absent).
    pub fn tenant_label(&self, tenant: Option<&str>) -> String {
        match tenant.filter(|t| !t.is_empty()) {
            None => "_default".into(),
            Some(tenant) if self.tenant_kept(tenant) => tenant.into(),
            Some(_) => "_other".into(),
        }
    }

    /// Whether `tenant` has a label of its own (one of the first [`MAX_TENANTS`] seen), else
    /// it counts as `_other`. Allocates only the first time a tenant is kept.
    pub fn tenant_kept(&self, tenant: &str) -> bool {
        let mut seen = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(tenant) {
            return true;
        }
        if seen.len() < MAX_TENANTS {
            seen.insert(tenant.into());
            return true;
        }
        false
    }

    /// Count an error answer of `kind` (`loraplex_errors_total{kind}`).
    pub fn count_error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// Count one finished request.
    pub fn record_request(&self, tenant: Option<&str>, tier: Tier, seconds: f64) {
        self.request_handles(tenant, tier).record(seconds);
    }

    /// The counter and histogram of one (tenant, tier) pair, to keep and reuse: workers keep
    /// those of requests without a tenant, skipping the label lookup on the hot path.
    pub fn request_handles(&self, tenant: Option<&str>, tier: Tier) -> RequestHandles {
        let labels = RequestLabels {
            tenant: self.tenant_label(tenant),
            cache_tier: tier.as_str(),
        };
        RequestHandles {
            count: self.requests.get_or_create(&labels).clone(),
            duration: self.request_duration.get_or_create(&labels).clone(),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_names_are_exposed() {
        let m = Metrics::new();
        m.record_request(Some("t1"), Tier::Local, 0.01);
        m.cache_hits
            .get_or_create(&TierLabel { tier: "local" })
            .inc();
        m.peer_forwards
            .get_or_create(&PeerLabel {
                target_peer: "10.0.0.2:9090".into(),
            })
            .inc();
        let text = m.encode();
        for name in [
            "loraplex_requests_total{tenant=\"t1\",cache_tier=\"local\"} 1",
            "loraplex_request_duration_seconds_bucket",
            "loraplex_cache_hits_total{tier=\"local\"} 1",
            "loraplex_peer_forwards_total{target_peer=\"10.0.0.2:9090\"} 1",
            "loraplex_overflow_local_total",
            "loraplex_ring_rebuilds_total",
            "loraplex_peers_active",
            "loraplex_vllm_healthy",
            "loraplex_forward_duration_seconds_bucket",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn tier_index_is_its_place_in_all() {
        for (i, tier) in Tier::ALL.iter().enumerate() {
            assert_eq!(tier.index(), i, "{tier:?}");
        }
    }

    #[test]
    fn tenant_label_is_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_TENANTS {
            assert_eq!(m.tenant_label(Some(&format!("t{i}"))), format!("t{i}"));
        }
        assert_eq!(m.tenant_label(Some("one-too-many")), "_other");
        assert_eq!(m.tenant_label(Some("t0")), "t0");
        assert_eq!(m.tenant_label(None), "_default");
    }
}
