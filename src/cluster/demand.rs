//! Demand per hash key: requests entering this node from clients (not forwarded ones), counted
//! per worker, turned into arrival rates on the control plane.
//!
//! Each worker owns a [`DemandTable`]: a fixed set-associative table of counters indexed by the
//! key's xxh3, written only by that worker (plain atomic loads and stores, no read-modify-write
//! shared with another core, no lock, no allocation). A key takes a way of its set when one is
//! free or idle for two ticks; the first bytes of its name are kept beside it (for the metric
//! labels of the top keys), and the pool its requests need (the base model's `pool_hash`; 0:
//! any), so that a hot key's replicas are sized on the nodes that serve it. A key that finds
//! every way busy is counted as untracked. The control plane ([`DemandReader`]) reads every
//! table each tick, turns the differences into rates and keeps an exponential moving average
//! per key (α = [`EMA_ALPHA`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
};

/// Sets per table.
const SETS: usize = 512;
/// Ways per set.
const WAYS: usize = 4;
/// Bytes of a key's name kept for labels.
pub const NAME_BYTES: usize = 96;
const NAME_WORDS: usize = NAME_BYTES / 8;
/// Weight of the newest tick in a key's rate.
pub const EMA_ALPHA: f64 = 0.3;
/// Rates below this (requests/s) are forgotten.
const FORGET_RATE: f64 = 0.01;

struct Way {
    hash: AtomicU64,
    count: AtomicU64,
    /// Tick of the last count.
    tick: AtomicU64,
    /// Changes whenever another key takes the way (odd while the name is written).
    seq: AtomicU32,
    /// The pool of the key's requests when it took the way.
    pool: AtomicU64,
    name_len: AtomicU32,
    name: [AtomicU64; NAME_WORDS],
}

impl Default for Way {
    fn default() -> Self {
        Way {
            hash: AtomicU64::new(0),
            count: AtomicU64::new(0),
            tick: AtomicU64::new(0),
            seq: AtomicU32::new(0),
            pool: AtomicU64::new(0),
            name_len: AtomicU32::new(0),
            name: Default::default(),
        }
    }
}

/// One worker's counters.
pub struct DemandTable {
    ways: Box<[Way]>,
    untracked: AtomicU64,
    board: Arc<DemandBoard>,
}

/// Every worker's table, and the tick the control plane is at.
#[derive(Default)]
pub struct DemandBoard {
    tick: AtomicU64,
    tables: Mutex<Vec<Arc<DemandTable>>>,
}

impl DemandBoard {
    /// A new table for a worker, registered for the reader.
    pub fn table(self: &Arc<Self>) -> Arc<DemandTable> {
        let t = Arc::new(DemandTable {
            ways: (0..SETS * WAYS).map(|_| Way::default()).collect(),
            untracked: AtomicU64::new(0),
            board: self.clone(),
        });
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t.clone());
        t
    }
}

impl DemandTable {
    /// Count one request for key `hash` needing `pool` (0: any; `name`: the key, kept for
    /// labels). Called only by the table's worker.
    #[inline]
    pub fn count(&self, hash: u64, pool: u64, name: &str) {
        let hash = hash.max(1);
        let tick = self.board.tick.load(Relaxed);
        let set = ((hash >> 32) as usize % SETS) * WAYS;
        let ways = &self.ways[set..set + WAYS];
        for w in ways {
            if w.hash.load(Relaxed) == hash {
                w.count.store(w.count.load(Relaxed) + 1, Relaxed);
                w.tick.store(tick, Relaxed);
                return;
            }
        }
        // A free way, or the one idle longest (two ticks at least).
        let idle = ways
            .iter()
            .filter(|w| w.hash.load(Relaxed) == 0 || w.tick.load(Relaxed) + 2 <= tick)
            .min_by_key(|w| w.tick.load(Relaxed));
        let Some(w) = idle else {
            self.untracked
                .store(self.untracked.load(Relaxed) + 1, Relaxed);
            return;
        };
        let seq = w.seq.load(Relaxed);
        w.seq.store(seq.wrapping_add(1), Relaxed);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let bytes = &name.as_bytes()[..name.len().min(NAME_BYTES)];
        for (i, word) in w.name.iter().enumerate() {
            let mut buf = [0u8; 8];
            let chunk = bytes.get(i * 8..).unwrap_or_default();
            let n = chunk.len().min(8);
            buf[..n].copy_from_slice(&chunk[..n]);
            word.store(u64::from_le_bytes(buf), Relaxed);
        }
        w.name_len.store(bytes.len() as u32, Relaxed);
        w.pool.store(pool, Relaxed);
        w.hash.store(hash, Relaxed);
        w.count.store(1, Relaxed);
        w.tick.store(tick, Relaxed);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        w.seq.store(seq.wrapping_add(2), Relaxed);
    }

    /// Requests not tracked because their set was full of live keys.
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Relaxed)
    }
}

/// A key's demand on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRate {
    pub hash: u64,
    /// Requests per second entering this node (EMA).
    pub rate: f64,
    /// The key's first [`NAME_BYTES`] bytes, when seen.
    pub name: String,
    /// The pool its requests need (0: any).
    pub pool: u64,
}

/// The control plane's side: reads the tables each tick.
pub struct DemandReader {
    board: Arc<DemandBoard>,
    /// Per table and way: `(seq, hash, count)` at the last read.
    last: Vec<Vec<(u32, u64, u64)>>,
    rates: HashMap<u64, KeyRate>,
}

impl DemandReader {
    pub fn new(board: Arc<DemandBoard>) -> DemandReader {
        DemandReader {
            board,
            last: Vec::new(),
            rates: HashMap::new(),
        }
    }

    /// Read every table, `secs` after the previous tick; update the rates, start the next tick.
    pub fn tick(&mut self, secs: f64) {
        let tables = self
            .board
            .tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.last.resize_with(tables.len(), Vec::new);
        let mut deltas: HashMap<u64, (u64, Option<(String, u64)>)> = HashMap::new();
        for (t, table) in tables.iter().enumerate() {
            let last = &mut self.last[t];
            last.resize(table.ways.len(), (0, 0, 0));
            for (w, way) in table.ways.iter().enumerate() {
                let seq = way.seq.load(Relaxed);
                if seq % 2 == 1 {
                    continue; // being claimed: next tick
                }
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                let hash = way.hash.load(Relaxed);
                let count = way.count.load(Relaxed);
                if hash == 0 {
                    continue;
                }
                let (lseq, lhash, lcount) = last[w];
                let delta = if lseq == seq && lhash == hash {
                    count.saturating_sub(lcount)
                } else {
                    count
                };
                last[w] = (seq, hash, count);
                let entry = deltas.entry(hash).or_default();
                entry.0 += delta;
                if entry.1.is_none() {
                    entry.1 = read_name_and_pool(way, seq);
                }
            }
        }
        let secs = secs.max(1e-3);
        for (hash, r) in &mut self.rates {
            let d = deltas.remove(hash).map_or(0, |d| d.0);
            r.rate = EMA_ALPHA * d as f64 / secs + (1.0 - EMA_ALPHA) * r.rate;
        }
        for (hash, (d, seen)) in deltas {
            if d > 0 {
                let (name, pool) = seen.unwrap_or_default();
                self.rates.insert(
                    hash,
                    KeyRate {
                        hash,
                        rate: EMA_ALPHA * d as f64 / secs,
                        name,
                        pool,
                    },
                );
            }
        }
        self.rates.retain(|_, r| r.rate >= FORGET_RATE);
        self.board.tick.fetch_add(1, Relaxed);
    }

    /// The rate of a key entering this node (0 when unknown).
    pub fn rate(&self, hash: u64) -> f64 {
        self.rates.get(&hash.max(1)).map_or(0.0, |r| r.rate)
    }

    /// The `n` keys with the highest rates, highest first.
    pub fn top(&self, n: usize) -> Vec<KeyRate> {
        let mut all: Vec<KeyRate> = self.rates.values().cloned().collect();
        all.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(a.hash.cmp(&b.hash)));
        all.truncate(n);
        all
    }
}

/// The name and pool in `way`, if they were not rewritten while read.
fn read_name_and_pool(way: &Way, seq: u32) -> Option<(String, u64)> {
    let len = (way.name_len.load(Relaxed) as usize).min(NAME_BYTES);
    let pool = way.pool.load(Relaxed);
    let mut bytes = Vec::with_capacity(NAME_BYTES);
    for word in &way.name {
        bytes.extend_from_slice(&word.load(Relaxed).to_le_bytes());
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
    if way.seq.load(Relaxed) != seq {
        return None;
    }
    bytes.truncate(len);
    Some((String::from_utf8_lossy(&bytes).into_owned(), pool))
}

#[cfg(test)]
mod tests {
    use xxhash_rust::xxh3::xxh3_64;

    use super::*;

    fn h(name: &str) -> u64 {
        xxh3_64(name.as_bytes())
    }

    #[test]
    fn rates_follow_the_counts_per_tick_and_fade() {
        let board = Arc::new(DemandBoard::default());
        let (a, b) = (board.table(), board.table());
        let mut r = DemandReader::new(board.clone());
        for _ in 0..10 {
            for _ in 0..30 {
                a.count(h("hot"), 42, "hot");
            }
            for _ in 0..20 {
                b.count(h("hot"), 42, "hot");
            }
            a.count(h("cold"), 0, "cold");
            r.tick(1.0);
        }
        let hot = r.rate(h("hot"));
        assert!((hot - 50.0).abs() < 2.0, "{hot}");
        assert!((r.rate(h("cold")) - 1.0).abs() < 0.1);
        let top = r.top(1);
        assert_eq!((top[0].name.as_str(), top[0].hash), ("hot", h("hot")));
        assert_eq!(top[0].pool, 42, "the pool its requests need");
        for _ in 0..30 {
            r.tick(1.0);
        }
        assert!(r.rate(h("hot")) < 0.01, "an idle key fades out");
        assert!(r.top(10).is_empty());
    }

    #[test]
    fn a_full_set_counts_the_newcomer_as_untracked_until_a_way_idles() {
        let board = Arc::new(DemandBoard::default());
        let t = board.table();
        let mut r = DemandReader::new(board.clone());
        // Keys of one set: the same bits 32.. modulo SETS.
        let same_set: Vec<u64> = (0..WAYS as u64 + 1)
            .map(|i| (i * SETS as u64 + 7) << 32 | 1)
            .collect();
        for &k in &same_set[..WAYS] {
            t.count(k, 0, "k");
        }
        t.count(same_set[WAYS], 0, "late");
        assert_eq!(t.untracked(), 1);
        // Two ticks later the first keys are idle: the newcomer takes a way.
        r.tick(1.0);
        r.tick(1.0);
        t.count(same_set[WAYS], 0, "late");
        r.tick(1.0);
        assert!(r.rate(same_set[WAYS]) > 0.0);
        let long = "x".repeat(300);
        t.count(h(&long), 0, &long);
        r.tick(1.0);
        let top = r.top(10);
        let kept = top.iter().find(|k| k.hash == h(&long)).unwrap();
        assert_eq!(kept.name.len(), NAME_BYTES);
    }
}
