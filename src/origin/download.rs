//! One adapter download from a remote origin: the list of files to fetch ([`Manifest`]) and,
//! for each file, a [`FileBody`] that yields its bytes.
//!
//! A `FileBody` hides the unreliable network from its reader: it aborts a read that stalls
//! longer than the idle timeout, reopens the file *at the offset already received* (`Range`)
//! after a reset, a 5xx or a stall, and hashes the bytes with SHA-256 as they go by (on a
//! thread beside the transfer, [`super::digest`]; no second read). Its last call returns `Ok(None)` only when the size and the checksum announced by the
//! origin matched; any mismatch is an error, so a reader that publishes only after `Ok(None)`
//! never publishes bad bytes. The origin-specific part is only "open this file at offset N"
//! ([`Opener`]).
//!
//! Metrics (`loraplex_fetch_*{origin}`) are recorded here, once per download: bytes as they
//! arrive, one failure with its reason, or success and duration on [`Download::finish`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{StreamExt, future::BoxFuture, stream::BoxStream};
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};

use super::{
    digest::PipelinedSha256,
    transfer::{FailClass, FetchError, RetryPolicy},
};
use crate::metrics::{Metrics, OriginLabel, OriginReason, OriginResult};

/// A stream of body chunks from an origin.
pub type ChunkStream = BoxStream<'static, Result<Bytes, FetchError>>;

/// One file of an adapter, as the origin lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path inside the adapter directory; checked relative (no `..`, no empty segments).
    pub path: String,
    /// What the opener needs to find it (an S3 key, a repo file name).
    pub locator: String,
    /// Size announced by the listing, if any.
    pub size: Option<u64>,
    /// SHA-256 announced by the listing, if any.
    pub sha256: Option<[u8; 32]>,
}

/// What an adapter consists of at one version of the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Identifies this version: a commit sha, an ETag. A different id means new content.
    pub content_id: String,
    pub files: Vec<RemoteFile>,
}

/// A response body just opened, with what its headers told about the whole file.
pub struct Opened {
    pub body: ChunkStream,
    /// Offset of the first byte of `body` (0 when the server ignored `Range`).
    pub start: u64,
    /// Full size of the file, if announced.
    pub size: Option<u64>,
    /// SHA-256 of the whole file, if announced.
    pub sha256: Option<[u8; 32]>,
}

/// The origin-specific part of a download: open a file at an offset.
pub trait Opener: Send + Sync + 'static {
    fn open(
        &self,
        file: &RemoteFile,
        offset: u64,
    ) -> BoxFuture<'static, Result<Opened, FetchError>>;
}

/// Metric handles of one download, shared by its file bodies.
struct Meter {
    metrics: Option<Arc<Metrics>>,
    origin: &'static str,
    bytes: Option<Counter>,
    failed: AtomicBool,
}

impl Meter {
    fn new(metrics: Option<Arc<Metrics>>, origin: &'static str) -> Self {
        let bytes = metrics
            .as_ref()
            .map(|m| m.fetch_bytes.get_or_create(&OriginLabel { origin }).clone());
        Meter {
            metrics,
            origin,
            bytes,
            failed: AtomicBool::new(false),
        }
    }

    /// Count one failed download (the first failure only: one download, one reason).
    fn fail(&self, class: FailClass) {
        let Some(m) = &self.metrics else { return };
        if self.failed.swap(true, Ordering::Relaxed) {
            return;
        }
        let (origin, result) = (self.origin, outcome(class));
        m.fetches
            .get_or_create(&OriginResult { origin, result })
            .inc();
        if class != FailClass::NotFound {
            let reason = class.as_str();
            m.fetch_failures
                .get_or_create(&OriginReason { origin, reason })
                .inc();
        }
    }
}

fn outcome(class: FailClass) -> &'static str {
    if class == FailClass::NotFound {
        "not_found"
    } else {
        "error"
    }
}

/// Record a download that failed before it started (the manifest step).
pub fn record_miss(metrics: Option<&Metrics>, origin: &'static str, e: &FetchError) {
    let Some(m) = metrics else { return };
    let result = outcome(e.class);
    m.fetches
        .get_or_create(&OriginResult { origin, result })
        .inc();
    if e.class != FailClass::NotFound {
        let reason = e.class.as_str();
        m.fetch_failures
            .get_or_create(&OriginReason { origin, reason })
            .inc();
    }
}

/// One adapter download: its manifest, and a body per file, in order.
pub struct Download {
    manifest: Manifest,
    opener: Arc<dyn Opener>,
    policy: RetryPolicy,
    meter: Arc<Meter>,
    started: Instant,
    verify: bool,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("origin", &self.meter.origin)
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

impl Download {
    pub fn new(
        origin: &'static str,
        manifest: Manifest,
        opener: Arc<dyn Opener>,
        policy: RetryPolicy,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Download {
            manifest,
            opener,
            policy,
            meter: Arc::new(Meter::new(metrics, origin)),
            started: Instant::now(),
            verify: true,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn content_id(&self) -> &str {
        &self.manifest.content_id
    }

    pub fn files(&self) -> &[RemoteFile] {
        &self.manifest.files
    }

    /// Turn SHA-256 verification off. Only the benchmark does this, to measure what the
    /// checksum costs; sizes are still checked.
    #[doc(hidden)]
    pub fn set_verify(&mut self, verify: bool) {
        self.verify = verify;
    }

    /// The body of file `index` of the manifest (opened lazily on the first read).
    pub fn body(&self, index: usize) -> FileBody {
        let file = self.manifest.files[index].clone();
        FileBody {
            expected_size: file.size,
            expected_sha: file.sha256,
            verify: self.verify,
            hasher: None,
            file,
            opener: self.opener.clone(),
            policy: self.policy,
            meter: self.meter.clone(),
            state: BodyState::Closed,
            received: 0,
            failures: 0,
        }
    }

    /// Call once every body returned `Ok(None)`: counts the download as a success.
    pub fn finish(self) -> Duration {
        let took = self.started.elapsed();
        if let Some(m) = &self.meter.metrics {
            let origin = self.meter.origin;
            let ok = OriginResult {
                origin,
                result: "ok",
            };
            m.fetches.get_or_create(&ok).inc();
            m.fetch_duration
                .get_or_create(&OriginLabel { origin })
                .observe(took.as_secs_f64());
        }
        took
    }
}

enum BodyState {
    /// Not open: (re)open at `received` on the next read.
    Closed,
    /// Reading; `skip` bytes must still be dropped (the server ignored our `Range`).
    Open { body: ChunkStream, skip: u64 },
    /// Every byte was delivered and verified.
    Done,
}

/// The bytes of one file, verified, resumed across failures.
pub struct FileBody {
    file: RemoteFile,
    opener: Arc<dyn Opener>,
    policy: RetryPolicy,
    meter: Arc<Meter>,
    state: BodyState,
    received: u64,
    /// Consecutive failures since the last byte received.
    failures: u32,
    expected_size: Option<u64>,
    expected_sha: Option<[u8; 32]>,
    verify: bool,
    /// Started on the first byte (it needs the tokio runtime).
    hasher: Option<PipelinedSha256>,
}

impl FileBody {
    pub fn file(&self) -> &RemoteFile {
        &self.file
    }

    /// Bytes delivered so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The next chunk; `Ok(None)` once the whole file arrived and matched its size and
    /// checksum. An error is final (retries are already spent) and counted in the metrics.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, FetchError> {
        match self.next_inner().await {
            Err(e) => {
                self.meter.fail(e.class);
                Err(e.context(format_args!("file {}", self.file.path)))
            }
            ok => ok,
        }
    }

    async fn next_inner(&mut self) -> Result<Option<Bytes>, FetchError> {
        loop {
            match &mut self.state {
                BodyState::Done => return Ok(None),
                BodyState::Closed => {
                    let opened = self.opener.open(&self.file, self.received).await;
                    match opened {
                        Ok(opened) => self.accept(opened)?,
                        Err(e) => self.retry_or_fail(e).await?,
                    }
                }
                BodyState::Open { body, skip } => {
                    let next = tokio::time::timeout(self.policy.idle_timeout, body.next()).await;
                    match next {
                        Err(_) => {
                            let idle = self.policy.idle_timeout;
                            let e = FetchError::new(
                                FailClass::Timeout,
                                format!(
                                    "stalled: no byte for {idle:?} at offset {}",
                                    self.received
                                ),
                            );
                            self.retry_or_fail(e).await?;
                        }
                        // Every byte arrived and only the ending broke: verify, don't reopen
                        // (a Range at the end of the file is unsatisfiable).
                        Ok(Some(Err(_))) if self.expected_size == Some(self.received) => {
                            return self.end().await;
                        }
                        Ok(Some(Err(e))) => self.retry_or_fail(e).await?,
                        Ok(None) => match self.expected_size {
                            // A clean end before the announced size is a truncation: resume.
                            Some(size) if self.received < size => {
                                let e = FetchError::transient(format!(
                                    "body ended at {} of {size} bytes",
                                    self.received
                                ));
                                self.retry_or_fail(e).await?;
                            }
                            _ => return self.end().await,
                        },
                        Ok(Some(Ok(mut chunk))) => {
                            if *skip > 0 {
                                let drop = (*skip).min(chunk.len() as u64) as usize;
                                *skip -= drop as u64;
                                chunk = chunk.slice(drop..);
                            }
                            if chunk.is_empty() {
                                continue;
                            }
                            return self.deliver(chunk).await.map(Some);
                        }
                    }
                }
            }
        }
    }

    /// Take a freshly opened body: check what it announces against what we know.
    fn accept(&mut self, opened: Opened) -> Result<(), FetchError> {
        if opened.start > self.received {
            return Err(FetchError::invalid(format!(
                "asked for offset {}, got a body starting at {}",
                self.received, opened.start
            )));
        }
        self.expected_size = merge("size", self.expected_size, opened.size)?;
        self.expected_sha = merge("sha256", self.expected_sha, opened.sha256)?;
        let skip = self.received - opened.start;
        self.state = BodyState::Open {
            body: opened.body,
            skip,
        };
        Ok(())
    }

    async fn deliver(&mut self, chunk: Bytes) -> Result<Bytes, FetchError> {
        let total = self.received + chunk.len() as u64;
        if let Some(size) = self.expected_size.filter(|&s| total > s) {
            return Err(FetchError::invalid(format!(
                "more bytes than the announced {size}"
            )));
        }
        if self.verify && self.expected_sha.is_some() {
            let h = self.hasher.get_or_insert_with(PipelinedSha256::new);
            h.update(chunk.clone()).await;
        }
        if let Some(c) = &self.meter.bytes {
            c.inc_by(chunk.len() as u64);
        }
        self.received = total;
        self.failures = 0;
        Ok(chunk)
    }

    /// The origin closed the body: check size and checksum.
    async fn end(&mut self) -> Result<Option<Bytes>, FetchError> {
        if let (true, Some(want)) = (self.verify, self.expected_sha) {
            let got: [u8; 32] = match self.hasher.take() {
                Some(h) => h.finish().await,
                None => Sha256::digest(b"").into(),
            };
            if got != want {
                return Err(FetchError::new(
                    FailClass::Checksum,
                    format!(
                        "sha256 mismatch: origin announced {}, bytes hash to {}",
                        hex(&want),
                        hex(&got)
                    ),
                ));
            }
        }
        self.state = BodyState::Done;
        Ok(None)
    }

    async fn retry_or_fail(&mut self, e: FetchError) -> Result<(), FetchError> {
        self.state = BodyState::Closed;
        if !e.class.retryable() || self.failures >= self.policy.retries {
            return Err(e);
        }
        let delay = self.policy.delay(self.failures);
        tracing::debug!(file = %self.file.path, offset = self.received, error = %e, ?delay,
            "origin transfer failed, resuming");
        self.failures += 1;
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// Two announcements of the same fact must agree.
fn merge<T: PartialEq + Copy + std::fmt::Debug>(
    what: &str,
    known: Option<T>,
    announced: Option<T>,
) -> Result<Option<T>, FetchError> {
    match (known, announced) {
        (Some(a), Some(b)) if a != b => Err(FetchError::invalid(format!(
            "the listing and the file disagree on the {what}"
        ))),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parse a 64-digit hex SHA-256 (optionally quoted, as in `X-Linked-Etag`).
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim().trim_start_matches("W/").trim_matches('"');
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bodies are read on the control plane and may move between its threads (a compile-time
    /// check: this test fails to build, not to run, if it breaks).
    #[test]
    fn bodies_and_their_reads_are_send() {
        fn is_send<T: Send>() {}
        is_send::<FileBody>();
        is_send::<Download>();
        fn read_is_send(b: &mut FileBody) -> impl Send + '_ {
            b.next_chunk()
        }
        let _ = read_is_send;
    }

    #[test]
    fn sha256_hex_parsing() {
        let h = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let quoted = format!("\"{h}\"");
        let v = parse_sha256_hex(&quoted).unwrap();
        assert_eq!(hex(&v), h);
        assert_eq!(parse_sha256_hex(&format!("W/{quoted}")), Some(v));
        assert_eq!(parse_sha256_hex("abc"), None);
        assert_eq!(parse_sha256_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn announcements_must_agree() {
        assert_eq!(merge("size", Some(1u64), None), Ok(Some(1)));
        assert_eq!(merge("size", None, Some(2u64)), Ok(Some(2)));
        assert_eq!(merge("size", Some(3u64), Some(3)), Ok(Some(3)));
        assert_eq!(
            merge("size", Some(3u64), Some(4)).unwrap_err().class,
            FailClass::Invalid
        );
    }
}
