//! loraplex in front of a vLLM as strict as the real one: served names apart from `--model`
//! (several of them), a vLLM that comes back serving another model, and idle keep-alive
//! connections that vLLM's server closes after 5 s. The real binary over real sockets; every
//! case runs under both io drivers (`io_uring::case`, `epoll::case`).

mod common;

use std::time::{Duration, Instant};

use common::{Driver, Node, Raw, chat_with, post};
use loraplex::testkit::{
    adapters::{AdapterSpec, CONFIG_FILE},
    origin::{OriginConfig, OriginStandIn},
    vllm::{KEEP_ALIVE_TIMEOUT, VllmConfig, VllmStandIn},
};
use serde_json::Value;

/// vLLM's `--model` and `--served-model-name`s.
const MODEL: &str = "/models/tiny-base";
const SERVED: [&str; 2] = ["tiny", "tiny-chat"];

/// A node in front of `vllm` (reading the node's store) with an http origin; no
/// `vllm.model_name`: the base model is learnt.
fn node(
    driver: Driver,
    dir: tempfile::TempDir,
    vllm: &VllmStandIn,
    origin: &OriginStandIn,
) -> Node {
    let yaml = format!(
        "vllm_url: \"{}\"\nvllm:\n  health_check_interval: 100ms\norigins:\n  - type: http\n    \
         base_url: \"{}\"\nstorage:\n  dir: \"{{DIR}}/store\"\n  rewrite_base_model: true\n",
        vllm.url(),
        origin.base_url(),
    );
    let node = Node::start_in(dir, &driver.config(&yaml), &[]);
    node.assert_driver(driver);
    node
}

fn store_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    (dir, store)
}

async fn get_status(node: &Node, path: &str) -> u16 {
    let mut c = Raw::connect(node.addr).await;
    c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await;
    c.response(false).await.status
}

async fn wait_ready(node: &Node, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while get_status(node, "/readyz").await != want {
        assert!(Instant::now() < deadline, "/readyz never answered {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stored_base(node: &Node, name: &str) -> Value {
    let text = std::fs::read(node.path("store").join(name).join(CONFIG_FILE)).unwrap();
    serde_json::from_slice::<Value>(&text).unwrap()["base_model_name_or_path"].clone()
}

async fn every_served_name_is_the_base_model_and_adapters_name_the_model_path(driver: Driver) {
    let (dir, store) = store_dir();
    let vllm = VllmStandIn::start(
        VllmConfig::new(MODEL)
            .served_model_names(SERVED)
            .lora_dir(&store),
    )
    .unwrap();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let lp = node(driver, dir, &vllm, &origin);
    wait_ready(&lp, 200).await;
    for name in SERVED {
        let r = chat_with(lp.addr, name).await;
        assert_eq!(
            r.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            vllm.served(name),
            1,
            "{name} went to vLLM as the base model"
        );
        assert_eq!(
            origin.adapter_gets(name),
            0,
            "{name} was taken for an adapter"
        );
    }
    // An adapter trained on another copy of the base: rewritten to `--model`, which vLLM's
    // resolver compares it with (not a served name).
    origin.put_adapter("acme/sum", &AdapterSpec::new("org/tiny-base", 20_000, 1));
    let r = chat_with(lp.addr, "acme/sum").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(stored_base(&lp, "acme/sum"), MODEL);
    assert_eq!(vllm.served("acme/sum"), 1);
}

async fn a_vllm_that_comes_back_serving_another_model_is_learnt_again(driver: Driver) {
    let (dir, store) = store_dir();
    let first = VllmStandIn::start(
        VllmConfig::new("/models/one")
            .served_model_names(["one"])
            .lora_dir(&store),
    )
    .unwrap();
    let addr = first.addr();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let lp = node(driver, dir, &first, &origin);
    wait_ready(&lp, 200).await;
    assert_eq!(chat_with(lp.addr, "one").await.status, 200);
    assert_eq!(first.served("one"), 1);

    first.shutdown().await;
    wait_ready(&lp, 503).await;
    let second = VllmStandIn::start(
        VllmConfig::new("/models/two")
            .served_model_names(["two"])
            .lora_dir(&store)
            .bind(addr),
    )
    .unwrap();
    wait_ready(&lp, 200).await;
    let r = chat_with(lp.addr, "two").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(second.served("two"), 1);
    assert_eq!(origin.adapter_gets("two"), 0);
    origin.put_adapter("acme/new", &AdapterSpec::new("org/two", 20_000, 2));
    let r = chat_with(lp.addr, "acme/new").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(stored_base(&lp, "acme/new"), "/models/two");
}

/// A node in front of `vllm` that probes it once (at start) and not again during the test, so
/// the probe's connection stays out of the counts.
fn node_for(driver: Driver, vllm: &VllmStandIn) -> Node {
    Node::start_on(
        driver,
        &format!(
            "vllm_url: \"{}\"\nvllm:\n  model_name: \"{MODEL}\"\n  health_check_interval: 1h\n",
            vllm.url()
        ),
    )
}

async fn a_request_after_vllm_closed_the_idle_pooled_connection_succeeds(driver: Driver) {
    let vllm = VllmStandIn::start(VllmConfig::new(MODEL)).unwrap();
    let lp = node_for(driver, &vllm);
    // The first health check (and its connection) done before counting connections.
    wait_ready(&lp, 200).await;
    // One client connection, so both requests use the same worker and its pool.
    let mut c = Raw::connect(lp.addr).await;
    let body = format!(r#"{{"model":"{MODEL}","messages":[]}}"#);
    c.send(&post("/v1/chat/completions", &body, "")).await;
    assert_eq!(c.response(false).await.status, 200);
    let connections = vllm.connections();
    // vLLM closes the pooled connection once it has been idle for 5 s.
    tokio::time::sleep(KEEP_ALIVE_TIMEOUT + Duration::from_millis(500)).await;
    c.send(&post("/v1/chat/completions", &body, "")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(vllm.served(MODEL), 2);
    assert_eq!(vllm.connections(), connections + 1, "a fresh connection");
}

/// A connection pooled a moment ago is reused without a peek (`PEEK_AFTER`); one the upstream
/// closed in that moment fails before any byte, and the request goes once more on a fresh
/// connection: served once, never lost, never twice. (If the machine is slow enough that the
/// pause outlasts `PEEK_AFTER`, the peek path runs instead; the assertions are the same.)
async fn a_request_on_a_young_pooled_connection_vllm_closed_is_served_once(driver: Driver) {
    let vllm = VllmStandIn::start(
        VllmConfig::new(MODEL).keep_alive_timeout(Some(Duration::from_millis(5))),
    )
    .unwrap();
    let lp = node_for(driver, &vllm);
    wait_ready(&lp, 200).await;
    let mut c = Raw::connect(lp.addr).await;
    let body = format!(r#"{{"model":"{MODEL}","messages":[]}}"#);
    for i in 1..=5 {
        c.send(&post("/v1/chat/completions", &body, "")).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(vllm.served(MODEL), i, "each request served exactly once");
        // Past vLLM's keep-alive (5 ms), well within loraplex's PEEK_AFTER (100 ms).
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

on_both_drivers!(
    every_served_name_is_the_base_model_and_adapters_name_the_model_path,
    a_vllm_that_comes_back_serving_another_model_is_learnt_again,
    a_request_after_vllm_closed_the_idle_pooled_connection_succeeds,
    a_request_on_a_young_pooled_connection_vllm_closed_is_served_once,
);
