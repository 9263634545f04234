//! Cold fetch throughput of the store: a large adapter (default 1 GiB of weights) through the
//! `file` origin into a storage dir, timed from `ensure` to the published, fsynced adapter,
//! with the peak RSS growth while it runs (sampled every 5 ms from /proc/self/status). For
//! reference, the same bytes copied with `std::fs::copy` + fsync.
//!
//! The source file sits in the page cache (just written), as a file an nginx origin serves
//! hot would. Run: `cargo bench --bench fetch` (env: `LORAPLEX_BENCH_DIR` for where the dirs
//! go, default the system temp dir; `LORAPLEX_BENCH_MB`, default 1024).

use std::{
    io::Write,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use loraplex::{
    adapter::AdapterName,
    config::{DirectIo, Driver},
    control::ControlPlane,
    metrics::Metrics,
    origin::{OriginChain, file::FileOrigin},
    store::{NoVllm, Store, StoreOptions, validate::tiny_config},
};

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A valid adapter whose weights are one U8 tensor of `bytes` bytes.
fn make_adapter(dir: &Path, bytes: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), tiny_config("base")).unwrap();
    let header =
        format!(r#"{{"w":{{"dtype":"U8","shape":[{bytes}],"data_offsets":[0,{bytes}]}}}}"#);
    let mut f = std::fs::File::create(dir.join("adapter_model.safetensors")).unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    let chunk: Vec<u8> = (0..4 << 20).map(|i| (i * 31 % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// Runs `f` while a thread samples VmRSS; returns (f's output, peak RSS growth in MiB).
fn with_rss<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let base = status_kb("VmRSS:");
    let peak = Arc::new(AtomicU64::new(base));
    let stop = Arc::new(AtomicBool::new(false));
    let (p, s) = (peak.clone(), stop.clone());
    let sampler = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            p.fetch_max(status_kb("VmRSS:"), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let out = f();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (out, (peak.load(Ordering::Relaxed) - base) as f64 / 1024.0)
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this target without it, as a
/// quick smoke run of the same code on small inputs.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn main() {
    let base =
        std::env::var("LORAPLEX_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), Into::into);
    let mb: u64 = std::env::var("LORAPLEX_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke() { 4 } else { 1024 });
    let bytes = mb << 20;
    let origin = tempfile::tempdir_in(&base).unwrap();
    make_adapter(&origin.path().join("big"), bytes);
    let total = bytes + 200;
    println!(
        "fetch: {mb} MiB adapter, file origin -> storage dir under {} (source in page cache)",
        base.display()
    );
    println!(
        "{:<34} {:>8} {:>10} {:>14}",
        "case", "secs", "MB/s", "peak RSS +MiB"
    );

    let cp = ControlPlane::start(2).unwrap();
    for (label, driver, direct) in [
        ("store, io_uring, O_DIRECT", Driver::IoUring, DirectIo::Auto),
        ("store, epoll, O_DIRECT", Driver::Epoll, DirectIo::Auto),
        (
            "store, io_uring, buffered+fsync",
            Driver::IoUring,
            DirectIo::Off,
        ),
    ] {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let store = Store::open(
            StoreOptions {
                dir: dir.path().to_owned(),
                max_size: 4 * bytes,
                rewrite_base_model: false,
                direct_io: direct,
                ttl: None,
                driver,
                pinned_wait: Duration::from_secs(1),
                faults: Arc::default(),
                preload: Vec::new(),
            },
            OriginChain::new(vec![Arc::new(FileOrigin::new(origin.path().to_owned()))]),
            Arc::new(NoVllm),
            cp.control(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let mode = store.write_mode().as_str();
        let (secs, rss) = with_rss(|| {
            let s = store.clone();
            std::thread::spawn(move || {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let start = Instant::now();
                    s.ensure(&AdapterName::parse("big").unwrap()).await.unwrap();
                    start.elapsed().as_secs_f64()
                })
            })
            .join()
            .unwrap()
        });
        println!(
            "{:<34} {secs:>8.2} {:>10.0} {rss:>14.1}",
            format!("{label} [{mode}]"),
            total as f64 / secs / 1e6
        );
        store.shutdown();
    }

    let dir = tempfile::tempdir_in(&base).unwrap();
    let (secs, rss) = with_rss(|| {
        let start = Instant::now();
        let dst = dir.path().join("copy");
        std::fs::copy(origin.path().join("big/adapter_model.safetensors"), &dst).unwrap();
        std::fs::File::open(&dst).unwrap().sync_all().unwrap();
        start.elapsed().as_secs_f64()
    });
    println!(
        "{:<34} {secs:>8.2} {:>10.0} {rss:>14.1}",
        "reference: fs::copy + fsync",
        total as f64 / secs / 1e6
    );
    println!(
        "process peak RSS (VmHWM): {} MiB",
        status_kb("VmHWM:") / 1024
    );
}
