//! Namespace operations on the storage directory, each made durable: publish by rename
//! (`renameat2` NOREPLACE, or EXCHANGE to replace an existing adapter with no window without
//! it), fsync of the directories a rename touched, removal, cleanup of empty parents.
//!
//! These are plain blocking calls: they run on the storage thread or tokio's blocking pool.
//! Every path passed in is `root` joined with a validated relative name, so nothing here can
//! reach outside the storage directory.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::index::StoredFile;

/// Hidden work area inside the storage directory (vLLM only resolves `{dir}/{name}`).
pub const TMP_DIR: &str = ".loraplex-tmp";

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: two valid NUL-terminated paths; AT_FDCWD with absolute or cwd-relative paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fsync a directory, making the entries created, renamed or removed in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Create the missing directories between `root` and `dir` (inclusive), each made durable
/// by an fsync of its parent.
pub fn create_parents(root: &Path, dir: &Path) -> io::Result<()> {
    if dir == root || dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_parents(root, parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => fsync_dir(dir.parent().unwrap_or(root)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// How a publish went.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    /// `target` did not exist; it is now the new adapter.
    New,
    /// `target` existed; it was swapped atomically and the old content is now at this path
    /// (the temp path), for the caller to delete once vLLM has been told.
    Replaced(PathBuf),
}

/// Move the complete, fsynced directory `tmp` to `target` atomically and durably.
pub fn publish(root: &Path, tmp: &Path, target: &Path) -> io::Result<Published> {
    let parent = target.parent().unwrap_or(root);
    // A concurrent eviction may remove an empty parent between our mkdir and the rename, or
    // the empty directory at `target` it leaves behind (a name inside it was evicted) between
    // the two renames: look again.
    let mut tries = 0;
    let gone = |e: &io::Error, tries: &mut u32| {
        *tries += 1;
        e.raw_os_error() == Some(libc::ENOENT) && *tries <= 3
    };
    let outcome = loop {
        match create_parents(root, parent) {
            Ok(()) => {}
            Err(e) if gone(&e, &mut tries) => continue,
            Err(e) => return Err(e),
        }
        match renameat2(tmp, target, libc::RENAME_NOREPLACE) {
            Ok(()) => break Published::New,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                match renameat2(tmp, target, libc::RENAME_EXCHANGE) {
                    Ok(()) => break Published::Replaced(tmp.to_owned()),
                    Err(e) if gone(&e, &mut tries) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) if gone(&e, &mut tries) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // A filesystem without renameat2 flags (some network filesystems): plain
                // rename works when nothing is there; replacing leaves a short window.
                if !target.exists() {
                    fs::rename(tmp, target)?;
                    break Published::New;
                }
                tracing::warn!(target = %target.display(), "renameat2 unsupported: replacing with two renames");
                let old = tmp.with_extension("old");
                fs::rename(target, &old)?;
                fs::rename(tmp, target)?;
                break Published::Replaced(old);
            }
            Err(e) => return Err(e),
        }
    };
    fsync_dir(parent)?;
    if let Published::Replaced(old) = &outcome {
        fsync_dir(old.parent().unwrap_or(root))?;
    }
    Ok(outcome)
}

/// Move `target` out of vLLM's sight into `to` (inside the temp area). `Ok(false)` when it
/// was not there.
pub fn hide(target: &Path, to: &Path) -> io::Result<bool> {
    match fs::rename(target, to) {
        Ok(()) => {
            if let Some(parent) = target.parent() {
                fsync_dir(parent)?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove a file or directory tree; absent is fine.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Remove the now-empty parent directories of `target` (nested names), up to `root`.
pub fn remove_empty_parents(root: &Path, target: &Path) {
    let mut dir = target.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) {
            break;
        }
        // Fails with ENOTEMPTY (another adapter lives here) and stops.
        if fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

/// The regular files under `dir` (recursively, symlinks not followed), relative to it, with
/// their lengths; and the bytes of them all (a file whose name is not UTF-8 counts there but
/// is not listed: no peer could ask for it).
pub fn files(dir: &Path) -> io::Result<(Vec<StoredFile>, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut (Vec<StoredFile>, u64)) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                walk(root, &entry.path(), out)?;
            } else if ft.is_file() {
                let size = entry.metadata()?.len();
                out.1 += size;
                let path = entry.path();
                let rel = path.strip_prefix(root).expect("walked under root");
                if let Some(rel) = rel.to_str() {
                    let path = rel.to_owned();
                    out.0.push(StoredFile { path, size });
                }
            }
        }
        Ok(())
    }
    let mut out = (Vec::new(), 0);
    walk(dir, dir, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_new_then_replace_atomically() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let tmp = root.join(TMP_DIR);
        fs::create_dir(&tmp).unwrap();
        let target = root.join("org/a");

        let t1 = tmp.join("t1");
        fs::create_dir(&t1).unwrap();
        fs::write(t1.join("f"), b"v1").unwrap();
        assert_eq!(publish(root, &t1, &target).unwrap(), Published::New);
        assert_eq!(fs::read(target.join("f")).unwrap(), b"v1");

        let t2 = tmp.join("t2");
        fs::create_dir(&t2).unwrap();
        fs::write(t2.join("f"), b"v2").unwrap();
        assert_eq!(
            publish(root, &t2, &target).unwrap(),
            Published::Replaced(t2.clone())
        );
        assert_eq!(fs::read(target.join("f")).unwrap(), b"v2");
        assert_eq!(
            fs::read(t2.join("f")).unwrap(),
            b"v1",
            "old copy kept for deletion"
        );

        let gone = tmp.join("gone");
        assert!(hide(&target, &gone).unwrap());
        assert!(!target.exists());
        assert!(!hide(&target, &gone.with_extension("x")).unwrap());
        remove_empty_parents(root, &target);
        assert!(!root.join("org").exists());
        assert!(root.exists());
        remove_tree(&gone).unwrap();
        remove_tree(&gone).unwrap();
    }

    #[test]
    fn empty_parent_cleanup_stops_at_siblings() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        fs::create_dir_all(root.join("org/x/a")).unwrap();
        fs::create_dir_all(root.join("org/b")).unwrap();
        remove_tree(&root.join("org/x/a")).unwrap();
        remove_empty_parents(root, &root.join("org/x/a"));
        assert!(!root.join("org/x").exists());
        assert!(root.join("org/b").exists());
    }
}
