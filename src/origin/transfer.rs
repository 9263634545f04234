//! Moving one file from an origin to a sink, the same way for every origin: stall detection
//! (an idle timeout per read, and the `min_rate` floor over a sliding window, [`super::rate`];
//! never a total-time limit), retries with backoff that resume from the byte offset reached
//! (`Range`), and the size and checksum (SHA-256, or a CRC) checks, computed while streaming.
//! The checksum is the manifest's, else the SHA-256 the first answer announces (the Hub's
//! `X-Linked-Etag` when the revision API listed none, as mirrors of the Hub do).

use std::{future::Future, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{FileSpec, Manifest, Origin, OriginError, OriginErrorKind, rate::RateFloor};
use crate::{adapter::AdapterName, config::TransferConfig, error::Error};

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

/// The checksum computed while streaming and the value it must reach: the SHA-256 when the
/// origin gave one, else its CRC.
enum Check {
    Sha256 {
        hasher: Sha256,
        want: [u8; 32],
    },
    Crc {
        hasher: Box<dyn aws_smithy_checksums::http::HttpChecksum>,
        want: super::Crc,
    },
}

impl Check {
    fn for_file(file: &FileSpec) -> Option<Check> {
        match (file.sha256, &file.crc) {
            (Some(want), _) => Some(Check::sha256(want)),
            (None, Some(crc)) => Some(Check::Crc {
                hasher: crc.algorithm.smithy().into_impl(),
                want: crc.clone(),
            }),
            (None, None) => None,
        }
    }

    fn sha256(want: [u8; 32]) -> Check {
        Check::Sha256 {
            hasher: Sha256::new(),
            want,
        }
    }

    fn update(&mut self, chunk: &[u8]) {
        match self {
            Check::Sha256 { hasher, .. } => hasher.update(chunk),
            Check::Crc { hasher, .. } => hasher.update(chunk),
        }
    }

    /// Compare with the value wanted: the content's SHA-256 when that was the check, `None`
    /// for a CRC, or the mismatch.
    fn finish(self, path: &str) -> Result<Option<[u8; 32]>, OriginError> {
        let mismatch = |what: &str, want: &[u8], got: &[u8]| {
            OriginError::invalid(format!(
                "{path}: {what} mismatch (expected {}, got {})",
                hex(want),
                hex(got)
            ))
        };
        match self {
            Check::Sha256 { hasher, want } => {
                let got: [u8; 32] = hasher.finalize().into();
                match want == got {
                    true => Ok(Some(got)),
                    false => Err(mismatch("sha256", &want, &got)),
                }
            }
            Check::Crc { hasher, want } => {
                let got = hasher.finalize();
                match want.value == got {
                    true => Ok(None),
                    false => Err(mismatch(want.algorithm.name(), &want.value, &got)),
                }
            }
        }
    }
}

/// Take the SHA-256 an answer announces: it must agree with the one being checked; when there
/// is none yet and the transfer starts from the first byte, it becomes the check.
fn adopt_announced(
    check: &mut Option<Check>,
    announced: Option<[u8; 32]>,
    done: u64,
    path: &str,
) -> Result<(), OriginError> {
    let Some(announced) = announced else {
        return Ok(());
    };
    match check {
        Some(Check::Sha256 { want, .. }) if *want != announced => {
            Err(OriginError::invalid(format!(
                "{path}: the answer announces sha256 {}, expected {}",
                hex(&announced),
                hex(want)
            )))
        }
        None if done == 0 => {
            *check = Some(Check::sha256(announced));
            Ok(())
        }
        // Already checked, by this value or by a CRC; or bytes arrived before any value did.
        _ => Ok(()),
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
            &cfg,
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
        Some(c) => c.finish(&file.path).map_err(TransferError::Origin)?,
        None => None,
    };
    Ok(Transferred {
        bytes: done,
        sha256,
        retries,
    })
}

/// One open + read-to-end attempt. `done` and the checksum carry over between attempts; the
/// rate floor starts again with each.
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
    cfg: &TransferConfig,
) -> Result<(), TransferError> {
    let (idle, connect) = (cfg.idle_timeout, cfg.connect_timeout);
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
    adopt_announced(check, opened.sha256, *done, &file.path).map_err(TransferError::Origin)?;
    // Bytes before `done` were already delivered (the origin restarted from an earlier offset).
    let mut skip = *done - opened.offset;
    let mut body = opened.body;
    let mut floor = cfg
        .min_rate
        .map(|rate| RateFloor::new(rate, cfg.rate_window, Instant::now()));
    loop {
        let idle_at = Instant::now() + idle;
        let wait_until = floor
            .as_ref()
            .map_or(idle_at, |f| f.deadline().min(idle_at));
        let next = match tokio::time::timeout_at(wait_until, body.next()).await {
            Ok(next) => next,
            Err(_) if wait_until < idle_at => {
                let f = floor.as_ref().expect("only a floor ends a wait early");
                return Err(TransferError::Origin(OriginError::transient(format!(
                    "{}: slower than min_rate ({} bytes/s over {:?}; {} bytes in this attempt)",
                    file.path,
                    cfg.min_rate.unwrap_or_default(),
                    cfg.rate_window,
                    f.total(),
                ))));
            }
            Err(_) => return Err(stall("mid-transfer")),
        };
        let mut chunk = match next {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(TransferError::Origin(e)),
        };
        if let Some(f) = floor.as_mut() {
            f.record(chunk.len() as u64, Instant::now());
        }
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
#[path = "transfer_tests.rs"]
mod tests;
