//! Placement: lookup and fallback-walk cost (criterion), and, printed once before the timed
//! part, the quality figures: table build time, keys moved when a middle peer leaves or a
//! peer joins, and peak-to-mean load over 1M random keys next to the ideal for the same keys.
//! Also jump consistent hashing, the first sketch placement does not use (`docs/placement.md`),
//! checked and timed for the record.
//!
//! Run: `cargo bench --bench placement`.
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: the
//! machines this runs on are shared, and wall time counts the slices other processes take.

use std::{hint::black_box, time::Instant};

use criterion::{
    BenchmarkId, Criterion, Throughput,
    measurement::{Measurement, ValueFormatter},
};
use loraplex::cluster::placement::Placement;
use xxhash_rust::xxh3::xxh3_64;

/// Criterion measurement: CPU time of the calling thread, in nanoseconds.
struct ThreadCpuTime;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; this clock exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &NanosFormatter
    }
}

struct NanosFormatter;

impl ValueFormatter for NanosFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = match typical {
            t if t < 1e3 => (1.0, "ns (cpu)"),
            t if t < 1e6 => (1e-3, "µs (cpu)"),
            _ => (1e-6, "ms (cpu)"),
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }
    fn scale_throughputs(&self, typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        let n = match *t {
            Throughput::Elements(n) | Throughput::Bytes(n) | Throughput::BytesDecimal(n) => n,
            Throughput::Bits(n) => n,
            Throughput::ElementsAndBytes { elements, .. } => elements,
        } as f64;
        let _ = typical;
        values.iter_mut().for_each(|v| *v = n * 1e9 / *v);
        "per s"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn addrs(n: usize, from: usize) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("10.{}.{}.{}:8000", i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

/// splitmix64: the key generator's randomness.
fn splitmix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Jump consistent hash: maps `key` to a bucket in `0..buckets` so that growing the bucket
/// count from `n` to `n + 1` moves only the keys that land in the new bucket (about 1/(n+1)).
///
/// John Lamping, Eric Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm",
/// arXiv:1406.2294 (2014). Only the last bucket may leave, which is why placement does not map
/// keys straight onto a peer list with it (`docs/placement.md`). `buckets == 0` yields 0.
fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

/// Growing from n to n+1 buckets moves only keys that land in bucket n, about 1/(n+1). Runs
/// first in `cargo bench` and in `cargo test --all-targets`; panics when jump_hash is wrong.
fn check_jump_hash() {
    for n in [1u32, 7, 100, 65_535] {
        let mut moved = 0;
        let total = 50_000;
        for i in 0..total {
            let key = splitmix(i);
            let (a, b) = (jump_hash(key, n), jump_hash(key, n + 1));
            assert!(a < n && b < n + 1);
            if a != b {
                assert_eq!(b, n);
                moved += 1;
            }
        }
        let ideal = total as f64 / f64::from(n + 1);
        assert!(
            (moved as f64 - ideal).abs() < 0.2 * ideal + 30.0,
            "jump_hash n={n}: {moved} keys moved"
        );
    }
    assert_eq!(jump_hash(42, 0), 0);
    assert_eq!(jump_hash(42, 1), 0);
}

/// Adapter-like names: `org{k}/lora-{random hex}`.
fn make_keys(n: usize, seed: u64) -> Vec<String> {
    (0..n as u64)
        .map(|i| format!("org{}/lora-{:016x}", i % 500, splitmix(i ^ seed)))
        .collect()
}

fn owners<'a>(p: &'a Placement, keys: &[String]) -> Vec<&'a str> {
    keys.iter()
        .map(|k| p.peers()[p.owner(k.as_bytes()).unwrap()].as_str())
        .collect()
}

fn moved(a: &[&str], b: &[&str]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

fn peak_to_mean(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    *load.iter().max().unwrap() as f64 / (total as f64 / load.len() as f64)
}

/// What a run covers: the full figures under `cargo bench`; under `cargo test --all-targets` a
/// smoke run of the same code, smaller (the full one took 79 s of CI in a debug build, where
/// building a 256-peer table takes 2.4 s).
struct Scale {
    /// Peer counts.
    sizes: &'static [usize],
    /// Keys for moved-keys and peak-to-mean.
    sample: usize,
    /// Keys for the table's own imbalance.
    large: u64,
    /// Timed table builds (the median is printed).
    builds: usize,
}

impl Scale {
    /// `cargo bench` passes `--bench`; `cargo test` does not.
    fn from_args() -> Scale {
        if std::env::args().any(|a| a == "--bench") {
            Scale {
                sizes: &[3, 64, 256],
                sample: 1_000_000,
                large: 16_000_000,
                builds: 5,
            }
        } else {
            Scale {
                sizes: &[3, 16],
                sample: 10_000,
                large: 100_000,
                builds: 1,
            }
        }
    }
}

/// Computed once, not timed by criterion.
fn quality(scale: &Scale) {
    let keys = make_keys(scale.sample, 0);
    println!("placement quality over {} random keys", keys.len());
    for &n in scale.sizes {
        let peers = addrs(n, 0);
        let mut builds: Vec<f64> = (0..scale.builds)
            .map(|_| {
                let t = Instant::now();
                black_box(Placement::build(&peers));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        builds.sort_by(f64::total_cmp);
        let full = Placement::build(&peers);
        let base = owners(&full, &keys);

        let gone = full.peers()[n / 2].clone();
        let shrunk: Vec<String> = peers.iter().filter(|p| **p != gone).cloned().collect();
        let removed = moved(&base, &owners(&Placement::build(&shrunk), &keys));
        let mut grown = peers.clone();
        grown.push(addrs(1, 100_000)[0].clone());
        let added = moved(&base, &owners(&Placement::build(&grown), &keys));

        let mut load = vec![0usize; n];
        let mut ideal = vec![0usize; n];
        for k in &keys {
            load[full.owner(k.as_bytes()).unwrap()] += 1;
            // An independent uniform peer per key: the sampling noise any scheme has.
            ideal[(xxh3_64(k.as_bytes()) % n as u64) as usize] += 1;
        }
        println!(
            "  peers={n:>3}  build={:.1} ms (median of {}), table {:.2} MiB  remove middle: moved {:.4} = {:.3}/N  \
             add: moved {:.4} = {:.3}/(N+1)  peak-to-mean {:.4} (ideal for these keys {:.4})",
            builds[builds.len() / 2],
            builds.len(),
            full.table_bytes() as f64 / (1 << 20) as f64,
            removed,
            removed * n as f64,
            added,
            added * (n + 1) as f64,
            peak_to_mean(&load),
            peak_to_mean(&ideal),
        );
    }
    // With 16M keys the sampling noise is 4x smaller, so what remains is the table's own
    // imbalance. Keys are 8 random bytes here (no string building).
    let large = scale.large;
    for &n in scale.sizes {
        let full = Placement::build(&addrs(n, 0));
        let mut load = vec![0usize; n];
        for i in 0..large {
            load[full.owner(&splitmix(i ^ 0xabcd).to_le_bytes()).unwrap()] += 1;
        }
        let mean = large as f64 / n as f64;
        let sd = (load
            .iter()
            .map(|&l| (l as f64 / mean - 1.0).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt();
        let noise = (n as f64 / large as f64).sqrt();
        println!(
            "  peers={n:>3}  {large} keys: peak-to-mean {:.4}, load sd {:.2}% (key noise alone {:.2}%)",
            peak_to_mean(&load),
            sd * 100.0,
            noise * 100.0
        );
    }
    // Peak-to-mean over more key sets at the most peers (256): how much is luck of the draw.
    let sample = scale.sample;
    let n = *scale.sizes.last().unwrap();
    let full = Placement::build(&addrs(n, 0));
    let (mut ours, mut ideal) = (Vec::new(), Vec::new());
    for seed in 1..=5u64 {
        let (mut load, mut base) = (vec![0usize; n], vec![0usize; n]);
        for k in make_keys(sample, seed << 40) {
            load[full.owner(k.as_bytes()).unwrap()] += 1;
            base[(xxh3_64(k.as_bytes()) % n as u64) as usize] += 1;
        }
        ours.push(format!("{:.4}", peak_to_mean(&load)));
        ideal.push(format!("{:.4}", peak_to_mean(&base)));
    }
    println!("  peers={n}, 5 more {sample}-key sets: peak-to-mean {ours:?}, ideal {ideal:?}");
}

fn lookups(c: &mut Criterion<ThreadCpuTime>, scale: &Scale) {
    let keys = make_keys(1 << 16, 7);
    let mut group = c.benchmark_group("owner");
    for &n in scale.sizes {
        let p = Placement::build(&addrs(n, 0));
        let mut i = 0;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                i = (i + 1) & (keys.len() - 1);
                p.owner(black_box(keys[i].as_bytes()))
            })
        });
    }
    // A working set of 1024 keys, a cluster's worth of adapters or sessions in use: their
    // table lines stay in cache between lookups, as they would in a running proxy.
    for &n in scale.sizes {
        let p = Placement::build(&addrs(n, 0));
        let mut i = 0;
        group.bench_function(BenchmarkId::new("working_set_1024", n), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                p.owner(black_box(keys[i].as_bytes()))
            })
        });
    }
    // The same lookups over 64 keys only: the table lines stay cached, which separates the
    // scoring cost from the cache misses of the full runs above.
    for &n in scale.sizes {
        let p = Placement::build(&addrs(n, 0));
        let mut i = 0;
        group.bench_function(BenchmarkId::new("cached", n), |b| {
            b.iter(|| {
                i = (i + 1) & 63;
                p.owner(black_box(keys[i].as_bytes()))
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("order");
    for &n in scale.sizes {
        let p = Placement::build(&addrs(n, 0));
        let mut i = 0;
        group.bench_function(BenchmarkId::new("first3", n), |b| {
            b.iter(|| {
                i = (i + 1) & (keys.len() - 1);
                p.order(black_box(keys[i].as_bytes()))
                    .take(3)
                    .fold(0, |a, x| a ^ x)
            })
        });
        group.bench_function(BenchmarkId::new("first8", n), |b| {
            b.iter(|| {
                i = (i + 1) & (keys.len() - 1);
                p.order(black_box(keys[i].as_bytes()))
                    .take(8)
                    .fold(0, |a, x| a ^ x)
            })
        });
        group.bench_function(BenchmarkId::new("all", n), |b| {
            b.iter(|| {
                i = (i + 1) & (keys.len() - 1);
                p.order(black_box(keys[i].as_bytes())).fold(0, |a, x| a ^ x)
            })
        });
    }
    group.finish();

    // Parts, for the record: hashing a key, and the jump hash the slot map does not use.
    let mut group = c.benchmark_group("parts");
    let mut i = 0;
    group.bench_function("xxh3_key", |b| {
        b.iter(|| {
            i = (i + 1) & (keys.len() - 1);
            xxh3_64(black_box(keys[i].as_bytes()))
        })
    });
    for buckets in [256u32, 65536] {
        let mut k = 0u64;
        group.bench_function(BenchmarkId::new("jump_hash", buckets), |b| {
            b.iter(|| {
                k = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
                jump_hash(black_box(k), buckets)
            })
        });
    }
    group.finish();
}

fn main() {
    check_jump_hash();
    let scale = Scale::from_args();
    quality(&scale);
    let mut c = Criterion::default()
        .with_measurement(ThreadCpuTime)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .configure_from_args();
    lookups(&mut c, &scale);
    c.final_summary();
}
