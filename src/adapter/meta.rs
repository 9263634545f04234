//! `.loraplex_meta`: where an adapter came from and when, in the Go project's JSON shape
//! (`origin`, `etag`, `revision`, `fetched_at` in RFC 3339, `ttl_seconds`), so a store written
//! by either implementation is read by the other.

use std::{fs, io, path::Path};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::META_FILE;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    /// Origin type that delivered it (`http`, `file`, `huggingface`, `s3`).
    pub origin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub fetched_at: Timestamp,
    #[serde(default)]
    pub ttl_seconds: i64,
}

impl AdapterMeta {
    /// ETag, else revision: the id revalidation compares (the Go rule).
    pub fn content_id(&self) -> Option<&str> {
        self.etag
            .as_deref()
            .filter(|s| !s.is_empty())
            .or(self.revision.as_deref().filter(|s| !s.is_empty()))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("meta always serializes")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(b).map_err(|e| format!("{META_FILE}: {e}"))
    }

    /// Read `{dir}/.loraplex_meta`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>, String> {
        match fs::read(dir.join(META_FILE)) {
            Ok(b) => Self::from_bytes(&b).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{META_FILE}: {e}")),
        }
    }

    /// Milliseconds since the Unix epoch of `fetched_at`.
    pub fn fetched_at_ms(&self) -> u64 {
        self.fetched_at.as_millisecond().max(0) as u64
    }
}

/// Milliseconds since the Unix epoch, as a timestamp.
pub fn timestamp_ms(ms: u64) -> Timestamp {
    Timestamp::from_millisecond(ms as i64).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_written_meta() {
        // As Go's encoding/json writes a time.Time (RFC 3339 with nanoseconds and offset).
        let go = br#"{"origin":"huggingface","revision":"abc123","fetched_at":"2025-03-01T10:20:30.123456789+02:00","ttl_seconds":3600}"#;
        let m = AdapterMeta::from_bytes(go).unwrap();
        assert_eq!(m.origin, "huggingface");
        assert_eq!(m.content_id(), Some("abc123"));
        assert_eq!(m.ttl_seconds, 3600);
        assert_eq!(m.fetched_at.to_string(), "2025-03-01T08:20:30.123456789Z");
        let back = AdapterMeta::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        let v: serde_json::Value = serde_json::from_slice(&m.to_bytes()).unwrap();
        assert!(v.get("etag").is_none(), "omitempty like Go");
        assert!(AdapterMeta::from_bytes(b"{").is_err());
    }

    #[test]
    fn etag_wins_over_revision() {
        let m = AdapterMeta {
            origin: "http".into(),
            etag: Some("\"e\"".into()),
            revision: Some("r".into()),
            fetched_at: timestamp_ms(1_700_000_000_000),
            ttl_seconds: 0,
        };
        assert_eq!(m.content_id(), Some("\"e\""));
        assert_eq!(m.fetched_at_ms(), 1_700_000_000_000);
    }
}
