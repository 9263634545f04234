//! The stand-in vLLM: an OpenAI-compatible server that resolves LoRA adapters from a directory
//! exactly as vLLM's `lora_filesystem_resolver` does, and tells which weights answered.
//!
//! What it mirrors (vLLM 0.32, `OpenAIServingModels` and the filesystem resolver):
//! - `model` equal to one of the served names (`--served-model-name`, several allowed; `--model`
//!   when none is given), or absent, is the base model; `--model` itself is not a name to
//!   request when served names are set. An adapter's `base_model_name_or_path` must equal
//!   `--model`. `GET /v1/models` lists one base entry per served name (`id` the served name,
//!   `root` `--model`).
//! - A name already loaded is known for the server's lifetime; its weights stay in memory while
//!   it is among the last `max_cpu_loras` adapters used (vLLM's CPU LoRA cache, 4 by default as
//!   with `--max-loras 4`), and are read from its directory again when it was pushed out: a
//!   vanished or changed file then shows. Any other name is resolved ([`super::vllm_resolve`])
//!   once, under a per-name lock, so many concurrent first requests cause one directory read.
//! - An idle keep-alive connection is closed 5 s after its last answer (uvicorn's
//!   `timeout_keep_alive`).
//! - Unknown or unresolvable: 404 with vLLM's exact body; found but not loadable (no weights,
//!   weights not whole): 400 `BadRequestError`; the resolver raising (bad JSON, missing key):
//!   500 `InternalServerError`. Failures are not cached: the next request resolves again.
//! - `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter` with vLLM's status codes and
//!   messages; `GET /v1/models` lists the base then the loaded adapters (`parent` = base).
//!
//! What it adds for tests: counters per model and per adapter, the content hash of each loaded
//! adapter (printed in every answer), faults such as a loaded adapter's weights vanishing from
//! disk, SSE pacing per server or per request (`x-test-event-gap-ms`), a delay before the
//! answer (`x-test-ttft-ms`), and the transparency probes of [`super::probes`].
//!
//! The engine behind inference (batch, queue, LoRA slots, load stalls) and vLLM's `/metrics`
//! are modelled in [`super::vllm_engine`]; by default it runs everything at once.
//!
//! This file owns the configuration, the state and the handle; the routes are in
//! `vllm_routes.rs`.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::runtime::Handle;

use super::{
    server::{RequestHead, Server, handler, lock},
    vllm_api,
    vllm_engine::{Engine, EngineConfig},
    vllm_resolve::LoadedAdapter,
    vllm_routes::route,
};

/// How to run the stand-in.
#[derive(Debug, Clone)]
pub struct VllmConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub bind: SocketAddr,
    /// The `--model` string: what adapters must name as their base (`root` in `/v1/models`),
    /// and the served name when `served_model_names` is empty.
    pub base_model: String,
    /// `--served-model-name`: the names requests use for the base model, the first one the
    /// name answers carry; empty: `base_model`.
    pub served_model_names: Vec<String>,
    /// `VLLM_LORA_RESOLVER_CACHE_DIR`; `None` disables the resolver (every adapter name 404s).
    pub lora_dir: Option<PathBuf>,
    /// Gap between SSE events (a request's `x-test-event-gap-ms` overrides it).
    pub event_gap: Duration,
    /// `max_tokens` when the request has none.
    pub max_tokens: u64,
    pub max_model_len: u64,
    /// `--max-cpu-loras`: adapters whose weights stay in memory (least recently used pushed
    /// out first). A loaded adapter outside them has its weights read from disk again on its
    /// next request: a vanished or broken file then fails that request with 500. `0`: read on
    /// every request.
    pub max_cpu_loras: usize,
    /// uvicorn's `timeout_keep_alive`: an idle keep-alive connection is closed this long after
    /// its last answer (`None`: never).
    pub keep_alive_timeout: Option<Duration>,
    /// Request heads kept for [`VllmStandIn::recent_heads`].
    pub keep_heads: usize,
    /// Batch, LoRA slots and their costs ([`EngineConfig::unbounded`] by default).
    pub engine: EngineConfig,
    /// Serve `/metrics` (false: 404, as a server without vLLM's metrics).
    pub metrics: bool,
}

/// vLLM's CPU LoRA cache as `--max-loras 4` gives it (`--max-cpu-loras` defaults to it).
pub const DEFAULT_MAX_CPU_LORAS: usize = 4;
/// uvicorn's default `timeout_keep_alive`, which vLLM keeps.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

impl VllmConfig {
    pub fn new(base_model: impl Into<String>) -> VllmConfig {
        VllmConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_model: base_model.into(),
            served_model_names: Vec::new(),
            lora_dir: None,
            event_gap: Duration::from_millis(5),
            max_tokens: 8,
            max_model_len: 2048,
            max_cpu_loras: DEFAULT_MAX_CPU_LORAS,
            keep_alive_timeout: Some(KEEP_ALIVE_TIMEOUT),
            keep_heads: 256, // loraplex scrapes /metrics every second: room for minutes of them
            engine: EngineConfig::unbounded(),
            metrics: true,
        }
    }

    /// No `/metrics` (404): a vLLM whose metrics loraplex cannot read.
    pub fn without_metrics(mut self) -> VllmConfig {
        self.metrics = false;
        self
    }

    pub fn engine(mut self, engine: EngineConfig) -> VllmConfig {
        self.engine = engine;
        self
    }

    pub fn lora_dir(mut self, dir: impl Into<PathBuf>) -> VllmConfig {
        self.lora_dir = Some(dir.into());
        self
    }

    pub fn event_gap(mut self, gap: Duration) -> VllmConfig {
        self.event_gap = gap;
        self
    }

    /// `--served-model-name a b ...`.
    pub fn served_model_names<S: Into<String>>(
        mut self,
        names: impl IntoIterator<Item = S>,
    ) -> VllmConfig {
        self.served_model_names = names.into_iter().map(Into::into).collect();
        self
    }

    /// Read a loaded adapter's weights on every request (`max_cpu_loras` 0), or keep the
    /// default CPU cache.
    pub fn reread_weights(mut self, on: bool) -> VllmConfig {
        self.max_cpu_loras = if on { 0 } else { DEFAULT_MAX_CPU_LORAS };
        self
    }

    pub fn max_cpu_loras(mut self, n: usize) -> VllmConfig {
        self.max_cpu_loras = n;
        self
    }

    pub fn keep_alive_timeout(mut self, limit: Option<Duration>) -> VllmConfig {
        self.keep_alive_timeout = limit;
        self
    }

    /// The names requests use for the base model (`--served-model-name`, else `--model`).
    pub fn served_names(&self) -> Vec<&str> {
        if self.served_model_names.is_empty() {
            vec![self.base_model.as_str()]
        } else {
            self.served_model_names.iter().map(String::as_str).collect()
        }
    }

    /// Whether a request naming `model` is a base-model request.
    pub fn is_base(&self, model: &str) -> bool {
        self.served_names().contains(&model)
    }

    pub fn bind(mut self, addr: SocketAddr) -> VllmConfig {
        self.bind = addr;
        self
    }
}

/// Something that went wrong under vLLM's feet, for tests to assert on (or against).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VllmFault {
    /// A request used a loaded adapter whose weights file is no longer on disk: the next time
    /// vLLM re-reads it (LoRA cache eviction) that request fails.
    WeightsGoneWhileLoaded { name: String, path: PathBuf },
    /// Read again (after leaving the CPU cache), the weights under a loaded name had changed
    /// without an unload.
    WeightsChangedWhileLoaded { name: String, old: u64, new: u64 },
}

/// An adapter directory the resolver found but could not use: the config unreadable (vLLM's
/// 500), the weights missing or not whole (400), or a directory without `adapter_config.json`
/// (404). In front of loraplex each one is a partial adapter made visible to vLLM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub name: String,
    /// The status vLLM answered.
    pub status: u16,
    pub why: String,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) loaded: Vec<LoadedAdapter>,
    /// Names whose weights are in memory, most recently used first (the CPU LoRA cache).
    pub(super) in_memory: VecDeque<String>,
    pub(super) requests: HashMap<String, u64>,
    pub(super) served: HashMap<String, u64>,
    pub(super) resolutions: HashMap<String, u64>,
    pub(super) loads: HashMap<String, u64>,
    pub(super) unloads: HashMap<String, u64>,
    pub(super) rereads: HashMap<String, u64>,
    pub(super) faults: Vec<VllmFault>,
    pub(super) refusals: Vec<Refusal>,
}

pub(super) struct State {
    pub(super) config: VllmConfig,
    pub(super) healthy: AtomicBool,
    /// `GET /health` requests still to be answered by closing the connection.
    pub(super) health_hang_ups: AtomicU64,
    pub(super) event_gap_ms: AtomicU64,
    pub(super) next_id: AtomicU64,
    pub(super) inner: Mutex<Counters>,
    /// vLLM's `lora_resolver_lock`: one resolution or load per name at a time.
    pub(super) name_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(super) engine: Arc<Engine>,
}

/// A running stand-in vLLM. Dropping it stops the server.
pub struct VllmStandIn {
    server: Server,
    state: Arc<State>,
}

pub(super) fn bump(map: &mut HashMap<String, u64>, key: &str) {
    *map.entry(key.to_owned()).or_default() += 1;
}

impl VllmStandIn {
    /// Start on the current tokio runtime (call from inside `#[tokio::test]` or a runtime).
    pub fn start(config: VllmConfig) -> io::Result<VllmStandIn> {
        VllmStandIn::start_on(&Handle::current(), config)
    }

    /// Start on the runtime behind `rt` (usable from a plain thread, e.g. the control plane).
    pub fn start_on(rt: &Handle, config: VllmConfig) -> io::Result<VllmStandIn> {
        let state = Arc::new(State {
            healthy: AtomicBool::new(true),
            health_hang_ups: AtomicU64::new(0),
            event_gap_ms: AtomicU64::new(config.event_gap.as_millis() as u64),
            next_id: AtomicU64::new(1),
            inner: Mutex::new(Counters::default()),
            name_locks: Mutex::new(HashMap::new()),
            engine: Engine::new(config.engine.clone()),
            config,
        });
        let routed = state.clone();
        let h = handler(move |req| route(routed.clone(), req));
        let config = &state.config;
        let server = Server::start_with(
            rt,
            config.bind,
            config.keep_heads,
            config.keep_alive_timeout,
            h,
        )?;
        Ok(VllmStandIn { server, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The `--model` string (what adapters name as their base).
    pub fn base_model(&self) -> &str {
        &self.state.config.base_model
    }

    /// The name answers for the base model carry (the first served name).
    pub fn served_name(&self) -> &str {
        self.state.config.served_names()[0]
    }

    /// `GET /health` answers 200 when healthy, 503 otherwise.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// From now on, read each request's body `delay` after its head (a busy server).
    pub fn delay_body_reads(&self, delay: Duration) {
        self.server.stats().delay_body_reads(delay);
    }

    /// The next `n` `GET /health` requests get no answer: the connection closes once each is
    /// read (a busy or restarting server's cut connection).
    pub fn hang_up_health(&self, n: u64) {
        self.state.health_hang_ups.store(n, Ordering::SeqCst);
    }

    /// Hang-ups ordered by [`VllmStandIn::hang_up_health`] not yet used.
    pub fn health_hang_ups_left(&self) -> u64 {
        self.state.health_hang_ups.load(Ordering::SeqCst)
    }

    pub fn set_event_gap(&self, gap: Duration) {
        self.state
            .event_gap_ms
            .store(gap.as_millis() as u64, Ordering::SeqCst);
    }

    fn read<T>(&self, f: impl FnOnce(&Counters) -> T) -> T {
        f(&lock(&self.state.inner))
    }

    /// Inference requests that named `model` (base or adapter), whatever their outcome.
    pub fn requests(&self, model: &str) -> u64 {
        self.read(|c| c.requests.get(model).copied().unwrap_or(0))
    }

    /// Inference requests for `model` that got an answer from the model.
    pub fn served(&self, model: &str) -> u64 {
        self.read(|c| c.served.get(model).copied().unwrap_or(0))
    }

    /// Times the resolver read the directory for `name`.
    pub fn resolutions(&self, name: &str) -> u64 {
        self.read(|c| c.resolutions.get(name).copied().unwrap_or(0))
    }

    /// Successful loads of `name` (resolver or load endpoint).
    pub fn loads(&self, name: &str) -> u64 {
        self.read(|c| c.loads.get(name).copied().unwrap_or(0))
    }

    /// Successful unloads of `name`.
    pub fn unloads(&self, name: &str) -> u64 {
        self.read(|c| c.unloads.get(name).copied().unwrap_or(0))
    }

    /// The adapters in memory, in load order.
    pub fn loaded(&self) -> Vec<LoadedAdapter> {
        self.read(|c| c.loaded.clone())
    }

    /// xxh3 of the weights loaded under `name`, if loaded.
    pub fn loaded_hash(&self, name: &str) -> Option<u64> {
        self.read(|c| {
            c.loaded
                .iter()
                .find(|l| l.name == name)
                .map(|l| l.weights_hash)
        })
    }

    /// The text an answer for `model` carries now (`None` for an adapter not loaded), given the
    /// prompt's word count and `max_tokens`.
    pub fn expected_text(
        &self,
        model: &str,
        prompt_tokens: u64,
        max_tokens: u64,
    ) -> Option<String> {
        if self.state.config.is_base(model) {
            return Some(vllm_api::completion_text(None, prompt_tokens, max_tokens));
        }
        let hash = self.loaded_hash(model)?;
        Some(vllm_api::completion_text(
            Some((model, hash)),
            prompt_tokens,
            max_tokens,
        ))
    }

    pub fn faults(&self) -> Vec<VllmFault> {
        self.read(|c| c.faults.clone())
    }

    /// Adapter directories found broken or partial when resolving, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.read(|c| c.refusals.clone())
    }

    /// Forget every loaded adapter, as a restarted vLLM would (counters are kept).
    pub fn forget_all(&self) {
        let mut inner = lock(&self.state.inner);
        inner.loaded.clear();
        inner.in_memory.clear();
    }

    /// Times a loaded adapter's weights were read from disk again after leaving the CPU cache.
    pub fn rereads(&self, name: &str) -> u64 {
        self.read(|c| c.rereads.get(name).copied().unwrap_or(0))
    }

    /// The engine model: queue, slots, slot loads.
    pub fn engine(&self) -> &Engine {
        &self.state.engine
    }

    /// Restart: loaded adapters forgotten, slots emptied, a new `process_start_time_seconds`
    /// (the request counters of the stand-in are kept).
    pub fn restart(&self) {
        self.forget_all();
        self.state.engine.restart();
    }

    /// Requests whose client (the proxy) went away before the answer was complete.
    pub fn cancelled(&self) -> u64 {
        self.server.stats().cancelled()
    }

    pub fn cancelled_targets(&self) -> Vec<String> {
        self.server.stats().cancelled_targets()
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.server.stats().connections()
    }

    /// HTTP requests received, all routes.
    pub fn http_requests(&self) -> u64 {
        self.server.stats().requests()
    }

    /// The last request heads received, oldest first, without the scrapes of `/metrics`
    /// (loraplex reads them every `vllm.metrics_interval`: monitoring, not traffic a test
    /// counts).
    pub fn recent_heads(&self) -> Vec<RequestHead> {
        let mut heads = self.server.stats().recent_heads();
        heads.retain(|h| h.target != "/metrics");
        heads
    }

    /// Stop and wait until the port is closed.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}
