//! File discovery: heartbeat files in a shared directory (`discovery.file.{dir,
//! heartbeat_interval, stale_threshold}`), for clusters without Kubernetes (an NFS mount).
//!
//! Format, the Go project's so that mixed Go/Rust clusters see each other: one file per node,
//! named after its address (`10.0.0.1:9090`), holding `"{addr}\n{unix_nanos}"`. Names starting
//! with `.` are ignored by both (our temp files live there); so is anything that does not parse.
//!
//! Writes are atomic: the body goes to `.{name}.tmp`, is fsynced, then renamed over the real
//! name, so a reader sees the old heartbeat or the new one, never a partial file (and a crash
//! right after the rename cannot leave an empty file). The directory itself is not fsynced: a
//! heartbeat lost to a crash only matters for a node that is gone anyway.
//!
//! Liveness is judged on *our* monotonic clock, not by comparing another node's clock with
//! ours: NFS clients and servers drift, and mtime is set by whichever clock the server or client
//! uses. A file is alive when its timestamp changed within `stale_threshold` of our own
//! observation. The first time a file is seen, its timestamp (wall clock) gives the initial
//! age, clamped at zero; so a leftover file of a dead node is not counted at start, a node
//! whose clock runs behind is counted from its next heartbeat on, and one whose clock runs
//! ahead is counted until `stale_threshold` passes without a change.
//!
//! A clean shutdown removes our own file. Files of other nodes are removed only after
//! [`CLEANUP_FACTOR`] × `stale_threshold` without any change (re-checked just before
//! removing), so a live node with a skewed clock never loses its file; garbage is left alone.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

use super::{Members, PeerSet, Publisher, canonical_peer};
use crate::{cluster::identity::Identity, control::Control, error::Error, shutdown::Shutdown};

/// Another node's file is deleted after this many stale thresholds without a change.
pub const CLEANUP_FACTOR: u32 = 4;

/// A heartbeat file is tiny; anything longer is not one of ours.
const MAX_FILE: u64 = 1024;

/// How often we write and scan, and when a silent node is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub interval: Duration,
    pub stale: Duration,
}

/// Write our heartbeat and scan once (errors here refuse to start), then every
/// `timing.interval` on the control plane until shutdown, which removes our file.
pub(super) fn start(
    dir: &Path,
    timing: Timing,
    me: &Identity,
    control: &Control,
    shutdown: Shutdown,
) -> Result<(watch::Receiver<PeerSet>, Arc<Heartbeat>), Error> {
    if timing.interval.is_zero() || timing.stale <= timing.interval {
        return Err(Error::bad_request(format!(
            "discovery.file: stale_threshold ({:?}) must exceed heartbeat_interval ({:?}) > 0",
            timing.stale, timing.interval
        )));
    }
    let ctx = |what: &str, e: io::Error| {
        Error::from(e).context(format!("discovery.file {what} {}", dir.display()))
    };
    fs::create_dir_all(dir).map_err(|e| ctx("create", e))?;
    let heartbeat = Arc::new(Heartbeat::new(dir, me.canonical())?);
    heartbeat
        .write()
        .map_err(|e| ctx("write heartbeat in", e))?;
    let mut scanner = Scanner::new(dir, timing.stale, heartbeat.name.clone());
    let found = scanner
        .scan(Instant::now(), wall_nanos())
        .map_err(|e| ctx("scan", e))?;
    let (publisher, rx) = Publisher::new(Members::build(found, me));

    let (me, hb) = (me.clone(), heartbeat.clone());
    // Shared with each blocking tick; a panicking tick poisons it, and the next one goes on
    // with what is inside (a bug must not make this node leave the cluster).
    let scanner = Arc::new(Mutex::new(scanner));
    control.spawn(async move {
        let mut tick = tokio::time::interval(timing.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: we just wrote and scanned
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {}
            }
            let (scanner, me, hb) = (scanner.clone(), me.clone(), hb.clone());
            let members = tokio::task::spawn_blocking(move || {
                if let Err(e) = hb.write() {
                    tracing::warn!(error = %e, "discovery.file: cannot write heartbeat");
                }
                let mut scanner = scanner.lock().unwrap_or_else(PoisonError::into_inner);
                match scanner.scan(Instant::now(), wall_nanos()) {
                    Ok(found) => Some(Members::build(found, &me)),
                    Err(e) => {
                        // Keep the last set: a flaky NFS mount must not empty the cluster.
                        tracing::warn!(error = %e, "discovery.file: cannot scan");
                        None
                    }
                }
            })
            .await;
            match members {
                Ok(Some(m)) => {
                    publisher.publish(m);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "discovery.file: scan task failed"),
            }
        }
        let _ = tokio::task::spawn_blocking(move || hb.leave()).await;
    });
    Ok((rx, heartbeat))
}

/// Our own heartbeat file.
#[derive(Debug)]
pub(super) struct Heartbeat {
    dir: PathBuf,
    /// File name (our canonical address).
    name: String,
    /// Set once we left: no heartbeat is written after that.
    left: Mutex<bool>,
}

impl Heartbeat {
    fn new(dir: &Path, addr: &str) -> Result<Heartbeat, Error> {
        let name = canonical_peer(addr)
            .map_err(|e| Error::bad_request(format!("discovery.file: own address {e}")))?;
        Ok(Heartbeat {
            dir: dir.to_owned(),
            name,
            left: Mutex::new(false),
        })
    }

    /// Write `"{addr}\n{unix_nanos}"` atomically (temp + fsync + rename).
    fn write(&self) -> io::Result<()> {
        let left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        if *left {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".{}.tmp", self.name));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(format!("{}\n{}", self.name, wall_nanos()).as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join(&self.name))
    }

    /// Remove our file and stop writing it. Idempotent.
    pub(super) fn leave(&self) {
        let mut left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        if *left {
            return;
        }
        *left = true;
        match fs::remove_file(self.dir.join(&self.name)) {
            Ok(()) => tracing::info!(name = %self.name, "discovery.file: heartbeat removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "discovery.file: cannot remove heartbeat"),
        }
    }
}

/// One parsed heartbeat file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Beat {
    addr: String,
    stamp: i128,
}

/// What we know of another node's file.
struct Seen {
    beat: Beat,
    /// Alive until then (our clock); `None`: stale since first seen.
    fresh_until: Option<Instant>,
    /// When we last saw the timestamp change (or first saw the file).
    changed_at: Instant,
}

/// Lists the directory and tracks every other node's heartbeat.
struct Scanner {
    dir: PathBuf,
    stale: Duration,
    own: String,
    seen: HashMap<String, Seen>,
}

impl Scanner {
    fn new(dir: &Path, stale: Duration, own: String) -> Scanner {
        Scanner {
            dir: dir.to_owned(),
            stale,
            own,
            seen: HashMap::new(),
        }
    }

    /// The addresses of the other live nodes at `now` (our monotonic clock; `wall` is our
    /// wall clock in unix nanos, only used to age files seen for the first time).
    fn scan(&mut self, now: Instant, wall: i128) -> io::Result<Vec<String>> {
        let mut present = HashSet::new();
        let mut alive = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let Ok(entry) = entry else { continue };
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || name == self.own {
                continue;
            }
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let Some(beat) = read_beat(&entry.path()) else {
                tracing::debug!(file = %name, "discovery.file: ignoring a file that is not a heartbeat");
                continue;
            };
            present.insert(name.clone());
            let stale = self.stale;
            let seen = self
                .seen
                .entry(name.clone())
                .and_modify(|s| {
                    if s.beat.stamp != beat.stamp {
                        *s = Seen {
                            beat: beat.clone(),
                            fresh_until: Some(now + stale),
                            changed_at: now,
                        };
                    }
                })
                .or_insert_with(|| {
                    let age = u64::try_from((wall - beat.stamp).max(0)).unwrap_or(u64::MAX);
                    let left = stale.checked_sub(Duration::from_nanos(age));
                    Seen {
                        beat: beat.clone(),
                        fresh_until: left.map(|l| now + l),
                        changed_at: now,
                    }
                });
            if seen.fresh_until.is_some_and(|t| now <= t) {
                alive.push(seen.beat.addr.clone());
            } else if now.duration_since(seen.changed_at) >= stale * CLEANUP_FACTOR {
                remove_if_unchanged(&entry.path(), &seen.beat);
            }
        }
        self.seen.retain(|name, _| present.contains(name));
        Ok(alive)
    }
}

/// Parse a heartbeat file; `None` for anything else.
fn read_beat(path: &Path) -> Option<Beat> {
    let mut body = String::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_FILE + 1)
        .read_to_string(&mut body)
        .ok()?;
    if body.len() as u64 > MAX_FILE {
        return None;
    }
    let mut lines = body.lines();
    let addr = canonical_peer(lines.next()?).ok()?;
    let stamp = lines.next()?.trim().parse().ok()?;
    Some(Beat { addr, stamp })
}

fn remove_if_unchanged(path: &Path, beat: &Beat) {
    // Narrow the race with a node restarting under the same name right now.
    if read_beat(path).as_ref() != Some(beat) {
        return;
    }
    match fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(file = %path.display(), "discovery.file: removed a dead node's heartbeat")
        }
        Err(e) => {
            tracing::debug!(file = %path.display(), error = %e, "discovery.file: cannot remove")
        }
    }
}

fn wall_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
