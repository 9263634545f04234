//! The proxy's state: [`Shared`] by every worker, and [`Proxy`], one worker's own (the
//! server's handler on that worker's thread).

use std::sync::{Arc, atomic::AtomicI64};

use crate::{
    cluster::{protocol::PeerClient, router::Router},
    config::Config,
    control::Control,
    metrics::{Metrics, RequestHandles, Tier},
    proxy::upstream::Pool,
    shutdown::Shutdown,
    store::Store,
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
    /// The client for every control-plane call to a peer.
    pub peer_client: PeerClient,
    pub store: Arc<Store>,
    /// `server.tls` and `cluster.tls` (forwards dial peers with `tls.peers`).
    pub tls: Tls,
}

/// One worker's proxy: built on the worker's thread, owned by it.
pub struct Proxy {
    pub shared: Arc<Shared>,
    /// Keep-alive connections to vLLM and peers, owned by this thread.
    pub pool: Pool,
    /// Request metrics of requests without a tenant, by tier (`Tier::ALL` order).
    pub untenanted: Vec<RequestHandles>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Proxy {
        Proxy {
            pool: Pool::new(&shared.config.server, shared.metrics.clone()),
            untenanted: Tier::ALL
                .iter()
                .map(|&t| shared.metrics.request_handles(None, t))
                .collect(),
            shared,
        }
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
