//! Adapters end to end: the real binary between the stand-in vLLM (which resolves adapters from
//! the storage directory exactly like vLLM's filesystem resolver, and checks the files are
//! whole) and the stand-in HTTP origin. Cold and warm, one download for many waiters, fallback
//! to the base model, eviction with vLLM told to unload, restart and crash recovery, admin API,
//! revalidation after the TTL. Every case runs under both io drivers (`io_uring::case`,
//! `epoll::case`; the storage thread follows `server.driver` too).

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{Driver, Node, Raw, chat_with as chat, eventually, post};
use loraplex::testkit::{
    adapters::{AdapterSpec, Defect, SAFETENSORS_FILE, file_hash},
    origin::{OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmStandIn},
};
use serde_json::json;

const BASE: &str = "tiny-base";

struct Setup {
    vllm: VllmStandIn,
    origin: OriginStandIn,
}

/// The stand-in vLLM reads adapters from `store` (the node's storage dir).
fn setup(store: &Path) -> Setup {
    std::fs::create_dir_all(store).unwrap();
    Setup {
        vllm: VllmStandIn::start(VllmConfig::new(BASE).lora_dir(store)).unwrap(),
        origin: OriginStandIn::start(OriginConfig::default()).unwrap(),
    }
}

fn node_in(driver: Driver, dir: tempfile::TempDir, s: &Setup, extra: &str) -> Node {
    let yaml = format!(
        "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: 1h\n\
         origins:\n  - type: http\n    base_url: \"{}\"\n{extra}",
        s.vllm.url(),
        s.origin.base_url()
    );
    let yaml = if extra.contains("storage:") {
        yaml
    } else {
        format!("{yaml}\nstorage:\n  dir: \"{{DIR}}/store\"\n  max_size: 1GB\n")
    };
    let node = Node::start_in(dir, &driver.config(&yaml), &[]);
    node.assert_driver(driver);
    node
}

/// A node and its stand-ins, the store in the node's tempdir.
fn start(driver: Driver, extra: &str) -> (Node, Setup) {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir.path().join("store"));
    (node_in(driver, dir, &s, extra), s)
}

fn spec(size: u64, seed: u64) -> AdapterSpec {
    AdapterSpec::new(BASE, size, seed)
}

async fn admin(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> common::RawResponse {
    let mut c = Raw::connect(addr).await;
    c.send(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    c.response(false).await
}

fn weights_hash(node: &Node, name: &str) -> u64 {
    file_hash(&node.path("store").join(name).join(SAFETENSORS_FILE)).unwrap()
}

async fn cold_fetch_then_warm_hits_reach_vllm_with_whole_files(driver: Driver) {
    let (lp, s) = start(driver, "");
    s.origin.put_adapter("acme/summarizer", &spec(300_000, 1));
    let r = chat(lp.addr, "acme/summarizer").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // vLLM loaded exactly the bytes the origin serves.
    let served = s.origin.file("acme/summarizer", SAFETENSORS_FILE).unwrap();
    assert_eq!(
        s.vllm.loaded_hash("acme/summarizer"),
        Some(xxhash_rust::xxh3::xxh3_64(&served))
    );
    assert_eq!(
        weights_hash(&lp, "acme/summarizer"),
        xxhash_rust::xxh3::xxh3_64(&served)
    );
    let gets = s.origin.adapter_gets("acme/summarizer");
    for _ in 0..5 {
        assert_eq!(chat(lp.addr, "acme/summarizer").await.status, 200);
    }
    assert_eq!(
        s.origin.adapter_gets("acme/summarizer"),
        gets,
        "warm hits never touch the origin"
    );
    assert!(s.vllm.faults().is_empty(), "{:?}", s.vllm.faults());
    let m = admin(lp.addr, "GET", "/metrics", "").await;
    let text = String::from_utf8(m.body).unwrap();
    assert!(
        text.contains("loraplex_cache_hits_total{tier=\"local\"} 5"),
        "{text}"
    );
    assert!(text.contains("cache_tier=\"origin\"} 1"), "{text}");
}

async fn two_hundred_concurrent_cold_requests_make_one_download(driver: Driver) {
    let (lp, s) = start(driver, "");
    s.origin.put_adapter("acme/popular", &spec(2_000_000, 2));
    s.origin.set_throttle(Some(8_000_000)); // ~0.25 s: every request arrives while it runs
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let addr = lp.addr;
            tokio::spawn(async move { chat(addr, "acme/popular").await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // One GET per file (config and weights).
    assert_eq!(s.origin.adapter_gets("acme/popular"), 2);
    assert_eq!(s.vllm.resolutions("acme/popular"), 1);
}

async fn unknown_adapter_is_vllms_404_and_bad_ones_are_502_with_nothing_published(driver: Driver) {
    let (lp, s) = start(driver, "");
    let r = chat(lp.addr, "acme/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"error":{"message":"The model `acme/nope` does not exist.","type":"NotFoundError","param":"model","code":404}})
    );
    s.origin.put_adapter(
        "acme/broken",
        &spec(100_000, 3).defect(Defect::TruncatedWeights),
    );
    let r = chat(lp.addr, "acme/broken").await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert!(!lp.path("store/acme/broken").exists());
    s.origin
        .put_adapter("acme/notlora", &spec(100_000, 4).defect(Defect::NotLora));
    assert_eq!(chat(lp.addr, "acme/notlora").await.status, 502);
    assert!(!lp.path("store/acme/notlora").exists());
    assert_eq!(
        s.vllm.requests("acme/nope") + s.vllm.requests("acme/broken"),
        0
    );
}

async fn fallback_rewrites_model_to_the_base_and_says_so(driver: Driver) {
    let (lp, s) = start(driver, "routing:\n  fallback_to_base_model: true\n");
    let r = chat(lp.addr, "acme/missing").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-loraplex-fallback").as_deref(),
        Some("base-model")
    );
    assert_eq!(s.vllm.served(BASE), 1);
    assert_eq!(
        s.vllm.requests("acme/missing"),
        0,
        "vLLM never saw the adapter name"
    );
}

async fn eviction_spares_adapters_in_flight_and_tells_vllm_to_unload(driver: Driver) {
    // Room for about two 400 kB adapters.
    let (lp, s) = start(
        driver,
        "storage:\n  dir: \"{DIR}/store\"\n  max_size: 900KB\n",
    );
    for (i, n) in ["acme/a", "acme/b", "acme/c"].iter().enumerate() {
        s.origin.put_adapter(n, &spec(400_000, 10 + i as u64));
    }
    // acme/a stays in flight: a slow stream holds its pin.
    assert_eq!(chat(lp.addr, "acme/a").await.status, 200);
    let mut held = Raw::connect(lp.addr).await;
    let body =
        json!({"model": "acme/a", "stream": true, "max_tokens": 30, "messages": []}).to_string();
    held.send(&post(
        "/v1/chat/completions",
        &body,
        "x-test-event-gap-ms: 100\r\n",
    ))
    .await;
    eventually("the stream to start", || s.vllm.requests("acme/a") == 2).await;
    assert_eq!(chat(lp.addr, "acme/b").await.status, 200);
    // c needs room: b goes (a is pinned), and vLLM is told to forget b.
    assert_eq!(chat(lp.addr, "acme/c").await.status, 200);
    assert!(
        lp.path("store/acme/a").exists(),
        "the adapter in flight survived"
    );
    assert!(!lp.path("store/acme/b").exists());
    eventually("vLLM to unload acme/b", || s.vllm.unloads("acme/b") == 1).await;
    assert_eq!(s.vllm.unloads("acme/a"), 0);
    // The evicted adapter comes back on demand and vLLM loads it again.
    assert_eq!(chat(lp.addr, "acme/b").await.status, 200);
    assert!(s.vllm.faults().is_empty(), "{:?}", s.vllm.faults());
    assert_eq!(held.response(false).await.status, 200);
}

async fn an_adapter_larger_than_the_budget_is_507_with_nothing_written(driver: Driver) {
    let (lp, s) = start(
        driver,
        "storage:\n  dir: \"{DIR}/store\"\n  max_size: 200KB\n",
    );
    s.origin.put_adapter("acme/huge", &spec(500_000, 5));
    let r = chat(lp.addr, "acme/huge").await;
    assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["type"], "InsufficientStorageError");
    assert!(!lp.path("store/acme/huge").exists());
}

async fn restart_rebuilds_from_disk_without_refetching(driver: Driver) {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir.path().join("store"));
    s.origin.put_adapter("acme/kept", &spec(200_000, 6));
    let mut lp = node_in(driver, dir, &s, "");
    assert_eq!(chat(lp.addr, "acme/kept").await.status, 200);
    let gets = s.origin.adapter_gets("acme/kept");
    assert!(lp.terminate().success());
    let dir = std::mem::replace(&mut lp.dir, tempfile::tempdir().unwrap());
    drop(lp);
    let lp = node_in(driver, dir, &s, "");
    s.vllm.forget_all();
    assert_eq!(chat(lp.addr, "acme/kept").await.status, 200);
    assert_eq!(
        s.origin.adapter_gets("acme/kept"),
        gets,
        "served from disk after restart"
    );
    let stats = admin(lp.addr, "GET", "/admin/cache/stats", "").await.json();
    assert_eq!(stats["items"], 1);
}

async fn kill_9_mid_fetch_leaves_nothing_partial_and_the_restart_cleans_up(driver: Driver) {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir.path().join("store"));
    s.origin.put_adapter("acme/big", &spec(3_000_000, 7));
    s.origin.set_throttle(Some(1_000_000)); // 3 s
    let mut lp = node_in(driver, dir, &s, "");
    let addr = lp.addr;
    let req = tokio::spawn(async move { chat(addr, "acme/big").await });
    let tmp = lp.path("store/.loraplex-tmp");
    eventually("the fetch to be writing", || {
        std::fs::read_dir(&tmp)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lp.child.kill().unwrap();
    let _ = lp.child.wait();
    let _ = req.await;
    assert!(
        !lp.path("store/acme/big").exists(),
        "no partial adapter where vLLM looks"
    );
    s.origin.set_throttle(None);
    let dir = std::mem::replace(&mut lp.dir, tempfile::tempdir().unwrap());
    drop(lp);
    let lp = node_in(driver, dir, &s, "");
    let leftovers: Vec<_> = std::fs::read_dir(lp.path("store/.loraplex-tmp"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    assert_eq!(chat(lp.addr, "acme/big").await.status, 200);
    assert!(s.vllm.faults().is_empty());
}

async fn admin_api_and_traversal_names(driver: Driver) {
    let (lp, s) = start(driver, "");
    s.origin.put_adapter("acme/w1", &spec(100_000, 8));
    let outside = lp.path("outside.txt");
    std::fs::write(&outside, "keep me").unwrap();
    let warm = admin(
        lp.addr,
        "POST",
        "/admin/cache/warmup",
        r#"{"adapters":["acme/w1","acme/none","../x"]}"#,
    )
    .await
    .json();
    let results = warm["results"].as_array().unwrap();
    assert_eq!(results[0], json!({"adapter": "acme/w1", "status": "ok"}));
    assert!(results[1]["status"].as_str().unwrap().starts_with("error"));
    assert!(results[2]["status"].as_str().unwrap().starts_with("error"));
    let stats = admin(lp.addr, "GET", "/admin/cache/stats", "").await.json();
    assert_eq!(stats["items"], 1);
    assert!(stats["size"].as_u64().unwrap() > 100_000);
    assert_eq!(stats["max_size"], 1u64 << 30);
    for bad in [
        ".",
        "..",
        "acme/..",
        "../outside.txt",
        "/etc",
        "",
        "acme//w1",
    ] {
        let r = admin(
            lp.addr,
            "POST",
            "/admin/cache/evict",
            &json!({"adapter": bad}).to_string(),
        )
        .await;
        assert_eq!(r.status, 400, "{bad:?}");
    }
    assert!(outside.exists() && lp.path("store/acme/w1").exists());
    assert_eq!(chat(lp.addr, "acme/w1").await.status, 200); // loaded in vLLM
    let r = admin(
        lp.addr,
        "POST",
        "/admin/cache/evict",
        r#"{"adapter":"acme/w1"}"#,
    )
    .await
    .json();
    assert_eq!(r["status"], "evicted");
    assert_eq!(r["evicted"], true);
    assert!(!lp.path("store/acme/w1").exists());
    eventually("vLLM to unload", || s.vllm.unloads("acme/w1") == 1).await;
    let f = admin(lp.addr, "GET", "/admin/cache/fetches", "")
        .await
        .json();
    assert_eq!(f["fetches"], json!([]));
    // Traversal in the request's model is refused before anything touches the disk.
    for bad in ["../outside", "acme/../../x", "./x"] {
        assert_eq!(chat(lp.addr, bad).await.status, 400, "{bad}");
    }
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
}

async fn an_update_at_the_origin_reaches_vllm_after_the_ttl(driver: Driver) {
    let (lp, s) = start(driver, "invalidation:\n  ttl: 1s\n");
    s.origin.put_adapter("acme/live", &spec(100_000, 20));
    assert_eq!(chat(lp.addr, "acme/live").await.status, 200);
    let old = s.vllm.loaded_hash("acme/live").unwrap();
    s.origin.put_adapter("acme/live", &spec(100_000, 21));
    let new = xxhash_rust::xxh3::xxh3_64(&s.origin.file("acme/live", SAFETENSORS_FILE).unwrap());
    assert_ne!(old, new);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Past the TTL: served from the stored copy at once, refreshed in the background.
    let started = Instant::now();
    let mut seen_new = false;
    while started.elapsed() < Duration::from_secs(15) {
        assert_eq!(chat(lp.addr, "acme/live").await.status, 200);
        if s.vllm.loaded_hash("acme/live") == Some(new) {
            seen_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_new, "vLLM never loaded the new weights");
    assert!(
        s.vllm.unloads("acme/live") >= 1,
        "vLLM was told to drop the old copy"
    );
    assert_eq!(weights_hash(&lp, "acme/live"), new);
}

on_both_drivers!(
    cold_fetch_then_warm_hits_reach_vllm_with_whole_files,
    two_hundred_concurrent_cold_requests_make_one_download,
    unknown_adapter_is_vllms_404_and_bad_ones_are_502_with_nothing_published,
    fallback_rewrites_model_to_the_base_and_says_so,
    eviction_spares_adapters_in_flight_and_tells_vllm_to_unload,
    an_adapter_larger_than_the_budget_is_507_with_nothing_written,
    restart_rebuilds_from_disk_without_refetching,
    kill_9_mid_fetch_leaves_nothing_partial_and_the_restart_cleans_up,
    admin_api_and_traversal_names,
    an_update_at_the_origin_reaches_vllm_after_the_ttl,
);
