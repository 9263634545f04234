//! The stand-in vLLM: an OpenAI-compatible server that resolves LoRA adapters from a directory
//! exactly as vLLM's `lora_filesystem_resolver` does, and tells which weights answered.
//!
//! What it mirrors (vLLM 0.32, `OpenAIServingModels` and the filesystem resolver):
//! - `model` equal to `--model` (or absent) is the base model; a name already loaded is served
//!   from memory for the server's lifetime, whatever happens to its directory afterwards;
//!   any other name is resolved ([`super::vllm_resolve`]) once, under a per-name lock, so many
//!   concurrent first requests cause one directory read.
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

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tokio::runtime::Handle;

use super::{
    probes,
    server::{Request, RequestHead, Response, Server, handler, lock},
    vllm_api::{self, Endpoint, error, model_not_found},
    vllm_resolve::{self, LoadError, LoadedAdapter, Resolution},
};

/// How to run the stand-in.
#[derive(Debug, Clone)]
pub struct VllmConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub bind: SocketAddr,
    /// The `--model` string: the served base name and what adapters must name as their base.
    pub base_model: String,
    /// `VLLM_LORA_RESOLVER_CACHE_DIR`; `None` disables the resolver (every adapter name 404s).
    pub lora_dir: Option<PathBuf>,
    /// Gap between SSE events (a request's `x-test-event-gap-ms` overrides it).
    pub event_gap: Duration,
    /// `max_tokens` when the request has none.
    pub max_tokens: u64,
    pub max_model_len: u64,
    /// Re-read a loaded adapter's weights on every request, as vLLM does after its LoRA cache
    /// evicted them: a vanished or broken file then fails the request with 500.
    pub reread_weights: bool,
    /// Request heads kept for [`VllmStandIn::recent_heads`].
    pub keep_heads: usize,
}

impl VllmConfig {
    pub fn new(base_model: impl Into<String>) -> VllmConfig {
        VllmConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_model: base_model.into(),
            lora_dir: None,
            event_gap: Duration::from_millis(5),
            max_tokens: 8,
            max_model_len: 2048,
            reread_weights: false,
            keep_heads: 64,
        }
    }

    pub fn lora_dir(mut self, dir: impl Into<PathBuf>) -> VllmConfig {
        self.lora_dir = Some(dir.into());
        self
    }

    pub fn event_gap(mut self, gap: Duration) -> VllmConfig {
        self.event_gap = gap;
        self
    }

    pub fn reread_weights(mut self, on: bool) -> VllmConfig {
        self.reread_weights = on;
        self
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
    /// With `reread_weights`: the weights under a loaded name changed without an unload.
    WeightsChangedWhileLoaded { name: String, old: u64, new: u64 },
}

#[derive(Default)]
struct Counters {
    loaded: Vec<LoadedAdapter>,
    requests: HashMap<String, u64>,
    served: HashMap<String, u64>,
    resolutions: HashMap<String, u64>,
    loads: HashMap<String, u64>,
    unloads: HashMap<String, u64>,
    faults: Vec<VllmFault>,
}

struct State {
    config: VllmConfig,
    healthy: AtomicBool,
    event_gap_ms: AtomicU64,
    next_id: AtomicU64,
    inner: Mutex<Counters>,
    /// vLLM's `lora_resolver_lock`: one resolution or load per name at a time.
    name_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A running stand-in vLLM. Dropping it stops the server.
pub struct VllmStandIn {
    server: Server,
    state: Arc<State>,
}

fn bump(map: &mut HashMap<String, u64>, key: &str) {
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
            event_gap_ms: AtomicU64::new(config.event_gap.as_millis() as u64),
            next_id: AtomicU64::new(1),
            inner: Mutex::new(Counters::default()),
            name_locks: Mutex::new(HashMap::new()),
            config,
        });
        let routed = state.clone();
        let h = handler(move |req| route(routed.clone(), req));
        let server = Server::start_on(rt, state.config.bind, state.config.keep_heads, h)?;
        Ok(VllmStandIn { server, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn base_model(&self) -> &str {
        &self.state.config.base_model
    }

    /// `GET /health` answers 200 when healthy, 503 otherwise.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
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

    pub fn faults(&self) -> Vec<VllmFault> {
        self.read(|c| c.faults.clone())
    }

    /// Forget every loaded adapter, as a restarted vLLM would (counters are kept).
    pub fn forget_all(&self) {
        lock(&self.state.inner).loaded.clear();
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

    /// The last request heads received, oldest first.
    pub fn recent_heads(&self) -> Vec<RequestHead> {
        self.server.stats().recent_heads()
    }

    /// Stop and wait until the port is closed.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

async fn route(state: Arc<State>, req: Request) -> Response {
    if let Some(resp) = probes::handle(&req).await {
        return resp;
    }
    let method = req.head.method.as_str();
    match (method, req.head.path()) {
        ("GET", "/health") => Response::new(if state.healthy.load(Ordering::SeqCst) {
            200
        } else {
            503
        }),
        ("GET", "/v1/models") => {
            let loaded = lock(&state.inner).loaded.clone();
            let config = &state.config;
            vllm_api::models(&config.base_model, config.max_model_len, &loaded)
        }
        ("POST", "/v1/chat/completions") => inference(&state, &req, Endpoint::Chat).await,
        ("POST", "/v1/completions") => inference(&state, &req, Endpoint::Completions).await,
        ("POST", "/v1/load_lora_adapter") => load_adapter(&state, &req).await,
        ("POST", "/v1/unload_lora_adapter") => unload_adapter(&state, &req).await,
        (
            _,
            "/health"
            | "/v1/models"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/load_lora_adapter"
            | "/v1/unload_lora_adapter",
        ) => Response::json(405, &serde_json::json!({"detail": "Method Not Allowed"})),
        _ => Response::json(404, &serde_json::json!({"detail": "Not Found"})),
    }
}

fn json_body(req: &Request) -> Result<Value, Response> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(error(
            400,
            "BadRequestError",
            "the body must be a JSON object",
            None,
        )),
        Err(e) => Err(error(
            400,
            "BadRequestError",
            &format!("invalid JSON: {e}"),
            None,
        )),
    }
}

fn header_ms(req: &Request, name: &str) -> Option<Duration> {
    req.head
        .header(name)
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_millis)
}

async fn inference(state: &Arc<State>, req: &Request, endpoint: Endpoint) -> Response {
    let body = match json_body(req) {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let base = state.config.base_model.as_str();
    // vLLM serves the base model when `model` is absent.
    let model = body.get("model").and_then(Value::as_str).unwrap_or(base);
    bump(&mut lock(&state.inner).requests, model);
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(state.config.max_tokens);
    if max_tokens == 0 {
        return error(
            400,
            "BadRequestError",
            "max_tokens must be at least 1, got 0.",
            None,
        );
    }
    let adapter = if model == base {
        None
    } else {
        match ensure_loaded(state, model).await {
            Ok(hash) => Some((model, hash)),
            Err(resp) => return resp,
        }
    };
    bump(&mut lock(&state.inner).served, model);
    if let Some(ttft) = header_ms(req, "x-test-ttft-ms") {
        tokio::time::sleep(ttft).await;
    }
    let prompt = vllm_api::prompt_tokens(endpoint, &body);
    let tokens = vllm_api::completion_tokens(adapter, prompt, max_tokens);
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let gap = header_ms(req, "x-test-event-gap-ms").unwrap_or(Duration::from_millis(
            state.event_gap_ms.load(Ordering::SeqCst),
        ));
        vllm_api::stream(endpoint, id, model, &tokens, gap)
    } else {
        vllm_api::whole(endpoint, id, model, &tokens, prompt)
    }
}

fn name_lock(state: &State, name: &str) -> Arc<tokio::sync::Mutex<()>> {
    lock(&state.name_locks)
        .entry(name.to_owned())
        .or_default()
        .clone()
}

/// Run blocking file work off the runtime threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(500, "InternalServerError", &e.to_string(), None))
}

/// The weights hash for a name already in memory, after the checks a re-read would make.
async fn cached(state: &State, name: &str) -> Result<Option<u64>, Response> {
    let found = lock(&state.inner)
        .loaded
        .iter()
        .find(|l| l.name == name)
        .cloned();
    let Some(loaded) = found else {
        return Ok(None);
    };
    if !state.config.reread_weights {
        if !loaded.weights_file.is_file() {
            lock(&state.inner)
                .faults
                .push(VllmFault::WeightsGoneWhileLoaded {
                    name: name.to_owned(),
                    path: loaded.path.clone(),
                });
        }
        return Ok(Some(loaded.weights_hash));
    }
    let path = loaded.path.clone();
    let reread = blocking(move || vllm_resolve::read_weights(&path)).await?;
    let mut inner = lock(&state.inner);
    match reread {
        Err(why) => {
            inner.faults.push(VllmFault::WeightsGoneWhileLoaded {
                name: name.to_owned(),
                path: loaded.path,
            });
            Err(error(500, "InternalServerError", &why, None))
        }
        Ok((_, hash)) => {
            if hash != loaded.weights_hash {
                inner.faults.push(VllmFault::WeightsChangedWhileLoaded {
                    name: name.to_owned(),
                    old: loaded.weights_hash,
                    new: hash,
                });
                if let Some(l) = inner.loaded.iter_mut().find(|l| l.name == name) {
                    l.weights_hash = hash;
                }
            }
            Ok(Some(hash))
        }
    }
}

/// The loaded weights' hash for `name`, resolving it from the directory on first use.
async fn ensure_loaded(state: &Arc<State>, name: &str) -> Result<u64, Response> {
    if let Some(hash) = cached(state, name).await? {
        return Ok(hash);
    }
    let Some(dir) = state.config.lora_dir.clone() else {
        return Err(model_not_found(name));
    };
    let name_lock = name_lock(state, name);
    let _guard = name_lock.lock().await;
    if let Some(hash) = cached(state, name).await? {
        return Ok(hash);
    }
    bump(&mut lock(&state.inner).resolutions, name);
    let (owned, base) = (name.to_owned(), state.config.base_model.clone());
    match blocking(move || vllm_resolve::resolve(&dir, &owned, &base)).await? {
        Resolution::Loaded(loaded) => {
            let hash = loaded.weights_hash;
            let mut inner = lock(&state.inner);
            bump(&mut inner.loads, name);
            inner.loaded.push(loaded);
            Ok(hash)
        }
        Resolution::NotFound => Err(model_not_found(name)),
        Resolution::Unloadable(_) => Err(error(
            400,
            "BadRequestError",
            &format!("LoRA adapter '{name}' was found but could not be loaded."),
            None,
        )),
        Resolution::Crashed(why) => Err(error(500, "InternalServerError", &why, None)),
    }
}

async fn load_adapter(state: &Arc<State>, req: &Request) -> Response {
    let body = match json_body(req) {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let name = body.get("lora_name").and_then(Value::as_str).unwrap_or("");
    let path = body.get("lora_path").and_then(Value::as_str).unwrap_or("");
    let inplace = body
        .get("load_inplace")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if name.is_empty() || path.is_empty() {
        let msg = "Both 'lora_name' and 'lora_path' must be provided.";
        return error(400, "InvalidUserInput", msg, None);
    }
    let name_lock = name_lock(state, name);
    let _guard = name_lock.lock().await;
    let already = lock(&state.inner).loaded.iter().any(|l| l.name == name);
    if already && !inplace {
        let msg = format!(
            "The lora adapter '{name}' has already been loaded. If you want to load the adapter \
             in place, set 'load_inplace' to True."
        );
        return error(400, "InvalidUserInput", &msg, None);
    }
    let (owned, dir) = (name.to_owned(), PathBuf::from(path));
    let loaded = match blocking(move || vllm_resolve::load_from_path(&owned, &dir)).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(LoadError::NotFound)) => {
            let msg = format!("Loading lora {name} failed: No adapter found for {path}");
            return error(404, "NotFoundError", &msg, None);
        }
        Ok(Err(LoadError::Broken(why))) => return error(500, "InternalServerError", &why, None),
        Err(resp) => return resp,
    };
    let mut inner = lock(&state.inner);
    inner.loaded.retain(|l| l.name != name);
    inner.loaded.push(loaded);
    bump(&mut inner.loads, name);
    Response::text(
        200,
        format!("Success: LoRA adapter '{name}' added successfully."),
    )
}

async fn unload_adapter(state: &Arc<State>, req: &Request) -> Response {
    let body = match json_body(req) {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let name = body.get("lora_name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        let msg = "'lora_name' needs to be provided to unload a LoRA adapter.";
        return error(400, "InvalidUserInput", msg, None);
    }
    let name_lock = name_lock(state, name);
    let _guard = name_lock.lock().await;
    let mut inner = lock(&state.inner);
    let before = inner.loaded.len();
    inner.loaded.retain(|l| l.name != name);
    if inner.loaded.len() == before {
        let msg = format!("The lora adapter '{name}' cannot be found.");
        return error(404, "NotFoundError", &msg, None);
    }
    bump(&mut inner.unloads, name);
    Response::text(
        200,
        format!("Success: LoRA adapter '{name}' removed successfully."),
    )
}
