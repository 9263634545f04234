//! Byte miss ratio of the store's eviction policy (size-aware S3-FIFO) against plain LRU, on
//! Zipf-popularity traces with mixed adapter sizes (10 MB .. 1 GB, log-uniform), for several
//! skews, cache sizes and seeds, and four trace families: sizes independent of popularity,
//! popular adapters the large ones, popular adapters the small ones, and a popular set that
//! shifts over the trace. Prints a table per family; lower is better.
//!
//! Run: `cargo bench --bench eviction` (`-- SEEDS` for another number of seeds; default 3)

use std::sync::{Arc, atomic::AtomicU8};

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

/// How a trace relates popularity, sizes and time.
#[derive(Clone, Copy)]
enum Family {
    /// Sizes independent of popularity; the popular set fixed.
    Independent,
    /// The more popular an adapter, the larger (rank 1 the largest).
    PopularLarge,
    /// The more popular an adapter, the smaller.
    PopularSmall,
    /// Sizes independent; every eighth of the trace, the 500 most popular ranks are given to
    /// other adapters (drawn from the rest), so the popular set keeps moving.
    Shifting,
}

impl Family {
    const ALL: [Family; 4] = [
        Family::Independent,
        Family::PopularLarge,
        Family::PopularSmall,
        Family::Shifting,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::Independent => "sizes independent of popularity",
            Family::PopularLarge => "popular adapters large",
            Family::PopularSmall => "popular adapters small",
            Family::Shifting => "popular set shifting every 1/8 of the trace",
        }
    }
}

/// Phases of a [`Family::Shifting`] trace, and the ranks that move at each phase change.
const PHASES: usize = 8;
const SHIFTED: usize = 500;

/// Reorder `sizes` so that they follow popularity as `family` says: `perm[rank]` is the object
/// at that popularity rank.
fn correlate(family: Family, sizes: &mut [u64], perm: &[u32]) {
    let mut sorted = sizes.to_vec();
    match family {
        Family::PopularLarge => sorted.sort_unstable_by(|a, b| b.cmp(a)),
        Family::PopularSmall => sorted.sort_unstable(),
        Family::Independent | Family::Shifting => return,
    }
    for (rank, &obj) in perm.iter().enumerate() {
        sizes[obj as usize] = sorted[rank];
    }
}

/// A Zipf(alpha) trace over a random permutation of the objects (shifting it between phases
/// for [`Family::Shifting`]); sizes are reordered by [`correlate`] for the correlated families.
fn trace(
    family: Family,
    alpha: f64,
    requests: usize,
    sizes: &mut [u64],
    rng: &mut Rng,
) -> Vec<u32> {
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
    correlate(family, sizes, &perm);
    let phase = requests.div_ceil(PHASES);
    (0..requests)
        .map(|i| {
            if matches!(family, Family::Shifting) && i > 0 && i % phase == 0 {
                for rank in 0..SHIFTED {
                    let other = SHIFTED + (rng.next() % (OBJECTS - SHIFTED) as u64) as usize;
                    perm.swap(rank, other);
                }
            }
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
    let seeds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(if smoke() { 1 } else { 3 });
    println!(
        "eviction: {OBJECTS} adapters, sizes 10 MB..1 GB log-uniform, {requests} requests per trace, {seeds} seeds"
    );
    println!(
        "byte miss ratio (lower is better), means over the seeds; cache = share of all adapter bytes"
    );
    let mut all = (0, 0);
    for family in Family::ALL {
        println!();
        println!("{}", family.name());
        println!(
            "{:>5} {:>6} {:>9} {:>9} {:>8} {:>9}",
            "alpha", "cache", "LRU", "S3-FIFO", "change", "S3 wins"
        );
        let (mut wins, mut rows, mut lru_sum, mut ours_sum) = (0, 0, 0.0, 0.0);
        for alpha in [0.6, 0.8, 1.0, 1.2] {
            // Every seed's trace (and sizes), then each cache share over all of them.
            let runs: Vec<(Vec<u64>, Vec<u32>)> = (0..seeds)
                .map(|seed| {
                    let mut rng = Rng(0x10AA_F1E5 ^ seed.wrapping_mul(0x9E37_79B9));
                    let mut sizes = sizes(&mut rng);
                    let t = trace(family, alpha, requests, &mut sizes, &mut rng);
                    (sizes, t)
                })
                .collect();
            for share in [0.01, 0.05, 0.10, 0.25] {
                let (mut lru, mut ours, mut seed_wins) = (0.0, 0.0, 0);
                for (sizes, t) in &runs {
                    let cap = (sizes.iter().sum::<u64>() as f64 * share) as u64;
                    let l = byte_miss_ratio(&mut Lru::new(cap), t, sizes);
                    let o = byte_miss_ratio(&mut Store(S3Fifo::new(cap)), t, sizes);
                    lru += l / seeds as f64;
                    ours += o / seeds as f64;
                    rows += 1;
                    if o < l {
                        wins += 1;
                        seed_wins += 1;
                    }
                }
                lru_sum += lru;
                ours_sum += ours;
                println!(
                    "{alpha:>5.1} {:>5.0}% {lru:>9.4} {ours:>9.4} {:>+7.1}% {:>5}/{seeds}",
                    share * 100.0,
                    (ours - lru) / lru * 100.0,
                    seed_wins
                );
            }
        }
        let cells = rows as f64 / seeds as f64;
        println!(
            "{}: S3-FIFO lower than LRU in {wins}/{rows} runs; mean byte miss ratio LRU {:.4}, S3-FIFO {:.4}",
            family.name(),
            lru_sum / cells,
            ours_sum / cells
        );
        all = (all.0 + wins, all.1 + rows);
    }
    println!();
    println!(
        "all families: S3-FIFO lower than LRU in {}/{} runs",
        all.0, all.1
    );
}
