//! Shared parts of the store tests: adapters on disk, a store on a real control plane, an
//! origin wrapper that counts and gates, recording vLLM hooks, monoio threads to drive the
//! store from, and a small HTTP origin server (axum) with Range, ETag, a token and faults.

#![allow(dead_code)]

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::Response,
};
use bytes::Bytes;
use futures_util::{FutureExt, future::BoxFuture, stream};
use loraplex::{
    adapter::AdapterName,
    config::{DirectIo, Driver},
    control::{Control, ControlPlane},
    error::Error,
    metrics::Metrics,
    origin::{FileSpec, FileStream, Manifest, Origin, OriginChain, OriginError},
    store::{
        Store, StoreOptions, VllmHooks,
        validate::{tiny_config, tiny_safetensors},
    },
};
use tokio::sync::watch;

pub const BASE: &str = "base/model";

/// Write a valid adapter `{root}/{name}/` with `floats` F32 weights; returns its files' bytes.
pub fn write_adapter(root: &Path, name: &str, floats: usize) -> u64 {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = tiny_config(BASE);
    let weights = tiny_safetensors(floats);
    std::fs::write(dir.join("adapter_config.json"), &config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &weights).unwrap();
    (config.len() + weights.len()) as u64
}

/// `vLLM` as the store sees it: records unloads.
#[derive(Default)]
pub struct Hooks {
    pub unloads: Mutex<Vec<String>>,
    pub base: Option<String>,
}

impl Hooks {
    pub fn unloaded(&self) -> Vec<String> {
        self.unloads.lock().unwrap().clone()
    }
}

impl VllmHooks for Hooks {
    fn unload(&self, name: &str) -> BoxFuture<'static, Result<(), Error>> {
        self.unloads.lock().unwrap().push(name.to_owned());
        async { Ok(()) }.boxed()
    }
    fn base_model(&self) -> Option<String> {
        self.base.clone()
    }
}

/// Wraps an origin: counts calls, can hold every manifest until released, can lie about a
/// file's sha256 or list a hostile path.
pub struct Counted {
    pub inner: Arc<dyn Origin>,
    pub manifests: AtomicU32,
    pub opens: AtomicU32,
    pub heads: AtomicU32,
    gate: watch::Sender<bool>,
    pub wrong_sha: AtomicBool,
    /// Announce no sizes (as an origin answering without Content-Length).
    pub strip_sizes: AtomicBool,
    pub extra_path: Mutex<Option<String>>,
    /// Stream in 64 KiB chunks with a short pause between (polling tests).
    pub slow: AtomicBool,
    /// In slow mode, hold every stream after `hold_after` chunks until released.
    body_gate: watch::Sender<bool>,
    pub hold_after: std::sync::atomic::AtomicUsize,
}

impl Counted {
    pub fn new(inner: Arc<dyn Origin>) -> Arc<Counted> {
        Arc::new(Counted {
            inner,
            manifests: AtomicU32::new(0),
            opens: AtomicU32::new(0),
            heads: AtomicU32::new(0),
            gate: watch::channel(true).0,
            wrong_sha: AtomicBool::new(false),
            strip_sizes: AtomicBool::new(false),
            extra_path: Mutex::new(None),
            slow: AtomicBool::new(false),
            body_gate: watch::channel(true).0,
            hold_after: std::sync::atomic::AtomicUsize::new(1),
        })
    }

    pub fn file(root: &Path) -> Arc<Counted> {
        Counted::new(Arc::new(loraplex::origin::file::FileOrigin::new(
            root.to_owned(),
        )))
    }

    /// Hold manifests until `release`.
    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// (Slow mode) hold every file stream after its first chunk until `release_body`.
    pub fn hold_body(&self) {
        self.body_gate.send_replace(false);
    }

    pub fn release_body(&self) {
        self.body_gate.send_replace(true);
    }

    pub fn manifests(&self) -> u32 {
        self.manifests.load(Ordering::SeqCst)
    }
}

impl Origin for Counted {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn transfer(&self) -> loraplex::config::TransferConfig {
        self.inner.transfer()
    }
    fn head<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        self.heads.fetch_add(1, Ordering::SeqCst);
        self.inner.head(name)
    }
    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        async move {
            self.manifests.fetch_add(1, Ordering::SeqCst);
            let mut gate = self.gate.subscribe();
            let _ = gate.wait_for(|open| *open).await;
            let mut m = self.inner.manifest(name).await?;
            if self.wrong_sha.load(Ordering::SeqCst) {
                for f in &mut m.files {
                    f.sha256 = Some([0xAB; 32]);
                }
            }
            if self.strip_sizes.load(Ordering::SeqCst) {
                for f in &mut m.files {
                    f.size = None;
                }
            }
            if let Some(p) = self.extra_path.lock().unwrap().clone() {
                m.files.push(FileSpec::new(p, Some(1)));
            }
            Ok(m)
        }
        .boxed()
    }
    fn open<'a>(
        &'a self,
        name: &'a AdapterName,
        manifest: &'a Manifest,
        file: &'a FileSpec,
        offset: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        self.opens.fetch_add(1, Ordering::SeqCst);
        let slow = self.slow.load(Ordering::SeqCst);
        async move {
            let mut s = self.inner.open(name, manifest, file, offset).await?;
            if self.strip_sizes.load(Ordering::SeqCst) {
                s.total = None;
            }
            if slow {
                use futures_util::StreamExt;
                let gate_rx = self.body_gate.subscribe();
                let hold_after = self.hold_after.load(Ordering::SeqCst);
                // Re-chunk into 64 KiB pieces with a pause between.
                let body = s
                    .body
                    .flat_map(|r| match r {
                        Ok(b) => {
                            let parts: Vec<Result<Bytes, OriginError>> = (0..b.len())
                                .step_by(64 << 10)
                                .map(|i| Ok(b.slice(i..(i + (64 << 10)).min(b.len()))))
                                .collect();
                            stream::iter(parts).left_stream()
                        }
                        Err(e) => stream::iter(vec![Err(e)]).right_stream(),
                    })
                    .enumerate()
                    .then(move |(i, r)| {
                        let mut gate = gate_rx.clone();
                        async move {
                            if i >= hold_after {
                                let _ = gate.wait_for(|open| *open).await;
                            }
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            r
                        }
                    })
                    .boxed();
                s.body = body;
            }
            Ok(s)
        }
        .boxed()
    }
}

/// A store over `dir` with `origins`, on its own control plane.
pub struct Env {
    pub cp: ControlPlane,
    pub control: Control,
    pub dir: PathBuf,
    pub hooks: Arc<Hooks>,
    pub metrics: Arc<Metrics>,
}

pub fn options(dir: &Path, max_size: u64) -> StoreOptions {
    StoreOptions {
        dir: dir.to_owned(),
        max_size,
        rewrite_base_model: false,
        direct_io: DirectIo::Auto,
        ttl: None,
        driver: Driver::Auto,
        pinned_wait: Duration::from_millis(200),
        faults: Arc::default(),
        preload: Vec::new(),
    }
}

impl Env {
    pub fn new(dir: &Path) -> Env {
        Env::with_hooks(dir, Hooks::default())
    }

    pub fn with_hooks(dir: &Path, hooks: Hooks) -> Env {
        let cp = ControlPlane::start(2).unwrap();
        let control = cp.control();
        Env {
            cp,
            control,
            dir: dir.to_owned(),
            hooks: Arc::new(hooks),
            metrics: Arc::new(Metrics::new()),
        }
    }

    pub fn open(&self, opts: StoreOptions, origins: Vec<Arc<dyn Origin>>) -> Arc<Store> {
        Store::open(
            opts,
            OriginChain::new(origins),
            self.hooks.clone(),
            self.control.clone(),
            self.metrics.clone(),
        )
        .unwrap()
    }
}

/// Run `f` on a fresh monoio runtime on its own thread (as a data-plane worker would).
pub fn mono<T, F, Fut>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(f())
    })
    .join()
    .unwrap()
}

pub fn name(s: &str) -> AdapterName {
    AdapterName::parse(s).unwrap()
}

/// Poll `cond` until true; panics after `secs` (a guard against hangs, not a timing check).
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Entries in the temp area (should be none when nothing is in flight).
pub fn tmp_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join(".loraplex-tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

// ---------- HTTP origin server ----------

/// What the test HTTP server saw and how it misbehaves.
#[derive(Default)]
pub struct ServerState {
    pub root: PathBuf,
    pub token: Option<String>,
    /// (method, path, Range header) of each request.
    pub log: Mutex<Vec<(String, String, Option<String>)>>,
    /// Cut the connection once after this many body bytes of this path.
    pub cut_once: Mutex<Option<(String, usize)>>,
    /// `"GET /path"` → (status to answer, how many more times).
    pub status: Mutex<HashMap<String, (u16, u32)>>,
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<ServerState>,
}

impl TestServer {
    pub fn start(control: &Control, state: ServerState) -> TestServer {
        let state = Arc::new(state);
        let app = Router::new().fallback(serve_file).with_state(state.clone());
        let listener = control
            .handle()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        control.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestServer { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<(String, String, Option<String>)> {
        self.state.log.lock().unwrap().clone()
    }
}

async fn serve_file(
    State(st): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_owned();
    let range = headers
        .get(header::RANGE)
        .map(|v| v.to_str().unwrap().to_owned());
    st.log
        .lock()
        .unwrap()
        .push((method.to_string(), path.clone(), range.clone()));
    let status = |s: u16| Response::builder().status(s).body(Body::empty()).unwrap();
    if let Some(t) = &st.token {
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        if auth.as_deref() != Some(&format!("Bearer {t}")) {
            return status(401);
        }
    }
    if let Some((code, left)) = st
        .status
        .lock()
        .unwrap()
        .get_mut(&format!("{method} {path}"))
        && *left > 0
    {
        *left -= 1;
        return status(*code);
    }
    let Ok(data) = std::fs::read(st.root.join(path.trim_start_matches('/'))) else {
        return status(404);
    };
    let etag = format!("\"{:x}\"", xxhash_rust::xxh3::xxh3_64(&data));
    let len = data.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .map(|n| n.parse::<usize>().unwrap())
        .unwrap_or(0);
    let mut b = Response::builder()
        .header(header::ETAG, etag)
        .header(header::CONTENT_LENGTH, len - start);
    b = if range.is_some() {
        b.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1),
        )
    } else {
        b.status(StatusCode::OK)
    };
    if method == Method::HEAD {
        return b.body(Body::empty()).unwrap();
    }
    let body = Bytes::from(data).slice(start..);
    let cut = {
        let mut c = st.cut_once.lock().unwrap();
        match c.as_ref() {
            Some((p, after)) if *p == path => {
                let after = *after;
                *c = None;
                Some(after)
            }
            _ => None,
        }
    };
    match cut {
        Some(after) => {
            use futures_util::StreamExt;
            let items: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(body.slice(..after.min(body.len()))),
                Err(std::io::Error::other("cut by the test")),
            ];
            // Let the first part reach the client before the connection is cut.
            let s = stream::iter(items).then(|item| async move {
                if item.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                item
            });
            b.body(Body::from_stream(s)).unwrap()
        }
        None => b.body(Body::from(body)).unwrap(),
    }
}
