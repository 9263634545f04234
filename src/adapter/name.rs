//! Adapter names: checked before anything touches the disk.
//!
//! A name is a Hugging Face repo id: segments of `[A-Za-z0-9._-]` separated by `/`, none empty,
//! none starting with `.` (so `.`, `..` and hidden names, which loraplex keeps for its own temp
//! files, are impossible), at most [`MAX_SEGMENTS`] segments and [`MAX_LEN`] bytes, each segment
//! at most [`MAX_SEGMENT_LEN`] bytes (a directory name the filesystem can hold). The last
//! segment may pin a revision with one `@`: `org/name@v2` (stored under that literal directory
//! name). A valid name is always a relative path that stays inside the storage directory, and
//! the store's temp names never grow with it, so every valid name can be stored.
//!
//! Names nest as directories do: `x` is an [ancestor](AdapterName::ancestors) of `x/y`. The
//! store never holds two adapters of which one is the other's ancestor (see `store::flight`).

use std::{borrow::Borrow, fmt, path::Path, sync::Arc};

use crate::error::{Clipped, Error};

/// Longest accepted name, in bytes.
pub const MAX_LEN: usize = 256;
/// Longest segment, in bytes: `NAME_MAX` of Linux filesystems (the segment with its `@revision`
/// is one directory name).
pub const MAX_SEGMENT_LEN: usize = 255;
/// Most segments in a name (`org/name` has 2). Recovery walks the storage directory exactly
/// this deep, so every adapter a name can reach is found again after a restart.
pub const MAX_SEGMENTS: usize = 8;

/// A validated adapter name. Shared, not copied, when cloned (the proxy's workers keep the
/// names they have seen and hand out clones; see `proxy::handles`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterName(Arc<str>);

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
                Error::bad_request(format!("invalid adapter name {:?}: {why}", Clipped(name)))
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
        if repo.split('/').count() > MAX_SEGMENTS {
            return bad("more than 8 segments");
        }
        if name
            .split('/')
            .any(|segment| segment.len() > MAX_SEGMENT_LEN)
        {
            return bad("a segment is longer than 255 bytes");
        }
        Ok(AdapterName(name.into()))
    }

    /// The names this one's directory lies in: `a` and `a/b` for `a/b/c` (shortest first).
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(i, _)| &self.0[..i])
    }

    /// Is `other` inside this name's directory (`x/y` for `x`)?
    pub fn contains(&self, other: &str) -> bool {
        other.len() > self.0.len()
            && other.starts_with(&*self.0)
            && other.as_bytes()[self.0.len()] == b'/'
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The repo id without a pinned revision: `org/name` for `org/name@v2`.
    pub fn repo(&self) -> &str {
        self.0.split_once('@').map_or(&*self.0, |(repo, _)| repo)
    }

    /// The pinned revision, if any.
    pub fn revision(&self) -> Option<&str> {
        self.0.split_once('@').map(|(_, rev)| rev)
    }

    /// The name as a relative path (nested directories for `/`).
    pub fn rel_path(&self) -> &Path {
        Path::new(&*self.0)
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

/// Hashes and orders as the `str` it wraps, so maps keyed by names are looked up by `&str`.
impl Borrow<str> for AdapterName {
    fn borrow(&self) -> &str {
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
    fn depth_is_bounded() {
        let deepest = ["s"; MAX_SEGMENTS].join("/");
        assert!(AdapterName::parse(&deepest).is_ok());
        assert!(AdapterName::parse(&format!("{deepest}@v1")).is_ok());
        let e = AdapterName::parse(&format!("{deepest}/s")).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.message.contains("8 segments"), "{}", e.message);
    }

    #[test]
    fn segments_fit_a_directory_name() {
        let longest = "a".repeat(MAX_SEGMENT_LEN);
        let two = format!("{}/{}", "o".repeat(127), "n".repeat(127));
        for ok in [longest.clone(), two, format!("{}@v1", "a".repeat(252))] {
            assert!(AdapterName::parse(&ok).is_ok(), "{}", ok.len());
        }
        // Within 256 bytes, only a name of one segment can pass 255.
        let e = AdapterName::parse(&format!("{longest}b")).unwrap_err();
        assert!(e.message.contains("longer than 255 bytes"), "{}", e.message);
        // A huge name is quoted in part.
        let huge = "x".repeat(4 << 20);
        let e = AdapterName::parse(&huge).unwrap_err();
        assert!(e.message.len() < 400, "{}", e.message.len());
        assert!(e.message.contains("4194304 bytes in all"), "{}", e.message);
    }

    #[test]
    fn nesting() {
        let n = AdapterName::parse("a/b/c@v1").unwrap();
        assert_eq!(n.ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
        let x = AdapterName::parse("x").unwrap();
        assert_eq!(x.ancestors().count(), 0);
        assert!(x.contains("x/y") && x.contains("x/adapter_config.json"));
        assert!(!x.contains("x") && !x.contains("xy") && !x.contains("x@v2") && !x.contains("x.y"));
    }

    #[test]
    fn path_stays_relative() {
        let n = AdapterName::parse("org/name").unwrap();
        assert!(n.rel_path().is_relative());
        assert_eq!(n.rel_path().components().count(), 2);
    }
}
