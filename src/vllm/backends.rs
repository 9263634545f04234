//! The node's vLLMs (`vllm_urls`): one [`Vllm`] per backend, by backend id (its position in
//! the list), and what the rest of the node asks of them as a whole.
//!
//! - Health: the node is healthy (`/healthz`'s `vllm_healthy`, `/readyz`,
//!   `loraplex_vllm_healthy`) while at least one backend is.
//! - Base models: each backend learns its own from its `/v1/models`; a request naming any of
//!   them is a base-model request ([`Backends::base_for`]).
//! - One adapter store for all: an evicted or replaced adapter is unloaded from every backend
//!   ([`Hooks`]), each call counted on its own; warm-up `load` and `storage.preload` load into
//!   every backend serving the adapter's base model ([`Backends::load_for`]), since any of them
//!   may be sent the adapter.

use std::sync::Arc;

use super::{BaseModel, Vllm};
use crate::{
    cluster::{hashkey::pool_hash, pools::Pools, state::ClusterState},
    config::Config,
    control::Control,
    error::Error,
    metrics::Metrics,
    shutdown::Shutdown,
};

/// Where a base model is served ([`Backends::serving`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// By a vLLM of this node.
    Here,
    /// Not here; by another node, or not known yet (some node has not reported).
    Elsewhere,
    /// By no vLLM of the cluster (every node has reported).
    Nowhere,
}

/// See the module doc.
pub struct Backends {
    all: Arc<[Arc<Vllm>]>,
}

impl Backends {
    /// One backend per `cfg.vllm_urls` entry (each resolved now).
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Backends, Error> {
        let restarts = tokio::sync::watch::Sender::new(0);
        let all = (0..cfg.vllm_urls.len())
            .map(|id| Vllm::new(cfg, id, metrics.clone(), restarts.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Backends { all: all.into() })
    }

    /// Every backend, by id.
    pub fn all(&self) -> &[Arc<Vllm>] {
        &self.all
    }

    /// Backend `id`; the first for an id past the list.
    pub fn get(&self, id: usize) -> &Arc<Vllm> {
        self.all.get(id).unwrap_or(&self.all[0])
    }

    /// The first backend (the node's only one with `vllm_url`).
    pub fn first(&self) -> &Arc<Vllm> {
        &self.all[0]
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// At least one backend is healthy.
    pub fn is_healthy(&self) -> bool {
        self.all.iter().any(|b| b.is_healthy())
    }

    /// Changes whenever any backend came back healthy or restarted.
    pub fn restarts(&self) -> tokio::sync::watch::Receiver<u64> {
        self.all[0].restarts()
    }

    /// The first backend whose base model `model` names (served name or `--model`), with its
    /// base model; `None` when no backend's known base model is `model`.
    pub fn base_for(&self, model: &str) -> Option<(usize, Arc<BaseModel>)> {
        self.all.iter().find_map(|b| {
            b.base_model()
                .filter(|base| base.is_base(model))
                .map(|base| (b.id, base))
        })
    }

    /// Where base model `base` is served, as this node knows it: a vLLM of this node serving
    /// it answers for itself (even before the cluster's view lists it); else the cluster's view
    /// says whether another node does, or (once every node has reported) none.
    pub fn serving(&self, pools: &Pools, base: &str) -> Serving {
        if self.base_for(base).is_some() {
            Serving::Here
        } else if pools.complete() && !pools.serves(pool_hash(base)) {
            Serving::Nowhere
        } else {
            Serving::Elsewhere
        }
    }

    /// Whether every backend's base model is known (learnt or configured), down ones aside.
    pub fn all_known(&self) -> bool {
        self.all.iter().any(|b| b.base_model().is_some())
            && self
                .all
                .iter()
                .all(|b| b.base_model().is_some() || b.is_down())
    }

    /// Learn the base model of every backend not known yet now, in parallel, but those a health
    /// check found down (their health poll learns it when they come back); the first error
    /// when none is known afterwards.
    pub async fn learn_base_models(&self) -> Result<(), Error> {
        let missing = self
            .all
            .iter()
            .filter(|b| b.base_model().is_none() && !b.is_down());
        let results = futures_util::future::join_all(missing.map(|b| b.learn_base_model())).await;
        match results.into_iter().find_map(Result::err) {
            Some(e) if !self.all.iter().any(|b| b.base_model().is_some()) => Err(e),
            None if !self.all.iter().any(|b| b.base_model().is_some()) => Err(Error::new(
                crate::error::ErrorKind::Unavailable,
                "no vLLM backend is reachable to tell its base model",
            )),
            _ => Ok(()),
        }
    }

    /// Load an adapter stored at `path` into the backends whose base model is `base` (its
    /// `--model` or a served name); into every backend when `base` is `None` (not learnt: any
    /// of them may be sent the adapter). `Ok` with the URLs of the backends that loaded it when
    /// one did at least; else the first backend's error. A 400 when no backend of the node
    /// serves `base`.
    pub async fn load_for(
        &self,
        name: &str,
        path: &std::path::Path,
        base: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        let targets: Vec<&Arc<Vllm>> = self
            .all
            .iter()
            .filter(|b| base.is_none_or(|m| b.base_model().is_some_and(|k| k.is_base(m))))
            .collect();
        if let (true, Some(base)) = (targets.is_empty(), base) {
            return Err(Error::bad_request(format!(
                "adapter {name} needs base model {base}, which no vLLM of this node serves \
                 (requests for it go to the nodes of its pool)"
            ))
            .with_param("adapters"));
        }
        let results =
            futures_util::future::join_all(targets.iter().map(|b| b.load(name, path))).await;
        let mut loaded = Vec::new();
        let mut first_err = None;
        for (b, r) in targets.iter().zip(results) {
            match r {
                Ok(()) => loaded.push(b.url.clone()),
                Err(e) => {
                    tracing::debug!(adapter = name, backend = %b.url, error = %e, "load refused");
                    first_err.get_or_insert(e);
                }
            }
        }
        match (loaded.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(loaded),
        }
    }

    /// Poll every backend's `/health` (each every `vllm.health_check_interval`).
    pub fn spawn_health_polls(&self, control: &Control, shutdown: Shutdown) {
        for b in self.all.iter() {
            b.spawn_health_poll(self.all.clone(), control, shutdown.clone());
        }
    }

    /// Scrape every backend's `/metrics` (each every `vllm.metrics_interval`).
    pub fn spawn_metrics_scrapes(
        &self,
        cluster: Arc<ClusterState>,
        control: &Control,
        shutdown: Shutdown,
    ) {
        for b in self.all.iter() {
            b.spawn_metrics_scrape(self.all.clone(), cluster.clone(), control, shutdown.clone());
        }
    }
}

/// The store's view of vLLM: unload calls run on the control plane (reqwest needs tokio), so
/// they can be awaited from any thread.
pub struct Hooks {
    pub backends: Arc<Backends>,
    pub control: Control,
}

impl crate::store::VllmHooks for Hooks {
    /// Unload from every backend (each may have loaded it), each call counted on its own;
    /// the first failure once all were tried.
    fn unload(&self, name: &str) -> futures_util::future::BoxFuture<'static, Result<(), Error>> {
        let (backends, name) = (self.backends.clone(), name.to_owned());
        let unload = self.control.run(async move {
            let calls = backends.all().iter().map(|b| b.unload(&name));
            futures_util::future::join_all(calls)
                .await
                .into_iter()
                .find_map(Result::err)
                .map_or(Ok(()), Err)
        });
        Box::pin(async move { unload.await? })
    }

    /// The first backend's `--model` (what `storage.rewrite_base_model` writes).
    fn base_model(&self) -> Option<String> {
        self.backends
            .first()
            .base_model()
            .map(|m| m.root.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vLLM of this node answers for itself, even when the cluster's view (every node has
    /// reported, and none lists it) has not caught up; else the view decides, and only once it
    /// is complete may a base model be served nowhere.
    #[test]
    fn own_vllm_first_then_the_cluster_view() {
        let yaml = "vllm_url: http://127.0.0.1:9\nvllm: { model_name: m-here }\n";
        let cfg = Config::from_yaml_str(yaml, |_| None).unwrap();
        let backends = Backends::new(&cfg, Arc::new(Metrics::new())).unwrap();
        let other = ["m-other".to_string()];
        let complete = Pools::build([Some(vec![&other[..]])]);
        assert!(complete.complete() && !complete.serves(pool_hash("m-here")));
        assert_eq!(backends.serving(&complete, "m-here"), Serving::Here);
        assert_eq!(backends.serving(&complete, "m-other"), Serving::Elsewhere);
        assert_eq!(backends.serving(&complete, "m-none"), Serving::Nowhere);
        let partial = Pools::build([Some(vec![&other[..]]), None]);
        assert_eq!(backends.serving(&partial, "m-none"), Serving::Elsewhere);
        assert_eq!(backends.serving(&partial, "m-here"), Serving::Here);
    }
}
