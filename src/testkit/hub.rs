//! A stand-in Hugging Face Hub speaking the parts of its HTTP API that loraplex uses, on real
//! sockets (for the tests, the demo and the benchmark), answering as `huggingface.co` does.
//!
//! - `GET /api/models/{repo}/revision/{rev}[?blobs=true]`: `sha` and `siblings` (with `size`
//!   and `lfs.sha256` when `blobs=true`; [`StandInHub::list_lfs`] turns the `lfs` objects off,
//!   as mirrors and proxies of the Hub often do).
//! - `GET /{repo}/resolve/{rev}/{file}`: every answer carries `X-Repo-Commit`. Small (git)
//!   files answer a relative 307 to `/api/resolve-cache/models/{repo}/{commit}/{file}` with
//!   `X-Linked-Etag` = their git blob sha1, and that route serves the bytes with the same
//!   `ETag`; LFS files answer 302 to `/cdn/{sha256}` with `X-Linked-Etag` (the SHA-256),
//!   `X-Linked-Size`, either on the Hub's own origin or on a second listener (another port:
//!   another origin).
//! - `GET /cdn/{sha256}`: the bytes, with `Range`, and the CDN's own `ETag` (not the content's
//!   SHA-256, as the real CDN's is its Xet hash).
//!
//! Errors have the Hub's shapes (`X-Error-Code`, `X-Error-Message`, a JSON `{"error": ...}`
//! body on `/api`): without a token, a repo that does not exist is **401** "Invalid username or
//! password." (no `X-Error-Code`), exactly like a private one; with a token it is 404
//! `RepoNotFound`. A token the Hub does not know is 401 "Invalid credentials in Authorization
//! header". A stand-in started with a token has private repos only: that token sees them,
//! no token gets the 401 of a missing repo. Unknown revisions and files are 404
//! `RevisionNotFound` / `EntryNotFound`. The CDN never checks a token, and records which
//! `Authorization` it was sent. Faults can be armed per path: an error status, a body cut
//! after N bytes (connection reset), a body that stalls after N bytes. Every request is
//! counted per path.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use super::{
    range::{RangeAnswer, pick_range},
    server::{Framing, Piece, Request, Response, Server, handler},
};
use crate::origin::transfer::hex;

/// How long an armed stall holds the rest of a body back (longer than any test waits).
const STALL: Duration = Duration::from_secs(3600);

/// A file of a commit.
#[derive(Debug, Clone)]
pub struct HubFile {
    pub name: String,
    pub bytes: Bytes,
    /// Stored in LFS: served through the CDN redirect with `X-Linked-*` headers.
    pub lfs: bool,
    /// Announce this SHA-256 instead of the real one (a repo whose bytes don't match). Set it
    /// before the file is added to a commit.
    pub lie_sha256: Option<[u8; 32]>,
    /// The announced SHA-256, hashed once: the API and every `/resolve/` answer carry it, and
    /// hashing a 1 GiB file per request made the server the bottleneck of the origin bench.
    announced: OnceLock<String>,
}

impl HubFile {
    pub fn small(name: &str, bytes: impl Into<Bytes>) -> Self {
        HubFile {
            name: name.into(),
            bytes: bytes.into(),
            lfs: false,
            lie_sha256: None,
            announced: OnceLock::new(),
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
        self.announced
            .get_or_init(|| match self.lie_sha256 {
                Some(lie) => hex(&lie),
                None => hex(&Sha256::digest(&self.bytes)),
            })
            .clone()
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
    /// CDN link speed in bytes/s (`None`: as fast as the socket takes it).
    link_rate: Option<u64>,
    /// The revision API leaves out `lfs` (a mirror).
    hide_lfs: bool,
}

struct HubState {
    token: Option<String>,
    cdn: CdnHost,
    /// Base URL of the second listener, set once both are up.
    cdn_base: OnceLock<String>,
    inner: Mutex<Inner>,
}

impl HubState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running stand-in Hub; stops when dropped.
pub struct StandInHub {
    hub: Server,
    cdn: Server,
    state: Arc<HubState>,
}

impl StandInHub {
    /// Start on two ports of 127.0.0.1 (the Hub and its "other host" CDN). Call inside tokio.
    pub async fn start(token: Option<&str>, cdn: CdnHost) -> io::Result<StandInHub> {
        StandInHub::start_on(&Handle::current(), token, cdn)
    }

    /// Start on the runtime behind `rt`, from any thread.
    pub fn start_on(rt: &Handle, token: Option<&str>, cdn: CdnHost) -> io::Result<StandInHub> {
        let state = Arc::new(HubState {
            token: token.map(str::to_owned),
            cdn,
            cdn_base: OnceLock::new(),
            inner: Mutex::default(),
        });
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let serve = |st: Arc<HubState>| {
            handler(move |req: Request| {
                let st = st.clone();
                async move { handle(&st, req) }
            })
        };
        let hub = Server::start_on(rt, any, 0, serve(state.clone()))?;
        let cdn_server = Server::start_on(rt, any, 0, serve(state.clone()))?;
        let _ = state.cdn_base.set(cdn_server.url());
        Ok(StandInHub {
            hub,
            cdn: cdn_server,
            state,
        })
    }

    /// The Hub's base URL (the origin's `endpoint`).
    pub fn url(&self) -> String {
        self.hub.url()
    }

    /// The other-origin CDN's base URL.
    pub fn cdn_url(&self) -> String {
        self.cdn.url()
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

    /// Serve CDN bytes at about `bytes_per_sec` from now on (`None`: unpaced), to stand in for
    /// a real link in benchmarks.
    pub fn set_link_rate(&self, bytes_per_sec: Option<u64>) {
        self.state.lock().link_rate = bytes_per_sec;
    }

    /// Whether the revision API lists the `lfs` object (with its SHA-256) of LFS files, as
    /// `huggingface.co` does (the default); `false` answers as many mirrors and proxies of the
    /// Hub do, with sizes only.
    pub fn list_lfs(&self, listed: bool) {
        self.state.lock().hide_lfs = !listed;
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

fn handle(st: &HubState, req: Request) -> Response {
    let head = &req.head;
    let path = head.path().to_owned();
    let auth = head.header("authorization").map(str::to_owned);
    let range = range_start(head.header("range"));
    let fault = {
        let mut inner = st.lock();
        *inner.hits.entry(path.clone()).or_default() += 1;
        let seen = inner.auth_seen.entry(path.clone()).or_default();
        seen.push(auth.clone());
        inner.ranges.entry(path.clone()).or_default().push(range);
        let queue = inner.faults.get_mut(&path);
        queue.and_then(|q| (!q.is_empty()).then(|| q.remove(0)))
    };
    if let Some(Fault::Status(code)) = fault {
        return Response::text(code, "armed fault");
    }
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let (blob, rate) = {
            let inner = st.lock();
            (inner.blobs.get(sha).cloned(), inner.link_rate)
        };
        return match blob {
            Some(bytes) if fault.is_none() => {
                let etag = cdn_etag(&bytes);
                paced(serve_bytes(head, bytes, None, etag, Vec::new()), rate)
            }
            Some(bytes) => {
                let etag = cdn_etag(&bytes);
                serve_bytes(head, bytes, fault, etag, Vec::new())
            }
            None => Response::text(404, "no such blob"),
        };
    }
    let api = path.starts_with("/api/");
    let expected = st.token.as_ref().map(|t| format!("Bearer {t}"));
    let who = match (&auth, &expected) {
        (Some(a), Some(e)) if a != e => return hub_error(401, None, INVALID_CREDENTIALS, api),
        (Some(_), _) => Caller::Authenticated,
        (None, _) => Caller::Anonymous,
    };
    let ctx = Ctx { st, who, api };
    if let Some(rest) = path.strip_prefix("/api/resolve-cache/models/") {
        return match parse_cached(rest) {
            Some((repo, commit, file)) => ctx.with_commit(repo, commit, |c| {
                match c.files.iter().find(|f| f.name == file && !f.lfs) {
                    Some(f) => {
                        let etag = format!("\"{}\"", git_blob_sha1(&f.bytes));
                        let commit = vec![("x-repo-commit".to_owned(), c.sha.clone())];
                        serve_bytes(head, f.bytes.clone(), fault, etag, commit)
                    }
                    None => entry_not_found(&c.sha),
                }
            }),
            None => hub_error(404, Some("EntryNotFound"), "Entry not found", api),
        };
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let blobs = head.query_param("blobs") == Some("true");
        return match rest.split_once("/revision/") {
            Some((repo, rev)) => repo_info(&ctx, repo, rev, blobs),
            None => ctx.missing_repo(),
        };
    }
    match parse_resolve(&path) {
        Some((repo, rev, file)) => resolve(&ctx, repo, rev, file),
        None => hub_error(404, Some("EntryNotFound"), "Entry not found", api),
    }
}

/// The Hub's message for a token it does not know.
const INVALID_CREDENTIALS: &str = "Invalid credentials in Authorization header";
/// The Hub's message for a repo it will not show without a token: missing, or private.
const INVALID_USERNAME: &str = "Invalid username or password.";

/// Who is asking.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    Anonymous,
    /// With a token the Hub accepts.
    Authenticated,
}

/// One request's view of the Hub.
struct Ctx<'a> {
    st: &'a HubState,
    who: Caller,
    /// An `/api` route (errors have a JSON body there, text elsewhere).
    api: bool,
}

impl Ctx<'_> {
    /// What the Hub answers for a repo this caller may not see: without a token the 401 that
    /// does not say whether the repo exists; with one, 404.
    fn missing_repo(&self) -> Response {
        match self.who {
            Caller::Anonymous => hub_error(401, None, INVALID_USERNAME, self.api).header(
                "www-authenticate",
                "Bearer realm=\"Authentication required\", charset=\"UTF-8\"",
            ),
            Caller::Authenticated => {
                hub_error(404, Some("RepoNotFound"), "Repository not found", self.api)
            }
        }
    }

    /// Find the commit `rev` (a ref or a sha) of `repo`, and run `f` on it. A stand-in with a
    /// token keeps its repos private: only that token sees them.
    fn with_commit(&self, repo: &str, rev: &str, f: impl FnOnce(&Commit) -> Response) -> Response {
        let private = self.st.token.is_some() && self.who == Caller::Anonymous;
        let inner = self.st.lock();
        let Some(commits) = inner.repos.get(repo).filter(|_| !private) else {
            return self.missing_repo();
        };
        match commits
            .iter()
            .find(|c| c.sha == rev || c.refs.iter().any(|r| r == rev))
        {
            Some(c) => f(c),
            None => hub_error(
                404,
                Some("RevisionNotFound"),
                &format!("Invalid rev id: {rev}"),
                self.api,
            ),
        }
    }
}

/// An error answer in the Hub's shape: `X-Error-Code` (when there is one), `X-Error-Message`,
/// and the message as `{"error": ...}` on `/api`, as text elsewhere.
fn hub_error(status: u16, code: Option<&str>, message: &str, api: bool) -> Response {
    let resp = match api {
        true => Response::json(status, &serde_json::json!({ "error": message })),
        false => Response::text(status, message),
    };
    let resp = resp.header("x-error-message", message);
    match code {
        Some(code) => resp.header("x-error-code", code),
        None => resp,
    }
}

fn entry_not_found(commit: &str) -> Response {
    hub_error(404, Some("EntryNotFound"), "Entry not found", false).header("x-repo-commit", commit)
}

/// `/{repo}/resolve/{rev}/{file}` → (repo, rev, file).
fn parse_resolve(path: &str) -> Option<(&str, &str, &str)> {
    let (repo, rest) = path.trim_start_matches('/').split_once("/resolve/")?;
    let (rev, file) = rest.split_once('/')?;
    Some((repo, rev, file))
}

/// `{org}/{name}/{commit}/{file}` (after `/api/resolve-cache/models/`) → (repo, commit, file).
fn parse_cached(rest: &str) -> Option<(&str, &str, &str)> {
    let mut parts = rest.splitn(4, '/');
    let (org, name, commit, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let repo = rest.get(..org.len() + 1 + name.len())?;
    Some((repo, commit, file))
}

/// The git blob id of `bytes` (hex SHA-1 of `blob {len}\0` + the bytes): what the Hub sends as
/// the ETag of a file kept in git rather than LFS.
pub fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut sha1 = aws_smithy_checksums::ChecksumAlgorithm::Sha1.into_impl();
    sha1.update(format!("blob {}\0", bytes.len()).as_bytes());
    sha1.update(bytes);
    hex(&sha1.finalize())
}

fn repo_info(ctx: &Ctx<'_>, repo: &str, rev: &str, blobs: bool) -> Response {
    let hide_lfs = ctx.st.lock().hide_lfs;
    ctx.with_commit(repo, rev, |c| {
        let siblings: Vec<serde_json::Value> = c
            .files
            .iter()
            .map(|f| {
                let mut s = serde_json::json!({ "rfilename": f.name });
                if blobs {
                    s["size"] = f.bytes.len().into();
                    if f.lfs && !hide_lfs {
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
        Response::json(200, &body)
    })
}

fn resolve(ctx: &Ctx<'_>, repo: &str, rev: &str, name: &str) -> Response {
    ctx.with_commit(repo, rev, |c| {
        let Some(file) = c.files.iter().find(|f| f.name == name) else {
            return entry_not_found(&c.sha);
        };
        if !file.lfs {
            let blob = git_blob_sha1(&file.bytes);
            return Response::new(307)
                .header("x-repo-commit", c.sha.clone())
                .header("x-linked-etag", format!("\"{blob}\""))
                .header(
                    "location",
                    format!("/api/resolve-cache/models/{repo}/{}/{name}", c.sha),
                );
        }
        let sha = file.announced_sha256();
        let location = match ctx.st.cdn {
            CdnHost::Same => format!("/cdn/{sha}"),
            CdnHost::Other => format!("{}/cdn/{sha}", ctx.st.cdn_base.get().expect("set at start")),
        };
        Response::new(302)
            .header("x-repo-commit", c.sha.clone())
            .header("x-linked-etag", format!("\"{sha}\""))
            .header("x-linked-size", file.bytes.len().to_string())
            .header("location", location)
    })
}

/// Pieces of a paced CDN answer: small enough that the pauses between them shape the flow
/// like a link, large enough that tokio's 1 ms timer granularity does not dominate.
const PACE_PIECE: usize = 4 << 20;

/// The answer's body cut into [`PACE_PIECE`]s, each after the pause that keeps the average at
/// `rate` bytes/s (the send time itself comes on top, so the link is a little slower than
/// `rate`).
fn paced(mut resp: Response, rate: Option<u64>) -> Response {
    let Some(rate) = rate.filter(|r| *r > 0) else {
        return resp;
    };
    resp.pieces = std::mem::take(&mut resp.pieces)
        .into_iter()
        .flat_map(|p| {
            let mut out = Vec::new();
            let mut data = p.data;
            let mut delay = p.delay;
            while !data.is_empty() {
                let n = data.len().min(PACE_PIECE);
                let piece = data.split_to(n);
                delay += Duration::from_secs_f64(n as f64 / rate as f64);
                out.push(Piece::new(delay, piece));
                delay = Duration::ZERO;
            }
            out
        })
        .collect();
    resp
}

/// The start of `Range: bytes=N-` (recorded for the tests).
fn range_start(v: Option<&str>) -> Option<u64> {
    let (start, _) = v?.trim().strip_prefix("bytes=")?.split_once('-')?;
    start.trim().parse().ok()
}

/// The CDN's own ETag of `bytes`: a hash that is not the content's SHA-256 (the real CDN's is
/// the Xet hash), so a client that took it for one would notice.
fn cdn_etag(bytes: &[u8]) -> String {
    format!(
        "\"{}\"",
        hex(&Sha256::digest(&bytes[..bytes.len().min(4096)]))
    )
}

/// The bytes, honouring `Range`, with the armed fault applied to the body.
fn serve_bytes(
    head: &super::server::RequestHead,
    bytes: Bytes,
    fault: Option<Fault>,
    etag: String,
    headers: Vec<(String, String)>,
) -> Response {
    let total = bytes.len() as u64;
    let (status, start, end) = match pick_range(head, &etag, total) {
        RangeAnswer::Whole => (200, 0, total),
        RangeAnswer::Partial(a, b) => (206, a, b + 1),
        RangeAnswer::Unsatisfiable => {
            return Response::new(416).header("content-range", format!("bytes */{total}"));
        }
    };
    let mut resp = Response::new(status)
        .header("accept-ranges", "bytes")
        .header("etag", etag);
    for (k, v) in headers {
        resp = resp.header(k, v);
    }
    if status == 206 {
        resp = resp.header(
            "content-range",
            format!("bytes {start}-{}/{total}", end - 1),
        );
    }
    let body = bytes.slice(start as usize..end as usize);
    let len = body.len() as u64;
    match fault {
        Some(Fault::Cut(n)) => {
            let sent = body.slice(..(n.min(len)) as usize);
            resp.pieces(Framing::Length, vec![Piece::new(Duration::ZERO, sent)])
                .announce_len(len)
                .abort_after_pieces()
        }
        Some(Fault::Stall(n)) => {
            let cut = n.min(len) as usize;
            let pieces = vec![
                Piece::new(Duration::ZERO, body.slice(..cut)),
                Piece::new(STALL, body.slice(cut..)),
            ];
            resp.pieces(Framing::Length, pieces)
        }
        _ => resp.pieces(Framing::Length, vec![Piece::new(Duration::ZERO, body)]),
    }
}
