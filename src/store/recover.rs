//! Startup: clean the temp area, find out whether O_DIRECT works here, rebuild the index
//! from what is on disk (adapters fetched before, by us or the Go project, and adapters copied
//! in by hand), remove corrupt entries, and enforce `max_size`.
//!
//! An adapter is a directory holding `adapter_config.json`; other directories are walked
//! (names with `/` are nested directories), as deep as a name may go
//! ([`MAX_SEGMENTS`](crate::adapter::name::MAX_SEGMENTS)). Everything under an adapter's
//! directory is its own and counts in its size: loraplex never stores `x/y` inside a stored `x`
//! (a 409), so a nested adapter found there was left by an older version, and it stays part of
//! `x` (`x/y` is refused until `x` is evicted). Hidden entries are never adapters:
//! `.loraplex-tmp` is ours and wiped; the Go project's `.tmp-*` fetch leftovers are removed
//! too; anything else hidden is left alone.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use super::{
    LOCAL, Store, StoreOptions,
    aligned::{ALIGN, AlignedBuf},
    fsops::{self, TMP_DIR},
    index::{Entry, Provenance},
    validate,
};
use crate::{
    adapter::{
        AdapterName, CONFIG_FILE, SAFETENSORS_FILE,
        meta::AdapterMeta,
        name::{MAX_LEN, MAX_SEGMENTS},
    },
    error::Error,
};

pub struct Recovered {
    /// Valid adapters found, oldest first.
    pub entries: Vec<Arc<Entry>>,
    /// O_DIRECT writes work in the storage directory.
    pub direct_ok: bool,
}

fn startup_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::internal(format!("storage dir: {what} {}: {e}", path.display()))
}

/// The storage directory must leave room for every valid name: `{dir}/{name}/{file}` within
/// `PATH_MAX` for the longest name and file loraplex writes (temp paths are shorter).
fn check_dir_len(root: &Path) -> Result<(), Error> {
    let longest = root.as_os_str().len() + 1 + MAX_LEN + 1 + SAFETENSORS_FILE.len();
    if longest >= libc::PATH_MAX as usize {
        return Err(Error::internal(format!(
            "storage dir {} is too long: an adapter name of {MAX_LEN} bytes and its files \
             would pass the {} bytes of a path",
            root.display(),
            libc::PATH_MAX
        )));
    }
    Ok(())
}

pub fn recover(opts: &StoreOptions) -> Result<Recovered, Error> {
    let root = &opts.dir;
    check_dir_len(root)?;
    fs::create_dir_all(root).map_err(|e| startup_error("creating", root, e))?;
    let tmp = root.join(TMP_DIR);
    fsops::remove_tree(&tmp).map_err(|e| startup_error("cleaning", &tmp, e))?;
    for entry in fs::read_dir(root).map_err(|e| startup_error("reading", root, e))? {
        let entry = entry.map_err(|e| startup_error("reading", root, e))?;
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            tracing::info!(path = %entry.path().display(), "removing a partial fetch left by the Go loraplex");
            fsops::remove_tree(&entry.path())
                .map_err(|e| startup_error("removing", &entry.path(), e))?;
        }
    }
    fs::create_dir(&tmp).map_err(|e| startup_error("creating", &tmp, e))?;
    fsops::fsync_dir(root).map_err(|e| startup_error("fsync", root, e))?;
    let direct_ok = !opts.faults.refuse_direct.load(Ordering::Relaxed) && probe_direct(&tmp);

    let mut found = Vec::new();
    walk(root, root, 0, &mut found);
    let mut entries = Vec::with_capacity(found.len());
    for (i, dir) in found.into_iter().enumerate() {
        let rel = dir.strip_prefix(root).expect("walked under root");
        let Some(name) = rel.to_str().and_then(|s| AdapterName::parse(s).ok()) else {
            tracing::warn!(path = %dir.display(), "skipping a directory whose name is not a valid adapter name");
            continue;
        };
        if let Err(why) = validate::check_dir(&dir) {
            tracing::error!(adapter = %name, reason = %why, "removing a corrupt adapter");
            let hidden = tmp.join(format!("corrupt-{i}"));
            if fsops::hide(&dir, &hidden).is_ok() {
                let _ = fsops::remove_tree(&hidden);
            }
            fsops::remove_empty_parents(root, &dir);
            continue;
        }
        let (files, size) = match fsops::files(&dir) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(adapter = %name, error = %e, "skipping an adapter that cannot be measured");
                continue;
            }
        };
        let meta = AdapterMeta::read(&dir).unwrap_or_else(|why| {
            tracing::warn!(adapter = %name, reason = %why, "ignoring an unreadable .loraplex_meta");
            None
        });
        let (provenance, fetched_at) = match meta {
            Some(m) => (
                Provenance {
                    origin: Some(m.origin.clone()),
                    etag: m.etag.clone(),
                    revision: m.revision.clone(),
                },
                m.fetched_at_ms(),
            ),
            // Copied in by hand: no origin to revalidate against; age from the config's mtime.
            None => (Provenance::default(), mtime_ms(&dir.join(CONFIG_FILE))),
        };
        entries.push(Arc::new(Entry::new(
            name, size, files, provenance, fetched_at, 0,
        )));
    }
    entries.sort_by_key(|e| e.fetched_at_ms());
    Ok(Recovered { entries, direct_ok })
}

fn mtime_ms(p: &Path) -> u64 {
    fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Collect adapter directories under `dir` (`depth` segments below the root).
fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if dir != root && dir.join(CONFIG_FILE).is_file() {
        out.push(dir.to_owned());
        return;
    }
    if depth >= MAX_SEGMENTS {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for entry in rd.flatten() {
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        // Directories only, never following symlinks out of the storage dir.
        if !hidden && entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &entry.path(), depth + 1, out);
        }
    }
}

/// Can files in `tmp` be written with O_DIRECT? (tmpfs on older kernels says EINVAL.)
fn probe_direct(tmp: &Path) -> bool {
    let path = tmp.join("direct-probe");
    let result = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .and_then(|mut f| {
            let mut buf = AlignedBuf::new(ALIGN);
            buf.pad_to_align();
            f.write_all(buf.as_slice())
        });
    let _ = fs::remove_file(&path);
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %tmp.display(), error = %e, "O_DIRECT unavailable; adapters will be written buffered + fsync");
            false
        }
    }
}

impl Store {
    /// Index what recovery found, oldest first, then evict down to `max_size`.
    pub(super) fn adopt(self: &Arc<Self>, entries: Vec<Arc<Entry>>) {
        let mut over = Vec::new();
        {
            let mut l = self.ledger();
            for e in entries {
                l.policy.insert_main(e.name.clone(), e.size(), e.clone());
                self.flights.set_stored(&e.name, true);
                self.index.insert(e);
            }
            while l.policy.bytes() > l.max {
                match l.policy.evict(|_, e| e.try_claim()) {
                    Some((_, e, _)) => over.push(e),
                    None => break,
                }
            }
        }
        for e in over {
            self.index.remove_if_same(&e);
            let target = self.opts.dir.join(e.name.rel_path());
            let hidden = self.tmp_path("evict");
            match fsops::hide(&target, &hidden) {
                Ok(_) => {
                    self.flights.set_stored(&e.name, false);
                    let _ = fsops::remove_tree(&hidden);
                    fsops::remove_empty_parents(&self.opts.dir, &target);
                }
                Err(err) => {
                    tracing::error!(adapter = %e.name, error = %err, "startup evict failed")
                }
            }
            tracing::info!(adapter = %e.name, bytes = e.size(), "evicted at startup: over storage.max_size");
            self.metrics.cache_evictions.get_or_create(&LOCAL).inc();
            let store = self.clone();
            self.control
                .spawn(async move { store.unload(&e.name).await });
        }
        self.update_gauges();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_dir_must_leave_room_for_the_longest_name() {
        assert!(check_dir_len(Path::new("/mnt/nvme/loraplex")).is_ok());
        let room = libc::PATH_MAX as usize - (1 + MAX_LEN + 1 + SAFETENSORS_FILE.len());
        assert!(check_dir_len(Path::new(&"d".repeat(room - 1))).is_ok());
        let e = check_dir_len(Path::new(&"d".repeat(room))).unwrap_err();
        assert!(e.message.contains("too long"), "{}", e.message);
    }
}
