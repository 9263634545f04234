//! What the remote origins (Hugging Face, S3) share on top of [`super::transfer`]: turning
//! client errors into [`OriginError`] classes, and reading `Content-Range`.
//!
//! Retries, resume from the offset reached, stall detection and checksums are the transfer's
//! (`pull_file`) and the store's (`with_retries` around manifests); an origin only classifies
//! each failure once, where it happens, so those layers decide without parsing messages.

use std::fmt;

use super::{OriginError, OriginErrorKind};

/// Classify a reqwest error. Timeouts, connection trouble and bodies that break mid-way
/// (reqwest calls those decode errors too) are transient; a JSON body that does not parse is
/// an unusable answer.
pub fn classify_reqwest(e: &reqwest::Error, what: impl fmt::Display, json: bool) -> OriginError {
    let kind = if e.is_decode() && json && !e.is_body() {
        OriginErrorKind::Invalid
    } else {
        OriginErrorKind::Transient
    };
    OriginError::new(kind, format!("{what}: {}", chain(e)))
}

pub use crate::error::chain;

/// The content id of an adapter: `{config ETag}+{weights ETag}`, or the config's alone when
/// the weights have none, so new weights under an unchanged config are noticed too (the Go
/// project looked at the config's ETag only).
pub fn content_id(config: String, weights: Option<String>) -> String {
    match weights {
        Some(w) if !w.is_empty() => format!("{config}+{w}"),
        _ => config,
    }
}

/// Where a body starts in its file, and the file's full size when the answer says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    pub total: Option<u64>,
}

/// `bytes 100-199/1000` → start 100, total 1000; `bytes 100-199/*` → start 100, no total.
pub fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some(ContentRange {
        start: start.parse().ok()?,
        total,
    })
}

/// Two announcements of the same fact must agree (a listing and a file's own headers).
pub fn agree<T: PartialEq + fmt::Debug>(
    what: &str,
    listed: Option<T>,
    announced: Option<T>,
) -> Result<(), OriginError> {
    match (listed, announced) {
        (Some(a), Some(b)) if a != b => Err(OriginError::invalid(format!(
            "the listing says {what} {a:?}, the file's answer {b:?}"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        let range = |start, total| Some(ContentRange { start, total });
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            range(100, Some(1000))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), range(0, None));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn announcements_must_agree() {
        assert!(agree("size", Some(1u64), None).is_ok());
        assert!(agree("size", None, Some(2u64)).is_ok());
        assert!(agree("size", Some(3u64), Some(3)).is_ok());
        let e = agree("size", Some(3u64), Some(4)).unwrap_err();
        assert_eq!(e.kind, OriginErrorKind::Invalid);
    }
}
