//! Routing by what each vLLM holds and how busy it is (`routing.policy: auto`), with real nodes
//! on loopback in front of stand-in vLLMs that model the engine (batch, queue, LoRA slots) and
//! export vLLM's metrics: hot adapters spread and come back, rare ones stay on one node, a busy
//! vLLM gets little new work, unknown or stale state routes by hash, adapters are loaded into
//! vLLM ahead of requests (warm-up with `load`, `storage.preload`, again after a restart).
//! Every case runs under both io drivers.

mod common;

use std::time::{Duration, Instant};

use common::{
    Driver, Raw,
    cluster::{BASE, Cluster, Spec},
    post, until,
};
use loraplex::testkit::{
    adapters::AdapterSpec,
    origin::{OriginConfig, OriginStandIn},
    vllm::VllmConfig,
    vllm_engine::EngineConfig,
};

/// A completion for `model` entering at node `entry`; its status.
async fn complete(c: &Cluster, entry: usize, model: &str) -> u16 {
    let mut raw = Raw::connect(c.node(entry).addr).await;
    let body = serde_json::json!({"model": model, "prompt": "hi", "max_tokens": 2}).to_string();
    raw.send(&post("/v1/completions", &body, "")).await;
    raw.response(false).await.status
}

fn origin_with(names: &[&str]) -> OriginStandIn {
    let o = OriginStandIn::start(OriginConfig::default()).unwrap();
    for (i, n) in names.iter().enumerate() {
        o.put_adapter(n, &AdapterSpec::new(BASE, 4096, i as u64));
    }
    o
}

fn served(c: &Cluster, model: &str) -> Vec<u64> {
    c.vllms.iter().map(|v| v.served(model)).collect()
}

/// Engines of 2 requests at a time, 100 ms each: 20 requests/s a node.
fn small_engine(_: usize) -> VllmConfig {
    VllmConfig::new(BASE).engine(EngineConfig {
        max_running: 2,
        max_loras: 4,
        prefill: Duration::from_millis(100),
        ..EngineConfig::unbounded()
    })
}

async fn a_hot_adapter_spreads_under_demand_and_comes_back_to_one_node(driver: Driver) {
    const HOT: &str = "acme/hot";
    let origin = origin_with(&[HOT]);
    let c = Cluster::start(
        driver,
        Spec {
            vllm: &small_engine,
            origin: Some(&origin),
            ..Spec::new(3)
        },
    )
    .await;
    let owner = c.owner_of(HOT);
    // Sustained demand: 12 clients in a loop, entering the three nodes in turn, for 6 s.
    let stop = Instant::now() + Duration::from_secs(6);
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let addr = c.node(i % 3).addr;
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let mut raw = Raw::connect(addr).await;
                    let body = format!(r#"{{"model":"{HOT}","prompt":"x","max_tokens":1}}"#);
                    raw.send(&post("/v1/completions", &body, "")).await;
                    assert_eq!(raw.response(false).await.status, 200);
                }
            })
        })
        .collect();
    // While it lasts, the nodes give the key more than one replica.
    until("the hot key to get replicas", 6, || async {
        let mut most: f64 = 0.0;
        for i in 0..3 {
            most = most.max(c.metric(i, "loraplex_key_replicas{key=\"acme/hot\"}").await);
        }
        most >= 2.0
    })
    .await;
    for t in clients {
        t.await.unwrap();
    }
    let during = served(&c, HOT);
    let serving = during.iter().filter(|&&n| n > 0).count();
    assert!(serving >= 2, "served by {during:?}");
    assert!(
        c.metric(owner, "loraplex_key_replicas{key=\"acme/hot\"}")
            .await
            <= 3.0
    );
    // Demand stops: every node shrinks the key back to one replica after the cooldown.
    for i in 0..3 {
        until("the hot key to shrink back", 20, || async {
            c.metric(i, "loraplex_key_replicas{key=\"acme/hot\"}").await <= 1.0
        })
        .await;
    }
    let before = served(&c, HOT);
    for i in 0..9 {
        assert_eq!(complete(&c, i % 3, HOT).await, 200);
    }
    let after = served(&c, HOT);
    let grew: Vec<usize> = (0..3).filter(|&i| after[i] > before[i]).collect();
    assert_eq!(grew, vec![owner], "{before:?} -> {after:?}");
}

async fn a_rare_adapter_is_stored_on_exactly_one_node(driver: Driver) {
    let names: Vec<String> = (0..6).map(|i| format!("acme/rare-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let origin = origin_with(&refs);
    let c = Cluster::start(
        driver,
        Spec {
            origin: Some(&origin),
            ..Spec::new(3)
        },
    )
    .await;
    for name in &names {
        for entry in 0..3 {
            assert_eq!(complete(&c, entry, name).await, 200);
        }
    }
    for name in &names {
        let holders: Vec<usize> = (0..3).filter(|&i| c.stores(i, name)).collect();
        assert_eq!(holders, vec![c.owner_of(name)], "{name}");
        let weights = format!("{name}/adapter_model.safetensors");
        assert_eq!(origin.gets(&weights), 1, "{name} fetched once");
    }
    let owner_decisions = c
        .metric(0, "loraplex_route_decisions_total{reason=\"owner\"}")
        .await;
    assert!(owner_decisions >= 6.0, "{owner_decisions}");
}

async fn a_vllm_with_a_long_queue_and_a_full_cache_gets_little_new_work(driver: Driver) {
    // Node 0's vLLM runs one request at a time, each for 15 s: the four held below keep it
    // busy for a minute, longer than the requests below take on a loaded machine (with 3 s
    // each its queue could drain mid-test, and then it rightly got work again).
    let slow = |i: usize| {
        if i == 0 {
            VllmConfig::new(BASE).engine(EngineConfig {
                max_running: 1,
                prefill: Duration::from_secs(15),
                ..EngineConfig::unbounded()
            })
        } else {
            VllmConfig::new(BASE)
        }
    };
    let names: Vec<String> = (0..40).map(|i| format!("acme/a-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let origin = origin_with(&refs);
    let c = Cluster::start(
        driver,
        Spec {
            vllm: &slow,
            origin: Some(&origin),
            ..Spec::new(3)
        },
    )
    .await;
    // Fill it: one running (KV full), three waiting, sent straight to vLLM.
    let url = c.vllms[0].url();
    let held: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = serde_json::json!({"model": BASE, "prompt": "x", "max_tokens": 1});
                let _ = reqwest::Client::new()
                    .post(format!("{url}/v1/completions"))
                    .json(&body)
                    .send()
                    .await;
            })
        })
        .collect();
    for i in 0..3 {
        until("every node to see node 0's queue", 10, || async {
            let peers = c.admin_peers(c.node(i)).await;
            let p = peers["peers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["addr"] == c.peers[0].as_str())
                .cloned()
                .unwrap();
            p["vllm"]["waiting"].as_f64() >= Some(3.0)
                && p["vllm"]["kv_cache_usage"].as_f64() >= Some(0.99)
        })
        .await;
    }
    // Base-model requests and rare adapters owned by node 0, entering every node.
    let before = c.vllms[0].requests(BASE);
    let mine: Vec<&String> = names
        .iter()
        .filter(|n| c.owner_of(n) == 0)
        .take(3)
        .collect();
    assert!(!mine.is_empty());
    for entry in 0..3 {
        for _ in 0..5 {
            assert_eq!(complete(&c, entry, BASE).await, 200);
        }
        for name in &mine {
            assert_eq!(complete(&c, entry, name).await, 200);
        }
    }
    let base_there = c.vllms[0].requests(BASE) - before;
    let adapters_there: u64 = mine.iter().map(|n| c.vllms[0].requests(n)).sum();
    assert_eq!(
        (base_there, adapters_there),
        (0, 0),
        "the busy vLLM got new work"
    );
    for h in held {
        h.abort();
    }
}

async fn a_vllm_without_metrics_is_still_routed_by_hash(driver: Driver) {
    let names: Vec<String> = (0..30).map(|i| format!("acme/old-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let origin = origin_with(&refs);
    let old = |i: usize| {
        let v = VllmConfig::new(BASE);
        if i == 1 { v.without_metrics() } else { v }
    };
    let c = Cluster::start(
        driver,
        Spec {
            vllm: &old,
            origin: Some(&origin),
            unknown: vec![1],
            ..Spec::new(3)
        },
    )
    .await;
    let peers = c.admin_peers(c.node(0)).await;
    let node1 = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == c.peers[1].as_str())
        .cloned()
        .unwrap();
    assert_eq!(node1["vllm"]["known"], false, "{node1}");
    let theirs: Vec<&String> = names
        .iter()
        .filter(|n| c.owner_of(n) == 1)
        .take(3)
        .collect();
    assert!(!theirs.is_empty());
    for name in &theirs {
        for entry in [0, 2] {
            assert_eq!(complete(&c, entry, name).await, 200);
        }
        assert_eq!(c.vllms[1].served(name), 2, "{name} went to its owner");
    }
}

async fn stale_peer_state_ages_out(driver: Driver) {
    let mut c = Cluster::start(driver, Spec::new(3)).await;
    let gone = c.peers[2].clone();
    let mut dead = c.nodes[2].take().unwrap();
    dead.child.kill().unwrap();
    let _ = dead.child.wait();
    // 3 intervals of 200 ms and a second: its last state no longer counts.
    until("node 2's state to age out", 10, || async {
        let peers = c.admin_peers(c.node(0)).await;
        let p = peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["addr"] == gone.as_str())
            .cloned()
            .unwrap();
        p["vllm"]["known"] == false
    })
    .await;
}

async fn warm_up_with_load_puts_the_adapter_in_vllm_before_any_request(driver: Driver) {
    const NAME: &str = "acme/warm";
    let origin = origin_with(&[NAME]);
    let c = Cluster::start(
        driver,
        Spec {
            origin: Some(&origin),
            ..Spec::new(1)
        },
    )
    .await;
    let mut raw = Raw::connect(c.node(0).addr).await;
    let body = format!(r#"{{"adapters":["{NAME}"],"load":true}}"#);
    raw.send(&post("/admin/cache/warmup", &body, "")).await;
    let r = raw.response(false).await.json();
    assert_eq!(r["results"][0]["status"], "ok", "{r}");
    assert_eq!(r["results"][0]["loaded"], true, "{r}");
    assert_eq!(c.vllms[0].loads(NAME), 1);
    assert!(c.vllms[0].loaded().iter().any(|l| l.name == NAME));
    assert_eq!(complete(&c, 0, NAME).await, 200);
    assert_eq!(
        c.vllms[0].resolutions(NAME),
        0,
        "the first request found it loaded"
    );
}

async fn preloaded_adapters_are_in_vllm_before_the_first_request_and_after_a_restart(
    driver: Driver,
) {
    let names = ["acme/pre-0", "acme/pre-1", "acme/pre-2"];
    let origin = origin_with(&names);
    let c = Cluster::start(
        driver,
        Spec {
            origin: Some(&origin),
            extra: format!(
                "storage:\n  dir: \"{{DIR}}/store\"\n  preload: [{}]\n",
                names.join(", ")
            ),
            ..Spec::new(3)
        },
    )
    .await;
    for i in 0..3 {
        until("readiness", 20, || async {
            reqwest::get(format!("{}/readyz", c.node(i).url()))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }
    for name in names {
        let owner = c.owner_of(name);
        let loads: Vec<u64> = c.vllms.iter().map(|v| v.loads(name)).collect();
        let mut want = vec![0; 3];
        want[owner] = 1;
        assert_eq!(loads, want, "{name} loaded once, by its owner");
        assert!((0..3).all(|i| c.stores(i, name) == (i == owner)));
        let stats: serde_json::Value =
            reqwest::get(format!("{}/admin/cache/stats", c.node(owner).url()))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        assert_eq!(stats["preload"][name], "loaded", "{stats}");
    }
    // Never evicted: an explicit evict is refused in OpenAI's shape.
    let owner = c.owner_of(names[0]);
    let mut raw = Raw::connect(c.node(owner).addr).await;
    let body = format!(r#"{{"adapter":"{}"}}"#, names[0]);
    raw.send(&post("/admin/cache/evict", &body, "")).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"]["type"], "ConflictError");
    assert!(c.stores(owner, names[0]));
    // vLLM restarts: the owner loads it again, before any request.
    c.vllms[owner].restart();
    until("the preloaded adapter to be loaded again", 15, || async {
        c.vllms[owner].loads(names[0]) >= 2
    })
    .await;
    assert_eq!(complete(&c, (owner + 1) % 3, names[0]).await, 200);
    assert_eq!(c.vllms[owner].resolutions(names[0]), 0);
}

on_both_drivers!(
    a_hot_adapter_spreads_under_demand_and_comes_back_to_one_node,
    a_rare_adapter_is_stored_on_exactly_one_node,
    a_vllm_with_a_long_queue_and_a_full_cache_gets_little_new_work,
    a_vllm_without_metrics_is_still_routed_by_hash,
    stale_peer_state_ages_out,
    warm_up_with_load_puts_the_adapter_in_vllm_before_any_request,
    preloaded_adapters_are_in_vllm_before_the_first_request_and_after_a_restart,
);
