//! `storage.preload`: adapters fetched at start on the node(s) that would serve them, loaded into
//! vLLM, and loaded again whenever vLLM comes back healthy or restarts; never evicted (the
//! store refuses). `/readyz` waits until every attempt has finished (not succeeded): a failure
//! is logged and shown in `/admin/cache/stats` under `preload`.
//!
//! Which nodes: under `hash_on: model` the adapter name is the key, and its owner (the first
//! node of its order in the configured peer set) serves it; under any other `hash_on` every node
//! may serve any adapter, so every node preloads. A preload set larger than `storage.max_size`
//! (sizes from the origins' manifests, or the store for what it holds) is refused at start.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{
    adapter::AdapterName,
    cluster::router::Router,
    config::{Config, HashOn},
    control::Control,
    error::{Error, ErrorKind},
    origin::OriginChain,
    shutdown::Shutdown,
    store::Store,
    vllm::Backends,
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

/// The adapters this node preloads.
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

/// Fetch and load the set now, then again after every vLLM restart; `done` is set once the
/// first round of attempts finished.
pub fn start(
    names: Vec<AdapterName>,
    store: Arc<Store>,
    vllm: Arc<Backends>,
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
        for name in &names {
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

/// Load every stored preloaded adapter into vLLM.
async fn load_all(names: &[AdapterName], store: &Store, vllm: &Backends) {
    for name in names {
        if !store.contains(name) {
            continue;
        }
        let path = store.dir().join(name.rel_path());
        match vllm.load_all(name.as_str(), &path).await {
            Ok(_) => store.set_preload_status(name, "loaded"),
            Err(e) => {
                tracing::warn!(adapter = %name, error = %e, "preload: loading into vLLM failed");
                store.set_preload_status(name, format!("stored; load failed: {}", e.message));
            }
        }
    }
}
