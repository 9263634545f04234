//! The cluster as a snapshot: the peers of the current membership, their placement and what is
//! known of their health. Peer health lives in [`PeerHealth`] records keyed by address that
//! survive topology rebuilds, so a rebuild never resets what is known about a peer.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use crate::cluster::{identity::Identity, placement::Placement};

/// Health checks that must fail in a row before a peer counts as down.
pub const FAILED_CHECKS_DOWN: u32 = 2;

/// What is known about a peer, updated by the health poll and by failed forwards.
#[derive(Debug)]
pub struct PeerHealth {
    /// Reachable (its `/healthz` answered, or no check has failed yet).
    up: AtomicBool,
    vllm_healthy: AtomicBool,
    /// Load in thousandths (0..=1000), from its `/healthz`.
    load_milli: AtomicU32,
    /// Successful checks so far.
    checks_ok: AtomicU64,
    /// Failed checks in a row.
    failures: AtomicU32,
}

impl Default for PeerHealth {
    fn default() -> Self {
        // Optimistic until a check says otherwise: a new peer gets traffic at once.
        PeerHealth {
            up: AtomicBool::new(true),
            vllm_healthy: AtomicBool::new(true),
            load_milli: AtomicU32::new(0),
            checks_ok: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }
}

impl PeerHealth {
    pub fn usable(&self) -> bool {
        self.up.load(Ordering::Relaxed) && self.vllm_healthy.load(Ordering::Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn vllm_healthy(&self) -> bool {
        self.vllm_healthy.load(Ordering::Relaxed)
    }

    pub fn load(&self) -> f64 {
        f64::from(self.load_milli.load(Ordering::Relaxed)) / 1000.0
    }

    pub fn checks_ok(&self) -> u64 {
        self.checks_ok.load(Ordering::Relaxed)
    }

    /// A `/healthz` answer arrived.
    pub fn observe(&self, vllm_healthy: bool, load: f64) {
        self.checks_ok.fetch_add(1, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.up.store(true, Ordering::Relaxed);
        self.vllm_healthy.store(vllm_healthy, Ordering::Relaxed);
        self.load_milli
            .store((load.clamp(0.0, 1.0) * 1000.0) as u32, Ordering::Relaxed);
    }

    /// The peer could not be reached (a connect was refused): down at once.
    pub fn mark_down(&self) {
        self.up.store(false, Ordering::Relaxed);
    }

    /// A health check failed: down after [`FAILED_CHECKS_DOWN`] in a row, so one slow answer
    /// from a busy peer does not move its keys. Returns whether the peer is now down.
    pub fn check_failed(&self) -> bool {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= FAILED_CHECKS_DOWN {
            self.mark_down();
        }
        !self.is_up()
    }
}

/// One peer of the topology.
#[derive(Debug)]
pub struct Peer {
    /// Canonical `host:port`, as every node spells it.
    pub addr: String,
    /// Resolved when the topology was built.
    pub sockaddrs: Vec<SocketAddr>,
    pub health: Arc<PeerHealth>,
}

/// An immutable snapshot: placement and peers, aligned by index.
#[derive(Debug)]
pub struct Topology {
    /// Counts rebuilds: a [`super::view::View`] built for another generation is not used.
    pub generation: u64,
    pub placement: Placement,
    pub peers: Vec<Peer>,
    /// This node's index.
    pub me: usize,
}

impl Topology {
    pub(super) fn single(me: &Identity) -> Topology {
        let addr = me.canonical().to_owned();
        Topology {
            generation: 0,
            placement: Placement::build(std::slice::from_ref(&addr)),
            peers: vec![Peer {
                addr,
                sockaddrs: Vec::new(),
                health: Arc::default(),
            }],
            me: 0,
        }
    }

    /// `GET /admin/peers`: the Go project's shape (`peers[].{addr,load,self}`, `self`,
    /// `count`) plus health.
    pub fn to_json(&self, my_load: f64) -> serde_json::Value {
        let peers: Vec<serde_json::Value> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let me = i == self.me;
                serde_json::json!({
                    "addr": p.addr,
                    "self": me,
                    "load": if me { my_load } else { p.health.load() },
                    "healthy": me || p.health.is_up(),
                    "vllm_healthy": me || p.health.vllm_healthy(),
                    "checks_ok": p.health.checks_ok(),
                })
            })
            .collect();
        serde_json::json!({
            "peers": peers,
            "self": self.peers[self.me].addr,
            "count": self.peers.len(),
        })
    }

    pub fn is_single(&self) -> bool {
        self.peers.len() <= 1
    }

    /// Whether `ip` is one of the peers' addresses (trust of the forwarded mark without a
    /// cluster token).
    pub fn is_peer_ip(&self, ip: std::net::IpAddr) -> bool {
        self.peers
            .iter()
            .enumerate()
            .any(|(i, p)| i != self.me && p.sockaddrs.iter().any(|s| s.ip() == ip))
    }
}
