//! The stand-in HTTP adapter origin: serves `{prefix}/{name}/{file}` like a plain web server
//! (nginx `root`/`alias`) would, with the knobs tests need to break it.
//!
//! Mirrors: `GET` and `HEAD`; a strong `ETag` (xxh3 of the content, quoted) that changes when the
//! content does; `Content-Length`; `Accept-Ranges: bytes`; one `Range: bytes=a-b | a- | -n` →
//! 206 with `Content-Range` (several ranges or bad syntax: the range is ignored, 200; past the
//! end: 416 `bytes */len`); `If-Range` with another ETag → 200 whole; `If-None-Match` → 304;
//! 404 for a missing file; 405 for other methods. The Go loraplex HTTP origin asks for
//! `{base}/{name}/adapter_config.json`, `adapter_model.safetensors`, `adapter_model.bin`.
//!
//! Test controls: GET/HEAD counts per path, replacing content at runtime, a bearer token, a
//! throttled rate, and [`Fault`]s: an error status, a cut after K body bytes, a stall after K
//! bytes, a per-request throttle. Body faults apply to GETs only; offsets count bytes of the
//! body sent in that answer (of the range, for a 206).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use tokio::runtime::Handle;
use xxhash_rust::xxh3::xxh3_64;

use super::{
    adapters::{AdapterSpec, adapter_files, hash16},
    range::{RangeAnswer, pick_range},
    server::{Framing, Piece, Request, RequestHead, Response, Server, handler, lock},
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

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Answer this status (with a short text body) instead of the file.
    Status(u16),
    /// Send the head (full length) and this many body bytes, then close the connection.
    CutAfter(u64),
    /// Pause this long after this many body bytes, then send the rest.
    StallAfter { bytes: u64, pause: Duration },
    /// Send the body at this many bytes per second.
    Throttle(u64),
}

/// A fault and which requests it hits: those for `path` (or any), after letting `skip` of them
/// through, `times` times (`None`: forever).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// `{name}/{file}` (no prefix); `None` matches every path.
    pub path: Option<String>,
    pub skip: u64,
    pub times: Option<u64>,
}

impl Fault {
    /// Hits the next matching request, once.
    pub fn new(kind: FaultKind) -> Fault {
        Fault {
            kind,
            path: None,
            skip: 0,
            times: Some(1),
        }
    }

    /// Only requests for `{name}/{file}`.
    pub fn on(mut self, rel_path: impl Into<String>) -> Fault {
        self.path = Some(rel_path.into());
        self
    }

    /// Hit the `n`-th matching request (1-based) rather than the next one.
    pub fn nth(mut self, n: u64) -> Fault {
        self.skip = n.saturating_sub(1);
        self
    }

    pub fn times(mut self, n: u64) -> Fault {
        self.times = Some(n);
        self
    }

    pub fn always(mut self) -> Fault {
        self.times = None;
        self
    }

    fn is_body_fault(&self) -> bool {
        !matches!(self.kind, FaultKind::Status(_))
    }
}

struct File {
    data: Bytes,
    etag: String,
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, File>,
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

    /// Put (or replace) one file of adapter `name`.
    pub fn put_file(&self, name: &str, file: &str, data: impl Into<Bytes>) {
        let data = data.into();
        let etag = format!("\"{}\"", hash16(xxh3_64(&data)));
        lock(&self.state.inner)
            .files
            .insert(format!("{name}/{file}"), File { data, etag });
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

/// Take the fault that hits this request, if any, updating the skip and times counts.
fn take_fault(faults: &mut Vec<Fault>, rel: &str, is_get: bool) -> Option<FaultKind> {
    let mut hit = None;
    for (i, fault) in faults.iter_mut().enumerate() {
        let matches =
            fault.path.as_deref().is_none_or(|p| p == rel) && (is_get || !fault.is_body_fault());
        if !matches {
            continue;
        }
        if fault.skip > 0 {
            fault.skip -= 1;
            continue;
        }
        hit = Some((i, fault.kind));
        break;
    }
    let (i, kind) = hit?;
    if let Some(times) = faults[i].times.as_mut() {
        *times -= 1;
        if *times == 0 {
            faults.remove(i);
        }
    }
    Some(kind)
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
    else {
        return Response::text(404, "not found");
    };
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

/// Lay out `body` as pieces carrying the throttle, stall or cut.
fn body_with_faults(
    resp: Response,
    body: Bytes,
    fault: Option<FaultKind>,
    throttle: Option<u64>,
) -> Response {
    let len = body.len() as u64;
    let (body, cut) = match fault {
        Some(FaultKind::CutAfter(k)) => (body.slice(..k.min(len) as usize), true),
        _ => (body, false),
    };
    let mut pieces = match throttle {
        // 20 pieces a second, each worth 50 ms at the rate.
        Some(rate) if rate > 0 => {
            let step = (rate / 20).max(1) as usize;
            let delay = Duration::from_secs_f64(step as f64 / rate as f64);
            (0..body.len())
                .step_by(step)
                .map(|at| {
                    let d = if at == 0 { Duration::ZERO } else { delay };
                    Piece::new(d, body.slice(at..(at + step).min(body.len())))
                })
                .collect()
        }
        _ => vec![Piece::new(Duration::ZERO, body)],
    };
    if let Some(FaultKind::StallAfter { bytes, pause }) = fault {
        pieces = stall_at(pieces, bytes, pause);
    }
    let resp = resp.pieces(Framing::Length, pieces).announce_len(len);
    if cut { resp.abort_after_pieces() } else { resp }
}

/// Split the pieces at body offset `at` and add `pause` before the part after it.
fn stall_at(pieces: Vec<Piece>, at: u64, pause: Duration) -> Vec<Piece> {
    let mut out = Vec::with_capacity(pieces.len() + 1);
    let mut offset = 0u64;
    let mut stalled = false;
    for piece in pieces {
        let len = piece.data.len() as u64;
        if !stalled && at < offset + len {
            let split = (at - offset) as usize;
            if split > 0 {
                out.push(Piece::new(piece.delay, piece.data.slice(..split)));
                out.push(Piece::new(pause, piece.data.slice(split..)));
            } else {
                out.push(Piece::new(piece.delay + pause, piece.data));
            }
            stalled = true;
        } else {
            out.push(piece);
        }
        offset += len;
    }
    out
}
