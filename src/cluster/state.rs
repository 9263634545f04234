//! What this node knows of every backend and every hot key, merged into the router's
//! [`View`] (control plane).
//!
//! Inputs: each local vLLM's samples (fed in by the `vllm` module's metrics scrape, one per
//! backend), the adapters this node's workers sent to each ([`Recent`]), its store's disk set, the peers' states (their
//! `/_loraplex/state`, polled), and the demand tables ([`super::demand`]). Outputs: the view the
//! workers route by, this node's own state for its peers ([`ClusterState::publish`]), and the
//! replica counts of hot keys.
//!
//! Replicas: a key's cluster rate is its rate entering this node plus what every peer reports
//! for it; with `C` the mean learnt capacity of the nodes, `k = ceil(rate / (TARGET_SHARE × C))`
//! clamped to the usable nodes; before any capacity is learnt, a key's k grows by one per tick
//! while all its replicas queue. k grows at once and shrinks only after [`COOLDOWN_TICKS`]
//! ticks of wanting less.
//!
//! Stale data ages out: a sample older than [`STALE_INTERVALS`] intervals counts as unknown.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use super::{
    demand::{DemandBoard, DemandReader, KeyRate},
    disk_filter::DiskFilter,
    hashkey::pool_hash,
    placement::MAX_TOP,
    pools::Pools,
    protocol::{BackendReport, HotKey, PeerState},
    router::{Router, Topology},
    view::{BackendState, NodeState, ReplicaTable, View},
};
use crate::metrics::{KeyLabel, Metrics};

/// A key's replicas are sized so that each takes about this share of a node's capacity.
pub const TARGET_SHARE: f64 = 0.5;
/// Ticks a key must want fewer replicas before it gets them.
pub const COOLDOWN_TICKS: u32 = 3;
/// Intervals after which a sample is stale.
pub const STALE_INTERVALS: u32 = 3;
/// Hot keys published to peers.
pub const HOT_KEYS: usize = 32;
/// Keys exported as replica metrics.
pub const METRIC_KEYS: usize = 10;
/// Adapter hashes kept per worker of what was sent to the local vLLM.
const RECENT: usize = 64;
/// At most this many adapters count as likely in GPU slots.
pub const MAX_GPU_SET: usize = 64;
/// Rate below which a key without learnt capacity is not grown (requests/s).
const MIN_HOT_RATE: f64 = 1.0;

/// The adapters one worker sent to the local vLLM, newest last (a ring, written by the worker).
pub struct Recent {
    ring: [AtomicU64; RECENT],
    next: AtomicU64,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            ring: std::array::from_fn(|_| AtomicU64::new(0)),
            next: AtomicU64::new(0),
        }
    }
}

impl Recent {
    /// Note an adapter (xxh3 of its name) sent to the local vLLM. Called only by its worker.
    #[inline]
    pub fn note(&self, adapter: u64) {
        let n = self.next.load(Relaxed);
        let last = self.ring[((n + RECENT as u64 - 1) % RECENT as u64) as usize].load(Relaxed);
        if n > 0 && last == adapter {
            return;
        }
        self.ring[(n % RECENT as u64) as usize].store(adapter, Relaxed);
        self.next.store(n + 1, Relaxed);
    }

    /// Newest first.
    fn newest(&self) -> impl Iterator<Item = u64> + '_ {
        let n = self.next.load(Relaxed);
        (0..n.min(RECENT as u64))
            .map(move |i| self.ring[((n - 1 - i) % RECENT as u64) as usize].load(Relaxed))
    }
}

/// One sample of a local vLLM, as the scrape read it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalSample {
    /// Which backend of this node (its position in `vllm_urls`).
    pub backend: usize,
    /// Its base-model names: `root` first, then every served name, deduplicated (empty: not
    /// learnt yet).
    pub models: Arc<[String]>,
    pub healthy: bool,
    /// Metrics were read (false: old vLLM without them, or the scrape failed).
    pub known: bool,
    pub running: f32,
    pub waiting: f32,
    pub kv: f32,
    /// `max_lora` from vLLM, else `vllm.max_loras`.
    pub max_lora: u16,
    /// xxh3 of the adapters in vLLM's current `lora_requests_info`.
    pub running_adapters: Vec<u64>,
    pub batch: f32,
    pub capacity: f32,
    pub started: f64,
}

struct PeerRecord {
    instance: u64,
    since: u64,
    /// Shared with the views built since it last changed.
    filter: Arc<DiskFilter>,
    filter_known: bool,
    /// One per backend of the peer.
    reports: Vec<(BackendReport, Instant)>,
    hot: Vec<HotKey>,
}

struct Inner {
    /// One per local backend.
    local: Vec<Option<(LocalSample, Instant)>>,
    local_seq: u64,
    peers: HashMap<String, PeerRecord>,
    disk: DiskFilter,
    disk_counter: u64,
    demand: DemandReader,
    last_tick: Instant,
    /// Key → (replicas, ticks it has wanted fewer).
    replicas: HashMap<u64, (u8, u32)>,
    table: ReplicaTable,
    top: Vec<KeyRate>,
    /// The keys whose `loraplex_key_*` series are published.
    labelled: Vec<String>,
}

/// Gives the xxh3 of every adapter name the node stores.
type StoredSet = Box<dyn Fn() -> Vec<u64> + Send + Sync>;

/// See the module doc. Shared as `Arc<ClusterState>`.
pub struct ClusterState {
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    pub demand: Arc<DemandBoard>,
    /// By backend, then by worker.
    recent: Mutex<Vec<Vec<Arc<Recent>>>>,
    inner: Mutex<Inner>,
    interval: Duration,
    /// This process's id in the peer state (a restarted node resends its whole filter).
    instance: u64,
    /// The node's own disk set, from the store (set by the node at start).
    stored: Mutex<Option<StoredSet>>,
    /// The local backends' URLs, by id (published for `/admin/peers`).
    urls: Mutex<Vec<String>>,
}

impl ClusterState {
    /// `backends`: how many vLLMs this node fronts (at least one).
    pub fn new(
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        interval: Duration,
        backends: usize,
    ) -> Arc<ClusterState> {
        let backends = backends.max(1);
        let demand = Arc::new(DemandBoard::default());
        let instance = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        Arc::new(ClusterState {
            router,
            metrics,
            inner: Mutex::new(Inner {
                local: vec![None; backends],
                local_seq: 0,
                peers: HashMap::new(),
                disk: DiskFilter::default(),
                disk_counter: 0,
                demand: DemandReader::new(demand.clone()),
                last_tick: Instant::now(),
                replicas: HashMap::new(),
                table: ReplicaTable::default(),
                top: Vec::new(),
                labelled: Vec::new(),
            }),
            demand,
            recent: Mutex::new(vec![Vec::new(); backends]),
            interval,
            instance,
            stored: Mutex::new(None),
            urls: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker's rings of adapters sent to the local vLLMs, one per backend.
    pub fn recent(&self) -> Vec<Arc<Recent>> {
        let mut all = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        all.iter_mut()
            .map(|per_worker| {
                let r = Arc::new(Recent::default());
                per_worker.push(r.clone());
                r
            })
            .collect()
    }

    /// The local backends' URLs, by id.
    pub fn set_urls(&self, urls: Vec<String>) {
        *self.urls.lock().unwrap_or_else(|e| e.into_inner()) = urls;
    }

    /// What is known of every backend of node `addr` (this node's own included), by id.
    pub fn reports_of(&self, addr: &str) -> Vec<BackendReport> {
        let inner = self.lock();
        if addr == self.router.me.canonical() {
            return self.local_reports(&inner);
        }
        inner
            .peers
            .get(addr)
            .map(|p| p.reports.iter().map(|(r, _)| r.clone()).collect())
            .unwrap_or_default()
    }

    /// How many vLLMs this node fronts.
    pub fn backends(&self) -> usize {
        self.lock().local.len()
    }

    /// Where the node's disk set comes from (xxh3 of every stored adapter's name).
    pub fn set_stored(&self, f: impl Fn() -> Vec<u64> + Send + Sync + 'static) {
        *self.stored.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    fn stale_after(&self) -> Duration {
        self.interval * STALE_INTERVALS + Duration::from_secs(1)
    }

    /// A new sample of a local vLLM (`sample.backend`; one past the backends is ignored).
    pub fn set_local(&self, sample: LocalSample) {
        let mut inner = self.lock();
        inner.local_seq += 1;
        let b = sample.backend;
        match inner.local.get_mut(b) {
            Some(slot) => *slot = Some((sample, Instant::now())),
            None => return,
        }
        self.install(&inner);
    }

    /// Local backend `b` as published and routed by: the sample, with the GPU-likely set (what
    /// vLLM runs, then what was sent to it most recently, `max_lora` in all).
    fn local_report(&self, inner: &Inner, b: usize) -> Option<(BackendReport, Instant)> {
        let (s, at) = inner.local.get(b)?.as_ref()?;
        let slots = usize::from(s.max_lora).clamp(1, MAX_GPU_SET);
        let mut gpu: Vec<u64> = s.running_adapters.iter().copied().take(slots).collect();
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let mut iters: Vec<_> = recent
            .get(b)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|r| r.newest())
            .collect();
        'fill: loop {
            let mut any = false;
            for it in &mut iters {
                if gpu.len() >= slots {
                    break 'fill;
                }
                if let Some(h) = it.next() {
                    any = true;
                    if !gpu.contains(&h) {
                        gpu.push(h);
                    }
                }
            }
            if !any {
                break;
            }
        }
        let report = BackendReport {
            known: s.known,
            healthy: s.healthy,
            running: s.running,
            waiting: s.waiting,
            kv: s.kv,
            max_lora: s.max_lora,
            lora_busy: s.running_adapters.len().min(usize::from(u16::MAX)) as u16,
            batch: s.batch,
            capacity: s.capacity,
            started: s.started,
            age_ms: at.elapsed().as_millis() as u64,
            seq: inner.local_seq,
            gpu,
            models: s.models.to_vec(),
            url: String::new(),
        };
        Some((report, *at))
    }

    /// Every local backend's report, by backend id (a default report for one not sampled yet).
    fn local_reports(&self, inner: &Inner) -> Vec<BackendReport> {
        let urls = self.urls.lock().unwrap_or_else(|e| e.into_inner());
        (0..inner.local.len())
            .map(|b| {
                let mut r = self.local_report(inner, b).map(|r| r.0).unwrap_or_default();
                r.url = urls.get(b).cloned().unwrap_or_default();
                r
            })
            .collect()
    }

    /// This node's state for a peer that has the disk filter up to version `since` (and
    /// belongs to instance `instance`: another instance gets everything anew).
    pub fn publish(&self, since: u64, instance: u64) -> PeerState {
        let inner = self.lock();
        let since = if instance == self.instance { since } else { 0 };
        let (segments, synced_to) = inner.disk.delta(since, inner.disk_counter);
        PeerState {
            instance: self.instance,
            backends: self.local_reports(&inner),
            hot: inner
                .demand
                .top(HOT_KEYS)
                .into_iter()
                .map(|k| HotKey {
                    h: k.hash,
                    r: k.rate as f32,
                    p: k.pool,
                })
                .collect(),
            disk_version: synced_to,
            disk: segments,
        }
    }

    /// What to ask `peer` for: `(since, instance)`.
    pub fn poll_args(&self, peer: &str) -> (u64, u64) {
        self.lock()
            .peers
            .get(peer)
            .map_or((0, 0), |p| (p.since, p.instance))
    }

    /// A peer's state arrived.
    pub fn set_peer(&self, peer: &str, state: PeerState) {
        let mut inner = self.lock();
        let rec = inner
            .peers
            .entry(peer.to_owned())
            .or_insert_with(|| PeerRecord {
                instance: 0,
                since: 0,
                filter: Arc::default(),
                filter_known: false,
                reports: Vec::new(),
                hot: Vec::new(),
            });
        if rec.instance != state.instance {
            rec.instance = state.instance;
            rec.filter = Arc::default();
            rec.filter_known = false;
        }
        let applied = if state.disk.is_empty() {
            Ok(())
        } else {
            Arc::make_mut(&mut rec.filter).apply(&state.disk)
        };
        match applied {
            Ok(()) => {
                rec.since = state.disk_version;
                rec.filter_known = true;
            }
            Err(e) => {
                tracing::warn!(peer, error = %e, "bad disk filter from a peer; asking again");
                rec.since = 0;
                rec.filter = Arc::default();
                rec.filter_known = false;
            }
        }
        let now = Instant::now();
        rec.reports = state
            .backends
            .into_iter()
            .map(|b| {
                let at = now
                    .checked_sub(Duration::from_millis(b.age_ms))
                    .unwrap_or(now);
                (b, at)
            })
            .collect();
        rec.hot = state.hot;
        self.install(&inner);
    }

    /// A peer did not answer: its data ages out on its own; nothing to do but rebuild later.
    pub fn forget_peers_not_in(&self, peers: &[String]) {
        self.lock().peers.retain(|p, _| peers.contains(p));
    }

    /// The control-plane tick (every `vllm.metrics_interval`): read the demand tables, refresh
    /// the disk filter, resize the replicas, age the view.
    pub fn tick(&self) {
        let stored = self
            .stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|f| f());
        let mut inner = self.lock();
        let secs = inner.last_tick.elapsed().as_secs_f64();
        inner.last_tick = Instant::now();
        inner.demand.tick(secs);
        if let Some(hashes) = stored {
            let inner = &mut *inner;
            inner
                .disk
                .update_from(DiskFilter::build(hashes), &mut inner.disk_counter);
        }
        self.size_replicas(&mut inner);
        self.install(&inner);
        self.publish_metrics(&mut inner);
    }

    /// `loraplex_key_replicas` and `loraplex_key_request_rate` of the top keys (others
    /// removed), `loraplex_vllm_gpu_adapters`.
    fn publish_metrics(&self, inner: &mut Inner) {
        let m = &self.metrics;
        // Set the top keys' series, then remove those of keys no longer on top: a scrape in
        // between never finds a top key's series missing, as it could after a clear.
        for k in &inner.top {
            let label = KeyLabel {
                key: k.name.clone(),
            };
            m.key_replicas
                .get_or_create(&label)
                .set(inner.table.get(k.hash) as i64);
            m.key_request_rate.get_or_create(&label).set(k.rate);
        }
        for gone in inner
            .labelled
            .iter()
            .filter(|n| !inner.top.iter().any(|k| &k.name == *n))
        {
            let label = KeyLabel { key: gone.clone() };
            m.key_replicas.remove(&label);
            m.key_request_rate.remove(&label);
        }
        inner.labelled = inner.top.iter().map(|k| k.name.clone()).collect();
        let reports: Vec<_> = (0..inner.local.len())
            .filter_map(|b| self.local_report(inner, b))
            .collect();
        if !reports.is_empty() {
            let gpu: usize = reports.iter().map(|(r, _)| r.gpu.len()).sum();
            m.vllm_gpu_adapters.set(gpu as i64);
        }
    }

    fn size_replicas(&self, inner: &mut Inner) {
        let topo = self.router.topology();
        let view = self.view_of(inner);
        // Nodes that can take a key's requests: up, with a backend up for its pool (counted
        // once per pool below).
        let usable = |pool: u64| {
            (0..topo.peers.len())
                .filter(|&i| {
                    (i == topo.me || topo.peers[i].health.usable())
                        && view.get(i).is_none_or(|n| n.up_for(pool))
                })
                .count()
                .max(1)
        };
        // A node's capacity: what its backends with a learnt capacity complete together.
        let caps: Vec<f64> = view
            .iter()
            .map(|n| {
                n.backends()
                    .iter()
                    .filter(|b| b.known && b.capacity > 0.0)
                    .map(|b| f64::from(b.capacity))
                    .sum::<f64>()
            })
            .filter(|&c| c > 0.0)
            .collect();
        let cap = (!caps.is_empty()).then(|| caps.iter().sum::<f64>() / caps.len() as f64);
        // Cluster rates: own top keys plus what the peers report; and each key's pool.
        let own = inner.demand.top(HOT_KEYS * 2);
        let mut rates: HashMap<u64, f64> = own.iter().map(|k| (k.hash, k.rate)).collect();
        let mut pools: HashMap<u64, u64> = own.iter().map(|k| (k.hash, k.pool)).collect();
        for p in inner.peers.values() {
            for h in &p.hot {
                *rates.entry(h.h).or_insert_with(|| inner.demand.rate(h.h)) += f64::from(h.r);
                let pool = pools.entry(h.h).or_default();
                if *pool == 0 {
                    *pool = h.p;
                }
            }
        }
        let mut usable_in: HashMap<u64, usize> = HashMap::new();
        let mut next = HashMap::new();
        for (&hash, &rate) in &rates {
            let (k, below) = inner.replicas.get(&hash).copied().unwrap_or((1, 0));
            let pool = pools[&hash];
            let usable = *usable_in.entry(pool).or_insert_with(|| usable(pool));
            let want = match cap {
                Some(c) => (rate / (TARGET_SHARE * c)).ceil().max(1.0) as usize,
                None if rate >= MIN_HOT_RATE && replicas_queue(&topo, &view, hash, pool, k) => {
                    usize::from(k) + 1
                }
                None if rate < MIN_HOT_RATE => 1,
                None => usize::from(k),
            }
            .clamp(1, usable.min(usize::from(u8::MAX))) as u8;
            // Up at once; down after the cooldown.
            let entry = if want >= k || below + 1 >= COOLDOWN_TICKS {
                (want, 0)
            } else {
                (k, below + 1)
            };
            if entry.0 > 1 || entry.1 > 0 {
                next.insert(hash, entry);
            }
        }
        // Keys no longer reported keep shrinking on the same cooldown.
        for (&hash, &(k, below)) in &inner.replicas {
            if !rates.contains_key(&hash) && k > 1 && below + 1 < COOLDOWN_TICKS {
                next.insert(hash, (k, below + 1));
            }
        }
        inner.replicas = next;
        let mut hot: Vec<(u64, u8, f64)> = inner
            .replicas
            .iter()
            .map(|(&h, &(k, _))| (h, k, rates.get(&h).copied().unwrap_or(0.0)))
            .collect();
        hot.sort_by(|a, b| b.2.total_cmp(&a.2));
        inner.table = ReplicaTable::build(hot.iter().map(|&(h, k, _)| (h, k)));
        inner.top = own
            .into_iter()
            .take(METRIC_KEYS)
            .map(|mut k| {
                k.rate = rates.get(&k.hash).copied().unwrap_or(k.rate);
                k
            })
            .collect();
    }

    /// The top keys entering this node with their cluster rates and replicas (for metrics).
    pub fn top_keys(&self) -> Vec<(String, f64, usize)> {
        let inner = self.lock();
        inner
            .top
            .iter()
            .map(|k| (k.name.clone(), k.rate, inner.table.get(k.hash)))
            .collect()
    }

    /// The node entries of a view for the current topology.
    fn view_of(&self, inner: &Inner) -> Vec<NodeState> {
        let topo = self.router.topology();
        let stale = self.stale_after();
        let backend = |r: &BackendReport, at: Instant| BackendState {
            known: r.known && at.elapsed() < stale,
            healthy: r.healthy,
            running: r.running,
            waiting: r.waiting,
            kv: r.kv,
            max_lora: r.max_lora,
            lora_busy: r.lora_busy,
            batch: r.batch,
            capacity: r.capacity,
            gpu: {
                let mut g = r.gpu.clone();
                g.sort_unstable();
                g.dedup();
                g.into()
            },
            seq: r.seq,
            models: {
                let mut m: Vec<u64> = r.models.iter().map(|n| pool_hash(n)).collect();
                m.sort_unstable();
                m.dedup();
                m.into()
            },
        };
        topo.peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i == topo.me {
                    return NodeState {
                        backends: (0..inner.local.len())
                            .map(|b| {
                                self.local_report(inner, b)
                                    .map_or_else(BackendState::default, |(r, at)| backend(&r, at))
                            })
                            .collect(),
                        disk: None,
                    };
                }
                match inner.peers.get(&p.addr) {
                    Some(rec) => NodeState {
                        backends: rec.reports.iter().map(|(r, at)| backend(r, *at)).collect(),
                        disk: rec.filter_known.then(|| rec.filter.clone()),
                    },
                    None => NodeState::default(),
                }
            })
            .collect()
    }

    /// Build the view and hand it to the router.
    fn install(&self, inner: &Inner) {
        let generation = self.router.topology().generation;
        self.router.set_view(View {
            generation,
            nodes: self.view_of(inner),
            replicas: inner.table.clone(),
            pools: Arc::new(self.pools_of(inner)),
        });
    }

    /// The cluster's base models: every node's backends' names.
    fn pools_of(&self, inner: &Inner) -> Pools {
        let topo = self.router.topology();
        Pools::build(topo.peers.iter().enumerate().map(|(i, p)| {
            if i == topo.me {
                Some(
                    inner
                        .local
                        .iter()
                        .map(|l| l.as_ref().map_or(&[][..], |(s, _)| &s.models[..]))
                        .collect(),
                )
            } else {
                inner
                    .peers
                    .get(&p.addr)
                    .map(|r| r.reports.iter().map(|(r, _)| &r.models[..]).collect())
            }
        }))
    }
}

/// Whether every one of the key's first `k` nodes among those serving its `pool` (0: any) has
/// a queue: on each of its backends serving the pool whose metrics are known, one at least.
fn replicas_queue(topo: &Topology, view: &[NodeState], key: u64, pool: u64, k: u8) -> bool {
    let serving = |i: usize| view.get(i).map(|s| s.serving(pool).map(|(_, b)| b));
    let mut order = [0u16; MAX_TOP];
    let n = topo.placement.top_where(key, &mut order, |i| {
        serving(i).is_some_and(|mut b| b.next().is_some())
    });
    let firsts = &order[..n.min(usize::from(k))];
    !firsts.is_empty()
        && firsts.iter().all(|&i| {
            serving(usize::from(i)).is_some_and(|backends| {
                let mut known = backends.filter(|b| b.known).peekable();
                known.peek().is_some() && known.all(|b| b.waiting > 0.0)
            })
        })
}

#[cfg(test)]
mod tests;
