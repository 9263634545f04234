//! Talking to the local vLLM: where it is, whether it is healthy, which base model it serves,
//! and telling it to forget an adapter.
//!
//! The data plane proxies to vLLM over its own pooled connections (see `proxy::upstream`);
//! this module is the control-plane side (reqwest on tokio): the `/health` poll every
//! `vllm.health_check_interval`, learning the base model from `GET /v1/models` when
//! `vllm.model_name` is unset (so the flags-only quick start works), and
//! `POST /v1/unload_lora_adapter` after an adapter is evicted or replaced.
//!
//! Added for routing by what vLLM holds: [`metrics`] (the `/metrics` parser), `scrape.rs` (the
//! scrape every `vllm.metrics_interval`, feeding the cluster state), and [`Vllm::load`]
//! (`POST /v1/load_lora_adapter`, for warm-ups with `load` and preloaded adapters), with
//! [`Vllm::restarts`] telling when vLLM came back or restarted.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Deserialize;

pub mod metrics;
mod scrape;

use crate::{
    config::Config,
    control::Control,
    error::{Error, ErrorKind},
    metrics::{Metrics, ResultLabel},
    shutdown::Shutdown,
};

/// Time limit of one control-plane call to vLLM (health, models, unload).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Vllm {
    /// Base URL without a trailing slash, e.g. `http://localhost:8000`.
    pub url: String,
    /// Resolved once at start; the data plane connects to these.
    pub addrs: Vec<SocketAddr>,
    configured_model: Option<Arc<str>>,
    learnt_model: OnceLock<Arc<str>>,
    healthy: AtomicBool,
    /// A health check has completed (before it, a successful scrape counts as healthy).
    checked: AtomicBool,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    interval: Duration,
    metrics_interval: Duration,
    /// `vllm.max_loras`: the slot count when vLLM does not say.
    fallback_max_loras: u16,
    /// Bumped when vLLM comes back healthy or its process start time changes.
    restarts: tokio::sync::watch::Sender<u64>,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(Deserialize)]
struct ModelCard {
    id: String,
    #[serde(default)]
    parent: Option<String>,
}

impl Vllm {
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Arc<Vllm>, Error> {
        let url = cfg.vllm_url.trim_end_matches('/').to_owned();
        let addrs = resolve(&url)?;
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        Ok(Arc::new(Vllm {
            url,
            addrs,
            configured_model: cfg.vllm.model_name.as_deref().map(Arc::from),
            learnt_model: OnceLock::new(),
            healthy: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            client,
            metrics,
            interval: cfg.vllm.health_check_interval,
            metrics_interval: cfg.vllm.metrics_interval,
            fallback_max_loras: cfg.vllm.max_loras.min(u32::from(u16::MAX)) as u16,
            restarts: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// Changes whenever vLLM came back healthy or restarted (its loaded adapters are gone).
    pub fn restarts(&self) -> tokio::sync::watch::Receiver<u64> {
        self.restarts.subscribe()
    }

    fn announce_restart(&self) {
        self.restarts.send_modify(|n| *n += 1);
    }

    /// `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`: load an adapter stored at
    /// `path` into vLLM now. "Already loaded" (400 naming it) counts as success.
    pub async fn load(&self, name: &str, path: &std::path::Path) -> Result<(), Error> {
        let res = self
            .client
            .post(format!("{}/v1/load_lora_adapter", self.url))
            .json(&serde_json::json!({ "lora_name": name, "lora_path": path }))
            .send()
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("load {name}: {e}")))?;
        let status = res.status();
        if status.is_success() {
            tracing::debug!(adapter = name, "loaded into vLLM");
            return Ok(());
        }
        let body = res.text().await.unwrap_or_default();
        if status.as_u16() == 400 && body.contains("already been loaded") {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::BadGateway,
            format!(
                "vLLM refused to load {name}: HTTP {status}: {}",
                body.trim()
            ),
        ))
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The served base model: configured, or learnt from vLLM.
    pub fn base_model(&self) -> Option<Arc<str>> {
        self.configured_model
            .clone()
            .or_else(|| self.learnt_model.get().cloned())
    }

    /// `GET /v1/models` and keep the first model without a parent (the base model).
    pub async fn learn_base_model(&self) -> Result<Arc<str>, Error> {
        if let Some(m) = self.base_model() {
            return Ok(m);
        }
        let unreachable = |e: reqwest::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "vLLM at {} is unreachable and vllm.model_name is unset: {e}",
                    self.url
                ),
            )
        };
        let list: ModelList = self
            .client
            .get(format!("{}/v1/models", self.url))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unreachable)?
            .json()
            .await
            .map_err(unreachable)?;
        let base = list
            .data
            .into_iter()
            .find(|m| m.parent.is_none())
            .ok_or_else(|| Error::new(ErrorKind::BadGateway, "vLLM lists no base model"))?;
        tracing::info!(base_model = %base.id, "learnt the base model from vLLM");
        Ok(self.learnt_model.get_or_init(|| Arc::from(base.id)).clone())
    }

    /// Tell vLLM to forget `name` so its next request re-resolves it from disk.
    /// "Not loaded" answers (404, 400) count as success.
    pub async fn unload(&self, name: &str) -> Result<(), Error> {
        let res = self
            .client
            .post(format!("{}/v1/unload_lora_adapter", self.url))
            .json(&serde_json::json!({ "lora_name": name }))
            .send()
            .await;
        let result = match &res {
            Ok(r) if r.status().is_success() => "ok",
            Ok(r) if matches!(r.status().as_u16(), 400 | 404) => "not_loaded",
            Ok(_) => "error",
            Err(_) => "unreachable",
        };
        self.metrics
            .vllm_unloads
            .get_or_create(&ResultLabel { result })
            .inc();
        match res {
            Ok(r) if result != "error" => {
                tracing::debug!(
                    adapter = name,
                    status = r.status().as_u16(),
                    "unloaded from vLLM"
                );
                Ok(())
            }
            Ok(r) => Err(Error::new(
                ErrorKind::BadGateway,
                format!("vLLM refused to unload {name}: HTTP {}", r.status()),
            )),
            Err(e) => Err(Error::new(
                ErrorKind::Unavailable,
                format!("unload {name}: {e}"),
            )),
        }
    }

    async fn check_health(&self) -> bool {
        let ok = matches!(
            self.client.get(format!("{}/health", self.url)).send().await,
            Ok(r) if r.status().is_success()
        );
        let was = self.healthy.swap(ok, Ordering::Relaxed);
        self.checked.store(true, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!(url = %self.url, "vLLM is healthy");
                self.announce_restart();
            } else {
                tracing::warn!(url = %self.url, "vLLM is unhealthy or unreachable");
            }
        }
        self.metrics.vllm_healthy.set(i64::from(ok));
        if ok
            && self.base_model().is_none()
            && let Err(e) = self.learn_base_model().await
        {
            tracing::warn!(error = %e, "cannot learn the base model yet");
        }
        ok
    }

    /// Poll `/health` now and every `vllm.health_check_interval` until shutdown.
    pub fn spawn_health_poll(self: &Arc<Self>, control: &Control, shutdown: Shutdown) {
        let this = self.clone();
        control.spawn(async move {
            let mut tick = tokio::time::interval(this.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => { this.check_health().await; }
                    _ = shutdown.wait() => return,
                }
            }
        });
    }
}

/// Resolve the host and port of an `http://host:port` URL.
fn resolve(url: &str) -> Result<Vec<SocketAddr>, Error> {
    let bad = |why: &str| Error::internal(format!("vllm_url {url:?}: {why}"));
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "http" {
        return Err(bad(
            "only http:// is supported (vLLM runs next to loraplex)",
        ));
    }
    let host = parsed.host_str().ok_or_else(|| bad("no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(bad("resolves to no address"));
    }
    Ok(addrs)
}

/// The store's view of vLLM: unload calls run on the control plane (reqwest needs tokio), so
/// they can be awaited from any thread.
pub struct Hooks {
    pub vllm: Arc<Vllm>,
    pub control: Control,
}

impl crate::store::VllmHooks for Hooks {
    fn unload(&self, name: &str) -> futures_util::future::BoxFuture<'static, Result<(), Error>> {
        let (vllm, name) = (self.vllm.clone(), name.to_owned());
        Box::pin(self.control.run(async move { vllm.unload(&name).await }))
    }

    fn base_model(&self) -> Option<String> {
        self.vllm.base_model().map(|m| m.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_localhost_and_refuses_https() {
        let addrs = resolve("http://127.0.0.1:8000").unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:8000".parse().unwrap()]);
        assert!(!resolve("http://localhost:8000/").unwrap().is_empty());
        assert!(resolve("https://vllm:8000").is_err());
        assert!(resolve("not a url").is_err());
    }
}
