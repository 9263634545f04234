//! Hit cost of the adapter store: `Store::pin` + dropping the pin, in ns per hit, on one
//! thread and with two threads hammering at once (this machine has 2 cores), over 1000
//! stored adapters (uniformly spread) and on a single hot adapter (worst contention: every
//! hit touches the same pin word).
//!
//! Run: `cargo bench --bench index`

use std::{
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use loraplex::{
    config::{DirectIo, Driver},
    control::ControlPlane,
    metrics::Metrics,
    origin::OriginChain,
    store::{
        AdapterName, NoVllm, Store, StoreOptions,
        validate::{tiny_config, tiny_safetensors},
    },
};

const ADAPTERS: usize = 1000;
const HITS: usize = 5_000_000;
/// Hits per thread in a smoke run.
const SMOKE_HITS: usize = 20_000;

/// ns per hit when `threads` threads each do `hits` pins over `names` (cycling).
fn run(store: &Arc<Store>, names: &[AdapterName], threads: usize, hits: usize) -> f64 {
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
                let start = Instant::now();
                let mut i = t * 13;
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
    let total: Duration = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap();
    total.as_nanos() as f64 / hits as f64
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this target without it, as a
/// quick smoke run of the same code on small inputs.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn main() {
    let hits = if smoke() { SMOKE_HITS } else { HITS };
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
    // Warm up caches and the allocator.
    run(&store, &names, 1, hits);
    println!("index hit cost: Store::pin + drop, {hits} hits per thread, TTL on (checked per hit)");
    println!("{:<28} {:>10} {:>10}", "case", "1 thread", "2 threads");
    for (label, set) in [("1000 adapters, spread", &names), ("1 hot adapter", &hot)] {
        let one = run(&store, set, 1, hits);
        let two = run(&store, set, 2, hits);
        println!("{label:<28} {one:>7.1} ns {two:>7.1} ns");
    }
    store.shutdown();
}
