//! The proxy's state: [`Shared`] by every worker, and [`Proxy`], one worker's own (the
//! server's handler on that worker's thread).

use std::{
    cell::RefCell,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
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
    metrics::{Metrics, Tier},
    origin::base::BaseModels,
    proxy::{handles::Handles, upstream::Pool},
    shutdown::Shutdown,
    store::Store,
    telemetry::Tracer,
    tls::Tls,
    vllm::Backends,
};

/// What every worker shares.
pub struct Shared {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// The node's vLLMs, by backend id.
    pub backends: Arc<Backends>,
    pub control: Control,
    pub shutdown: Shutdown,
    /// Requests in flight on this node (the Go project's `pending`).
    pub pending: Pending,
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
    /// Adapters' base models (their pools).
    pub bases: Arc<BaseModels>,
}

/// One worker's proxy: built on the worker's thread, owned by it.
pub struct Proxy {
    pub shared: Arc<Shared>,
    /// Keep-alive connections to vLLM and peers, owned by this thread.
    pub pool: Pool,
    /// Metric handles and adapter names, resolved once.
    pub handles: Handles,
    /// This worker's slot in [`Shared::pending`].
    pub worker: usize,
    /// The buffer of the proxy's own answers (`/healthz`, `/metrics`, ...), kept between them.
    answer_buf: RefCell<Vec<u8>>,
    /// This worker's demand counters (requests entering from clients, per key).
    pub demand: Arc<DemandTable>,
    /// What this worker sent to each node since its last sample.
    pub sent: Sent,
    /// Adapters this worker sent to each local vLLM, by backend id.
    pub recent: Vec<Arc<Recent>>,
    /// `loraplex_route_decisions_total` by reason (`Reason::ALL` order), resolved once.
    decisions: Vec<Counter>,
}

/// Largest own-answer buffer kept for the next answer.
const MAX_ANSWER_BUF: usize = 256 * 1024;

impl Proxy {
    /// Worker `worker`'s proxy.
    pub fn new(shared: Arc<Shared>, worker: usize) -> Proxy {
        Proxy {
            pool: Pool::new(&shared.config.server, shared.metrics.clone()),
            handles: Handles::new(shared.metrics.clone()),
            worker,
            answer_buf: RefCell::default(),
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

    /// An empty buffer for an own answer (the kept one, unless another answer has it).
    pub fn take_answer_buf(&self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut *self.answer_buf.borrow_mut());
        buf.reserve(1024);
        buf
    }

    /// Keep `buf` for the next own answer.
    pub fn give_answer_buf(&self, mut buf: Vec<u8>) {
        if buf.capacity() <= MAX_ANSWER_BUF {
            buf.clear();
            *self.answer_buf.borrow_mut() = buf;
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
        self.handles.record_request(tenant, tier, seconds);
    }
}

/// Requests in flight on this node: one counter per worker, each on its own cache line and
/// written by its worker only, so that counting a request never contends with another core;
/// reading sums them (`/healthz`, routing, `loraplex_inflight_requests`).
pub struct Pending {
    slots: Box<[Slot]>,
}

#[repr(align(128))]
#[derive(Default)]
struct Slot(AtomicI64);

impl Pending {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> Pending {
        Pending {
            slots: (0..workers.max(1)).map(|_| Slot::default()).collect(),
        }
    }

    /// A request starts on `worker`.
    pub fn enter(&self, worker: usize) {
        self.slots[worker % self.slots.len()]
            .0
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A request ends on `worker`.
    pub fn leave(&self, worker: usize) {
        self.slots[worker % self.slots.len()]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests in flight on every worker (each counter read with `order`).
    pub fn load(&self, order: Ordering) -> i64 {
        self.slots.iter().map(|s| s.0.load(order)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_sums_the_workers() {
        let p = Pending::new(3);
        p.enter(0);
        p.enter(2);
        p.enter(2);
        p.leave(0);
        assert_eq!(p.load(Ordering::Relaxed), 2);
        p.enter(7);
        assert_eq!(
            p.load(Ordering::Relaxed),
            3,
            "an id past the slots still counts"
        );
    }
}
