//! What a client gets when its adapter cannot be had, through the real binary: a download
//! slower than `storage.fetch_wait_timeout` is a 504 for the waiting requests while it goes on
//! for the later ones; with `routing.fallback_to_base_model` the base model answers instead of
//! a 502 (origin failure), a 507 (no room) or that 504, with `model` rewritten and
//! `x-loraplex-fallback: base-model`. An eviction tells vLLM to unload once and counts it once.
//! Every case runs under both io drivers.

mod common;

use std::time::{Duration, Instant};

use common::{
    Driver, RawResponse, chat_with as chat,
    store::{BASE, http_origin, metrics, node, request, spec, stand_ins},
};
use loraplex::testkit::{
    adapters::SAFETENSORS_FILE,
    origin::{Fault, FaultKind, OriginConfig, OriginStandIn},
};

/// The weights of `name` trickle at 100 kB/s for the next `times` downloads.
fn trickle(origin: &OriginStandIn, name: &str, times: u64) {
    let weights = format!("{name}/{SAFETENSORS_FILE}");
    origin.inject(
        Fault::new(FaultKind::Throttle(100_000))
            .on(weights)
            .times(times),
    );
}

fn assert_timeout(r: &RawResponse) {
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    let e = &r.json()["error"];
    assert_eq!(e["type"], "GatewayTimeoutError");
    assert_eq!(e["param"], "model");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("storage.fetch_wait_timeout"), "{msg}");
}

async fn a_slow_download_is_a_504_for_its_waiters_and_goes_on(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/slow", &spec(800_000, 1)); // 8 s at 100 kB/s
    trickle(&origin, "acme/slow", 1);
    let extra = "storage:\n  fetch_wait_timeout: 1s\n";
    let lp = node(driver, dir, &vllm, &http_origin(&origin), extra);

    // Two clients wait; each gets its 504 after the timeout, not after the download.
    let started = Instant::now();
    let waiting: Vec<_> = (0..2)
        .map(|_| tokio::spawn(chat(lp.addr, "acme/slow")))
        .collect();
    for w in waiting {
        assert_timeout(&w.await.unwrap());
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    let fetches = request(lp.addr, "GET", "/admin/cache/fetches", "")
        .await
        .json();
    assert_eq!(fetches["fetches"][0]["adapter"], "acme/slow", "{fetches}");

    // The download goes on: a later request gets the adapter from it, downloaded once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = chat(lp.addr, "acme/slow").await;
        if r.status == 200 {
            break;
        }
        assert_timeout(&r);
        assert!(Instant::now() < deadline, "the download never finished");
    }
    assert_eq!(origin.gets(&format!("acme/slow/{SAFETENSORS_FILE}")), 1);
    assert_eq!(vllm.served("acme/slow"), 1);
    assert!(vllm.faults().is_empty(), "{:?}", vllm.faults());
}

async fn the_base_model_answers_for_a_502_a_507_and_a_504_with_fallback(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/broken", &spec(100_000, 2));
    let mut failing =
        Fault::new(FaultKind::Status(500)).on(format!("acme/broken/{SAFETENSORS_FILE}"));
    failing.times = None;
    origin.inject(failing);
    origin.put_adapter("acme/huge", &spec(2_000_000, 3));
    origin.put_adapter("acme/slow", &spec(800_000, 4));
    trickle(&origin, "acme/slow", 2);
    let origins = format!("{}    retries: 0\n", http_origin(&origin));
    let storage = "storage:\n  max_size: 1MB\n  fetch_wait_timeout: 1s\n";
    let cases = [("acme/broken", 502), ("acme/huge", 507), ("acme/slow", 504)];

    // Without the fallback, the client sees why.
    let plain = node(
        driver,
        tempfile::tempdir().unwrap(),
        &vllm,
        &origins,
        storage,
    );
    for (name, status) in cases {
        let r = chat(plain.addr, name).await;
        assert_eq!(
            r.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.header("x-loraplex-fallback").is_none());
    }
    assert_eq!(vllm.served(BASE), 0);

    // With it, the base model answers each, and vLLM never sees the adapter's name.
    let extra = format!("{storage}routing:\n  fallback_to_base_model: true\n");
    let lp = node(driver, dir, &vllm, &origins, &extra);
    for (i, (name, _)) in cases.into_iter().enumerate() {
        let r = chat(lp.addr, name).await;
        assert_eq!(
            r.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.header("x-loraplex-fallback").as_deref(),
            Some("base-model")
        );
        assert_eq!(r.json()["model"], BASE, "{name}: `model` rewritten");
        assert_eq!(vllm.served(BASE), i as u64 + 1);
        assert_eq!(vllm.requests(name), 0, "{name}");
    }
}

async fn an_eviction_unloads_once_and_counts_once(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/u", &spec(100_000, 5));
    let lp = node(driver, dir, &vllm, &http_origin(&origin), "");
    assert_eq!(chat(lp.addr, "acme/u").await.status, 200);
    let r = request(
        lp.addr,
        "POST",
        "/admin/cache/evict",
        r#"{"adapter":"acme/u"}"#,
    )
    .await;
    assert_eq!(r.json()["evicted"], true);
    // Counted at the end of the eviction, after the unload.
    let evicted = "loraplex_cache_evictions_total{tier=\"local\"} 1";
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = metrics(lp.addr).await;
        if text.contains(evicted) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the eviction never finished: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(vllm.unloads("acme/u"), 1);
    let unloads: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("loraplex_vllm_unloads_total{"))
        .collect();
    assert_eq!(
        unloads,
        ["loraplex_vllm_unloads_total{result=\"ok\"} 1"],
        "{text}"
    );
}

/// A warm-up waits for its downloads at most `storage.fetch_wait_timeout`, as a request does:
/// past it, a 504 in OpenAI's shape naming the key, while the download goes on (a later
/// warm-up finds it stored, downloaded once).
async fn a_slow_warm_up_is_a_504_and_its_download_goes_on(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/slow-warm", &spec(800_000, 6)); // 8 s at 100 kB/s
    trickle(&origin, "acme/slow-warm", 1);
    let extra = "storage:\n  fetch_wait_timeout: 1s\n";
    let lp = node(driver, dir, &vllm, &http_origin(&origin), extra);
    let warm = r#"{"adapters": ["acme/slow-warm"], "load": true}"#;

    let r = request(lp.addr, "POST", "/admin/cache/warmup", warm).await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    let e = &r.json()["error"];
    assert_eq!(e["type"], "GatewayTimeoutError", "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("storage.fetch_wait_timeout") && msg.contains("acme/slow-warm"),
        "{msg}"
    );
    let fetches = request(lp.addr, "GET", "/admin/cache/fetches", "")
        .await
        .json();
    assert_eq!(
        fetches["fetches"][0]["adapter"], "acme/slow-warm",
        "{fetches}"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let r = request(lp.addr, "POST", "/admin/cache/warmup", warm).await;
        if r.status == 200 {
            break r.json();
        }
        assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
        assert!(Instant::now() < deadline, "the download never finished");
    };
    assert_eq!(answer["results"][0]["status"], "ok", "{answer}");
    assert_eq!(answer["results"][0]["loaded"], true, "{answer}");
    assert_eq!(
        origin.gets(&format!("acme/slow-warm/{SAFETENSORS_FILE}")),
        1
    );
}

on_both_drivers!(
    a_slow_warm_up_is_a_504_and_its_download_goes_on,
    a_slow_download_is_a_504_for_its_waiters_and_goes_on,
    the_base_model_answers_for_a_502_a_507_and_a_504_with_fallback,
    an_eviction_unloads_once_and_counts_once,
);
