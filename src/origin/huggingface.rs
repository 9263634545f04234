//! The Hugging Face Hub origin (`type: huggingface`): repo id = adapter name, `org/name@rev`
//! pins a revision.
//!
//! A download resolves the revision once (`GET /api/models/{repo}/revision/{rev}?blobs=true`:
//! commit `sha`, and every file with its size and, for LFS files, its SHA-256), picks the files
//! an adapter needs ([`select_files`]), and fetches each one from `/{repo}/resolve/{sha}/{file}`
//! of that same commit, so a push to `main` during a download cannot mix two versions. LFS
//! files answer with a redirect to a CDN; the `X-Linked-Etag` (SHA-256), `X-Linked-Size` and
//! `X-Repo-Commit` of that first answer are checked against the listing, and the bytes are
//! hashed while they stream (`transfer::pull_file`): a mismatch rejects the adapter. When the
//! listing has no LFS SHA-256 (mirrors and proxies of the Hub often list none), the
//! `X-Linked-Etag` is the checksum, if it is one: 64 hex digits (a small file's is its git
//! blob sha1, 40 digits, and is not used; nor is a plain `ETag`, which a mirror may set to
//! anything).
//!
//! Redirects are followed by hand (`redirect::Policy::none()`), for two reasons: the
//! `X-Linked-*` headers are on the redirect itself, which reqwest's automatic policy hides, and
//! the `Authorization` header must go only to the Hub's own origin (same scheme, host and
//! port; `127.0.0.1` and `localhost`, or two ports, are different origins), never to the CDN.
//!
//! Why not the `hf-hub` crate: 0.4/0.5 download only into their own cache directory (they
//! cannot stream into our writer) and bring a second reqwest; 1.x streams but pulls in `hf-xet`
//! and its storage stack (88 crates more than this crate already builds, measured with
//! `cargo tree`), while what we need from the Hub is two GET endpoints and three headers.
//!
//! Errors, as `huggingface_hub` reads them: 404 (or `X-Error-Code: RepoNotFound`,
//! `RevisionNotFound`, `EntryNotFound`) is "not found", so the chain tries the next origin; so
//! is a 401, which the Hub answers without a token for a repo that does not exist as for a
//! private one (the message hints at the token), except the 401 of a token the Hub refuses
//! ("Invalid credentials in Authorization header") and of a gated repo, which, like 403, are a
//! 502 naming authentication; 5xx, resets and stalls are transient (the store retries them,
//! resuming with `Range`).

use futures_util::{FutureExt, StreamExt, TryStreamExt, future::BoxFuture};
use reqwest::{StatusCode, Url, header, redirect};
use serde::Deserialize;

use super::{
    FileSpec, FileStream, Manifest, Origin, OriginError,
    remote::{ContentRange, agree, classify_reqwest, parse_content_range},
    transfer::parse_sha256,
};
use crate::{
    adapter::{AdapterName, BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE},
    config::TransferConfig,
    error::Error,
};

/// The metric label and config `type`.
pub const ORIGIN: &str = "huggingface";
/// Files other than the config and the weights are fetched only up to this size.
pub const MAX_EXTRA_FILE: u64 = 64 << 20;
/// Extensions of the small companion files fetched with an adapter (tokenizer, chat template).
const EXTRA_EXTENSIONS: [&str; 5] = ["json", "txt", "model", "jinja", "tiktoken"];
/// Redirect hops followed for one file (the Hub uses one, renamed repos two).
const MAX_REDIRECTS: usize = 5;

/// One file of a repo at a commit (`siblings[]` of the revision API with `blobs=true`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Sibling {
    pub rfilename: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub lfs: Option<LfsInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LfsInfo {
    pub sha256: String,
    pub size: u64,
}

/// A revision resolved to its commit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RepoRevision {
    /// The commit sha: the adapter's content id.
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

/// HTTP client for the Hub's API: resolve a revision, open a file at an offset.
#[derive(Debug)]
pub struct HubClient {
    http: reqwest::Client,
    endpoint: Url,
    token: Option<String>,
}

impl HubClient {
    /// `endpoint` is the Hub's base URL (`https://huggingface.co`, or `HF_ENDPOINT`).
    pub fn new(
        endpoint: &str,
        token: Option<String>,
        transfer: &TransferConfig,
    ) -> Result<Self, Error> {
        let endpoint = Url::parse(endpoint.trim_end_matches('/'))
            .map_err(|e| Error::bad_request(format!("huggingface endpoint {endpoint:?}: {e}")))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(Error::bad_request(format!(
                "huggingface endpoint {endpoint}: not http(s)"
            )));
        }
        // No total timeout: `read_timeout` bounds each read (a stall), never the transfer.
        let http = reqwest::Client::builder()
            .redirect(redirect::Policy::none())
            .connect_timeout(transfer.connect_timeout)
            .read_timeout(transfer.idle_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Error::internal(format!("building the Hub HTTP client: {e}")))?;
        let token = token.filter(|t| !t.is_empty());
        Ok(HubClient {
            http,
            endpoint,
            token,
        })
    }

    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has a path")
            .pop_if_empty()
            .extend(segments.iter().flat_map(|s| s.split('/')));
        url
    }

    /// Whether `url` is on the Hub's own origin, the only one that may see the token.
    fn same_origin(&self, url: &Url) -> bool {
        url.scheme() == self.endpoint.scheme()
            && url.host_str() == self.endpoint.host_str()
            && url.port_or_known_default() == self.endpoint.port_or_known_default()
    }

    fn get(&self, url: Url) -> reqwest::RequestBuilder {
        let with_token = self.same_origin(&url);
        let req = self.http.get(url);
        match (&self.token, with_token) {
            (Some(token), true) => req.bearer_auth(token),
            _ => req,
        }
    }

    /// Resolve `revision` of `repo` to its commit and file list (one attempt; the store
    /// retries transient failures).
    pub async fn resolve(&self, repo: &str, revision: &str) -> Result<RepoRevision, OriginError> {
        let mut url = self.url(&["api", "models", repo, "revision", revision]);
        url.query_pairs_mut().append_pair("blobs", "true");
        let what = format!("Hugging Face {repo}@{revision}");
        let resp = self
            .get(url)
            .send()
            .await
            .map_err(|e| classify_reqwest(&e, &what, false))?;
        if !resp.status().is_success() {
            return Err(self.refusal(resp, &what).await);
        }
        resp.json::<RepoRevision>()
            .await
            .map_err(|e| classify_reqwest(&e, &what, true))
    }

    /// Open `file` of `repo` at `commit` from byte `offset`, following the CDN redirect by
    /// hand. The first answer's `X-Repo-Commit` must be `commit`; its `X-Linked-Etag`, when it
    /// is a SHA-256 (64 hex digits: LFS files; small files have a git blob sha1 or nothing),
    /// goes with the stream for the transfer to check, and its `X-Linked-Size` must agree
    /// with the body's.
    pub async fn open(
        &self,
        repo: &str,
        commit: &str,
        file: &str,
        offset: u64,
    ) -> Result<FileStream, OriginError> {
        let what = format!("Hugging Face {repo}/{file}@{commit}");
        let mut url = self.url(&[repo, "resolve", commit, file]);
        let mut linked: Option<Linked> = None;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.get(url.clone());
            if offset > 0 {
                req = req.header(header::RANGE, format!("bytes={offset}-"));
            }
            let resp = req
                .send()
                .await
                .map_err(|e| classify_reqwest(&e, &what, false))?;
            // The first answer carries the LFS facts, whether it redirects or not.
            let facts = linked.get_or_insert_with(|| Linked::from_headers(resp.headers()));
            if let Some(c) = facts.commit.as_ref().filter(|c| *c != commit) {
                return Err(OriginError::invalid(format!(
                    "{what}: the Hub answered for commit {c}"
                )));
            }
            let status = resp.status();
            if status.is_redirection() {
                let location = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        OriginError::invalid(format!("{what}: redirect without Location"))
                    })?;
                url = url
                    .join(location)
                    .map_err(|e| OriginError::invalid(format!("{what}: bad Location: {e}")))?;
                continue;
            }
            if !status.is_success() {
                return Err(self.refusal(resp, &what).await);
            }
            let ContentRange { start, total } =
                body_range(&resp, offset).map_err(|e| e.context(&what))?;
            let facts = linked.take().unwrap_or_default();
            agree("size", facts.size, total).map_err(|e| e.context(&what))?;
            let body = resp
                .bytes_stream()
                .map_err(|e| classify_reqwest(&e, "reading the Hub's body", false))
                .boxed();
            return Ok(FileStream {
                offset: start,
                total: facts.size.or(total),
                sha256: facts.sha256,
                body,
            });
        }
        Err(OriginError::invalid(format!(
            "{what}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// Classify a non-success answer of the Hub, as `huggingface_hub` does
    /// (`hf_raise_for_status`): the `X-Error-Code` first; then a 401 is "not found" unless its
    /// message says the token is invalid, because the Hub answers 401 to a request without a
    /// token for a repo that does not exist as for a private one.
    async fn refusal(&self, resp: reqwest::Response, what: &str) -> OriginError {
        let status = resp.status();
        let code = resp
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let message = match status {
            StatusCode::UNAUTHORIZED => error_message(resp).await,
            _ => String::new(),
        };
        let token = self.token.is_some();
        match (status, code.as_str()) {
            (_, "RepoNotFound" | "RevisionNotFound" | "EntryNotFound")
            | (StatusCode::NOT_FOUND, _) => {
                let hint = match token {
                    false => " (a private repo needs a token on the huggingface origin)",
                    true => "",
                };
                OriginError::not_found(format!("{what}: not found ({status}){hint}"))
            }
            (StatusCode::UNAUTHORIZED, "GatedRepo") | (StatusCode::FORBIDDEN, _) => {
                OriginError::auth(format!(
                    "{what}: the Hub denied access ({status}{}): authentication: {}",
                    if code.is_empty() {
                        String::new()
                    } else {
                        format!(", {code}")
                    },
                    match token {
                        true => "the token has no access to this repo (gated or private)",
                        false => "a gated repo needs a token on the huggingface origin",
                    }
                ))
            }
            (StatusCode::UNAUTHORIZED, _) if message == INVALID_CREDENTIALS => {
                OriginError::auth(format!(
                    "{what}: the Hub refused authentication ({status}: {message}): the token \
                     is wrong or expired; set `token` on the huggingface origin (usually \
                     ${{HF_TOKEN}})"
                ))
            }
            (StatusCode::UNAUTHORIZED, _) => OriginError::not_found(format!(
                "{what}: not found ({status}{}; the Hub answers so for a repo that does not \
                 exist{})",
                match message.is_empty() {
                    true => String::new(),
                    false => format!(": {message}"),
                },
                match token {
                    false =>
                        " and for a private one: a private repo needs a token on the \
                               huggingface origin",
                    true => " and for one the token cannot see",
                }
            )),
            _ => OriginError::from_status(status.as_u16(), what),
        }
    }
}

/// The message the Hub gives with an invalid token (`huggingface_hub` tells it apart by it).
const INVALID_CREDENTIALS: &str = "Invalid credentials in Authorization header";
/// Bytes of an error body read for its message.
const MAX_ERROR_BODY: usize = 4096;

/// The Hub's message for a refusal: `X-Error-Message`, else the body's `{"error": "..."}`,
/// else its text (at most [`MAX_ERROR_BODY`] bytes read).
async fn error_message(mut resp: reqwest::Response) -> String {
    if let Some(m) = resp
        .headers()
        .get("x-error-message")
        .and_then(|v| v.to_str().ok())
    {
        return m.trim().to_owned();
    }
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY);
    #[derive(Deserialize)]
    struct HubError {
        error: String,
    }
    match serde_json::from_slice::<HubError>(&body) {
        Ok(e) => e.error.trim().to_owned(),
        Err(_) => String::from_utf8_lossy(&body).trim().to_owned(),
    }
}

trait Context {
    fn context(self, what: &str) -> Self;
}

impl Context for OriginError {
    fn context(mut self, what: &str) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

/// Facts of the first `/resolve/` answer.
#[derive(Debug, Default)]
struct Linked {
    sha256: Option<[u8; 32]>,
    size: Option<u64>,
    commit: Option<String>,
}

impl Linked {
    fn from_headers(h: &header::HeaderMap) -> Self {
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        Linked {
            sha256: text("x-linked-etag").and_then(parse_sha256),
            size: text("x-linked-size").and_then(|s| s.trim().parse().ok()),
            commit: text("x-repo-commit").map(str::to_owned),
        }
    }
}

/// Where the body starts and the file's full size, from a 200 or 206 answer to a request for
/// `offset..`.
fn body_range(resp: &reqwest::Response, offset: u64) -> Result<ContentRange, OriginError> {
    if resp.status() == StatusCode::PARTIAL_CONTENT {
        let range = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range)
            .ok_or_else(|| OriginError::invalid("206 without a usable Content-Range"))?;
        if range.start != offset {
            return Err(OriginError::invalid(format!(
                "asked for offset {offset}, got Content-Range from {}",
                range.start
            )));
        }
        return Ok(range);
    }
    // 200: the whole file (a server that ignores Range starts at 0; the transfer skips).
    Ok(ContentRange {
        start: 0,
        total: resp.content_length(),
    })
}

/// Which files of a repo make the adapter.
///
/// Rule: top-level files only (subfolders such as `checkpoint-500/` or `runs/` are training
/// leftovers), with plain names (`[A-Za-z0-9._-]`, not starting with `.`):
/// - `adapter_config.json` (required: without it the repo is not an adapter: not found);
/// - the weights: `adapter_model.safetensors`, else `adapter_model.bin` (vLLM reads the same
///   order; a repo with neither is refused, never stored config-only);
/// - small companions: `*.json`, `*.txt`, `*.model`, `*.jinja`, `*.tiktoken` up to
///   [`MAX_EXTRA_FILE`] (tokenizer files, chat templates, special tokens).
///
/// Everything else (READMEs, images, other `*.safetensors`/`*.bin` such as full model weights
/// or `training_args.bin`, `*.pt` optimizer states) is skipped. Config first.
pub fn select_files(siblings: &[Sibling]) -> Result<Vec<FileSpec>, OriginError> {
    let plain = |n: &str| {
        !n.is_empty()
            && !n.starts_with('.')
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    let top: Vec<&Sibling> = siblings.iter().filter(|s| plain(&s.rfilename)).collect();
    let find = |name: &str| top.iter().copied().find(|s| s.rfilename == name);
    let Some(config) = find(CONFIG_FILE) else {
        return Err(OriginError::not_found(format!(
            "no {CONFIG_FILE}: not a LoRA adapter"
        )));
    };
    let Some(weights) = find(SAFETENSORS_FILE).or_else(|| find(BIN_FILE)) else {
        return Err(OriginError::invalid(format!(
            "{CONFIG_FILE} without {SAFETENSORS_FILE} or {BIN_FILE}"
        )));
    };
    let mut files = vec![spec(config)?, spec(weights)?];
    for s in &top {
        let ext = s.rfilename.rsplit_once('.').map_or("", |(_, e)| e);
        let small = file_size(s).is_some_and(|n| n <= MAX_EXTRA_FILE);
        if EXTRA_EXTENSIONS.contains(&ext) && small && s.rfilename != config.rfilename {
            files.push(spec(s)?);
        }
    }
    Ok(files)
}

fn file_size(s: &Sibling) -> Option<u64> {
    s.lfs.as_ref().map(|l| l.size).or(s.size)
}

fn spec(s: &Sibling) -> Result<FileSpec, OriginError> {
    let sha256 = match &s.lfs {
        Some(lfs) => Some(parse_sha256(&lfs.sha256).ok_or_else(|| {
            OriginError::invalid(format!("{}: bad lfs.sha256 {:?}", s.rfilename, lfs.sha256))
        })?),
        None => None,
    };
    Ok(FileSpec {
        path: s.rfilename.clone(),
        size: file_size(s),
        sha256,
        crc: None,
        validator: None,
    })
}

/// The `huggingface` origin.
pub struct HuggingFace {
    client: HubClient,
    transfer: TransferConfig,
}

impl HuggingFace {
    pub fn new(
        endpoint: &str,
        token: Option<String>,
        transfer: TransferConfig,
    ) -> Result<Self, Error> {
        Ok(HuggingFace {
            client: HubClient::new(endpoint, token, &transfer)?,
            transfer,
        })
    }

    pub fn client(&self) -> &HubClient {
        &self.client
    }

    /// Resolve `name` (default revision `main`) and pick its files.
    pub async fn resolve_manifest(&self, name: &AdapterName) -> Result<Manifest, OriginError> {
        let (repo, rev) = (name.repo(), name.revision().unwrap_or("main"));
        let revision = self.client.resolve(repo, rev).await?;
        let files = select_files(&revision.siblings)
            .map_err(|e| e.context(&format!("Hugging Face {repo}@{}", revision.sha)))?;
        Ok(Manifest {
            files,
            etag: None,
            revision: Some(revision.sha),
            ..Default::default()
        })
    }
}

impl Origin for HuggingFace {
    fn kind(&self) -> &'static str {
        ORIGIN
    }

    fn describe(&self) -> String {
        format!("huggingface {}", self.client.endpoint)
    }

    fn transfer(&self) -> TransferConfig {
        self.transfer.clone()
    }

    /// The commit sha the revision points to now.
    fn head<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        async move {
            let rev = name.revision().unwrap_or("main");
            Ok(Some(self.client.resolve(name.repo(), rev).await?.sha))
        }
        .boxed()
    }

    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        self.resolve_manifest(name).boxed()
    }

    /// Every file comes from the commit the manifest resolved, never from the branch.
    fn open<'a>(
        &'a self,
        name: &'a AdapterName,
        manifest: &'a Manifest,
        file: &'a FileSpec,
        offset: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        async move {
            let commit = manifest.revision.as_deref().ok_or_else(|| {
                OriginError::invalid("a Hugging Face manifest without its commit")
            })?;
            let (repo, path) = (name.repo(), file.path.as_str());
            self.client.open(repo, commit, path, offset).await
        }
        .boxed()
    }
}

#[cfg(test)]
#[path = "huggingface_tests.rs"]
mod tests;
