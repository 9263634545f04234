//! The stand-in HTTP adapter origin: serves `{prefix}/{name}/{file}` like a plain web server
//! (nginx `root`/`alias`) would, with the knobs tests need to break it.
//!
//! Mirrors: `GET` and `HEAD`; nginx's `ETag`, `"{mtime hex}-{size hex}"` (not a hash of the
//! content: new bytes of the same size under the same mtime keep it), and `Last-Modified`; each
//! put gets an mtime later than any file it replaces, as an upload a moment later would
//! ([`OriginStandIn::put_file_at`] sets one); `Content-Length`; `Accept-Ranges: bytes`; one
//! `Range: bytes=a-b | a- | -n` → 206 with `Content-Range` (several ranges or bad syntax: the
//! range is ignored, 200; past the end: 416 `bytes */len`); `If-Range` with another ETag → 200
//! whole; `If-None-Match` → 304; 404 for a missing file; 405 for other methods. The Go loraplex
//! HTTP origin asks for `{base}/{name}/adapter_config.json`, `adapter_model.safetensors`,
//! `adapter_model.bin`.
//!
//! Test controls: GET/HEAD counts per path, replacing content at runtime, a bearer token, a
//! throttled rate, and [`Fault`]s: an error status, a cut after K body bytes, a stall after K
//! bytes, a per-request throttle. Body faults apply to GETs only; offsets count bytes of the
//! body sent in that answer (of the range, for a 206). Faults live in [`super::origin_faults`].

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::runtime::Handle;

pub use super::origin_faults::{Fault, FaultKind};
use super::{
    adapters::{AdapterSpec, adapter_files},
    origin_faults::{body_with_faults, take_fault},
    range::{RangeAnswer, pick_range},
    server::{Request, RequestHead, Response, Server, handler, lock},
};

/// How to run the stand-in origin.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    pub bind: SocketAddr,
    /// Path prefix before `{name}/{file}`, e.g. `/adapters` (empty for the root).
    pub prefix: String,
    pub keep_heads: usize,
}

impl Default for OriginConfig {
    fn default() -> OriginConfig {
        OriginConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            prefix: "/adapters".into(),
            keep_heads: 64,
        }
    }
}

struct File {
    data: Bytes,
    /// Seconds since the epoch, as nginx reads them from the file.
    mtime: u64,
    etag: String,
}

/// nginx's ETag for a file: `"{mtime:x}-{size:x}"` (`ngx_http_set_etag`).
pub fn nginx_etag(mtime: u64, size: u64) -> String {
    format!("\"{mtime:x}-{size:x}\"")
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, File>,
    /// The last mtime given to each path, kept when the file is removed: a file put again
    /// is newer than any it replaces.
    mtimes: HashMap<String, u64>,
    gets: HashMap<String, u64>,
    heads: HashMap<String, u64>,
    faults: Vec<Fault>,
    bearer: Option<String>,
    throttle: Option<u64>,
}

struct State {
    prefix: String,
    inner: Mutex<Inner>,
}

/// A running stand-in origin. Dropping it stops the server.
pub struct OriginStandIn {
    server: Server,
    state: Arc<State>,
}

impl OriginStandIn {
    /// Start on the current tokio runtime.
    pub fn start(config: OriginConfig) -> io::Result<OriginStandIn> {
        OriginStandIn::start_on(&Handle::current(), config)
    }

    /// Start on the runtime behind `rt` (usable from a plain thread).
    pub fn start_on(rt: &Handle, config: OriginConfig) -> io::Result<OriginStandIn> {
        let prefix = config.prefix.trim_end_matches('/').to_owned();
        let state = Arc::new(State {
            prefix,
            inner: Mutex::new(Inner::default()),
        });
        let routed = state.clone();
        let h = handler(move |req| {
            let state = routed.clone();
            async move { serve(&state, &req) }
        });
        let server = Server::start_on(rt, config.bind, config.keep_heads, h)?;
        Ok(OriginStandIn { server, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The base URL adapters live under: `http://127.0.0.1:PORT{prefix}`.
    pub fn base_url(&self) -> String {
        format!("{}{}", self.server.url(), self.state.prefix)
    }

    /// Put (or replace) one file of adapter `name`, modified now (and after the file it
    /// replaces).
    pub fn put_file(&self, name: &str, file: &str, data: impl Into<Bytes>) {
        let path = format!("{name}/{file}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut inner = lock(&self.state.inner);
        let mtime = match inner.mtimes.get(&path) {
            Some(old) => now.max(old + 1),
            None => now,
        };
        insert(&mut inner, path, data.into(), mtime);
    }

    /// Put (or replace) one file of adapter `name` with the modification time `mtime`
    /// (seconds since the epoch).
    pub fn put_file_at(&self, name: &str, file: &str, data: impl Into<Bytes>, mtime: u64) {
        let mut inner = lock(&self.state.inner);
        insert(&mut inner, format!("{name}/{file}"), data.into(), mtime);
    }

    /// The modification time of `{name}/{file}` (seconds since the epoch).
    pub fn mtime(&self, name: &str, file: &str) -> Option<u64> {
        let inner = lock(&self.state.inner);
        inner.files.get(&format!("{name}/{file}")).map(|f| f.mtime)
    }

    /// Generate adapter `name` from `spec`, replacing all its files.
    pub fn put_adapter(&self, name: &str, spec: &AdapterSpec) {
        self.remove_adapter(name);
        for (file, data) in adapter_files(spec) {
            self.put_file(name, file, data);
        }
    }

    /// Serve the files of an adapter directory on disk as adapter `name` (read now).
    pub fn put_dir(&self, name: &str, dir: &Path) -> io::Result<()> {
        self.remove_adapter(name);
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let file = entry.file_name().to_string_lossy().into_owned();
                self.put_file(name, &file, std::fs::read(entry.path())?);
            }
        }
        Ok(())
    }

    pub fn remove_file(&self, name: &str, file: &str) {
        lock(&self.state.inner)
            .files
            .remove(&format!("{name}/{file}"));
    }

    pub fn remove_adapter(&self, name: &str) {
        let prefix = format!("{name}/");
        lock(&self.state.inner)
            .files
            .retain(|path, _| !path.starts_with(&prefix));
    }

    /// The bytes served for `{name}/{file}`.
    pub fn file(&self, name: &str, file: &str) -> Option<Bytes> {
        let inner = lock(&self.state.inner);
        inner
            .files
            .get(&format!("{name}/{file}"))
            .map(|f| f.data.clone())
    }

    /// The quoted ETag served for `{name}/{file}`.
    pub fn etag(&self, name: &str, file: &str) -> Option<String> {
        let inner = lock(&self.state.inner);
        inner
            .files
            .get(&format!("{name}/{file}"))
            .map(|f| f.etag.clone())
    }

    /// GET requests received for `{name}/{file}` (whatever their outcome).
    pub fn gets(&self, rel_path: &str) -> u64 {
        lock(&self.state.inner)
            .gets
            .get(rel_path)
            .copied()
            .unwrap_or(0)
    }

    /// GET requests received for any file of adapter `name`.
    pub fn adapter_gets(&self, name: &str) -> u64 {
        let prefix = format!("{name}/");
        let inner = lock(&self.state.inner);
        inner
            .gets
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn heads(&self, rel_path: &str) -> u64 {
        lock(&self.state.inner)
            .heads
            .get(rel_path)
            .copied()
            .unwrap_or(0)
    }

    /// Require `Authorization: Bearer TOKEN` (401 otherwise); `None` to stop requiring it.
    pub fn require_bearer(&self, token: Option<&str>) {
        lock(&self.state.inner).bearer = token.map(str::to_owned);
    }

    /// Send every body at `bytes_per_sec`; `None` for full speed.
    pub fn set_throttle(&self, bytes_per_sec: Option<u64>) {
        lock(&self.state.inner).throttle = bytes_per_sec;
    }

    /// Arm a fault (faults are tried in the order injected).
    pub fn inject(&self, fault: Fault) {
        lock(&self.state.inner).faults.push(fault);
    }

    pub fn clear_faults(&self) {
        lock(&self.state.inner).faults.clear();
    }

    /// Faults still armed.
    pub fn pending_faults(&self) -> Vec<Fault> {
        lock(&self.state.inner).faults.clone()
    }

    /// HTTP requests received.
    pub fn requests(&self) -> u64 {
        self.server.stats().requests()
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.server.stats().connections()
    }

    /// Requests whose client left before the whole answer was sent.
    pub fn cancelled(&self) -> u64 {
        self.server.stats().cancelled()
    }

    pub fn recent_heads(&self) -> Vec<RequestHead> {
        self.server.stats().recent_heads()
    }

    /// Stop and wait until the port is closed.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

fn insert(inner: &mut Inner, path: String, data: Bytes, mtime: u64) {
    let etag = nginx_etag(mtime, data.len() as u64);
    inner.mtimes.insert(path.clone(), mtime);
    inner.files.insert(path, File { data, mtime, etag });
}

/// `Last-Modified` of an mtime: an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(mtime: u64) -> String {
    let at = jiff::Timestamp::from_second(i64::try_from(mtime).unwrap_or(i64::MAX))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    at.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn serve(state: &State, req: &Request) -> Response {
    let head = &req.head;
    let is_get = head.method == "GET";
    if !is_get && head.method != "HEAD" {
        return Response::text(405, "method not allowed").header("allow", "GET, HEAD");
    }
    let Some(rel) = head
        .path()
        .strip_prefix(state.prefix.as_str())
        .and_then(|p| p.strip_prefix('/'))
        .and_then(percent_decode)
    else {
        return Response::text(404, "not found");
    };
    let rel = rel.as_str();
    let mut inner = lock(&state.inner);
    let counts = if is_get {
        &mut inner.gets
    } else {
        &mut inner.heads
    };
    *counts.entry(rel.to_owned()).or_default() += 1;

    if let Some(token) = &inner.bearer {
        let expected = format!("Bearer {token}");
        if head.header("authorization") != Some(expected.as_str()) {
            return Response::text(401, "unauthorized").header("www-authenticate", "Bearer");
        }
    }
    let fault = take_fault(&mut inner.faults, rel, is_get);
    if let Some(FaultKind::Status(code)) = fault {
        return Response::text(code, format!("injected fault: {code}"));
    }
    let Some(file) = inner.files.get(rel) else {
        return Response::text(404, "not found");
    };
    let (data, etag) = (file.data.clone(), file.etag.clone());
    let last_modified = http_date(file.mtime);
    let throttle = match fault {
        Some(FaultKind::Throttle(rate)) => Some(rate),
        _ => inner.throttle,
    };
    drop(inner);

    let content_type = if rel.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let base = |status| {
        Response::new(status)
            .header("content-type", content_type)
            .header("last-modified", last_modified.clone())
            .header("etag", etag.clone())
            .header("accept-ranges", "bytes")
    };
    let if_none_match = head.header("if-none-match");
    if if_none_match.is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*")) {
        return Response::new(304).header("etag", etag.clone());
    }
    let total = data.len() as u64;
    let (status, body, content_range) = match pick_range(head, &etag, total) {
        RangeAnswer::Whole => (200, data, None),
        RangeAnswer::Partial(start, end) => (
            206,
            data.slice(start as usize..=end as usize),
            Some(format!("bytes {start}-{end}/{total}")),
        ),
        RangeAnswer::Unsatisfiable => {
            return Response::text(416, "range not satisfiable")
                .header("content-range", format!("bytes */{total}"));
        }
    };
    let mut resp = base(status);
    if let Some(range) = content_range {
        resp = resp.header("content-range", range);
    }
    body_with_faults(resp, body, fault, throttle)
}

/// Decode `%XX` escapes as a web server does before mapping a path to a file (`None` when the
/// escapes are malformed or the result is not UTF-8).
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
