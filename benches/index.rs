//! Hit cost of the adapter store: `Store::pin` + dropping the pin, in ns per hit, on one
//! thread and with two threads hammering at once (this machine has 2 cores), over 1000
//! stored adapters (uniformly spread) and on a single hot adapter (worst contention: every
//! hit touches the same pin word).
//!
//! Criterion times `iters` hits on each thread with `iter_custom` and takes the slower
//! thread's time, so a "2 threads" figure is the cost of one hit while the other core does
//! the same.
//!
//! Run: `cargo bench --bench index` (without `--bench`, as in `cargo test`, criterion runs each
//! case once as a smoke test).

use criterion::{BenchmarkId, Criterion};
use std::{
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use loraplex::{
    adapter::AdapterName,
    config::{DirectIo, Driver},
    control::ControlPlane,
    metrics::Metrics,
    origin::OriginChain,
    store::{
        NoVllm, Store, StoreOptions,
        validate::{tiny_config, tiny_safetensors},
    },
};

const ADAPTERS: usize = 1000;

/// Time for `threads` threads each doing `hits` pins over `names` (cycling): the slowest's.
fn run(store: &Arc<Store>, names: &[AdapterName], threads: usize, hits: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            let names = names.to_vec();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Different walk per thread: stride through the names.
                let step = if t == 0 { 1 } else { 7 };
                barrier.wait();
                let mut i = t * 13;
                let start = Instant::now();
                for _ in 0..hits {
                    let pin = store.pin(&names[i % names.len()]).expect("stored");
                    std::hint::black_box(&pin);
                    drop(pin);
                    i += step;
                }
                start.elapsed()
            })
        })
        .collect();
    barrier.wait();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<AdapterName> = (0..ADAPTERS)
        .map(|i| {
            let n = format!("org{}/adapter-{i}", i % 10);
            let d = dir.path().join(&n);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("adapter_config.json"), tiny_config("base")).unwrap();
            std::fs::write(d.join("adapter_model.safetensors"), tiny_safetensors(4)).unwrap();
            AdapterName::parse(&n).unwrap()
        })
        .collect();
    let cp = ControlPlane::start(1).unwrap();
    let opts = StoreOptions {
        dir: dir.path().to_owned(),
        max_size: 1 << 40,
        rewrite_base_model: false,
        direct_io: DirectIo::Auto,
        ttl: Some(Duration::from_secs(3600)),
        driver: Driver::Auto,
        pinned_wait: Duration::from_secs(1),
        faults: Arc::default(),
        preload: Vec::new(),
    };
    let store = Store::open(
        opts,
        OriginChain::default(),
        Arc::new(NoVllm),
        cp.control(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let hot = vec![names[0].clone()];
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    // Store::pin + drop, TTL on (checked per hit).
    let mut group = c.benchmark_group("index_hit");
    for (label, set) in [("spread_1000", &names), ("hot_1", &hot)] {
        for threads in [1, 2] {
            let id = BenchmarkId::new(label, format!("{threads}_threads"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| run(&store, set, threads, iters))
            });
        }
    }
    group.finish();
    c.final_summary();
    store.shutdown();
}
