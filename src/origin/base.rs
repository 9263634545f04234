//! An adapter's base model: the `base_model_name_or_path` of its `adapter_config.json`, learnt
//! before the request is routed (an adapter is placed only on nodes whose vLLM serves its base).
//!
//! Where the answer comes from, first match wins:
//! 1. `routing.base_models`: the longest configured prefix of the name (no I/O; also how an
//!    adapter whose config names its base by another name, `storage.rewrite_base_model`, finds
//!    its pool);
//! 2. the cache (lock-free read; [`CAPACITY`] entries, [`TTL`], failures for [`RETRY`]);
//! 3. the adapter's config on this node's disk, when it is stored here;
//! 4. the *base owner*: the first reachable node of the adapter name's placement order, asked
//!    over the peer protocol (`GET /_loraplex/base/{name}`), which learns it once (3, then 5)
//!    and caches it for every entry node of the cluster: one origin fetch per cluster instead of
//!    one per entry node. The owner of the name is the node most likely to store the adapter
//!    already (it is where the name's keys land under `hash_on: model`);
//! 5. the configured origins in order: the config file alone ([`Origin::config`]).
//!
//! One learning per name at a time (single flight, waiters share its answer); every step has a
//! time limit ([`PEER_TIMEOUT`], [`LEARN_TIMEOUT`]), and a waiter gives up after
//! [`LEARN_TIMEOUT`] too. What it gives: [`Base::Known`], [`Base::Missing`] (every origin said
//! the adapter does not exist: a 404 without routing), or [`Base::Unknown`] (no origin
//! configured, an origin failed, a config without `base_model_name_or_path` or unreadable): the
//! request is then routed as if pools did not exist, and the store's fetch reports the error.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::{OriginChain, OriginErrorKind};
use crate::{
    adapter::{AdapterName, CONFIG_FILE},
    cluster::{protocol::PeerClient, router::Router},
    control::Control,
};

/// Names whose base is cached at most (past it, expired entries go first, then any).
pub const CAPACITY: usize = 65_536;
/// How long a learnt base is kept: an adapter's base does not change while its name stays, but
/// a name re-uploaded with another base is seen within this.
pub const TTL: Duration = Duration::from_secs(600);
/// How long "missing" or "unknown" is kept: a new upload or a recovered origin is seen soon,
/// and a burst of requests for a missing name costs one origin request, not one each.
pub const RETRY: Duration = Duration::from_secs(10);
/// Time the base owner gets to answer; past it this node asks the origins itself.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Time one learning may take in all (a waiter waits at most this long, then routes as today).
pub const LEARN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `adapter_config.json` read (real ones are under 2 KiB).
pub const MAX_CONFIG: usize = 1 << 20;

/// What is known of an adapter's base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `base_model_name_or_path` (or a `routing.base_models` rule).
    Known(Arc<str>),
    /// No origin has the adapter.
    Missing,
    /// Not learnt: no origin, an origin failure, a config without the field.
    Unknown,
}

impl Base {
    pub fn name(&self) -> Option<&str> {
        match self {
            Base::Known(b) => Some(b),
            _ => None,
        }
    }
}

/// The bounds above, in one place (tests shrink them).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity: usize,
    pub ttl: Duration,
    pub retry: Duration,
    pub peer_timeout: Duration,
    pub learn_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            capacity: CAPACITY,
            ttl: TTL,
            retry: RETRY,
            peer_timeout: PEER_TIMEOUT,
            learn_timeout: LEARN_TIMEOUT,
        }
    }
}

struct Cached {
    base: Base,
    until: Instant,
}

type Flight = watch::Receiver<Option<Base>>;

/// The base models of adapters (see the module doc). One per node, shared by every worker.
pub struct BaseModels {
    /// `routing.base_models`, longest prefix first.
    rules: Vec<(String, Arc<str>)>,
    cache: papaya::HashMap<Box<str>, Cached, foldhash::fast::RandomState>,
    /// Learnings in flight, by name and whether the owner may be asked.
    flights: Mutex<HashMap<(Box<str>, bool), Flight>>,
    /// The configured origins (the `peer` origin is not one: the owner is asked instead).
    origins: OriginChain,
    /// `storage.dir`.
    dir: PathBuf,
    /// The cluster, to find and ask the base owner (`None`: never ask).
    peers: Option<(Arc<Router>, PeerClient)>,
    control: Control,
    limits: Limits,
}

/// A learning to wait for ([`BaseModels::lookup`]); await it from any runtime.
pub struct Waiter(Flight);

impl Waiter {
    /// The answer ([`Base::Unknown`] if the learning went away); the learning itself is
    /// bounded by [`LEARN_TIMEOUT`], so is this.
    pub async fn wait(mut self) -> Base {
        match self.0.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Base::Unknown),
            Err(_) => Base::Unknown,
        }
    }
}

impl BaseModels {
    pub fn new(
        rules: &[(String, String)],
        origins: OriginChain,
        dir: PathBuf,
        peers: Option<(Arc<Router>, PeerClient)>,
        control: Control,
    ) -> Arc<BaseModels> {
        let mut rules: Vec<(String, Arc<str>)> = rules
            .iter()
            .map(|(p, b)| (p.clone(), Arc::from(b.as_str())))
            .collect();
        rules.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        Arc::new(BaseModels {
            rules,
            cache: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .build(),
            flights: Mutex::default(),
            origins,
            dir,
            peers,
            control,
            limits: Limits::default(),
        })
    }

    /// The same with other bounds.
    pub fn with_limits(self: Arc<Self>, limits: Limits) -> Arc<Self> {
        let mut me = Arc::into_inner(self).expect("with_limits before sharing");
        me.limits = limits;
        Arc::new(me)
    }

    /// The base `routing.base_models` gives `name` (longest prefix), if any.
    pub fn rule(&self, name: &str) -> Option<&Arc<str>> {
        self.rules
            .iter()
            .find(|(prefix, _)| name.starts_with(prefix.as_str()))
            .map(|(_, base)| base)
    }

    /// The rules, longest prefix first.
    pub fn rules(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules.iter().map(|(p, b)| (p.as_str(), &**b))
    }

    /// What is known now without I/O (a rule or a fresh cache entry); lock-free, no allocation.
    pub fn known(&self, name: &str) -> Option<Base> {
        if let Some(base) = self.rule(name) {
            return Some(Base::Known(base.clone()));
        }
        let cache = self.cache.pin();
        let hit = cache.get(name)?;
        (hit.until > Instant::now()).then(|| hit.base.clone())
    }

    /// The base of `name`: at once when known, else a [`Waiter`] for the learning (started
    /// here when none is in flight). `ask_owner`: false when a peer asks (the answer is learnt
    /// here, never passed on, so two nodes disagreeing on the owner cannot ask each other).
    pub fn lookup(self: &Arc<Self>, name: &AdapterName, ask_owner: bool) -> Result<Base, Waiter> {
        if let Some(base) = self.known(name.as_str()) {
            return Ok(base);
        }
        let key = (Box::<str>::from(name.as_str()), ask_owner);
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = flights.get(&key) {
            return Err(Waiter(rx.clone()));
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key.clone(), rx.clone());
        drop(flights);
        let me = self.clone();
        let name = name.clone();
        self.control.spawn(async move {
            let base = tokio::time::timeout(me.limits.learn_timeout, me.learn(&name, ask_owner))
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!(adapter = %name, "learning the base model timed out");
                    Base::Unknown
                });
            me.remember(name.as_str(), base.clone());
            me.flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            let _ = tx.send(Some(base));
        });
        Err(Waiter(rx))
    }

    /// Put an answer in the cache, making room when it is full.
    fn remember(&self, name: &str, base: Base) {
        let ttl = match base {
            Base::Known(_) => self.limits.ttl,
            _ => self.limits.retry,
        };
        let capacity = self.limits.capacity;
        let cache = self.cache.pin();
        if cache.len() >= capacity {
            let now = Instant::now();
            cache.retain(|_, v| v.until > now);
            let excess = cache.len().saturating_sub(capacity * 3 / 4);
            let victims: Vec<Box<str>> = cache.keys().take(excess).cloned().collect();
            for k in victims {
                cache.remove(&k);
            }
        }
        cache.insert(
            name.into(),
            Cached {
                base,
                until: Instant::now() + ttl,
            },
        );
    }

    /// The bases of adapters stored here, from their configs on disk (cached like any answer):
    /// no origin or peer is asked. Run on the control plane.
    pub async fn stored(&self, names: &[AdapterName]) -> Vec<Base> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let base = match self.known(name.as_str()) {
                Some(base) => base,
                None => {
                    let base = self.read_disk(name).await.unwrap_or(Base::Unknown);
                    if matches!(base, Base::Known(_)) {
                        self.remember(name.as_str(), base.clone());
                    }
                    base
                }
            };
            out.push(base);
        }
        out
    }

    /// Names cached (fresh or not).
    pub fn cached_len(&self) -> usize {
        self.cache.len()
    }

    /// Forget `name` (evicted or replaced: its next lookup learns again).
    pub fn forget(&self, name: &str) {
        self.cache.pin().remove(name);
    }

    /// Disk, then the owner (when `ask_owner` and another node), then the origins.
    async fn learn(&self, name: &AdapterName, ask_owner: bool) -> Base {
        if let Some(base) = self.read_disk(name).await {
            return base;
        }
        if ask_owner && let Some(base) = self.ask_owner_of(name).await {
            return base;
        }
        self.read_origins(name).await
    }

    async fn read_disk(&self, name: &AdapterName) -> Option<Base> {
        let path = self.dir.join(name.rel_path()).join(CONFIG_FILE);
        let meta = tokio::fs::metadata(&path).await.ok()?;
        if meta.len() > MAX_CONFIG as u64 {
            return Some(Base::Unknown);
        }
        let bytes = tokio::fs::read(&path).await.ok()?;
        Some(parse(name, &bytes))
    }

    /// Ask the first reachable node of the name's order, when that is not this node. `None`:
    /// this node is the owner, or the owner did not answer (then this node asks the origins).
    async fn ask_owner_of(&self, name: &AdapterName) -> Option<Base> {
        let (router, client) = self.peers.as_ref()?;
        let topo = router.topology();
        if topo.is_single() {
            return None;
        }
        let owner = topo
            .placement
            .order(name.as_str().as_bytes())
            .find(|&i| i == topo.me || topo.peers[i].health.is_up())?;
        if owner == topo.me {
            return None;
        }
        let peer = &topo.peers[owner].addr;
        match client
            .base_model(peer, name, self.limits.peer_timeout)
            .await
        {
            Some(answer) => Some(match (answer.base_model, answer.missing) {
                (Some(b), _) => Base::Known(Arc::from(b.as_str())),
                (None, true) => Base::Missing,
                (None, false) => Base::Unknown,
            }),
            None => {
                tracing::debug!(adapter = %name, peer = %peer, "the base owner did not answer");
                None
            }
        }
    }

    /// The config from the first origin that has the adapter.
    async fn read_origins(&self, name: &AdapterName) -> Base {
        let mut missing = 0;
        for origin in self.origins.iter() {
            match read_config(origin.as_ref(), name).await {
                Ok(bytes) => return parse(name, &bytes),
                Err(e) if e.kind == OriginErrorKind::NotFound => missing += 1,
                Err(e) => {
                    tracing::warn!(adapter = %name, origin = origin.describe(), error = %e,
                        "reading the adapter's config for its base model");
                    return Base::Unknown;
                }
            }
        }
        if missing > 0 {
            Base::Missing
        } else {
            Base::Unknown
        }
    }
}

/// The config file of `name` from `origin`, at most [`MAX_CONFIG`] bytes.
async fn read_config(
    origin: &dyn super::Origin,
    name: &AdapterName,
) -> Result<Vec<u8>, super::OriginError> {
    let mut stream = origin.config(name).await?;
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.body.next().await {
        let chunk = chunk?;
        if buf.len() + chunk.len() > MAX_CONFIG {
            return Err(super::OriginError::invalid(format!(
                "{CONFIG_FILE} is larger than {MAX_CONFIG} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.to_vec())
}

/// `base_model_name_or_path` of a config; [`Base::Unknown`] when absent or unreadable.
pub fn parse(name: &AdapterName, config: &[u8]) -> Base {
    let value: serde_json::Value = match serde_json::from_slice(config) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(adapter = %name, error = %e, "unreadable {CONFIG_FILE}");
            return Base::Unknown;
        }
    };
    match value
        .get("base_model_name_or_path")
        .and_then(|b| b.as_str())
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        Some(b) => Base::Known(Arc::from(b)),
        None => Base::Unknown,
    }
}

#[cfg(test)]
#[path = "base_tests.rs"]
mod tests;
