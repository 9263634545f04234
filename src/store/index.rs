//! The in-memory index of stored adapters and the [`Pin`] that keeps one on disk while a
//! request uses it.
//!
//! The map is `papaya` (lock-free reads, no shards to lock, epoch-style reclamation):
//! a hit is one hash lookup, one atomic add on the entry's pin word, and two relaxed stores
//! (frequency, last access). No global lock, no filesystem access. `dashmap` would take a
//! shard read lock per lookup; `papaya` takes none, and it is maintained and well tested.
//!
//! The pin word: the low 63 bits count pins, the top bit says EVICTING. The evictor claims an
//! entry with a CAS 0 → EVICTING (so only an unpinned entry can be claimed); the hit path adds
//! one and, if it then sees EVICTING, takes it back and reports a miss. Once claimed, an entry
//! can never be pinned again, so a claimed entry has no user.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use super::policy::Tracked;
use crate::adapter::{AdapterName, META_FILE};

const EVICTING: u64 = 1 << 63;

/// Milliseconds since the Unix epoch (the wall clock: `fetched_at` is persisted), from the
/// coarse clock: a few ns instead of ~25 (it is read on every hit), a few ms of resolution
/// (plenty for last-access times and TTLs).
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_REALTIME_COARSE exists on every Linux we run on.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        return ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a stored adapter came from, as its `.loraplex_meta` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provenance {
    /// Origin type; `None` for an adapter copied in by hand (never revalidated).
    pub origin: Option<String>,
    pub etag: Option<String>,
    pub revision: Option<String>,
}

impl Provenance {
    pub fn content_id(&self) -> Option<&str> {
        self.etag.as_deref().or(self.revision.as_deref())
    }
}

/// One file of a stored adapter, relative to its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    pub path: String,
    pub size: u64,
}

/// One stored adapter. Immutable but for the atomics; a new version is a new `Entry`.
#[derive(Debug)]
pub struct Entry {
    pub name: AdapterName,
    /// Bytes of its files on disk; changes only under the store's ledger lock, together with
    /// the policy's count (a refreshed `.loraplex_meta` may differ in length).
    size: AtomicU64,
    pub provenance: Provenance,
    /// Its files as published (`.loraplex_meta` left out), sorted by path: what a peer is
    /// offered, known without touching the disk.
    files: Box<[StoredFile]>,
    state: AtomicU64,
    freq: AtomicU8,
    last_access_ms: AtomicU64,
    fetched_at_ms: AtomicU64,
    /// A revalidation task runs for it.
    pub(crate) revalidating: AtomicBool,
    /// No revalidation before this (back-off after a failure).
    pub(crate) next_revalidation_ms: AtomicU64,
    pub(crate) revalidation_failures: AtomicU32,
}

impl Entry {
    /// A new entry, with `pins` pins already held (1 for the flight that fetched it). `size`:
    /// bytes of every file of its directory; `files`: those a peer may ask for.
    pub fn new(
        name: AdapterName,
        size: u64,
        files: Vec<StoredFile>,
        provenance: Provenance,
        fetched_at_ms: u64,
        pins: u64,
    ) -> Self {
        let mut files: Vec<StoredFile> =
            files.into_iter().filter(|f| f.path != META_FILE).collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Entry {
            name,
            size: AtomicU64::new(size),
            provenance,
            files: files.into(),
            state: AtomicU64::new(pins),
            freq: AtomicU8::new(0),
            last_access_ms: AtomicU64::new(fetched_at_ms),
            fetched_at_ms: AtomicU64::new(fetched_at_ms),
            revalidating: AtomicBool::new(false),
            next_revalidation_ms: AtomicU64::new(0),
            revalidation_failures: AtomicU32::new(0),
        }
    }

    /// Take a pin unless the entry is being evicted.
    #[inline]
    pub fn try_pin(&self) -> bool {
        let prev = self.state.fetch_add(1, Ordering::AcqRel);
        if prev & EVICTING != 0 {
            self.state.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    #[inline]
    fn unpin(&self) {
        self.state.fetch_sub(1, Ordering::AcqRel);
    }

    /// Claim for eviction: succeeds only with no pin held. A claimed entry stays claimed.
    pub fn try_claim(&self) -> bool {
        self.state
            .compare_exchange(0, EVICTING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Give a claim back (the eviction could not proceed).
    pub fn unclaim(&self) {
        self.state.fetch_and(!EVICTING, Ordering::AcqRel);
    }

    pub fn pins(&self) -> u64 {
        self.state.load(Ordering::Acquire) & !EVICTING
    }

    pub fn is_evicting(&self) -> bool {
        self.state.load(Ordering::Acquire) & EVICTING != 0
    }

    /// Bytes of its files on disk.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Its files as published, `.loraplex_meta` left out.
    pub fn files(&self) -> &[StoredFile] {
        &self.files
    }

    /// Under the ledger lock, with the policy's count.
    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
    }

    pub fn last_access_ms(&self) -> u64 {
        self.last_access_ms.load(Ordering::Relaxed)
    }

    pub fn fetched_at_ms(&self) -> u64 {
        self.fetched_at_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn set_fetched_at_ms(&self, ms: u64) {
        self.fetched_at_ms.store(ms, Ordering::Relaxed);
    }

    /// Record an access: the eviction policy's frequency and the last-access time.
    #[inline]
    pub(crate) fn touch(&self, now_ms: u64) {
        super::policy::touch(&self.freq);
        // Skip the store when unchanged: keeps the cache line shared between cores.
        if self.last_access_ms.load(Ordering::Relaxed) != now_ms {
            self.last_access_ms.store(now_ms, Ordering::Relaxed);
        }
    }
}

impl Tracked for Entry {
    fn freq(&self) -> &AtomicU8 {
        &self.freq
    }
}

/// A stored adapter in use: while any `Pin` of it lives, it is not evicted. Dropping unpins.
#[derive(Debug)]
pub struct Pin {
    entry: Arc<Entry>,
}

impl Pin {
    /// Pin `entry`, unless it is being evicted.
    pub(crate) fn new(entry: &Arc<Entry>) -> Option<Pin> {
        entry.try_pin().then(|| Pin {
            entry: entry.clone(),
        })
    }

    /// Wrap a pin already counted in the entry (a new entry born with one pin).
    pub(crate) fn held(entry: Arc<Entry>) -> Pin {
        debug_assert!(entry.pins() > 0);
        Pin { entry }
    }

    pub fn name(&self) -> &AdapterName {
        &self.entry.name
    }

    /// Bytes on disk.
    pub fn size(&self) -> u64 {
        self.entry.size()
    }

    /// Its files as published, `.loraplex_meta` left out.
    pub fn files(&self) -> &[StoredFile] {
        self.entry.files()
    }

    /// ETag or revision it was fetched at, when known.
    pub fn content_id(&self) -> Option<&str> {
        self.entry.provenance.content_id()
    }

    /// When its origin was last asked (fetch or revalidation), in ms since the Unix epoch.
    pub fn fetched_at_ms(&self) -> u64 {
        self.entry.fetched_at_ms()
    }

    pub(crate) fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }
}

impl Clone for Pin {
    /// Another pin of the same entry; cannot fail (a pinned entry is never claimed).
    fn clone(&self) -> Self {
        self.entry.state.fetch_add(1, Ordering::AcqRel);
        Pin {
            entry: self.entry.clone(),
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.entry.unpin();
    }
}

/// Name → current entry. Hashed with foldhash (seeded per process): SipHash was a tenth
/// of a hit's cost. Flooding is not a concern: only adapters an origin delivered are keys.
pub struct Index {
    map: papaya::HashMap<AdapterName, Arc<Entry>, foldhash::fast::RandomState>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            map: papaya::HashMap::with_hasher(foldhash::fast::RandomState::default()),
        }
    }
}

impl Index {
    /// The hit path: pin the current entry of `name`, or `None` (absent or being evicted).
    #[inline]
    pub fn pin(&self, name: &AdapterName) -> Option<Pin> {
        let map = self.map.pin();
        Pin::new(map.get(name)?)
    }

    pub fn get(&self, name: &AdapterName) -> Option<Arc<Entry>> {
        self.map.pin().get(name).cloned()
    }

    pub fn contains(&self, name: &AdapterName) -> bool {
        self.map.pin().contains_key(name)
    }

    /// Insert or replace; returns the entry replaced.
    pub fn insert(&self, entry: Arc<Entry>) -> Option<Arc<Entry>> {
        self.map.pin().insert(entry.name.clone(), entry).cloned()
    }

    /// Remove `name` if its current entry is `entry` (a newer version stays).
    pub fn remove_if_same(&self, entry: &Arc<Entry>) -> bool {
        matches!(
            self.map
                .pin()
                .remove_if(&entry.name, |_, cur| Arc::ptr_eq(cur, entry)),
            Ok(Some(_))
        )
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A snapshot of every entry (admin; walks the map, never the disk).
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        self.map.pin().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> Arc<Entry> {
        let file = StoredFile {
            path: "f".into(),
            size: 10,
        };
        Arc::new(Entry::new(
            AdapterName::parse(name).unwrap(),
            10,
            vec![file],
            Provenance::default(),
            0,
            0,
        ))
    }

    #[test]
    fn pinned_entries_cannot_be_claimed_and_claimed_cannot_be_pinned() {
        let idx = Index::default();
        let e = entry("a");
        idx.insert(e.clone());
        let name = e.name.clone();
        let p = idx.pin(&name).unwrap();
        let p2 = p.clone();
        assert_eq!(e.pins(), 2);
        assert!(!e.try_claim());
        drop((p, p2));
        assert_eq!(e.pins(), 0);
        assert!(e.try_claim());
        assert!(idx.pin(&name).is_none(), "EVICTING is a miss");
        assert_eq!(e.pins(), 0);
        e.unclaim();
        assert!(idx.pin(&name).is_some());
    }

    #[test]
    fn remove_only_the_same_version() {
        let idx = Index::default();
        let old = entry("a");
        let new = entry("a");
        idx.insert(old.clone());
        assert!(Arc::ptr_eq(&idx.insert(new.clone()).unwrap(), &old));
        assert!(!idx.remove_if_same(&old));
        assert!(idx.remove_if_same(&new));
        assert!(idx.is_empty());
    }

    #[test]
    fn pin_and_claim_race_never_both_win() {
        // One thread pins and unpins in a loop, the other claims and unclaims. A pin may
        // never succeed while a claim is held.
        let e = entry("race");
        let stop = Arc::new(AtomicBool::new(false));
        let claimed = Arc::new(AtomicBool::new(false));
        let (e2, s2, c2) = (e.clone(), stop.clone(), claimed.clone());
        let pinner = std::thread::spawn(move || {
            let mut taken = 0u64;
            while !s2.load(Ordering::Relaxed) || taken < 1000 {
                if let Some(p) = Pin::new(&e2) {
                    assert!(!c2.load(Ordering::SeqCst), "pinned a claimed entry");
                    taken += 1;
                    drop(p);
                }
            }
            taken
        });
        let mut claims = 0;
        while claims < 1000 {
            if e.try_claim() {
                claimed.store(true, Ordering::SeqCst);
                claims += 1;
                assert!(Pin::new(&e).is_none());
                claimed.store(false, Ordering::SeqCst);
                e.unclaim();
            }
        }
        stop.store(true, Ordering::Relaxed);
        let taken = pinner.join().unwrap();
        assert!(taken > 0 && claims > 0, "taken {taken} claims {claims}");
        assert_eq!(e.pins(), 0);
    }
}
