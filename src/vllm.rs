//! Talking to the local vLLMs: where each is, whether it is healthy, which base model it
//! serves, and telling it to forget an adapter.
//!
//! A node fronts one or more vLLMs, its *backends* ([`Backends`], `backends.rs`), each a
//! [`Vllm`] with its own health poll, base model, metrics scrape and restart detection; they
//! share the node's one adapter store.
//!
//! The data plane proxies to vLLM over its own pooled connections (see `proxy::upstream`);
//! this module is the control-plane side (reqwest on tokio): the `/health` poll every
//! `vllm.health_check_interval`, learning the base model ([`BaseModel`]: every served name and
//! `--model`) from `GET /v1/models` once vLLM is healthy and again whenever it comes back, and
//! `POST /v1/unload_lora_adapter` after an adapter is evicted or replaced.
//!
//! Added for routing by what vLLM holds: [`metrics`] (the `/metrics` parser), `scrape.rs` (the
//! scrape every `vllm.metrics_interval`, feeding the cluster state), and [`Vllm::load`]
//! (`POST /v1/load_lora_adapter`, for warm-ups with `load` and preloaded adapters), with
//! [`Vllm::restarts`] telling when vLLM came back or restarted.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use serde::Deserialize;

mod backends;
pub mod metrics;
mod scrape;

pub use backends::{Backends, Hooks, Serving};

use crate::{
    cluster::topology::FAILED_CHECKS_DOWN,
    config::Config,
    control::Control,
    error::{Error, ErrorKind},
    metrics::{BackendLabel, Metrics, ResultLabel},
    shutdown::Shutdown,
};

/// Time limit of one control-plane call to vLLM (health, models, unload).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Vllm {
    /// Its position in `vllm_urls` (the backend id).
    pub id: usize,
    /// Base URL without a trailing slash, e.g. `http://localhost:8000`.
    pub url: String,
    /// Resolved once at start; the data plane connects to these.
    pub addrs: Vec<SocketAddr>,
    /// `vllm.model_name`: a base-model name before vLLM has told, and after.
    configured_model: Option<Arc<BaseModel>>,
    /// What vLLM's `/v1/models` said last.
    learnt_model: ArcSwapOption<BaseModel>,
    /// Set while vLLM is down (and at start): the next healthy check learns the base again.
    base_stale: AtomicBool,
    healthy: AtomicBool,
    /// Health checks in a row that got no answer (see [`Check`]).
    missed: AtomicU32,
    /// A health check has completed (before it, a successful scrape counts as healthy).
    checked: AtomicBool,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    interval: Duration,
    metrics_interval: Duration,
    /// `vllm.max_loras`: the slot count when vLLM does not say.
    fallback_max_loras: u16,
    /// Bumped when vLLM comes back healthy or its process start time changes (shared by
    /// every backend of the node).
    restarts: tokio::sync::watch::Sender<u64>,
    /// The labels of its `loraplex_vllm_backend_*` series, as last published.
    label: std::sync::Mutex<BackendLabel>,
    /// Its last sample (the node-wide gauges add the backends' up).
    last: std::sync::Mutex<Option<crate::cluster::state::LocalSample>>,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(Deserialize)]
struct ModelCard {
    id: String,
    #[serde(default)]
    root: Option<String>,
    #[serde(default)]
    parent: Option<String>,
}

/// The base model as vLLM serves it: the entries of `/v1/models` without a parent, one per
/// `--served-model-name` (vLLM takes several), each with `root` = `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModel {
    /// The served names, vLLM's first first (then `vllm.model_name` when vLLM does not list
    /// it): a request naming one of them is a base-model request.
    pub served: Vec<Arc<str>>,
    /// `--model`: what a stored adapter's `base_model_name_or_path` must equal for vLLM's
    /// resolver (`storage.rewrite_base_model` writes it).
    pub root: Arc<str>,
}

impl BaseModel {
    /// `vllm.model_name` alone, taken as both served name and `--model` until vLLM tells.
    fn configured(name: &str) -> BaseModel {
        BaseModel {
            served: vec![Arc::from(name)],
            root: Arc::from(name),
        }
    }

    /// The entries without a parent of a `/v1/models` answer, plus `configured` as a served
    /// name; `None` when vLLM lists no base model.
    fn from_cards(cards: Vec<ModelCard>, configured: Option<&BaseModel>) -> Option<BaseModel> {
        let mut root = None;
        let mut served: Vec<Arc<str>> = Vec::new();
        for card in cards.into_iter().filter(|c| c.parent.is_none()) {
            root.get_or_insert_with(|| card.root.clone().unwrap_or_else(|| card.id.clone()));
            served.push(Arc::from(card.id));
        }
        let root = Arc::from(root?);
        if let Some(name) = configured.map(BaseModel::name)
            && !served.contains(name)
        {
            tracing::warn!(
                model_name = %name,
                served = ?served,
                "vllm.model_name is not a name vLLM serves; requests naming it go to vLLM as the \
                 base model"
            );
            served.push(name.clone());
        }
        Some(BaseModel { served, root })
    }

    /// The name requests for the base model use (vLLM's first served name): the fallback's.
    pub fn name(&self) -> &Arc<str> {
        &self.served[0]
    }

    /// Whether a request naming `model` is for the base model: one of its served names, or
    /// `--model` itself (which vLLM answers 404 when served names differ, but which is never
    /// an adapter to fetch).
    pub fn is_base(&self, model: &str) -> bool {
        &*self.root == model || self.served.iter().any(|s| &**s == model)
    }
}

impl Vllm {
    /// Backend `id` of `cfg.vllm_urls`; `restarts` is shared by the node's backends.
    pub fn new(
        cfg: &Config,
        id: usize,
        metrics: Arc<Metrics>,
        restarts: tokio::sync::watch::Sender<u64>,
    ) -> Result<Arc<Vllm>, Error> {
        let url = cfg.vllm_urls[id].trim_end_matches('/').to_owned();
        let addrs = resolve(&url)?;
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        let label = BackendLabel {
            backend: url.clone(),
            base_model: cfg.vllm.model_name.clone().unwrap_or_default(),
        };
        Ok(Arc::new(Vllm {
            id,
            label: std::sync::Mutex::new(label),
            last: std::sync::Mutex::new(None),
            url,
            addrs,
            // With several backends each tells its own base model: `vllm.model_name` (one name)
            // would be wrong for all but one, so it is ignored (warned at start).
            configured_model: cfg
                .vllm
                .model_name
                .as_deref()
                .filter(|_| cfg.vllm_urls.len() == 1)
                .map(|name| Arc::new(BaseModel::configured(name))),
            learnt_model: ArcSwapOption::empty(),
            base_stale: AtomicBool::new(true),
            healthy: AtomicBool::new(false),
            missed: AtomicU32::new(0),
            checked: AtomicBool::new(false),
            client,
            metrics,
            interval: cfg.vllm.health_check_interval,
            metrics_interval: cfg.vllm.metrics_interval,
            fallback_max_loras: cfg.vllm.max_loras.min(u32::from(u16::MAX)) as u16,
            restarts,
        }))
    }

    /// The labels of its per-backend series now (the base model as last learnt).
    pub fn label(&self) -> BackendLabel {
        let mut label = self.label.lock().unwrap_or_else(|e| e.into_inner());
        let base = self.base_model().map(|b| b.name().to_string());
        if let Some(base) = base
            && base != label.base_model
        {
            // The base model changed (learnt, or vLLM restarted with another): its gauges move
            // to the new labels.
            let m = &self.metrics;
            m.backend_healthy.remove(&label);
            m.backend_requests_running.remove(&label);
            m.backend_requests_waiting.remove(&label);
            m.backend_kv_cache_usage.remove(&label);
            label.base_model = base;
        }
        label.clone()
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

    /// A health check found it down (not before the first check).
    pub fn is_down(&self) -> bool {
        self.checked.load(Ordering::Relaxed) && !self.is_healthy()
    }

    /// The base model: as vLLM last listed it, else `vllm.model_name`; `None` before either.
    pub fn base_model(&self) -> Option<Arc<BaseModel>> {
        self.learnt_model
            .load_full()
            .or_else(|| self.configured_model.clone())
    }

    /// Its base-model names as peers and the router know them: `root` first, then every served
    /// name, deduplicated; empty before they are known.
    pub fn model_names(&self) -> Arc<[String]> {
        let Some(base) = self.base_model() else {
            return Arc::from([]);
        };
        let mut names: Vec<String> = vec![base.root.to_string()];
        for s in &base.served {
            if !names.iter().any(|n| n == &**s) {
                names.push(s.to_string());
            }
        }
        names.into()
    }

    /// `GET /v1/models` and keep its base entries (replacing what was learnt before).
    pub async fn learn_base_model(&self) -> Result<Arc<BaseModel>, Error> {
        let unreachable = |e: reqwest::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!("vLLM at {} is unreachable: {e}", self.url),
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
        let base = BaseModel::from_cards(list.data, self.configured_model.as_deref())
            .ok_or_else(|| Error::new(ErrorKind::BadGateway, "vLLM lists no base model"))?;
        let base = Arc::new(base);
        let before = self.learnt_model.swap(Some(base.clone()));
        if before.as_deref() != Some(&*base) {
            tracing::info!(
                served = ?base.served,
                model = %base.root,
                "learnt the base model from vLLM"
            );
        }
        Ok(base)
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
        self.metrics
            .backend_unloads
            .get_or_create(&self.label())
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

    /// `all`: every backend of the node (this one among them), for the node-wide gauge.
    async fn check_health(&self, all: &[Arc<Vllm>]) -> bool {
        let check = Check::of(self.client.get(format!("{}/health", self.url)).send().await);
        let missed = match check {
            Check::NoAnswer => self.missed.fetch_add(1, Ordering::Relaxed) + 1,
            _ => {
                self.missed.store(0, Ordering::Relaxed);
                0
            }
        };
        let ok = check.healthy(self.is_healthy(), missed);
        if check == Check::NoAnswer {
            tracing::debug!(url = %self.url, missed, "vLLM's /health did not answer");
        }
        // The base model is learnt when vLLM is first seen healthy, and again whenever it
        // comes back (a restarted vLLM may serve other names or another model), before it is
        // reported healthy: ready means the base model's names are known.
        if !ok {
            self.base_stale.store(true, Ordering::Relaxed);
        } else if self.base_stale.load(Ordering::Relaxed) {
            match self.learn_base_model().await {
                Ok(_) => self.base_stale.store(false, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "cannot learn the base model yet"),
            }
        }
        // The gauges first: whoever sees the new health (`/healthz`) sees it in `/metrics` too.
        // The node-wide one is 1 while any backend is healthy.
        let any = ok || all.iter().any(|b| b.id != self.id && b.is_healthy());
        self.metrics.vllm_healthy.set(i64::from(any));
        self.metrics
            .backend_healthy
            .get_or_create(&self.label())
            .set(i64::from(ok));
        let was = self.healthy.swap(ok, Ordering::Relaxed);
        self.checked.store(true, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!(url = %self.url, backend = self.id, "vLLM is healthy");
                self.announce_restart();
            } else {
                tracing::warn!(url = %self.url, backend = self.id, "vLLM is unhealthy or unreachable");
            }
        }
        ok
    }

    /// Poll `/health` now and every `vllm.health_check_interval` until shutdown (`all`: every
    /// backend of the node).
    fn spawn_health_poll(
        self: &Arc<Self>,
        all: Arc<[Arc<Vllm>]>,
        control: &Control,
        shutdown: Shutdown,
    ) {
        let this = self.clone();
        control.spawn(async move {
            let mut tick = tokio::time::interval(this.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => { this.check_health(&all).await; }
                    _ = shutdown.wait() => return,
                }
            }
        });
    }
}

/// What one `GET /health` found. vLLM answering anything but 2xx, or refusing the connection
/// (nothing listens), is down at once; no answer in time (or a connection cut mid-answer) may be
/// a busy vLLM or a busy machine, so it takes [`FAILED_CHECKS_DOWN`] in a row, as a peer's
/// `/healthz` does: one slow answer must not move every key the node owns to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Healthy,
    Down,
    NoAnswer,
}

impl Check {
    fn of(res: Result<reqwest::Response, reqwest::Error>) -> Check {
        match res {
            Ok(r) if r.status().is_success() => Check::Healthy,
            Ok(_) => Check::Down,
            Err(e) if e.is_connect() && !e.is_timeout() => Check::Down,
            Err(_) => Check::NoAnswer,
        }
    }

    /// Healthy after this check, given the health before it and the checks in a row (this
    /// one included) that got no answer.
    fn healthy(self, was: bool, missed: u32) -> bool {
        match self {
            Check::Healthy => true,
            Check::Down => false,
            Check::NoAnswer => was && missed < FAILED_CHECKS_DOWN,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cards(json: &str) -> Vec<ModelCard> {
        serde_json::from_str::<ModelList>(json).unwrap().data
    }

    #[test]
    fn every_served_name_is_the_base_and_root_is_the_model() {
        // `--model /m/base --served-model-name a b`, one adapter loaded.
        let list = cards(
            r#"{"data":[{"id":"a","root":"/m/base","parent":null},
            {"id":"b","root":"/m/base","parent":null},
            {"id":"acme/x","root":"/store/acme/x","parent":"a"}]}"#,
        );
        let base = BaseModel::from_cards(list, None).unwrap();
        assert_eq!(base.name().as_ref(), "a");
        assert_eq!(base.root.as_ref(), "/m/base");
        assert!(base.is_base("a") && base.is_base("b") && base.is_base("/m/base"));
        assert!(!base.is_base("acme/x") && !base.is_base(""));
        // vllm.model_name that vLLM does not list still counts as the base model.
        let list = cards(r#"{"data":[{"id":"a","root":"/m/base"}]}"#);
        let configured = BaseModel::configured("old-name");
        let base = BaseModel::from_cards(list, Some(&configured)).unwrap();
        assert_eq!(base.served.len(), 2);
        assert!(base.is_base("old-name"));
        assert_eq!(base.name().as_ref(), "a");
        // No `root` (not vLLM): the id stands for it; no base entry: none.
        let base = BaseModel::from_cards(cards(r#"{"data":[{"id":"m"}]}"#), None).unwrap();
        assert_eq!(base.root.as_ref(), "m");
        let only_adapters = cards(r#"{"data":[{"id":"x","parent":"m"}]}"#);
        assert_eq!(BaseModel::from_cards(only_adapters, None), None);
    }

    /// Real vLLM 0.32 answers (`tests/fixtures/vllm/`): without and with `--served-model-name`.
    #[test]
    fn reads_real_vllm_model_lists() {
        let plain = cards(include_str!(
            "../tests/fixtures/vllm/models-after-lora.json"
        ));
        let base = BaseModel::from_cards(plain, None).unwrap();
        let path = "/tmp/loraplex-vllm-fixtures/tiny/base-a";
        assert_eq!((base.served.len(), &*base.root), (1, path));
        assert!(base.is_base(path) && !base.is_base("acme/summarizer-lora"));
        let served = cards(include_str!(
            "../tests/fixtures/vllm/models-served-name-after-lora.json"
        ));
        let base = BaseModel::from_cards(served, None).unwrap();
        assert_eq!(base.name().as_ref(), "tiny-b");
        assert_eq!(base.served.len(), 1);
        assert_eq!(&*base.root, "/tmp/loraplex-vllm-fixtures/tiny/base-b");
        assert!(!base.is_base("acme/b-lora"));
        // `--served-model-name tiny tiny-chat`: two base entries.
        let two = cards(include_str!(
            "../tests/fixtures/vllm/models-two-served-names.json"
        ));
        let base = BaseModel::from_cards(two, None).unwrap();
        let served: Vec<&str> = base.served.iter().map(|s| &**s).collect();
        assert_eq!(served, ["tiny", "tiny-chat"]);
        assert_eq!(&*base.root, "/tmp/ph-real/base");
    }

    #[test]
    fn resolves_localhost_and_refuses_https() {
        let addrs = resolve("http://127.0.0.1:8000").unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:8000".parse().unwrap()]);
        assert!(!resolve("http://localhost:8000/").unwrap().is_empty());
        assert!(resolve("https://vllm:8000").is_err());
        assert!(resolve("not a url").is_err());
    }

    /// What each kind of `/health` outcome does, over real sockets: a refused connection and a
    /// non-2xx answer are down at once; a server that never answers (timeout) or hangs up
    /// without answering is down only after two such checks in a row.
    #[tokio::test]
    async fn no_answer_takes_two_checks_in_a_row_a_refusal_or_an_error_status_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Each connection gets what the next entry says: "200", "503", "silent" (reads the
        // request, never answers) or "hangup" (reads it, closes).
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut conn, _)) = listener.accept().await {
                let what = rx.recv().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                match what {
                    "silent" => held.push(conn),
                    "hangup" => drop(conn),
                    status => {
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        );
                        let _ = conn.write_all(head.as_bytes()).await;
                    }
                }
            }
        });
        let check = |what| {
            tx.send(what).unwrap();
            let req = client.get(format!("http://{addr}/health")).send();
            async move { Check::of(req.await) }
        };
        assert_eq!(check("200").await, Check::Healthy);
        assert_eq!(check("503").await, Check::Down);
        assert_eq!(check("silent").await, Check::NoAnswer);
        assert_eq!(check("hangup").await, Check::NoAnswer);
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let res = client.get(format!("http://{refused}/health")).send().await;
        assert_eq!(Check::of(res), Check::Down);

        // Healthy until the second check in a row without an answer; one answer resets the
        // count; a definite failure needs no second.
        let mut healthy = true;
        let mut missed = 0;
        let mut step = |c: Check| {
            missed = if c == Check::NoAnswer { missed + 1 } else { 0 };
            healthy = c.healthy(healthy, missed);
            healthy
        };
        assert!(step(Check::NoAnswer));
        assert!(step(Check::Healthy));
        assert!(step(Check::NoAnswer));
        assert!(!step(Check::NoAnswer));
        assert!(!step(Check::NoAnswer), "stays down while nothing answers");
        assert!(step(Check::Healthy));
        assert!(!step(Check::Down));
        // Down before the first answer stays down on a missed check.
        assert!(!Check::NoAnswer.healthy(false, 1));
    }
}
