//! `storage.preload`: adapters fetched at start on the node(s) that would serve them, loaded into
//! vLLM, and loaded again whenever vLLM comes back healthy or restarts; never evicted (the
//! store refuses). `/readyz` waits until every attempt has finished (not succeeded): a failure
//! is logged and shown in `/admin/cache/stats` under `preload`.
//!
//! Which nodes: under `hash_on: model` the adapter name is the key, and the node its requests go
//! to preloads it: its owner (the first node of its order in the configured peer set), or, once
//! the cluster serves several base models, the first node of that order serving the adapter's
//! base model. Under any other `hash_on` every node may serve any adapter, so every node
//! serving its base preloads it. A preload set larger than `storage.max_size` (sizes from the
//! origins' manifests, or the store for what it holds) is refused at start; that check counts
//! the adapters this node owns by name (their base models are not known yet).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{
    adapter::AdapterName,
    cluster::{hashkey::pool_hash, router::Router},
    config::{Config, HashOn},
    control::Control,
    error::{Error, ErrorKind},
    origin::{
        OriginChain,
        base::{Base, BaseModels, LEARN_TIMEOUT},
    },
    shutdown::Shutdown,
    store::Store,
    vllm::{Backends, Serving},
};

/// Time the start-up size check may take (manifests of the preload set).
const SIZE_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The preload set, checked as adapter names.
pub fn names(cfg: &Config) -> Result<Vec<AdapterName>, Error> {
    cfg.storage
        .preload
        .iter()
        .enumerate()
        .map(|(i, n)| {
            AdapterName::parse(n)
                .map_err(|e| Error::internal(format!("storage.preload[{i}]: {n:?}: {}", e.message)))
        })
        .collect()
}

/// The adapters this node preloads as far as names tell (before base models are known): for
/// the start-time size check.
pub fn mine(cfg: &Config, router: &Router, all: &[AdapterName]) -> Vec<AdapterName> {
    let topo = router.topology();
    all.iter()
        .filter(|name| {
            cfg.routing.hash_on != HashOn::Model
                || topo.placement.owner(name.as_str().as_bytes()) == Some(topo.me)
        })
        .cloned()
        .collect()
}

/// Refuse a preload set larger than the disk budget. Sizes the origins cannot tell in time are
/// not counted (the fetch then fails with 507 instead, shown in the stats).
pub fn check_size(
    control: &Control,
    store: &Store,
    origins: &OriginChain,
    names: &[AdapterName],
    max_size: u64,
) -> Result<(), Error> {
    let sizes = control.handle().block_on(async {
        let mut total = 0u64;
        for name in names {
            let stored = store.stored_size(name);
            let size = match stored {
                Some(s) => Some(s),
                None => tokio::time::timeout(SIZE_CHECK_TIMEOUT, manifest_size(origins, name))
                    .await
                    .ok()
                    .flatten(),
            };
            match size {
                Some(s) => total += s,
                None => tracing::warn!(adapter = %name, "preload: size unknown at start"),
            }
        }
        total
    });
    if sizes > max_size {
        return Err(Error::new(
            ErrorKind::InsufficientStorage,
            format!(
                "storage.preload needs {sizes} bytes, more than storage.max_size ({max_size} bytes)"
            ),
        ));
    }
    Ok(())
}

async fn manifest_size(origins: &OriginChain, name: &AdapterName) -> Option<u64> {
    for origin in origins.iter() {
        if let Ok(m) = origin.manifest(name).await {
            return m.known_size();
        }
    }
    None
}

/// Fetch and load this node's part of the set (`names`: all of it) now, then again after every
/// vLLM restart; `done` is set once the first round of attempts finished. Each adapter's base
/// model is learnt first (`bases`, as a request learns it, once the cluster serves two base
/// models), then its node chosen (module doc): one no vLLM of this node serves is skipped with
/// a warning, the others are loaded only into the backends serving it.
pub fn start(
    names: Vec<AdapterName>,
    store: Arc<Store>,
    vllm: Arc<Backends>,
    (bases, router): (Arc<BaseModels>, Arc<Router>),
    control: &Control,
    done: Arc<AtomicBool>,
    shutdown: Shutdown,
) {
    if names.is_empty() {
        done.store(true, Ordering::Relaxed);
        return;
    }
    let mut restarts = vllm.restarts();
    restarts.mark_unchanged();
    control.spawn(async move {
        let names = with_bases(names, &store, &vllm, &bases, &router).await;
        for (name, _) in &names {
            match store.ensure(name).await {
                Ok(_) => store.set_preload_status(name, "stored"),
                Err(e) => {
                    tracing::warn!(adapter = %name, error = %e, "preload: fetch failed");
                    store.set_preload_status(name, format!("error: {}", e.message));
                }
            }
        }
        load_all(&names, &store, &vllm).await;
        done.store(true, Ordering::Relaxed);
        tracing::info!(adapters = names.len(), "preload attempts finished");
        loop {
            tokio::select! {
                changed = restarts.changed() => if changed.is_err() { return },
                _ = shutdown.wait() => return,
            }
            tracing::info!("vLLM is back or restarted: loading the preloaded adapters again");
            load_all(&names, &store, &vllm).await;
        }
    });
}

/// Time the start-up waits for every node to report its vLLMs' base models (then the pools as
/// known so far are used).
const POOLS_WAIT: Duration = Duration::from_secs(10);

/// This node's part of the set with each adapter's base model (`None`: not learnt, or one base
/// model in the cluster: every backend). Under `hash_on: model` only the adapters whose requests
/// come to this node (module doc); those no vLLM of this node serves are left out with a
/// warning (and their status in the stats).
async fn with_bases(
    names: Vec<AdapterName>,
    store: &Store,
    vllm: &Backends,
    bases: &Arc<BaseModels>,
    router: &Router,
) -> Vec<(AdapterName, Option<Arc<str>>)> {
    let _ = vllm.learn_base_models().await;
    let deadline = tokio::time::Instant::now() + POOLS_WAIT;
    while !router.view().pools.complete() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pools = router.view().pools.clone();
    let topo = router.topology();
    let by_owner = router.hash_on == HashOn::Model;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let base = match pools.multi().then(|| bases.lookup(&name, true)) {
            None => Base::Unknown,
            Some(Ok(base)) => base,
            Some(Err(waiter)) => tokio::time::timeout(LEARN_TIMEOUT, waiter.wait())
                .await
                .unwrap_or(Base::Unknown),
        };
        let base = match base {
            Base::Known(base) => Some(base),
            _ => None,
        };
        // Its requests come here: the first node of its pool, or, with no base model known or
        // no node known to serve it, its owner by name (then that one node reports it).
        let key = name.as_str().as_bytes();
        let here = || match base
            .as_deref()
            .and_then(|b| router.pool_owner(key, pool_hash(b)))
        {
            Some(node) => node == topo.peers[topo.me].addr,
            None => topo.placement.owner(key) == Some(topo.me),
        };
        if by_owner && !here() {
            continue;
        }
        let Some(base) = base else {
            out.push((name, None));
            continue;
        };
        let why = match vllm.serving(&pools, &base) {
            Serving::Here => {
                out.push((name, Some(base)));
                continue;
            }
            Serving::Nowhere => {
                format!("its base model {base} is served by no vLLM of the cluster")
            }
            Serving::Elsewhere => {
                format!("its base model {base} is served by no vLLM of this node")
            }
        };
        tracing::warn!(adapter = %name, base = %base, "preload: skipped: {why}");
        store.set_preload_status(&name, format!("error: skipped: {why}"));
    }
    out
}

/// Load every stored preloaded adapter into the backends serving its base model.
async fn load_all(names: &[(AdapterName, Option<Arc<str>>)], store: &Store, vllm: &Backends) {
    for (name, base) in names {
        if !store.contains(name) {
            continue;
        }
        let path = store.dir().join(name.rel_path());
        match vllm.load_for(name.as_str(), &path, base.as_deref()).await {
            Ok(_) => store.set_preload_status(name, "loaded"),
            Err(e) => {
                tracing::warn!(adapter = %name, error = %e, "preload: loading into vLLM failed");
                store.set_preload_status(name, format!("stored; load failed: {}", e.message));
            }
        }
    }
}
