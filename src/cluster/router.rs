//! Which node serves a request: the routing decision the pipeline asks for on every routed
//! request, under `routing.policy`.
//!
//! - `auto` (default): an adapter's candidates are the first k usable nodes of its key's order,
//!   k sized by the key's demand ([`super::view::ReplicaTable`], 1 for rare keys). With k = 1
//!   the owner serves unless it is down or past `routing.overflow_threshold`; with k > 1 each
//!   candidate is scored by expected time to first token ([`super::score`]: residency + queue)
//!   and the best serves, ties to the owner, this node kept unless another is better by more
//!   than a hop. Base-model requests (no key) go to the least loaded by vLLM's queue of this
//!   node and [`SAMPLED`] others drawn at random (power of d choices, `docs/routing.md`), again
//!   only when that beats the hop. A key without an adapter (`hash_on` a header, base model)
//!   stays on its key's order, bounded by load.
//! - `hash`: round 1's rule: the first of the key's first [`SPREAD`] usable nodes below the
//!   overflow threshold, by loraplex's own load; base-model requests stay here.
//! - `least-load`: the least loaded node by vLLM's queue, ignoring residency (every node read).
//!
//! Over backends: a node fronts one or more vLLMs ([`super::view::NodeState::backends`]).
//! Only backends that serve the request's base model ([`RouteRequest::pool`]) are candidates;
//! a node is usable while one of them is, and its figures are those of its best such backend
//! (the lowest cost; requests this worker sent there since the sample are spread over them).
//! The chosen node then picks its own backend: [`Decision::backend`] for a request served here,
//! [`Router::local_backend`] for one a peer forwarded (lowest cost, ties to the backend with
//! fewer requests running, waiting and sent, so equal backends share the load).
//!
//! The decision reads two `arc-swap` snapshots (topology, view), takes no lock and allocates
//! nothing: candidates and fallbacks are fixed arrays; a key's first nodes come from the
//! placement's per-slot cache ([`Placement::top`]), so no decision of `auto` reads every node.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::{ArcSwap, Guard};

pub use super::topology::{FAILED_CHECKS_DOWN, Peer, PeerHealth, Topology};
use super::{
    placement::{MAX_TOP, Placement},
    score::{self, HOP_MS, Residency},
    view::{BackendState, NodeState, View},
};
use crate::{
    cluster::{discovery::Members, identity::Identity},
    config::{Config, HashOn, RoutingPolicy},
    metrics::Metrics,
};

/// Candidates of the `hash` policy: a hot key spreads over at most this many nodes.
pub const SPREAD: usize = 3;

/// Other nodes drawn at random for a base-model request under `auto` (beside this node).
pub const SAMPLED: usize = 2;

/// Why a request went where it went (`loraplex_route_decisions_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The key's owner serves it.
    Owner,
    /// Another replica of a hot key, because of what it holds (GPU slot, disk).
    Residency,
    /// Another replica, or the least loaded node, because of load.
    Load,
    /// A base-model request without a key, placed by load (here or elsewhere).
    Spread,
    /// The owner is down or past the overflow threshold, or nothing is known of the
    /// candidates' vLLMs (routed by hash).
    Fallback,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Owner,
        Reason::Residency,
        Reason::Load,
        Reason::Spread,
        Reason::Fallback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Owner => "owner",
            Reason::Residency => "residency",
            Reason::Load => "load",
            Reason::Spread => "spread",
            Reason::Fallback => "fallback",
        }
    }
}

/// Peers to try in turn, a fixed array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Peers {
    idx: [u16; MAX_TOP],
    len: u8,
}

impl Peers {
    fn push(&mut self, i: usize) {
        if usize::from(self.len) < MAX_TOP {
            self.idx[usize::from(self.len)] = i as u16;
            self.len += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + Clone + '_ {
        self.idx[..usize::from(self.len)]
            .iter()
            .map(|&i| usize::from(i))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where a routed request goes: `peers` in turn (only while nothing was delivered; empty: none),
/// then this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub peers: Peers,
    pub reason: Reason,
    /// The key's owner is another node, usable, and was passed over (load, residency, the
    /// overflow threshold): `loraplex_overflow_local_total` when served here.
    pub overflow: bool,
    /// The backend of this node that serves the request if it ends up served here; `None`: no
    /// local backend serves its pool.
    pub backend: Option<u16>,
}

impl Decision {
    fn local(reason: Reason) -> Decision {
        Decision {
            peers: Peers::default(),
            reason,
            overflow: false,
            backend: None,
        }
    }

    pub fn is_local(&self) -> bool {
        self.peers.is_empty()
    }
}

/// What the decision needs to know about a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteRequest {
    /// xxh3 of the hash key; `None`: no key (a base-model request under `hash_on: model`).
    pub key: Option<u64>,
    /// xxh3 of the adapter's name, for an adapter request.
    pub adapter: Option<u64>,
    /// Whether this node's store holds the adapter.
    pub local_disk: bool,
    /// This node's own load (requests in flight over 200).
    pub my_load: f64,
    /// [`pool_hash`](super::hashkey::pool_hash) of the base model the request needs (a
    /// base-model request: the name it asks for; an adapter request: the adapter's base model
    /// once known); 0: unknown, any backend.
    pub pool: u64,
}

/// Requests one worker sent to each node since that node's last sample: counted on top of the
/// sample so that entry nodes do not all pile onto the node that looked idle. Per worker, so no
/// counter is shared between cores; resized (the only allocation) when the topology changes.
/// Also the worker's random source for sampling nodes (seeded per `Sent`, so workers and nodes
/// draw different nodes).
pub struct Sent {
    inner: RefCell<(u64, Vec<(u64, u32)>)>,
    /// The same for this node's own backends, by backend id.
    local: RefCell<Vec<(u64, u32)>>,
    rng: Cell<u64>,
}

impl Default for Sent {
    fn default() -> Self {
        static SEEDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let n = SEEDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Sent {
            inner: RefCell::default(),
            local: RefCell::default(),
            rng: Cell::new(nanos ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }
}

impl Sent {
    /// A uniform draw from `0..n` (splitmix64, then Lemire's multiply-shift).
    fn draw(&self, n: usize) -> usize {
        let s = self.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.rng.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((u128::from(z) * n as u128) >> 64) as usize
    }

    fn ahead(&self, view: &View, idx: usize) -> u32 {
        let inner = self.inner.borrow();
        match (inner.1.get(idx), view.nodes.get(idx)) {
            (Some(&(seq, n)), Some(node)) if inner.0 == view.generation && seq == node.seq() => n,
            _ => 0,
        }
    }

    /// Count one request sent to `idx`.
    pub fn add(&self, view: &View, idx: usize) {
        let mut inner = self.inner.borrow_mut();
        if inner.0 != view.generation || inner.1.len() != view.nodes.len() {
            *inner = (view.generation, vec![(0, 0); view.nodes.len()]);
        }
        let Some(seq) = view.nodes.get(idx).map(NodeState::seq) else {
            return;
        };
        let entry = &mut inner.1[idx];
        if entry.0 != seq {
            *entry = (seq, 0);
        }
        entry.1 += 1;
    }

    /// Requests sent to this node's backend `b` since its sample (`me`: this node's index).
    fn ahead_local(&self, view: &View, me: usize, b: usize) -> u32 {
        let seq = view
            .nodes
            .get(me)
            .and_then(|n| n.backends.get(b))
            .map(|b| b.seq);
        match (self.local.borrow().get(b), seq) {
            (Some(&(s, n)), Some(seq)) if s == seq => n,
            _ => 0,
        }
    }

    /// Count one request sent to this node's backend `b`.
    pub fn add_local(&self, view: &View, me: usize, b: usize) {
        let Some(seq) = view
            .nodes
            .get(me)
            .and_then(|n| n.backends.get(b))
            .map(|b| b.seq)
        else {
            return;
        };
        let mut local = self.local.borrow_mut();
        if local.len() <= b {
            local.resize(b + 1, (0, 0));
        }
        let entry = &mut local[b];
        if entry.0 != seq {
            *entry = (seq, 0);
        }
        entry.1 += 1;
    }
}

/// The cluster as the data plane sees it.
pub struct Router {
    pub me: Identity,
    pub hash_on: HashOn,
    pub policy: RoutingPolicy,
    pub forward_timeout: Duration,
    pub overflow_threshold: f64,
    pub token: Option<String>,
    /// This node's own IP when its identity names one: peer connections come from it.
    pub source_ip: Option<std::net::IpAddr>,
    topology: ArcSwap<Topology>,
    view: ArcSwap<View>,
    health: Mutex<HashMap<String, Arc<PeerHealth>>>,
    metrics: Arc<Metrics>,
}

impl Router {
    pub fn new(cfg: &Config, me: Identity, metrics: Arc<Metrics>) -> Router {
        let topology = ArcSwap::from_pointee(Topology::single(&me));
        metrics.peers_active.set(1);
        Router {
            hash_on: cfg.routing.hash_on.clone(),
            policy: cfg.routing.policy,
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
            view: ArcSwap::from_pointee(View::default()),
            health: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The current snapshot.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// The current view (lock-free; hold it only for the decision).
    pub fn view(&self) -> Guard<Arc<View>> {
        self.view.load()
    }

    /// Install a new view (control plane).
    pub fn set_view(&self, view: View) {
        self.view.store(Arc::new(view));
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
        let generation = self.topology.load().generation + 1;
        self.topology.store(Arc::new(Topology {
            generation,
            placement,
            peers,
            me,
        }));
    }

    /// Route a request (see the module doc). `view` is used only when built for `topo`.
    pub fn decide(
        &self,
        topo: &Topology,
        view: &View,
        req: &RouteRequest,
        sent: &Sent,
    ) -> Decision {
        let mut d = self.decide_node(topo, view, req, sent);
        d.backend = self.pick_local(topo, view, req, Some(sent));
        d
    }

    /// The best backend of this node for a request served here (a peer forwarded it, or the
    /// chosen peers were unreachable); `None` when none serves its pool. See the module doc.
    pub fn local_backend(&self, view: &View, req: &RouteRequest) -> Option<u16> {
        self.pick_local(&self.topology.load(), view, req, None)
    }

    /// [`Router::local_backend`], counting what this worker sent to each backend since its
    /// sample (`sent`), so that equal backends take turns.
    pub fn local_backend_sent(&self, view: &View, req: &RouteRequest, sent: &Sent) -> Option<u16> {
        self.pick_local(&self.topology.load(), view, req, Some(sent))
    }

    /// The node a request keyed `key` goes to within pool `pool` (a
    /// [`pool_hash`](super::hashkey::pool_hash)) while its nodes are up: the first of the key's
    /// order among the nodes serving the pool; `None` when no node is known to serve it (or the
    /// view is not built for the topology yet).
    pub fn pool_owner(&self, key: &[u8], pool: u64) -> Option<String> {
        let (topo, view) = (self.topology(), self.view());
        let view = Self::valid(&topo, &view)?;
        let key = xxhash_rust::xxh3::xxh3_64(key);
        Self::pool_first(&topo, view, key, pool).map(|i| topo.peers[i].addr.clone())
    }

    /// Where `key`'s requests for `pool` go while its owner there is down: the first usable
    /// node of the key's order among those serving the pool (the owner when none is usable);
    /// `None` as for [`pool_owner`](Self::pool_owner). What a warm-up sent on aims at.
    pub fn pool_target(&self, key: &[u8], pool: u64) -> Option<String> {
        let (topo, view) = (self.topology(), self.view());
        let view = Self::valid(&topo, &view)?;
        let mut order = [0u16; MAX_TOP];
        let n = Self::key_order(
            &topo,
            Some(view),
            xxhash_rust::xxh3::xxh3_64(key),
            pool,
            &mut order,
        );
        let order = &order[..n];
        let i = order
            .iter()
            .find(|&&i| Self::usable(&topo, Some(view), usize::from(i), pool))
            .or(order.first())?;
        Some(topo.peers[usize::from(*i)].addr.clone())
    }

    /// The first node of `key`'s order among those serving `pool` (0: any).
    fn pool_first(topo: &Topology, view: &View, key: u64, pool: u64) -> Option<usize> {
        if pool == 0 {
            return topo.placement.owner_of_hash(key);
        }
        let mut first = [0u16; 1];
        let n = Self::key_order(topo, Some(view), key, pool, &mut first);
        (n == 1).then(|| usize::from(first[0]))
    }

    /// The view if it was built for `topo`.
    fn valid<'v>(topo: &Topology, view: &'v View) -> Option<&'v View> {
        (view.generation == topo.generation && view.nodes.len() == topo.peers.len()).then_some(view)
    }

    fn pick_local(
        &self,
        topo: &Topology,
        view: &View,
        req: &RouteRequest,
        sent: Option<&Sent>,
    ) -> Option<u16> {
        let Some(view) = Self::valid(topo, view) else {
            // Nothing known of the backends yet: the first serves a request for any pool.
            return (req.pool == 0).then_some(0);
        };
        let node = &view.nodes[topo.me];
        // (id, cost, tie-break) of the best up backend; the first serving one if none is up.
        let mut best: Option<(usize, f32, f32)> = None;
        let mut first = None;
        for (j, b) in node.serving(req.pool) {
            first.get_or_insert(j);
            if !b.up() {
                continue;
            }
            let ahead = sent.map_or(0, |s| s.ahead_local(view, topo.me, j)) as f32;
            let residency = match req.adapter {
                None => 0.0,
                Some(a) if b.known && b.gpu_has(a) => 0.0,
                Some(_) => score::residency_ms(b, Residency::Disk),
            };
            let cost = residency + score::queue_ms(b, ahead).unwrap_or(0.0);
            let load = if b.known {
                b.running + b.waiting + ahead
            } else {
                ahead
            };
            if best.is_none_or(|(_, c, l)| cost < c || (cost == c && load < l)) {
                best = Some((j, cost, load));
            }
        }
        best.map(|b| b.0).or(first).map(|j| j as u16)
    }

    fn decide_node(
        &self,
        topo: &Topology,
        view: &View,
        req: &RouteRequest,
        sent: &Sent,
    ) -> Decision {
        if topo.is_single() {
            return Decision::local(Reason::Owner);
        }
        let view = Self::valid(topo, view);
        // A request of a pool under `hash` (base-model pools): its key's order within the pool,
        // and a base-model request this node has no backend for goes to the pool's least loaded.
        if let (RoutingPolicy::Hash, Some(v)) = (self.policy, view)
            && req.pool != 0
        {
            match req.key {
                Some(key) => return self.bounded(topo, Some(v), key, req),
                None if v.nodes[topo.me].serving(req.pool).next().is_none() => {
                    let all = 0..v.nodes.len();
                    return self.least_loaded(topo, v, req, sent, Reason::Spread, all);
                }
                None => {}
            }
        }
        match (self.policy, req.key, view) {
            (RoutingPolicy::Hash, None, _) => Decision::local(Reason::Spread),
            (RoutingPolicy::Hash, Some(key), _) | (_, Some(key), None) => {
                self.bounded(topo, None, key, req)
            }
            (RoutingPolicy::Auto, None, None) | (RoutingPolicy::LeastLoad, None, None) => {
                Decision::local(Reason::Spread)
            }
            (RoutingPolicy::LeastLoad, _, Some(view)) => {
                self.least_loaded(topo, view, req, sent, Reason::Load, 0..view.nodes.len())
            }
            (RoutingPolicy::Auto, None, Some(view)) => match self.sample(topo, view, req, sent) {
                Some(sampled) => {
                    self.least_loaded(topo, view, req, sent, Reason::Spread, sampled.iter())
                }
                None => {
                    self.least_loaded(topo, view, req, sent, Reason::Spread, 0..view.nodes.len())
                }
            },
            (RoutingPolicy::Auto, Some(key), Some(view)) => match req.adapter {
                None => self.bounded(topo, Some(view), key, req),
                Some(_) => match view.replicas.get(key) {
                    k if k <= 1 => self.bounded(topo, Some(view), key, req),
                    k => self.scored(topo, view, key, k, req, sent),
                },
            },
        }
    }

    /// Whether node `i` can take requests for base model `pool`: reachable, and one of its
    /// backends serving `pool` is up.
    fn usable(topo: &Topology, view: Option<&View>, i: usize, pool: u64) -> bool {
        let vllm_up = view.is_none_or(|v| v.nodes[i].up_for(pool));
        (i == topo.me || topo.peers[i].health.usable()) && vllm_up
    }

    /// Load in 0..=1 for the overflow threshold: loraplex's own requests in flight, and with a
    /// view the queue and LoRA slots of its least loaded backend serving the pool
    /// ([`score::shed_load`]).
    fn shed_load(&self, topo: &Topology, view: Option<&View>, i: usize, req: &RouteRequest) -> f64 {
        let proxy = if i == topo.me {
            req.my_load
        } else {
            topo.peers[i].health.load()
        };
        match view {
            Some(v) => v.nodes[i]
                .serving(req.pool)
                .filter(|(_, b)| b.up())
                .map(|(_, b)| score::shed_load(b, proxy, req.adapter))
                .reduce(f64::min)
                .unwrap_or(proxy),
            None => proxy,
        }
    }

    /// Node `i`'s queue cost for `req`: its best up backend serving the pool, `ahead` (sent
    /// there since the samples, every entry node counted) spread over them; `None` when none of
    /// them has known metrics.
    fn node_queue(view: &View, i: usize, pool: u64, ahead: f32) -> Option<f32> {
        let node = &view.nodes[i];
        let n = node.serving(pool).filter(|(_, b)| b.up()).count().max(1) as f32;
        node.serving(pool)
            .filter(|(_, b)| b.up())
            .filter_map(|(_, b)| score::queue_ms(b, ahead / n))
            .reduce(f32::min)
    }

    /// The key's first nodes ([`Placement::top`]); within the request's pool when it has one
    /// and the view says which nodes serve it: the nodes with a backend serving the pool, in
    /// the key's order ([`Placement::top_where`]), so a small pool is found however far down
    /// the order its nodes are.
    #[inline]
    fn key_order(
        topo: &Topology,
        view: Option<&View>,
        key: u64,
        pool: u64,
        out: &mut [u16],
    ) -> usize {
        match view {
            Some(v) if pool != 0 => topo
                .placement
                .top_where(key, out, |i| v.nodes[i].serving(pool).next().is_some()),
            _ => topo.placement.top(key, out),
        }
    }

    /// The owner, unless it is down or past the overflow threshold: then the next usable node
    /// of the key's order below it (at most [`SPREAD`] candidates; all overloaded: the owner).
    fn bounded(
        &self,
        topo: &Topology,
        view: Option<&View>,
        key: u64,
        req: &RouteRequest,
    ) -> Decision {
        let mut order = [0u16; MAX_TOP];
        let mut cands = Peers::default();
        // The key's first SPREAD nodes (cheap: past the slot's hot peers `top` scores every
        // peer, and keeps as many as asked); more only when some of them are not usable.
        for want in [SPREAD, MAX_TOP] {
            let n = Self::key_order(topo, view, key, req.pool, &mut order[..want]);
            cands = Peers::default();
            for i in order[..n].iter().map(|&i| usize::from(i)) {
                if usize::from(cands.len) == SPREAD {
                    break;
                }
                if Self::usable(topo, view, i, req.pool) {
                    cands.push(i);
                }
            }
            if usize::from(cands.len) == SPREAD || n < want {
                break;
            }
        }
        let Some(first) = cands.iter().next() else {
            return Decision::local(Reason::Fallback);
        };
        let pos = cands
            .iter()
            .position(|i| self.shed_load(topo, view, i, req) < self.overflow_threshold)
            .unwrap_or(0);
        let owner = usize::from(order[0]);
        let reason = if pos == 0 && first == owner {
            Reason::Owner
        } else {
            Reason::Fallback
        };
        let mut peers = Peers::default();
        for i in cands.iter().skip(pos).take_while(|&i| i != topo.me) {
            peers.push(i);
        }
        Decision {
            peers,
            reason,
            overflow: pos > 0 && first == owner,
            backend: None,
        }
    }

    /// A hot key: score its first `k` usable nodes and pick the best.
    fn scored(
        &self,
        topo: &Topology,
        view: &View,
        key: u64,
        k: usize,
        req: &RouteRequest,
        sent: &Sent,
    ) -> Decision {
        let mut order = [0u16; MAX_TOP];
        let mut cands = Peers::default();
        // The key's first k nodes; more only when some of them are not usable (as `bounded`).
        for want in [k.min(MAX_TOP), MAX_TOP] {
            let n = Self::key_order(topo, Some(view), key, req.pool, &mut order[..want]);
            cands = Peers::default();
            for i in order[..n].iter().map(|&i| usize::from(i)) {
                if usize::from(cands.len) < k && Self::usable(topo, Some(view), i, req.pool) {
                    cands.push(i);
                }
            }
            if usize::from(cands.len) == k || n < want {
                break;
            }
        }
        let adapter = req.adapter.unwrap_or(key);
        // Every entry node is assumed to send like this one (a load balancer spreads clients).
        let scale = topo.peers.len() as f32;
        let mut anywhere: Option<bool> = None;
        let mut costs = [(0.0f32, 0.0f32, false); MAX_TOP];
        for (c, i) in cands.iter().enumerate() {
            let node = &view.nodes[i];
            let on_disk = if i == topo.me {
                req.local_disk
            } else {
                node.disk.as_ref().is_none_or(|d| d.contains(adapter))
            };
            let not_here = if on_disk {
                Residency::Disk
            } else if *anywhere.get_or_insert_with(|| {
                req.local_disk
                    || view.nodes.iter().enumerate().any(|(j, n)| {
                        j != topo.me && n.disk.as_ref().is_some_and(|d| d.contains(adapter))
                    })
            }) {
                Residency::PeerDisk
            } else {
                Residency::Origin
            };
            // The node's best backend serving the pool: known metrics first, then the lowest
            // residency + queue; what was sent there is spread over its backends.
            let up = node.serving(req.pool).filter(|(_, b)| b.up());
            let n = up.clone().count().max(1) as f32;
            let ahead = sent.ahead(view, i) as f32 * scale / n;
            let mut best: Option<(f32, f32, bool)> = None;
            for (_, b) in up {
                let residency = if b.known && b.gpu_has(adapter) {
                    Residency::Gpu
                } else {
                    not_here
                };
                let queue = score::queue_ms(b, ahead);
                let cost = (
                    score::residency_ms(b, residency),
                    queue.unwrap_or(0.0),
                    queue.is_some(),
                );
                let better = best.is_none_or(|bc| {
                    (cost.2 && !bc.2) || (cost.2 == bc.2 && cost.0 + cost.1 < bc.0 + bc.1)
                });
                if better {
                    best = Some(cost);
                }
            }
            costs[c] = best.unwrap_or((
                score::residency_ms(&BackendState::default(), not_here),
                0.0,
                false,
            ));
        }
        let len = usize::from(cands.len);
        if len == 0 {
            return Decision::local(Reason::Fallback);
        }
        let known = costs[..len].iter().filter(|c| c.2).count();
        if known == 0 {
            return self.bounded(topo, Some(view), key, req);
        }
        let mean = costs[..len]
            .iter()
            .filter(|c| c.2)
            .map(|c| c.1)
            .sum::<f32>()
            / known as f32;
        let total = |c: &(f32, f32, bool)| c.0 + if c.2 { c.1 } else { mean };
        let mut best = 0;
        for c in 1..len {
            if total(&costs[c]) < total(&costs[best]) {
                best = c;
            }
        }
        let at = |c: usize| cands.idx[c] as usize;
        if let Some(mine) = (0..len).find(|&c| at(c) == topo.me)
            && total(&costs[mine]) <= total(&costs[best]) + HOP_MS
        {
            best = mine;
        }
        let reason = if best == 0 {
            Reason::Owner
        } else if costs[best].0 < costs[0].0 {
            Reason::Residency
        } else {
            Reason::Load
        };
        let mut peers = Peers::default();
        if at(best) != topo.me {
            peers.push(at(best));
            // On connect failures: the other candidates in order, then here.
            for c in 0..len {
                if c != best && at(c) != topo.me {
                    peers.push(at(c));
                }
            }
        }
        Decision {
            peers,
            reason,
            overflow: best != 0 && at(0) == usize::from(order[0]),
            backend: None,
        }
    }

    /// This node and [`SAMPLED`] other usable nodes drawn at random (power of d choices: the
    /// least loaded of a few random nodes balances almost as well as the least loaded of all,
    /// and herds less on stale figures; `docs/routing.md`). `None` when the cluster is small
    /// enough to read every node, or when the draws found no usable node (most are down).
    fn sample(
        &self,
        topo: &Topology,
        view: &View,
        req: &RouteRequest,
        sent: &Sent,
    ) -> Option<Peers> {
        let n = view.nodes.len();
        if n <= SAMPLED + 1 {
            return None;
        }
        let mut out = Peers::default();
        out.push(topo.me);
        for _ in 0..4 * SAMPLED {
            // Uniform over the others: draw from n - 1 and skip this node's index.
            let mut i = sent.draw(n - 1);
            if i >= topo.me {
                i += 1;
            }
            if !out.iter().any(|c| c == i) && Self::usable(topo, Some(view), i, req.pool) {
                out.push(i);
                if usize::from(out.len) == SAMPLED + 1 {
                    break;
                }
            }
        }
        (out.len > 1).then_some(out)
    }

    /// The least loaded usable node of `cands` by vLLM's queue (this node unless another is
    /// better by more than a hop); nodes with unknown load count as the mean of the known.
    fn least_loaded(
        &self,
        topo: &Topology,
        view: &View,
        req: &RouteRequest,
        sent: &Sent,
        reason: Reason,
        cands: impl Iterator<Item = usize> + Clone,
    ) -> Decision {
        let scale = view.nodes.len() as f32;
        let cost =
            |i: usize| Self::node_queue(view, i, req.pool, sent.ahead(view, i) as f32 * scale);
        let (mut sum, mut known) = (0.0, 0);
        for i in cands.clone() {
            if let Some(c) = cost(i) {
                sum += c;
                known += 1;
            }
        }
        if known == 0 {
            return match req.key {
                Some(key) => self.bounded(topo, Some(view), key, req),
                None => Decision::local(reason),
            };
        }
        let mean = sum / known as f32;
        let total = |i: usize| cost(i).unwrap_or(mean);
        // The key's owner within its pool; start from it (or this node), so ties stay put.
        let owner = req
            .key
            .and_then(|key| Self::pool_first(topo, view, key, req.pool));
        let start = owner.filter(|&o| Self::usable(topo, Some(view), o, req.pool));
        let mut best = start
            .or_else(|| {
                cands
                    .clone()
                    .find(|&i| Self::usable(topo, Some(view), i, req.pool))
            })
            .unwrap_or(topo.me);
        // Each candidate's cost once (the best one's kept).
        let mut best_cost = total(best);
        for i in cands {
            if i == best || !Self::usable(topo, Some(view), i, req.pool) {
                continue;
            }
            let c = total(i);
            if c < best_cost {
                (best, best_cost) = (i, c);
            }
        }
        if Self::usable(topo, Some(view), topo.me, req.pool) && total(topo.me) <= best_cost + HOP_MS
        {
            best = topo.me;
        }
        let reason = if owner == Some(best) {
            Reason::Owner
        } else {
            reason
        };
        let mut peers = Peers::default();
        if best != topo.me {
            peers.push(best);
        }
        Decision {
            peers,
            reason,
            overflow: owner
                .is_some_and(|o| o != best && Self::usable(topo, Some(view), o, req.pool)),
            backend: None,
        }
    }
}

/// A node's vLLM as the view has it (for `/admin/peers`).
pub fn backend_json(b: &BackendState) -> serde_json::Value {
    serde_json::json!({
        "known": b.known,
        "healthy": b.healthy,
        "running": b.running,
        "waiting": b.waiting,
        "kv_cache_usage": b.kv,
        "lora_slots": b.max_lora,
        "lora_busy": b.lora_busy,
        "batch": b.batch,
        "capacity_rps": b.capacity,
        "gpu_adapters": b.gpu.len(),
    })
}

#[cfg(test)]
mod tests;
