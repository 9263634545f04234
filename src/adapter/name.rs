//! Adapter names: checked before anything touches the disk.
//!
//! A name is a Hugging Face repo id: segments of `[A-Za-z0-9._-]` separated by `/`, none empty,
//! none starting with `.` (so `.`, `..` and hidden names, which loraplex keeps for its own temp
//! files, are impossible), at most [`MAX_LEN`] bytes. The last segment may pin a revision with
//! one `@`: `org/name@v2` (stored under that literal directory name). A valid name is always
//! a relative path that stays inside the storage directory.

use std::{fmt, path::Path};

use crate::error::Error;

/// Longest accepted name, in bytes.
pub const MAX_LEN: usize = 256;

/// A validated adapter name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterName(String);

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl AdapterName {
    /// Validate `name`; the error is a 400 naming the rule that failed.
    pub fn parse(name: &str) -> Result<AdapterName, Error> {
        let bad = |why: &str| {
            Err(
                Error::bad_request(format!("invalid adapter name {name:?}: {why}"))
                    .with_param("model"),
            )
        };
        if name.is_empty() {
            return bad("empty");
        }
        if name.len() > MAX_LEN {
            return bad("longer than 256 bytes");
        }
        let (repo, revision) = match name.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (name, None),
        };
        if let Some(rev) = revision
            && !segment_ok(rev)
        {
            return bad("the revision after '@' must be [A-Za-z0-9._-] and not start with '.'");
        }
        for segment in repo.split('/') {
            if !segment_ok(segment) {
                return bad(
                    "segments are [A-Za-z0-9._-], separated by '/', none empty or starting with '.'",
                );
            }
        }
        Ok(AdapterName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The repo id without a pinned revision: `org/name` for `org/name@v2`.
    pub fn repo(&self) -> &str {
        self.0.split_once('@').map_or(&self.0, |(repo, _)| repo)
    }

    /// The pinned revision, if any.
    pub fn revision(&self) -> Option<&str> {
        self.0.split_once('@').map(|(_, rev)| rev)
    }

    /// The name as a relative path (nested directories for `/`).
    pub fn rel_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl fmt::Display for AdapterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AdapterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for AdapterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_repo_ids() {
        for ok in [
            "a",
            "acme/summarizer-lora",
            "Org_1/name.v2",
            "a/b/c",
            "org/name@main",
            "x@v1.0",
        ] {
            assert!(AdapterName::parse(ok).is_ok(), "{ok}");
        }
        let n = AdapterName::parse("org/name@abc123").unwrap();
        assert_eq!((n.repo(), n.revision()), ("org/name", Some("abc123")));
    }

    #[test]
    fn refuses_escapes_and_oddities() {
        let long = "a".repeat(MAX_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/../b",
            "a/./b",
            "/abs",
            "a//b",
            "a/",
            ".hidden",
            "a/.b",
            "a b",
            "a\\b",
            "a\0b",
            "ünï",
            "a@",
            "a@.x",
            "a@b@c",
            "a@b/c",
            "%2e%2e",
            long.as_str(),
        ] {
            let e = AdapterName::parse(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad:?}");
        }
    }

    #[test]
    fn path_stays_relative() {
        let n = AdapterName::parse("org/name").unwrap();
        assert!(n.rel_path().is_relative());
        assert_eq!(n.rel_path().components().count(), 2);
    }
}
