//! A stand-in Hugging Face Hub speaking the parts of its HTTP API that loraplex uses, on real
//! sockets (for the tests, the demo and the benchmark).
//!
//! - `GET /api/models/{repo}/revision/{rev}[?blobs=true]`: `sha` and `siblings` (with `size`
//!   and `lfs.sha256` when `blobs=true`).
//! - `GET /{repo}/resolve/{rev}/{file}`: small files answer 200 directly; LFS files answer 302
//!   to `/cdn/{sha256}` with `X-Linked-Etag`, `X-Linked-Size` and `X-Repo-Commit`, either on
//!   the Hub's own origin or on a second listener (another port: another origin).
//! - `GET /cdn/{sha256}`: the bytes, with `Range`.
//!
//! A token, when set, is required on `/api` and `/resolve` (401 without it, as the Hub does);
//! the CDN never checks it, and records which `Authorization` it was sent. Unknown repos,
//! revisions and files are 404 with the Hub's `X-Error-Code`. Faults can be armed per path:
//! an error status, a body cut after N bytes (connection reset), a body that stalls after N
//! bytes. Every request is counted per path.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use sha2::{Digest, Sha256};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::origin::download::hex;

/// Chunk size of served bodies.
const CHUNK: usize = 256 << 10;

/// A file of a commit.
#[derive(Debug, Clone)]
pub struct HubFile {
    pub name: String,
    pub bytes: Bytes,
    /// Stored in LFS: served through the CDN redirect with `X-Linked-*` headers.
    pub lfs: bool,
    /// Announce this SHA-256 instead of the real one (a repo whose bytes don't match).
    pub lie_sha256: Option<[u8; 32]>,
}

impl HubFile {
    pub fn small(name: &str, bytes: impl Into<Bytes>) -> Self {
        HubFile {
            name: name.into(),
            bytes: bytes.into(),
            lfs: false,
            lie_sha256: None,
        }
    }

    pub fn lfs(name: &str, bytes: impl Into<Bytes>) -> Self {
        HubFile {
            lfs: true,
            ..HubFile::small(name, bytes)
        }
    }

    /// The SHA-256 the Hub announces for this file (hex).
    pub fn announced_sha256(&self) -> String {
        match self.lie_sha256 {
            Some(lie) => hex(&lie),
            None => hex(&Sha256::digest(&self.bytes)),
        }
    }
}

/// Where `/resolve/` sends LFS files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CdnHost {
    /// A relative redirect on the Hub's own origin.
    Same,
    /// An absolute redirect to the second listener (another port: another origin).
    Other,
}

/// A fault armed for the next request(s) to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status instead.
    Status(u16),
    /// Send this many body bytes, then reset the connection.
    Cut(u64),
    /// Send this many body bytes, then send nothing more, ever.
    Stall(u64),
}

struct Commit {
    sha: String,
    refs: Vec<String>,
    files: Vec<HubFile>,
}

#[derive(Default)]
struct Inner {
    repos: HashMap<String, Vec<Commit>>,
    blobs: HashMap<String, Bytes>,
    hits: HashMap<String, u64>,
    auth_seen: HashMap<String, Vec<Option<String>>>,
    ranges: HashMap<String, Vec<Option<u64>>>,
    faults: HashMap<String, Vec<Fault>>,
}

struct HubState {
    token: Option<String>,
    cdn: CdnHost,
    cdn_base: String,
    inner: Mutex<Inner>,
}

impl HubState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running stand-in Hub; stops when dropped.
pub struct StandInHub {
    addr: SocketAddr,
    cdn_addr: SocketAddr,
    state: Arc<HubState>,
    tasks: Vec<JoinHandle<()>>,
}

impl StandInHub {
    /// Start on two ports of 127.0.0.1 (the Hub and its "other host" CDN). Call inside tokio.
    pub async fn start(token: Option<&str>, cdn: CdnHost) -> io::Result<StandInHub> {
        let hub = TcpListener::bind("127.0.0.1:0").await?;
        let other = TcpListener::bind("127.0.0.1:0").await?;
        let (addr, cdn_addr) = (hub.local_addr()?, other.local_addr()?);
        let state = Arc::new(HubState {
            token: token.map(str::to_owned),
            cdn,
            cdn_base: format!("http://{cdn_addr}"),
            inner: Mutex::default(),
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let tasks = [hub, other]
            .into_iter()
            .map(|l| {
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(l, app).await;
                })
            })
            .collect();
        Ok(StandInHub {
            addr,
            cdn_addr,
            state,
            tasks,
        })
    }

    /// The Hub's base URL (the origin's `endpoint`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The other-origin CDN's base URL.
    pub fn cdn_url(&self) -> String {
        format!("http://{}", self.cdn_addr)
    }

    /// Add a commit of `repo` reachable by its sha and by each of `refs` (`main`, tags). A
    /// ref already pointing elsewhere moves to this commit.
    pub fn add_commit(&self, repo: &str, sha: &str, refs: &[&str], files: Vec<HubFile>) {
        let mut inner = self.state.lock();
        for f in files.iter().filter(|f| f.lfs) {
            inner.blobs.insert(f.announced_sha256(), f.bytes.clone());
        }
        let commits = inner.repos.entry(repo.to_owned()).or_default();
        for c in commits.iter_mut() {
            c.refs.retain(|r| !refs.contains(&r.as_str()));
        }
        commits.push(Commit {
            sha: sha.to_owned(),
            refs: refs.iter().map(|r| r.to_string()).collect(),
            files,
        });
    }

    /// Requests seen for `path` (e.g. `/cdn/{sha256}`, `/org/x/resolve/{sha}/file`).
    pub fn hits(&self, path: &str) -> u64 {
        self.state.lock().hits.get(path).copied().unwrap_or(0)
    }

    /// The `Authorization` header of each request to `path`, in order.
    pub fn auth_seen(&self, path: &str) -> Vec<Option<String>> {
        self.state
            .lock()
            .auth_seen
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    /// The `Range` start of each request to `path`, in order.
    pub fn ranges_seen(&self, path: &str) -> Vec<Option<u64>> {
        self.state
            .lock()
            .ranges
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    /// Arm `fault` for the next request to `path` (faults queue up, one per request).
    pub fn arm(&self, path: &str, fault: Fault) {
        self.state
            .lock()
            .faults
            .entry(path.to_owned())
            .or_default()
            .push(fault);
    }

    /// The CDN path of an LFS file.
    pub fn cdn_path(file: &HubFile) -> String {
        format!("/cdn/{}", file.announced_sha256())
    }
}

impl Drop for StandInHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn handle(State(st): State<Arc<HubState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let range = range_start(req.headers());
    let fault = {
        let mut inner = st.lock();
        *inner.hits.entry(path.clone()).or_default() += 1;
        inner
            .auth_seen
            .entry(path.clone())
            .or_default()
            .push(auth.clone());
        inner.ranges.entry(path.clone()).or_default().push(range);
        inner
            .faults
            .get_mut(&path)
            .and_then(|q| (!q.is_empty()).then(|| q.remove(0)))
    };
    if let Some(Fault::Status(code)) = fault {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (code, "armed fault").into_response();
    }
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let blob = st.lock().blobs.get(sha).cloned();
        return match blob {
            Some(bytes) => serve_bytes(bytes, range, fault, HeaderMap::new()),
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    let expected = st.token.as_ref().map(|t| format!("Bearer {t}"));
    if expected.is_some() && auth != expected {
        return (
            StatusCode::UNAUTHORIZED,
            "Invalid credentials in Authorization header",
        )
            .into_response();
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let blobs = req.uri().query().is_some_and(|q| q.contains("blobs=true"));
        return match rest.split_once("/revision/") {
            Some((repo, rev)) => repo_info(&st, repo, rev, blobs),
            None => not_found("RepoNotFound"),
        };
    }
    match parse_resolve(&path) {
        Some((repo, rev, file)) => resolve(&st, repo, rev, file, range, fault),
        None => not_found("EntryNotFound"),
    }
}

/// `/{repo}/resolve/{rev}/{file}` → (repo, rev, file).
fn parse_resolve(path: &str) -> Option<(&str, &str, &str)> {
    let (repo, rest) = path.trim_start_matches('/').split_once("/resolve/")?;
    let (rev, file) = rest.split_once('/')?;
    Some((repo, rev, file))
}

fn not_found(code: &'static str) -> Response {
    let mut resp = (StatusCode::NOT_FOUND, code).into_response();
    resp.headers_mut()
        .insert("x-error-code", HeaderValue::from_static(code));
    resp
}

/// Find the commit `rev` (a ref or a sha) of `repo`, and run `f` on it.
fn with_commit(
    st: &HubState,
    repo: &str,
    rev: &str,
    f: impl FnOnce(&Commit) -> Response,
) -> Response {
    let inner = st.lock();
    let Some(commits) = inner.repos.get(repo) else {
        return not_found("RepoNotFound");
    };
    match commits
        .iter()
        .find(|c| c.sha == rev || c.refs.iter().any(|r| r == rev))
    {
        Some(c) => f(c),
        None => not_found("RevisionNotFound"),
    }
}

fn repo_info(st: &HubState, repo: &str, rev: &str, blobs: bool) -> Response {
    with_commit(st, repo, rev, |c| {
        let siblings: Vec<serde_json::Value> = c
            .files
            .iter()
            .map(|f| {
                let mut s = serde_json::json!({ "rfilename": f.name });
                if blobs {
                    s["size"] = f.bytes.len().into();
                    if f.lfs {
                        s["lfs"] = serde_json::json!({
                            "sha256": f.announced_sha256(),
                            "size": f.bytes.len(),
                            "pointerSize": 134,
                        });
                    }
                }
                s
            })
            .collect();
        let body = serde_json::json!({ "id": repo, "sha": c.sha, "siblings": siblings });
        axum::Json(body).into_response()
    })
}

fn resolve(
    st: &HubState,
    repo: &str,
    rev: &str,
    name: &str,
    range: Option<u64>,
    fault: Option<Fault>,
) -> Response {
    with_commit(st, repo, rev, |c| {
        let Some(file) = c.files.iter().find(|f| f.name == name) else {
            return not_found("EntryNotFound");
        };
        let mut headers = HeaderMap::new();
        let commit = HeaderValue::from_str(&c.sha).expect("a sha is a header value");
        headers.insert("x-repo-commit", commit);
        if !file.lfs {
            return serve_bytes(file.bytes.clone(), range, fault, headers);
        }
        let sha = file.announced_sha256();
        let location = match st.cdn {
            CdnHost::Same => format!("/cdn/{sha}"),
            CdnHost::Other => format!("{}/cdn/{sha}", st.cdn_base),
        };
        let etag = HeaderValue::from_str(&format!("\"{sha}\"")).expect("hex");
        headers.insert("x-linked-etag", etag.clone());
        headers.insert(header::ETAG, etag);
        headers.insert("x-linked-size", file.bytes.len().into());
        headers.insert(
            header::LOCATION,
            HeaderValue::from_str(&location).expect("url"),
        );
        (StatusCode::FOUND, headers).into_response()
    })
}

/// `Range: bytes=N-` (or `N-M`, served to the end anyway: loraplex only asks open ranges).
fn range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get(header::RANGE)?.to_str().ok()?;
    let (start, _) = v.strip_prefix("bytes=")?.split_once('-')?;
    start.parse().ok()
}

fn serve_bytes(
    bytes: Bytes,
    range: Option<u64>,
    fault: Option<Fault>,
    mut headers: HeaderMap,
) -> Response {
    let len = bytes.len() as u64;
    let start = range.unwrap_or(0);
    if start > len || (range.is_some() && start == len) {
        let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
        let cr = HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii");
        resp.headers_mut().insert(header::CONTENT_RANGE, cr);
        return resp;
    }
    let status = if range.is_some() {
        let cr = format!("bytes {start}-{}/{len}", len - 1);
        headers.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&cr).expect("ascii"),
        );
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    headers.insert(header::CONTENT_LENGTH, (len - start).into());
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let body = bytes.slice(start as usize..);
    let (limit, after) = match fault {
        Some(Fault::Cut(n)) => (n as usize, Some(false)),
        Some(Fault::Stall(n)) => (n as usize, Some(true)),
        _ => (body.len(), None),
    };
    let sent = body.slice(..limit.min(body.len()));
    let chunks = (0..sent.len())
        .step_by(CHUNK)
        .map(move |i| Ok::<_, io::Error>(sent.slice(i..(i + CHUNK).min(sent.len()))));
    let head = stream::iter(chunks);
    let body = match after {
        None => Body::from_stream(head),
        Some(false) => Body::from_stream(head.chain(stream::once(async {
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "armed cut"))
        }))),
        Some(true) => Body::from_stream(head.chain(stream::pending())),
    };
    (status, headers, body).into_response()
}
