//! The routing decision's cost (criterion): a rare key (its owner), a hot key scored over its
//! four replicas, a base-model request (the least loaded of all nodes), at 3, 64 and 256 peers,
//! with every node's vLLM known; and at 64 peers with two vLLMs per node (one of base model
//! `m1`, one of `m2`), every request for `m1` (`/64x2`); and at 64 peers in two base-model
//! pools (one vLLM per node, `m1` on even nodes, `m2` on odd ones), every request for `m2`, a
//! key's order then over the pool's nodes (`/64p2`). Before the timed part, it counts the heap allocations of
//! 10,000 decisions of each kind (a counting global allocator) and fails if there is any: the
//! decision must stay allocation-free.
//!
//! `decide/owner lookup (reference)` is `Placement::owner` over 65,536 random keys, as
//! `cargo bench --bench placement`'s `owner` group measures it: measured in the same run, it
//! says how much slower than a quiet machine the shared one ran (the README has the quiet
//! figures).
//!
//! Run: `cargo bench --bench routing` (`-- /64` for 64 peers only, with the two-backend case).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use criterion::{BenchmarkId, Criterion};
use loraplex::{
    cluster::{
        discovery::Members,
        hashkey::pool_hash,
        identity::Identity,
        router::{RouteRequest, Router, Sent},
        view::{BackendState, NodeState, ReplicaTable, View},
    },
    config::Config,
    metrics::Metrics,
};
use xxhash_rust::xxh3::xxh3_64;

/// Counts allocations, then hands them to the system allocator.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SIZES: [usize; 3] = [3, 64, 256];
const HOT: &[u8] = b"acme/hot-adapter";

/// Nodes with two vLLMs each (`m1`, `m2`) in the two-backend case.
const TWO: usize = 64;

/// `n` peers with `backends` vLLMs each (backend `j` serves `m1` when `j` is even, else `m2`;
/// with `node_pools`, node `i`'s serve `m1` when `i` is even, else `m2`).
fn setup(n: usize, backends: usize, node_pools: bool) -> (Router, View) {
    let ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))];
    let me = Identity::with_local_ips("10.0.0.1:9090".parse().unwrap(), None, ips).unwrap();
    let router = Router::new(&Config::default(), me, Arc::new(Metrics::new()));
    let peers: Vec<String> = (1..=n)
        .map(|i| format!("10.0.{}.{}:9090", i / 256, i % 256))
        .collect();
    router.rebuild(&Members::build(&peers, &router.me), HashMap::new());
    let topo = router.topology();
    let nodes = (0..n)
        .map(|i| NodeState {
            backends: (0..backends)
                .map(|j| BackendState {
                    known: true,
                    healthy: true,
                    running: ((i + j) % 32) as f32,
                    waiting: ((i + j) % 3) as f32,
                    kv: 0.4,
                    max_lora: 16,
                    lora_busy: 8,
                    batch: 32.0,
                    capacity: 10.0,
                    gpu: (0..16u64)
                        .map(|g| g * 7919 + i as u64)
                        .collect::<Vec<_>>()
                        .into(),
                    seq: 1,
                    models: Arc::from([pool_hash(
                        ["m1", "m2"][if node_pools { i % 2 } else { j % 2 }],
                    )]),
                })
                .collect(),
            disk: None,
        })
        .collect();
    let view = View {
        generation: topo.generation,
        nodes,
        replicas: ReplicaTable::build([(xxh3_64(HOT), 4)]),
        pools: Default::default(),
    };
    (router, view)
}

/// The three kinds of request; `pool`: the base model they need (0: any).
fn requests(pool: u64) -> [(&'static str, RouteRequest); 3] {
    let rare = xxh3_64(b"acme/rare-adapter");
    let hot = xxh3_64(HOT);
    [
        (
            "rare key",
            RouteRequest {
                key: Some(rare),
                adapter: Some(rare),
                pool,
                ..RouteRequest::default()
            },
        ),
        (
            "hot key, 4 replicas",
            RouteRequest {
                key: Some(hot),
                adapter: Some(hot),
                pool,
                ..RouteRequest::default()
            },
        ),
        (
            "base model, least loaded",
            RouteRequest {
                pool,
                ..RouteRequest::default()
            },
        ),
    ]
}

/// Every case: (peers, vLLMs per node, pools by node, pool of the requests, id suffix).
fn cases() -> Vec<(usize, usize, bool, u64, String)> {
    SIZES
        .iter()
        .map(|&n| (n, 1, false, 0, n.to_string()))
        .chain([
            (TWO, 2, false, pool_hash("m1"), format!("{TWO}x2")),
            (TWO, 1, true, pool_hash("m2"), format!("{TWO}p2")),
        ])
        .collect()
}

fn check_no_allocation() {
    for (n, backends, node_pools, pool, id) in cases() {
        let (router, view) = setup(n, backends, node_pools);
        let topo = router.topology();
        let sent = Sent::default();
        sent.add(&view, 0);
        sent.add_local(&view, topo.me, 0);
        for (name, req) in requests(pool) {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            for _ in 0..10_000 {
                black_box(router.decide(&topo, &view, black_box(&req), &sent));
            }
            let allocs = ALLOCATIONS.load(Ordering::Relaxed) - before;
            println!("{id} peers, {name}: {allocs} allocations in 10,000 decisions");
            assert_eq!(allocs, 0, "the routing decision allocated");
        }
    }
}

/// The keys of `cargo bench --bench placement` (splitmix64-named, 500 organisations).
fn reference_keys() -> Vec<String> {
    (0..1u64 << 16)
        .map(|i| {
            let mut z = (i ^ 7).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            format!("org{}/lora-{:016x}", i % 500, z ^ (z >> 31))
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    check_no_allocation();
    let keys = reference_keys();
    let mut g = c.benchmark_group("decide");
    for (n, backends, node_pools, pool, id) in cases() {
        let (router, view) = setup(n, backends, node_pools);
        let topo = router.topology();
        let mut i = 0;
        g.bench_with_input(
            BenchmarkId::new("owner lookup (reference)", &id),
            &keys,
            |b, keys| {
                b.iter(|| {
                    i = (i + 1) & (keys.len() - 1);
                    topo.placement.owner(black_box(keys[i].as_bytes()))
                })
            },
        );
        let sent = Sent::default();
        sent.add(&view, 0);
        for (name, req) in requests(pool) {
            g.bench_with_input(BenchmarkId::new(name, &id), &req, |b, req| {
                b.iter(|| router.decide(&topo, &view, black_box(req), &sent))
            });
        }
    }
    g.finish();
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
