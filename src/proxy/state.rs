//! The proxy's state: [`Shared`] by every worker, and [`Proxy`], one worker's own (the
//! server's handler on that worker's thread).

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicI64},
};

use prometheus_client::metrics::counter::Counter;

use crate::{
    cluster::{
        demand::DemandTable,
        protocol::PeerClient,
        router::{Reason, Router, Sent},
        state::{ClusterState, Recent},
    },
    config::Config,
    control::Control,
    metrics::{Metrics, RequestHandles, Tier},
    proxy::upstream::Pool,
    shutdown::Shutdown,
    store::Store,
    telemetry::Tracer,
    tls::Tls,
    vllm::Vllm,
};

/// What every worker shares.
pub struct Shared {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub vllm: Arc<Vllm>,
    pub control: Control,
    pub shutdown: Shutdown,
    /// Requests in flight on this node (the Go project's `pending`).
    pub pending: AtomicI64,
    pub router: Arc<Router>,
    /// What is known of every node's vLLM and of hot keys (control plane).
    pub cluster: Arc<ClusterState>,
    /// The client for every control-plane call to a peer.
    pub peer_client: PeerClient,
    pub store: Arc<Store>,
    /// OpenTelemetry spans (off unless `tracing.otlp_endpoint` is set).
    pub tracer: Tracer,
    /// `server.tls` and `cluster.tls` (forwards dial peers with `tls.peers`).
    pub tls: Tls,
    /// The `storage.preload` attempts have finished (`/readyz` waits for it).
    pub preload_done: Arc<AtomicBool>,
}

/// One worker's proxy: built on the worker's thread, owned by it.
pub struct Proxy {
    pub shared: Arc<Shared>,
    /// Keep-alive connections to vLLM and peers, owned by this thread.
    pub pool: Pool,
    /// Request metrics of requests without a tenant, by tier (`Tier::ALL` order).
    pub untenanted: Vec<RequestHandles>,
    /// This worker's demand counters (requests entering from clients, per key).
    pub demand: Arc<DemandTable>,
    /// What this worker sent to each node since its last sample.
    pub sent: Sent,
    /// Adapters this worker sent to the local vLLM.
    pub recent: Arc<Recent>,
    /// `loraplex_route_decisions_total` by reason (`Reason::ALL` order), resolved once.
    decisions: Vec<Counter>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Proxy {
        Proxy {
            pool: Pool::new(&shared.config.server, shared.metrics.clone()),
            untenanted: Tier::ALL
                .iter()
                .map(|&t| shared.metrics.request_handles(None, t))
                .collect(),
            demand: shared.cluster.demand.table(),
            sent: Sent::default(),
            recent: shared.cluster.recent(),
            decisions: Reason::ALL
                .iter()
                .map(|r| {
                    let label = crate::metrics::ReasonLabel { reason: r.as_str() };
                    shared.metrics.route_decisions.get_or_create(&label).clone()
                })
                .collect(),
            shared,
        }
    }

    /// Count a routing decision.
    pub fn count_decision(&self, reason: Reason) {
        let i = Reason::ALL
            .iter()
            .position(|&r| r == reason)
            .expect("every reason is in ALL");
        self.decisions[i].inc();
    }

    /// Count one finished request.
    pub fn record_request(&self, tenant: Option<&str>, tier: Tier, seconds: f64) {
        match tenant.filter(|t| !t.is_empty()) {
            None => {
                let i = Tier::ALL
                    .iter()
                    .position(|&t| t == tier)
                    .expect("every tier is in ALL");
                self.untenanted[i].record(seconds);
            }
            Some(_) => self.shared.metrics.record_request(tenant, tier, seconds),
        }
    }
}
