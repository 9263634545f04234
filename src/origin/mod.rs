//! Where adapters come from: the [`Origin`] interface, its error classes, and the
//! [`OriginChain`] of configured origins tried in order.
//!
//! An origin describes an adapter as a [`Manifest`] (the files it has, with size and sha256
//! when it knows them, and a content id), then streams each file as `Bytes`, from a byte offset
//! when it can (`Range`). That shape fits every source loraplex has or will have:
//! - `http`: HEAD the config (ETag = content id) and the weights, then GET each file;
//! - `file`: a directory listing, then reads;
//! - Hugging Face: repo info (commit sha, siblings with sizes and LFS sha256), then `/resolve/`
//!   streams following redirects;
//! - S3: ListObjectsV2, then GetObject streams with `Range`;
//! - a peer loraplex node: its manifest of a stored adapter, then its files.
//!
//! Origins run on the control plane (tokio). Retries, resume from the offset reached, stall
//! detection and checksums live once, in [`transfer`], for every origin.

pub mod base;
pub mod file;
pub mod http;
pub mod huggingface;
pub mod peer;
pub mod rate;
pub mod remote;
pub mod s3;
pub mod transfer;

use std::{fmt, sync::Arc};

use bytes::Bytes;
use futures_util::{FutureExt, future::BoxFuture, stream::BoxStream};

use crate::{
    adapter::{AdapterName, BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE},
    config::{Config, OriginConfig, TransferConfig},
    control::Control,
    error::{Error, ErrorKind},
};

/// Why an origin could not deliver; decides what the chain does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginErrorKind {
    /// The origin does not have this adapter (HTTP 404, no such key): try the next origin.
    NotFound,
    /// 401/403: credentials missing or refused.
    Auth,
    /// 5xx, reset, timeout, stall: worth retrying.
    Transient,
    /// The origin answered, but with something unusable (bad checksum, no weights, wrong size).
    Invalid,
}

impl OriginErrorKind {
    /// Metric label (`loraplex_fetch_failures_total{reason}`).
    pub fn as_str(self) -> &'static str {
        match self {
            OriginErrorKind::NotFound => "not_found",
            OriginErrorKind::Auth => "auth",
            OriginErrorKind::Transient => "transient",
            OriginErrorKind::Invalid => "invalid",
        }
    }
}

/// An error from one origin, before the chain turns it into a user-facing [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginError {
    pub kind: OriginErrorKind,
    pub message: String,
}

impl OriginError {
    pub fn new(kind: OriginErrorKind, message: impl Into<String>) -> Self {
        OriginError {
            kind,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(OriginErrorKind::NotFound, message)
    }
    pub fn auth(message: impl Into<String>) -> Self {
        Self::new(OriginErrorKind::Auth, message)
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(OriginErrorKind::Transient, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(OriginErrorKind::Invalid, message)
    }

    /// Classify an HTTP status that is not a success.
    pub fn from_status(status: u16, what: &str) -> Self {
        let msg = format!("{what}: HTTP {status}");
        match status {
            404 | 410 => Self::not_found(msg),
            401 | 403 => Self::auth(format!("{msg} (authentication refused or missing)")),
            408 | 429 | 500..=599 => Self::transient(msg),
            _ => Self::invalid(msg),
        }
    }

    /// The user-facing error for adapter `name`, naming the origin that failed.
    pub fn into_error(self, name: &AdapterName, origin: &str) -> Error {
        match self.kind {
            OriginErrorKind::NotFound => Error::model_not_found(name.as_str()),
            _ => Error::new(
                ErrorKind::BadGateway,
                format!("fetching adapter {name} from {origin}: {}", self.message),
            )
            .with_param("model"),
        }
    }
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for OriginError {}

/// One file of an adapter as the origin describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Path inside the adapter directory (`adapter_config.json`, `tokenizer/vocab.json`).
    pub path: String,
    /// Exact size in bytes, when the origin knows it.
    pub size: Option<u64>,
    /// SHA-256 of the content, when the origin knows it (HF LFS, S3 checksums, peers).
    pub sha256: Option<[u8; 32]>,
    /// A CRC of the whole content, when the origin keeps one and no SHA-256 (S3).
    pub crc: Option<Crc>,
    /// The file's ETag when the manifest was made (http): a resume asks for the rest of that
    /// version only (`If-Range`), so a file replaced meanwhile is never stitched from two.
    pub validator: Option<String>,
}

/// A CRC an origin keeps for a whole object: S3's full-object `x-amz-checksum-crc64nvme`
/// (S3's default for new objects), `-crc32c` or `-crc32`. It catches corruption in transit or
/// at rest as SHA-256 does, at a fraction of the CPU, though not deliberate tampering; it is
/// what such an object offers, so it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crc {
    pub algorithm: CrcAlgorithm,
    /// The CRC, big-endian, as S3 sends it (base64-decoded).
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrcAlgorithm {
    Crc32,
    Crc32c,
    Crc64Nvme,
}

impl CrcAlgorithm {
    pub fn name(self) -> &'static str {
        self.smithy().as_str()
    }

    /// The SDK's implementation of the same algorithm.
    pub fn smithy(self) -> aws_smithy_checksums::ChecksumAlgorithm {
        use aws_smithy_checksums::ChecksumAlgorithm as A;
        match self {
            CrcAlgorithm::Crc32 => A::Crc32,
            CrcAlgorithm::Crc32c => A::Crc32c,
            CrcAlgorithm::Crc64Nvme => A::Crc64Nvme,
        }
    }

    /// Bytes of the CRC.
    pub fn bytes(self) -> usize {
        match self {
            CrcAlgorithm::Crc64Nvme => 8,
            CrcAlgorithm::Crc32 | CrcAlgorithm::Crc32c => 4,
        }
    }
}

impl FileSpec {
    pub fn new(path: impl Into<String>, size: Option<u64>) -> Self {
        FileSpec {
            path: path.into(),
            size,
            sha256: None,
            crc: None,
            validator: None,
        }
    }
}

/// What an origin has for an adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The files to fetch, config first.
    pub files: Vec<FileSpec>,
    /// ETag of the config (http, S3) or content fingerprint (file), when there is one.
    pub etag: Option<String>,
    /// Commit / revision (Hugging Face), when there is one.
    pub revision: Option<String>,
    /// Where the files are read from, when the origin chose it with the manifest (the `peer`
    /// origin: the node that gave it); `None` for the others.
    pub source: Option<String>,
    /// When the origin was last asked about these files, in ms since the Unix epoch, when that
    /// was earlier than now (a peer's copy: its `fetched_at`, which the copy keeps so it looks
    /// no fresher than it is); `None`: now.
    pub fetched_at_ms: Option<u64>,
}

impl Manifest {
    /// The id compared by TTL revalidation: ETag, else revision (the Go project's rule).
    pub fn content_id(&self) -> Option<&str> {
        self.etag.as_deref().or(self.revision.as_deref())
    }

    /// Sum of the file sizes, when every size is known.
    pub fn known_size(&self) -> Option<u64> {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A file's bytes, from some offset.
pub struct FileStream {
    /// Offset of the first byte the stream yields. An origin that cannot honour the requested
    /// offset (a server ignoring `Range`) says 0 here; the transfer skips what it already has.
    pub offset: u64,
    /// Size of the whole file, when the answer says it (`Content-Length`, `Content-Range`).
    pub total: Option<u64>,
    /// The SHA-256 of the whole file, when the answer announces one (the Hub's
    /// `X-Linked-Etag`). It must agree with the manifest's; when the manifest has none, the
    /// transfer checks the bytes against it.
    pub sha256: Option<[u8; 32]>,
    pub body: BoxStream<'static, Result<Bytes, OriginError>>,
}

/// A source of adapters. Object-safe; methods return boxed `Send` futures run on tokio.
pub trait Origin: Send + Sync + 'static {
    /// Config `type` and metric label: `http`, `file`, `huggingface`, `s3`, `peer`.
    fn kind(&self) -> &'static str;

    /// Human description for errors and logs (`http https://host/base`).
    fn describe(&self) -> String;

    /// Timeouts and retries for this origin's transfers.
    fn transfer(&self) -> TransferConfig {
        TransferConfig::default()
    }

    /// Cheap current content id (ETag or revision) of an adapter, for revalidation.
    fn head<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>>;

    /// The files of an adapter. `NotFound` when the origin does not have it.
    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>>;

    /// Stream `file` starting at byte `offset` (0 for the whole file).
    fn open<'a>(
        &'a self,
        name: &'a AdapterName,
        manifest: &'a Manifest,
        file: &'a FileSpec,
        offset: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>>;

    /// The adapter's `adapter_config.json` alone, to learn its base model before its weights
    /// are placed ([`base`]). By default the manifest, then the file; an origin that can name
    /// the file directly overrides it with [`config_by_path`] (one request).
    fn config<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        async move {
            let manifest = self.manifest(name).await?;
            let file = manifest
                .files
                .iter()
                .find(|f| f.path == CONFIG_FILE)
                .ok_or_else(|| OriginError::not_found(format!("no {CONFIG_FILE}")))?;
            self.open(name, &manifest, file, 0).await
        }
        .boxed()
    }
}

/// [`Origin::config`] for origins whose `open` needs no manifest (http, S3, file): the config
/// file by its path, one request.
pub fn config_by_path<'a, O: Origin + ?Sized>(
    origin: &'a O,
    name: &'a AdapterName,
) -> BoxFuture<'a, Result<FileStream, OriginError>> {
    async move {
        let manifest = Manifest {
            files: Vec::new(),
            etag: None,
            ..Default::default()
        };
        let file = FileSpec::new(CONFIG_FILE, None);
        origin.open(name, &manifest, &file, 0).await
    }
    .boxed()
}

/// The configured origins, tried in order.
#[derive(Clone, Default)]
pub struct OriginChain {
    origins: Vec<Arc<dyn Origin>>,
}

impl OriginChain {
    pub fn new(origins: Vec<Arc<dyn Origin>>) -> Self {
        OriginChain { origins }
    }

    /// Build the origins listed in the config. Types not built yet are refused clearly.
    pub fn from_config(cfg: &Config, _control: &Control) -> Result<OriginChain, Error> {
        let mut origins: Vec<Arc<dyn Origin>> = Vec::with_capacity(cfg.origins.len());
        for (i, o) in cfg.origins.iter().enumerate() {
            match o {
                OriginConfig::Http {
                    base_url,
                    token,
                    transfer,
                } => origins.push(Arc::new(http::HttpOrigin::new(
                    base_url,
                    token.clone(),
                    transfer.clone(),
                )?)),
                OriginConfig::File { path } => {
                    origins.push(Arc::new(file::FileOrigin::new(path.clone())))
                }
                OriginConfig::HuggingFace {
                    endpoint,
                    token,
                    transfer,
                } => origins.push(Arc::new(
                    huggingface::HuggingFace::new(endpoint, token.clone(), transfer.clone())
                        .map_err(|e| e.context(format_args!("origins[{i}]")))?,
                )),
                OriginConfig::S3 {
                    bucket,
                    region,
                    prefix,
                    endpoint,
                    transfer,
                } => {
                    let settings = s3::S3Settings {
                        bucket: bucket.clone(),
                        region: region.clone(),
                        prefix: prefix.clone(),
                        endpoint: endpoint.clone(),
                    };
                    origins.push(Arc::new(s3::S3::new(settings, transfer.clone())))
                }
            }
        }
        Ok(OriginChain { origins })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Origin>> {
        self.origins.iter()
    }

    pub fn len(&self) -> usize {
        self.origins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// The content id from the first origin that has the adapter. Errors: the first error
    /// that is not `NotFound`, else `NotFound`.
    pub async fn head(&self, name: &AdapterName) -> Result<(String, Option<String>), OriginError> {
        let mut first: Option<OriginError> = None;
        for origin in &self.origins {
            match transfer::with_retries(origin.as_ref(), "head", || origin.head(name)).await {
                Ok(id) => return Ok((origin.kind().to_owned(), id)),
                Err(e) => {
                    if e.kind != OriginErrorKind::NotFound && first.is_none() {
                        first = Some(OriginError::new(
                            e.kind,
                            format!("{}: {}", origin.describe(), e.message),
                        ));
                    }
                }
            }
        }
        Err(first
            .unwrap_or_else(|| OriginError::not_found(format!("{name} not found in any origin"))))
    }
}

/// Check a manifest before anything is fetched: safe relative paths, a config, weights.
pub fn check_manifest(m: &Manifest) -> Result<(), OriginError> {
    for f in &m.files {
        if !safe_rel_path(&f.path) {
            return Err(OriginError::invalid(format!(
                "refusing file path {:?} (must stay inside the adapter directory)",
                f.path
            )));
        }
    }
    let has = |p: &str| m.files.iter().any(|f| f.path == p);
    if !has(CONFIG_FILE) {
        return Err(OriginError::not_found(format!("no {CONFIG_FILE}")));
    }
    if !has(SAFETENSORS_FILE) && !has(BIN_FILE) {
        return Err(OriginError::invalid(format!(
            "adapter has no weights ({SAFETENSORS_FILE} or {BIN_FILE})"
        )));
    }
    Ok(())
}

/// A relative path of plain segments: no `..`, `.`, empty or hidden segment, no absolute
/// path, no backslash or NUL. Hidden names are loraplex's own (`.loraplex_meta`).
pub fn safe_rel_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 1024
        && !p.contains(['\\', '\0'])
        && p.split('/').all(|s| !s.is_empty() && !s.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(
            OriginError::from_status(404, "x").kind,
            OriginErrorKind::NotFound
        );
        assert_eq!(
            OriginError::from_status(403, "x").kind,
            OriginErrorKind::Auth
        );
        assert_eq!(
            OriginError::from_status(503, "x").kind,
            OriginErrorKind::Transient
        );
        assert_eq!(
            OriginError::from_status(429, "x").kind,
            OriginErrorKind::Transient
        );
        assert_eq!(
            OriginError::from_status(400, "x").kind,
            OriginErrorKind::Invalid
        );
    }

    #[test]
    fn errors_map_to_404_or_502() {
        let n = AdapterName::parse("acme/x").unwrap();
        let e = OriginError::not_found("nope").into_error(&n, "http h");
        assert_eq!(e, Error::model_not_found("acme/x"));
        let e = OriginError::auth("401").into_error(&n, "http h");
        assert_eq!(e.status(), 502);
        assert!(e.message.contains("http h"), "{}", e.message);
    }

    #[test]
    fn manifest_rules() {
        let cfg = FileSpec::new(CONFIG_FILE, Some(10));
        let w = FileSpec::new(SAFETENSORS_FILE, Some(100));
        let m = |files| Manifest {
            files,
            etag: None,
            revision: Some("r".into()),
            ..Default::default()
        };
        assert!(check_manifest(&m(vec![cfg.clone(), w.clone()])).is_ok());
        let only_cfg = check_manifest(&m(vec![cfg.clone()])).unwrap_err();
        assert_eq!(only_cfg.kind, OriginErrorKind::Invalid);
        assert!(only_cfg.message.contains("no weights"));
        assert_eq!(
            check_manifest(&m(vec![w.clone()])).unwrap_err().kind,
            OriginErrorKind::NotFound
        );
        let evil = FileSpec::new("../../etc/passwd", None);
        assert!(check_manifest(&m(vec![cfg, w, evil])).is_err());
        assert_eq!(m(vec![]).content_id(), Some("r"));
    }

    #[test]
    fn rel_paths() {
        for ok in ["a", "a/b.json", "tokenizer/vocab.txt"] {
            assert!(safe_rel_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/../b",
            "..",
            ".",
            "a//b",
            ".loraplex_meta",
            "a\\b",
            "a/",
        ] {
            assert!(!safe_rel_path(bad), "{bad}");
        }
    }
}
