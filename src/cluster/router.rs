//! Which node serves a request: the current topology (placement + peer health) and the routing
//! decision the pipeline asks for on every routed request.
//!
//! The hot path reads one `arc-swap` snapshot (no lock), hashes the key, and walks the key's
//! order only as far as needed: the owner when it is healthy and not overloaded, else the next
//! peers in the key's order (bounded-load style: a hot key spreads over its first few nodes,
//! not over all of them). Peer health and load live in [`PeerHealth`] records keyed by address
//! that survive topology rebuilds, so a rebuild never resets what is known about a peer.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;

use crate::{
    cluster::{discovery::Members, identity::Identity, placement::Placement},
    config::{Config, HashOn},
    metrics::Metrics,
};

/// Healthy, not-overloaded candidates considered before giving up on shedding: a hot key
/// spreads over at most this many nodes.
pub const SPREAD: usize = 3;

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
    pub placement: Placement,
    pub peers: Vec<Peer>,
    /// This node's index.
    pub me: usize,
}

impl Topology {
    fn single(me: &Identity) -> Topology {
        let addr = me.canonical().to_owned();
        Topology {
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

/// Where a routed request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve here. `overflow`: the owner is another node, shed because it is overloaded.
    Local { overflow: bool },
    /// Forward to these peers in turn (only while nothing was delivered), then serve here.
    Forward { peers: Vec<usize>, overflow: bool },
}

/// The cluster as the data plane sees it.
pub struct Router {
    pub me: Identity,
    pub hash_on: HashOn,
    pub forward_timeout: Duration,
    pub overflow_threshold: f64,
    pub token: Option<String>,
    /// This node's own IP when its identity names one: peer connections come from it.
    pub source_ip: Option<std::net::IpAddr>,
    topology: ArcSwap<Topology>,
    health: Mutex<HashMap<String, Arc<PeerHealth>>>,
    metrics: Arc<Metrics>,
}

impl Router {
    pub fn new(cfg: &Config, me: Identity, metrics: Arc<Metrics>) -> Router {
        let topology = ArcSwap::from_pointee(Topology::single(&me));
        metrics.peers_active.set(1);
        Router {
            hash_on: cfg.routing.hash_on.clone(),
            forward_timeout: cfg.routing.forward_timeout,
            overflow_threshold: cfg.routing.overflow_threshold,
            token: cfg.cluster.token.clone(),
            source_ip: me
                .canonical()
                .parse::<SocketAddr>()
                .ok()
                .map(|a| a.ip())
                .filter(|ip| {
                    !ip.is_unspecified() && me.is_self_addr(SocketAddr::new(*ip, me.port()))
                }),
            me,
            topology,
            health: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The current snapshot.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// Install a new membership (`resolved`: each peer's socket addresses).
    pub fn rebuild(&self, members: &Members, resolved: HashMap<String, Vec<SocketAddr>>) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.retain(|addr, _| members.peers().iter().any(|p| p == addr));
        let placement = Placement::build(members.peers());
        let peers: Vec<Peer> = placement
            .peers()
            .iter()
            .map(|addr| Peer {
                addr: addr.clone(),
                sockaddrs: resolved.get(addr).cloned().unwrap_or_default(),
                health: health.entry(addr.clone()).or_default().clone(),
            })
            .collect();
        let me = placement.index_of(members.me()).unwrap_or(0);
        self.metrics.peers_active.set(peers.len() as i64);
        self.metrics.ring_rebuilds.inc();
        tracing::info!(
            peers = peers.len(),
            me = members.me(),
            "cluster membership changed"
        );
        self.topology.store(Arc::new(Topology {
            placement,
            peers,
            me,
        }));
    }

    /// Route `key` given this node's own load (0..=1).
    ///
    /// The first [`SPREAD`] usable nodes of the key's order are the candidates; the first of
    /// them below `overflow_threshold` serves (the owner when it isn't overloaded), and when all
    /// are overloaded the owner serves anyway. A forward falls back, on connect failures, to the
    /// candidates after the chosen one, up to this node, which then serves itself.
    pub fn decide(&self, topo: &Topology, key: &[u8], my_load: f64) -> Decision {
        if topo.is_single() {
            return Decision::Local { overflow: false };
        }
        let candidates: Vec<(usize, f64)> = topo
            .placement
            .order(key)
            .filter_map(|idx| {
                if idx == topo.me {
                    return Some((idx, my_load));
                }
                let h = &topo.peers[idx].health;
                h.usable().then(|| (idx, h.load()))
            })
            .take(SPREAD)
            .collect();
        let Some(&(owner, _)) = candidates.first() else {
            return Decision::Local { overflow: false };
        };
        let pos = candidates
            .iter()
            .position(|&(_, load)| load < self.overflow_threshold)
            .unwrap_or(0);
        let chosen = candidates[pos].0;
        let overflow = chosen != owner;
        if chosen == topo.me {
            return Decision::Local { overflow };
        }
        let peers = candidates[pos..]
            .iter()
            .map(|&(i, _)| i)
            .take_while(|&i| i != topo.me)
            .collect();
        Decision::Forward { peers, overflow }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn router(n: usize) -> (Router, Arc<Topology>) {
        let ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))];
        let me = Identity::with_local_ips("10.0.0.1:9090".parse().unwrap(), None, ips).unwrap();
        let r = Router::new(&Config::default(), me, Arc::new(Metrics::new()));
        let peers: Vec<String> = (1..=n).map(|i| format!("10.0.0.{i}:9090")).collect();
        let members = Members::build(&peers, &r.me);
        r.rebuild(&members, HashMap::new());
        let t = r.topology();
        (r, t)
    }

    fn key_owned_by(t: &Topology, who: usize) -> Vec<u8> {
        (0..)
            .map(|i| format!("adapter-{i}").into_bytes())
            .find(|k| t.placement.owner(k) == Some(who))
            .unwrap()
    }

    #[test]
    fn single_node_is_always_local() {
        let (r, t) = router(1);
        assert_eq!(r.decide(&t, b"x", 1.0), Decision::Local { overflow: false });
    }

    #[test]
    fn owner_serves_and_others_forward_to_it() {
        let (r, t) = router(3);
        let mine = key_owned_by(&t, t.me);
        assert_eq!(
            r.decide(&t, &mine, 0.0),
            Decision::Local { overflow: false }
        );
        let other = (0..3).find(|&i| i != t.me).unwrap();
        let theirs = key_owned_by(&t, other);
        match r.decide(&t, &theirs, 0.0) {
            Decision::Forward { peers, overflow } => {
                assert_eq!(peers[0], other);
                assert!(!overflow);
                assert!(!peers.contains(&t.me));
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn dead_or_overloaded_owner_is_skipped_in_key_order() {
        let (r, t) = router(3);
        let other = (0..3).find(|&i| i != t.me).unwrap();
        let key = key_owned_by(&t, other);
        let order: Vec<usize> = t.placement.order(&key).collect();
        t.peers[other].health.mark_down();
        let next = order[1];
        let d = r.decide(&t, &key, 0.0);
        if next == t.me {
            assert_eq!(
                d,
                Decision::Local { overflow: false },
                "a dead owner is not overflow"
            );
        } else {
            assert_eq!(
                d,
                Decision::Forward {
                    peers: vec![next],
                    overflow: false
                }
            );
        }
        t.peers[other].health.observe(true, 0.95);
        let d = r.decide(&t, &key, 0.0);
        match d {
            Decision::Local { overflow } => assert!(overflow && next == t.me),
            Decision::Forward { peers, overflow } => assert!(overflow && peers[0] == next),
        }
    }

    #[test]
    fn everyone_overloaded_goes_to_the_owner() {
        let (r, t) = router(3);
        for p in &t.peers {
            p.health.observe(true, 1.0);
        }
        let other = (0..3).find(|&i| i != t.me).unwrap();
        let key = key_owned_by(&t, other);
        match r.decide(&t, &key, 1.0) {
            Decision::Forward { peers, .. } => assert_eq!(peers[0], other),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn health_survives_rebuilds() {
        let (r, t) = router(3);
        let other = (0..3).find(|&i| i != t.me).unwrap();
        t.peers[other].health.observe(true, 0.5);
        let addr = t.peers[other].addr.clone();
        let peers: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}:9090")).collect();
        r.rebuild(&Members::build(&peers, &r.me), HashMap::new());
        let t2 = r.topology();
        let p = t2.peers.iter().find(|p| p.addr == addr).unwrap();
        assert_eq!(p.health.load(), 0.5);
    }
}
