//! Moving one file from an origin to a sink, the same way for every origin: stall detection
//! (an idle timeout per read, never a total-time limit), retries with backoff that resume from
//! the byte offset reached (`Range`), and the size and checksum (SHA-256, or a CRC) checks,
//! computed while streaming.

use std::{future::Future, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::{FileSpec, Manifest, Origin, OriginError, OriginErrorKind};
use crate::{adapter::AdapterName, error::Error};

/// First retry delay; doubles per retry up to [`BACKOFF_CAP`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Where the bytes of the file go, in order. An error from the sink is final: a full disk is
/// not cured by asking the origin again, and content the sink rejects
/// (`TransferError::Origin` with `Invalid`) will not change either.
pub trait ChunkSink: Send {
    fn accept(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), TransferError>> + Send;
}

/// Why a transfer stopped.
#[derive(Debug)]
pub enum TransferError {
    /// The origin failed (after the retries it deserved).
    Origin(OriginError),
    /// The sink (the writer, the disk budget) failed.
    Sink(Error),
}

/// What a finished transfer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transferred {
    pub bytes: u64,
    /// The content's sha256, computed only when the origin gave one to check against
    /// (hashing costs more CPU than the rest of the transfer).
    pub sha256: Option<[u8; 32]>,
    /// Retries it took (resumed or restarted opens).
    pub retries: u32,
}

/// The checksum computed while streaming: the SHA-256 when the origin gave one, else its CRC.
enum Check {
    Sha256(Sha256),
    Crc(Box<dyn aws_smithy_checksums::http::HttpChecksum>),
}

impl Check {
    fn for_file(file: &FileSpec) -> Option<Check> {
        match (&file.sha256, &file.crc) {
            (Some(_), _) => Some(Check::Sha256(Sha256::new())),
            (None, Some(crc)) => Some(Check::Crc(crc.algorithm.smithy().into_impl())),
            (None, None) => None,
        }
    }

    fn update(&mut self, chunk: &[u8]) {
        match self {
            Check::Sha256(h) => h.update(chunk),
            Check::Crc(c) => c.update(chunk),
        }
    }

    /// Compare with what `file` announced: the content's SHA-256 when that was the check,
    /// `None` for a CRC, or the mismatch.
    fn finish(self, file: &FileSpec) -> Result<Option<[u8; 32]>, OriginError> {
        let mismatch = |what: &str, want: &[u8], got: &[u8]| {
            OriginError::invalid(format!(
                "{}: {what} mismatch (expected {}, got {})",
                file.path,
                hex(want),
                hex(got)
            ))
        };
        match self {
            Check::Sha256(h) => {
                let got: [u8; 32] = h.finalize().into();
                match file.sha256 {
                    Some(want) if want != got => Err(mismatch("sha256", &want, &got)),
                    _ => Ok(Some(got)),
                }
            }
            Check::Crc(c) => {
                let got = c.finalize();
                match &file.crc {
                    Some(want) if want.value != got => {
                        Err(mismatch(want.algorithm.name(), &want.value, &got))
                    }
                    _ => Ok(None),
                }
            }
        }
    }
}

/// Run a metadata request of `origin` (manifest, head) with its timeouts, retrying
/// transient failures with backoff like a transfer.
pub async fn with_retries<T, F, Fut>(
    origin: &dyn Origin,
    what: &str,
    mut call: F,
) -> Result<T, OriginError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, OriginError>>,
{
    let cfg = origin.transfer();
    let limit = cfg.connect_timeout + cfg.idle_timeout;
    let mut backoff = BACKOFF_START;
    let mut retries = 0;
    loop {
        let result = match tokio::time::timeout(limit, call()).await {
            Ok(r) => r,
            Err(_) => Err(OriginError::transient(format!(
                "{what}: no answer within {limit:?}"
            ))),
        };
        match result {
            Err(e) if e.kind == OriginErrorKind::Transient && retries < cfg.retries => {
                retries += 1;
                tracing::warn!(origin = %origin.describe(), what, retry = retries, error = %e.message, "retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
            other => return other,
        }
    }
}

/// Stream `file` of adapter `name` from `origin` into `sink`.
pub async fn pull_file<S: ChunkSink>(
    origin: &dyn Origin,
    name: &AdapterName,
    manifest: &Manifest,
    file: &FileSpec,
    sink: &mut S,
) -> Result<Transferred, TransferError> {
    let cfg = origin.transfer();
    let mut check = Check::for_file(file);
    let mut done: u64 = 0;
    let mut expected = file.size;
    let mut retries = 0u32;
    let mut backoff = BACKOFF_START;
    loop {
        let attempt = stream_once(
            origin,
            name,
            manifest,
            file,
            sink,
            &mut check,
            &mut done,
            &mut expected,
            cfg.idle_timeout,
            cfg.connect_timeout,
        )
        .await;
        match attempt {
            Ok(()) => break,
            Err(TransferError::Origin(e))
                if e.kind == OriginErrorKind::Transient && retries < cfg.retries =>
            {
                retries += 1;
                tracing::warn!(
                    adapter = %name, file = %file.path, origin = %origin.describe(),
                    offset = done, retry = retries, error = %e.message,
                    "transfer interrupted; retrying from the offset reached"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
            Err(e) => return Err(e),
        }
    }
    let sha256 = match check {
        Some(c) => c.finish(file).map_err(TransferError::Origin)?,
        None => None,
    };
    Ok(Transferred {
        bytes: done,
        sha256,
        retries,
    })
}

/// One open + read-to-end attempt. `done` and the checksum carry over between attempts.
#[allow(clippy::too_many_arguments)]
async fn stream_once<S: ChunkSink>(
    origin: &dyn Origin,
    name: &AdapterName,
    manifest: &Manifest,
    file: &FileSpec,
    sink: &mut S,
    check: &mut Option<Check>,
    done: &mut u64,
    expected: &mut Option<u64>,
    idle: Duration,
    connect: Duration,
) -> Result<(), TransferError> {
    let stall = |what: &str| {
        TransferError::Origin(OriginError::transient(format!(
            "{}: no data for {idle:?} ({what})",
            file.path
        )))
    };
    let opened = tokio::time::timeout(connect + idle, origin.open(name, manifest, file, *done))
        .await
        .map_err(|_| stall("waiting for the answer"))?
        .map_err(TransferError::Origin)?;
    if opened.offset > *done {
        return Err(TransferError::Origin(OriginError::invalid(format!(
            "{}: asked for offset {done}, got {}",
            file.path, opened.offset
        ))));
    }
    if let Some(total) = opened.total {
        match *expected {
            Some(want) if want != total => {
                return Err(TransferError::Origin(OriginError::invalid(format!(
                    "{}: size {total} announced, {want} expected",
                    file.path
                ))));
            }
            _ => *expected = Some(total),
        }
    }
    // Bytes before `done` were already delivered (the origin restarted from an earlier offset).
    let mut skip = *done - opened.offset;
    let mut body = opened.body;
    loop {
        let next = tokio::time::timeout(idle, body.next())
            .await
            .map_err(|_| stall("mid-transfer"))?;
        let mut chunk = match next {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(TransferError::Origin(e)),
        };
        if skip > 0 {
            let n = skip.min(chunk.len() as u64);
            let _ = chunk.split_to(n as usize);
            skip -= n;
            if chunk.is_empty() {
                continue;
            }
        }
        let new_done = *done + chunk.len() as u64;
        if let Some(want) = *expected
            && new_done > want
        {
            return Err(TransferError::Origin(OriginError::invalid(format!(
                "{}: more bytes than the expected {want}",
                file.path
            ))));
        }
        if let Some(c) = check.as_mut() {
            c.update(&chunk);
        }
        *done = new_done;
        sink.accept(chunk).await?;
    }
    match *expected {
        Some(want) if *done < want => Err(TransferError::Origin(OriginError::transient(format!(
            "{}: stream ended at {done} of {want} bytes",
            file.path
        )))),
        _ => Ok(()),
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse a 64-digit hex sha256 (ETags carry it quoted; quotes are stripped).
pub fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let s = s.trim().trim_start_matches("W/").trim_matches('"');
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use futures_util::{FutureExt, future::BoxFuture, stream};

    use super::*;
    use crate::{config::TransferConfig, origin::FileStream};

    /// An origin serving one in-memory file, failing the first `cuts` opens after `cut_at`
    /// bytes, honouring offsets only when `ranges`.
    struct Flaky {
        data: Bytes,
        cuts: AtomicU32,
        cut_at: usize,
        ranges: bool,
        opens: AtomicU32,
    }

    impl Origin for Flaky {
        fn kind(&self) -> &'static str {
            "test"
        }
        fn describe(&self) -> String {
            "test flaky".into()
        }
        fn transfer(&self) -> TransferConfig {
            TransferConfig {
                retries: 3,
                ..TransferConfig::default()
            }
        }
        fn head<'a>(
            &'a self,
            _: &'a AdapterName,
        ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
            async { Ok(None) }.boxed()
        }
        fn manifest<'a>(
            &'a self,
            _: &'a AdapterName,
        ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
            unreachable!()
        }
        fn open<'a>(
            &'a self,
            _: &'a AdapterName,
            _: &'a Manifest,
            _: &'a FileSpec,
            offset: u64,
        ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
            self.opens.fetch_add(1, Ordering::SeqCst);
            let start = if self.ranges { offset as usize } else { 0 };
            let rest = self.data.slice(start..);
            let cut = self
                .cuts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                .is_ok();
            let mut items: Vec<Result<Bytes, OriginError>> = rest
                .chunks(7)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            if cut {
                let keep = self.cut_at.div_ceil(7).min(items.len());
                items.truncate(keep);
                items.push(Err(OriginError::transient("connection reset")));
            }
            async move {
                Ok(FileStream {
                    offset: start as u64,
                    total: Some(self.data.len() as u64),
                    body: stream::iter(items).boxed(),
                })
            }
            .boxed()
        }
    }

    struct Collect(Vec<u8>);
    impl ChunkSink for Collect {
        async fn accept(&mut self, chunk: Bytes) -> Result<(), TransferError> {
            self.0.extend_from_slice(&chunk);
            Ok(())
        }
    }

    fn data() -> Bytes {
        (0..1000u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>()
            .into()
    }

    async fn run(
        o: &Flaky,
        sha: Option<[u8; 32]>,
    ) -> (Result<Transferred, TransferError>, Vec<u8>) {
        let name = AdapterName::parse("a").unwrap();
        let m = Manifest {
            files: vec![],
            etag: None,
            revision: None,
            source: None,
        };
        let spec = FileSpec {
            path: "w".into(),
            size: Some(1000),
            sha256: sha,
            crc: None,
        };
        let mut sink = Collect(Vec::new());
        let r = pull_file(o, &name, &m, &spec, &mut sink).await;
        (r, sink.0)
    }

    fn flaky(cuts: u32, ranges: bool) -> Arc<Flaky> {
        Arc::new(Flaky {
            data: data(),
            cuts: AtomicU32::new(cuts),
            cut_at: 400,
            ranges,
            opens: AtomicU32::new(0),
        })
    }

    #[tokio::test]
    async fn resumes_with_range_and_verifies() {
        let o = flaky(2, true);
        let want: [u8; 32] = Sha256::digest(data()).into();
        let (r, got) = run(&o, Some(want)).await;
        let t = r.unwrap();
        assert_eq!(got, data().to_vec());
        assert_eq!((t.bytes, t.retries, t.sha256), (1000, 2, Some(want)));
        assert_eq!(o.opens.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn restarts_when_range_is_ignored() {
        let o = flaky(1, false);
        let (r, got) = run(&o, None).await;
        assert_eq!(r.unwrap().retries, 1);
        assert_eq!(got, data().to_vec());
    }

    #[tokio::test]
    async fn gives_up_after_retries() {
        let o = flaky(10, true);
        let (r, _) = run(&o, None).await;
        match r {
            Err(TransferError::Origin(e)) => assert_eq!(e.kind, OriginErrorKind::Transient),
            other => panic!("{other:?}"),
        }
        assert_eq!(o.opens.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn sha_mismatch_is_invalid() {
        let o = flaky(0, true);
        let (r, _) = run(&o, Some([7; 32])).await;
        match r {
            Err(TransferError::Origin(e)) => {
                assert_eq!(e.kind, OriginErrorKind::Invalid);
                assert!(e.message.contains("sha256 mismatch"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sha_hex_roundtrip() {
        let d: [u8; 32] = Sha256::digest(b"x").into();
        assert_eq!(parse_sha256(&format!("\"{}\"", hex(&d))), Some(d));
        assert_eq!(parse_sha256("abc"), None);
    }
}
