//! Byte miss ratio of the store's eviction policy (size-aware S3-FIFO) against plain LRU, on
//! Zipf-popularity traces with mixed adapter sizes (10 MB .. 1 GB, log-uniform, independent of
//! popularity), for several skews and cache sizes. Prints a table; lower is better.
//!
//! Run: `cargo bench --bench eviction`

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicU8},
};

use loraplex::store::policy::{S3Fifo, Tracked, touch};

/// Distinct adapters in a trace.
const OBJECTS: usize = 5_000;
/// Requests per trace.
const REQUESTS: usize = 400_000;
const MB: u64 = 1 << 20;

/// splitmix64: small, good enough, reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sizes log-uniform in [10 MB, 1 GB].
fn sizes(rng: &mut Rng) -> Vec<u64> {
    let (lo, hi) = ((10 * MB) as f64, (1024 * MB) as f64);
    (0..OBJECTS)
        .map(|_| (lo * (hi / lo).powf(rng.unit())) as u64)
        .collect()
}

/// A Zipf(alpha) trace over a random permutation of the objects.
fn trace(alpha: f64, requests: usize, rng: &mut Rng) -> Vec<u32> {
    let mut cdf = Vec::with_capacity(OBJECTS);
    let mut acc = 0.0;
    for rank in 1..=OBJECTS {
        acc += 1.0 / (rank as f64).powf(alpha);
        cdf.push(acc);
    }
    let mut perm: Vec<u32> = (0..OBJECTS as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    (0..requests)
        .map(|_| {
            let x = rng.unit() * acc;
            perm[cdf.partition_point(|&c| c < x).min(OBJECTS - 1)]
        })
        .collect()
}

trait Policy {
    /// Serve one request; true on a hit.
    fn access(&mut self, key: u32, size: u64) -> bool;
}

/// Classic LRU bounded in bytes (intrusive list over object ids).
struct Lru {
    cap: u64,
    bytes: u64,
    size: Vec<u64>,
    present: Vec<bool>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
}

const NIL: u32 = u32::MAX;

impl Lru {
    fn new(cap: u64) -> Self {
        Lru {
            cap,
            bytes: 0,
            size: vec![0; OBJECTS],
            present: vec![false; OBJECTS],
            prev: vec![NIL; OBJECTS],
            next: vec![NIL; OBJECTS],
            head: NIL,
            tail: NIL,
        }
    }
    fn unlink(&mut self, k: u32) {
        let (p, n) = (self.prev[k as usize], self.next[k as usize]);
        if p != NIL {
            self.next[p as usize] = n
        } else {
            self.head = n
        }
        if n != NIL {
            self.prev[n as usize] = p
        } else {
            self.tail = p
        }
    }
    fn push_front(&mut self, k: u32) {
        self.prev[k as usize] = NIL;
        self.next[k as usize] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = k
        } else {
            self.tail = k
        }
        self.head = k;
    }
}

impl Policy for Lru {
    fn access(&mut self, key: u32, size: u64) -> bool {
        if self.present[key as usize] {
            self.unlink(key);
            self.push_front(key);
            return true;
        }
        if size > self.cap {
            return false;
        }
        while self.bytes + size > self.cap {
            let t = self.tail;
            self.unlink(t);
            self.present[t as usize] = false;
            self.bytes -= self.size[t as usize];
        }
        self.present[key as usize] = true;
        self.size[key as usize] = size;
        self.bytes += size;
        self.push_front(key);
        false
    }
}

/// The store's policy, used exactly as the store uses it: a hit bumps the entry's counter,
/// a miss inserts and evicts until the budget holds.
struct Store(S3Fifo<u32, Arc<AtomicU8>>);

impl Policy for Store {
    fn access(&mut self, key: u32, size: u64) -> bool {
        if let Some(v) = self.0.get(&key) {
            touch(v.freq());
            return true;
        }
        if size > self.0.capacity() {
            return false;
        }
        while self.0.bytes() + size > self.0.capacity() {
            if self.0.evict(|_, _| true).is_none() {
                break;
            }
        }
        self.0.insert(key, size, Arc::new(AtomicU8::new(0)));
        false
    }
}

/// Bytes missed / bytes requested, after a warm-up tenth of the trace.
fn byte_miss_ratio(p: &mut dyn Policy, trace: &[u32], sizes: &[u64]) -> f64 {
    let warm = trace.len() / 10;
    let (mut req, mut miss) = (0u64, 0u64);
    for (i, &k) in trace.iter().enumerate() {
        let s = sizes[k as usize];
        let hit = p.access(k, s);
        if i >= warm {
            req += s;
            if !hit {
                miss += s;
            }
        }
    }
    miss as f64 / req as f64
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this target without it, as a
/// quick smoke run of the same code on small inputs.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn main() {
    let requests = if smoke() { REQUESTS / 50 } else { REQUESTS };
    let mut rng = Rng(0x10AA_F1E5);
    let sizes = sizes(&mut rng);
    let total: u64 = sizes.iter().sum();
    println!(
        "eviction: {OBJECTS} adapters, {:.0} GiB in all, sizes 10 MB..1 GB log-uniform, {requests} requests per trace",
        total as f64 / (1u64 << 30) as f64
    );
    println!("byte miss ratio (lower is better); cache = share of all adapter bytes");
    println!(
        "{:>5} {:>6} {:>10} {:>9} {:>9} {:>8}",
        "alpha", "cache", "cache GiB", "LRU", "S3-FIFO", "change"
    );
    let mut wins = 0;
    let mut rows = 0;
    let mut summary: HashMap<&str, f64> = HashMap::new();
    for alpha in [0.6, 0.8, 1.0, 1.2] {
        let t = trace(alpha, requests, &mut rng);
        for share in [0.01, 0.05, 0.10, 0.25] {
            let cap = (total as f64 * share) as u64;
            let lru = byte_miss_ratio(&mut Lru::new(cap), &t, &sizes);
            let ours = byte_miss_ratio(&mut Store(S3Fifo::new(cap)), &t, &sizes);
            rows += 1;
            if ours < lru {
                wins += 1;
            }
            *summary.entry("lru").or_default() += lru;
            *summary.entry("ours").or_default() += ours;
            println!(
                "{alpha:>5.1} {:>5.0}% {:>10.1} {lru:>9.4} {ours:>9.4} {:>+7.1}%",
                share * 100.0,
                cap as f64 / (1u64 << 30) as f64,
                (ours - lru) / lru * 100.0
            );
        }
    }
    println!(
        "S3-FIFO lower than LRU in {wins}/{rows} cases; mean byte miss ratio LRU {:.4}, S3-FIFO {:.4}",
        summary["lru"] / rows as f64,
        summary["ours"] / rows as f64
    );
}
