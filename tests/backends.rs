//! A node fronting several vLLMs (`vllm_urls`), through the real binary and stand-in vLLMs:
//! requests for a base model land only on the backends serving it; backends share the node's
//! one store (one download, loaded into each); an eviction unloads from every backend and
//! counts each; the node stays healthy and ready while one backend is; a base model only a
//! peer's backend serves is forwarded there; `vllm_url` and `vllm_urls` together are refused. Proxy-level cases run under both io drivers.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{
    Driver, chat_with as chat,
    cluster::{Cluster, Spec},
    store::{metrics, request},
};
use loraplex::testkit::{
    adapters::{AdapterSpec, SAFETENSORS_FILE},
    origin::{OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmStandIn},
};

const M1: &str = "model-one";
/// Backend 2's `--model`; it serves it as [`M2`] and [`M2_ALIAS`].
const M2_ROOT: &str = "/models/two";
const M2: &str = "model-two";
const M2_ALIAS: &str = "two-alias";

/// Backends 0 and 1 serve M1, backend 2 serves M2 under two names.
fn mixed(_: usize) -> Vec<VllmConfig> {
    vec![
        VllmConfig::new(M1),
        VllmConfig::new(M1),
        VllmConfig::new(M2_ROOT).served_model_names([M2, M2_ALIAS]),
    ]
}

/// Two backends of M1.
fn pair(_: usize) -> Vec<VllmConfig> {
    vec![VllmConfig::new(M1), VllmConfig::new(M1)]
}

async fn one_node(
    driver: Driver,
    backends: &dyn Fn(usize) -> Vec<VllmConfig>,
    extra: &str,
) -> Cluster {
    one_node_with(driver, backends, extra, None).await
}

async fn one_node_with(
    driver: Driver,
    backends: &dyn Fn(usize) -> Vec<VllmConfig>,
    extra: &str,
    origin: Option<&OriginStandIn>,
) -> Cluster {
    let spec = Spec {
        backends: Some(backends),
        extra: extra.to_owned(),
        origin,
        ..Spec::new(1)
    };
    let c = Cluster::start(driver, spec).await;
    c.node(0).wait_ready().await;
    c
}

/// Wait until `cond` holds of the node's `/metrics` text.
async fn metrics_until(c: &Cluster, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = metrics(c.node(0).addr).await;
        if cond(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn backend_series(metric: &str, v: &VllmStandIn, base: &str) -> String {
    format!("{metric}{{backend=\"{}\",base_model=\"{base}\"}}", v.url())
}

async fn base_requests_go_only_to_backends_serving_their_model(driver: Driver) {
    let c = one_node(driver, &mixed, "").await;
    let [b0, b1, b2] = [c.backend(0, 0), c.backend(0, 1), c.backend(0, 2)];
    for _ in 0..20 {
        let r = chat(c.node(0).addr, M1).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    for name in [M2, M2, M2, M2_ALIAS, M2_ALIAS] {
        let r = chat(c.node(0).addr, name).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    // M1 over its two backends, both used; none on M2's.
    assert_eq!(b0.requests(M1) + b1.requests(M1), 20);
    assert!(
        b0.requests(M1) > 0 && b1.requests(M1) > 0,
        "equal backends share"
    );
    assert_eq!(b2.requests(M1), 0);
    // M2 by either name on its backend only.
    assert_eq!((b2.requests(M2), b2.requests(M2_ALIAS)), (3, 2));
    for b in [b0, b1] {
        assert_eq!(b.requests(M2) + b.requests(M2_ALIAS), 0);
    }
    // /admin/peers lists the node's backends with their base-model names (root first).
    let peers = c.admin_peers(c.node(0)).await;
    let backends = &peers["peers"][0]["backends"];
    assert_eq!(backends.as_array().unwrap().len(), 3, "{peers}");
    assert_eq!(backends[0]["url"], b0.url());
    assert_eq!(backends[0]["models"], serde_json::json!([M1]));
    assert_eq!(backends[2]["url"], b2.url());
    assert_eq!(
        backends[2]["models"],
        serde_json::json!([M2_ROOT, M2, M2_ALIAS])
    );
    assert_eq!(backends[2]["healthy"], true);
    // Per-backend series carry the backend's URL and its base model's first served name.
    let text = metrics_until(&c, "per-backend gauges", |t| {
        t.contains(&backend_series(
            "loraplex_vllm_backend_requests_waiting",
            b2,
            M2,
        ))
    })
    .await;
    for (b, base) in [(b0, M1), (b1, M1), (b2, M2)] {
        let healthy = format!(
            "{} 1",
            backend_series("loraplex_vllm_backend_healthy", b, base)
        );
        assert!(text.contains(&healthy), "{healthy}\n{text}");
    }
}

async fn backends_share_one_download_and_an_eviction_unloads_from_each(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/one", &AdapterSpec::new(M1, 100_000, 3));
    let c = one_node_with(driver, &pair, "", Some(&origin)).await;
    let (b0, b1) = (c.backend(0, 0), c.backend(0, 1));
    let addr = c.node(0).addr;
    // A warm-up with `load` fetches once and loads into both backends, from the one store.
    let warm = request(
        addr,
        "POST",
        "/admin/cache/warmup",
        r#"{"adapters":["acme/one"],"load":true}"#,
    )
    .await
    .json();
    assert_eq!(warm["results"][0]["loaded"], true, "{warm}");
    assert_eq!(
        warm["results"][0]["loaded_on"],
        serde_json::json!([b0.url(), b1.url()])
    );
    assert_eq!((b0.loads("acme/one"), b1.loads("acme/one")), (1, 1));
    assert_eq!(b0.loaded()[0].path, b1.loaded()[0].path, "the one store");
    assert_eq!(b0.loaded()[0].weights_hash, b1.loaded()[0].weights_hash);
    for _ in 0..6 {
        assert_eq!(chat(addr, "acme/one").await.status, 200);
    }
    assert_eq!(b0.requests("acme/one") + b1.requests("acme/one"), 6);
    let weights = format!("acme/one/{SAFETENSORS_FILE}");
    assert_eq!(origin.gets(&weights), 1, "one download for both");
    assert!(c.stores(0, "acme/one"));

    let r = request(
        addr,
        "POST",
        "/admin/cache/evict",
        r#"{"adapter":"acme/one"}"#,
    )
    .await;
    assert_eq!(r.json()["evicted"], true);
    let evicted = "loraplex_cache_evictions_total{tier=\"local\"} 1";
    let text = metrics_until(&c, "the eviction never finished", |t| t.contains(evicted)).await;
    assert_eq!((b0.unloads("acme/one"), b1.unloads("acme/one")), (1, 1));
    assert!(
        text.contains("loraplex_vllm_unloads_total{result=\"ok\"} 2"),
        "one unload per backend: {text}"
    );
    for b in [b0, b1] {
        let series = format!(
            "{} 1",
            backend_series("loraplex_vllm_backend_unloads_total", b, M1)
        );
        assert!(text.contains(&series), "{series}\n{text}");
    }
    assert!(!c.stores(0, "acme/one"));
}

async fn the_node_is_healthy_and_ready_while_one_backend_is(driver: Driver) {
    let c = one_node(driver, &mixed, "").await;
    let addr = c.node(0).addr;
    let [b0, b1, b2] = [c.backend(0, 0), c.backend(0, 1), c.backend(0, 2)];
    b2.set_healthy(false);
    let down = format!(
        "{} 0",
        backend_series("loraplex_vllm_backend_healthy", b2, M2)
    );
    let text = metrics_until(&c, "backend 2 never seen down", |t| t.contains(&down)).await;
    assert!(text.contains("loraplex_vllm_healthy 1"), "{text}");
    let healthz = request(addr, "GET", "/healthz", "").await.json();
    assert_eq!(healthz["vllm_healthy"], true, "{healthz}");
    assert_eq!(healthz["status"], "ok");
    let readyz = request(addr, "GET", "/readyz", "").await;
    assert_eq!(readyz.status, 200);
    // M1 is still served.
    assert_eq!(chat(addr, M1).await.status, 200);

    for b in [b0, b1] {
        b.set_healthy(false);
    }
    metrics_until(&c, "the node never went unhealthy", |t| {
        t.contains("loraplex_vllm_healthy 0")
    })
    .await;
    let healthz = request(addr, "GET", "/healthz", "").await.json();
    assert_eq!(healthz["vllm_healthy"], false, "{healthz}");
    assert_eq!(healthz["status"], "degraded");
    let readyz = request(addr, "GET", "/readyz", "").await;
    assert_eq!(readyz.status, 503);
    assert_eq!(readyz.json()["vllm_healthy"], false);
    // One back: ready again.
    b1.set_healthy(true);
    c.node(0).wait_ready().await;
    let healthz = request(addr, "GET", "/healthz", "").await.json();
    assert_eq!(healthz["vllm_healthy"], true, "{healthz}");
    assert!(metrics(addr).await.contains("loraplex_vllm_healthy 1"));
}

/// Node 0: two vLLMs of M1; node 1: one of M1, one of M2.
fn two_nodes(i: usize) -> Vec<VllmConfig> {
    match i {
        0 => vec![VllmConfig::new(M1), VllmConfig::new(M1)],
        _ => vec![
            VllmConfig::new(M1),
            VllmConfig::new(M2_ROOT).served_model_names([M2]),
        ],
    }
}

async fn a_base_model_only_a_peer_serves_is_forwarded_to_its_backend(driver: Driver) {
    let spec = Spec {
        backends: Some(&two_nodes),
        ..Spec::new(2)
    };
    let c = Cluster::start(driver, spec).await;
    for i in 0..2 {
        c.node(i).wait_ready().await;
    }
    for _ in 0..4 {
        let r = chat(c.node(0).addr, M2).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(c.backend(1, 1).requests(M2), 4);
    for (i, j) in [(0, 0), (0, 1), (1, 0)] {
        assert_eq!(c.backend(i, j).requests(M2), 0, "backend {j} of node {i}");
    }
    // M1 entering node 0 stays there (a local backend needs no hop).
    for _ in 0..6 {
        assert_eq!(chat(c.node(0).addr, M1).await.status, 200);
    }
    assert_eq!(
        c.backend(0, 0).requests(M1) + c.backend(0, 1).requests(M1),
        6
    );
    // Node 0 sees node 1's backends and their base models.
    let peers = c.admin_peers(c.node(0)).await;
    let node1 = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == c.peers[1])
        .unwrap();
    assert_eq!(
        node1["backends"][1]["models"],
        serde_json::json!([M2_ROOT, M2])
    );
}

/// `loraplex check-config` of `yaml`: (success, stdout, stderr).
fn check_config(yaml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loraplex"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vllm_url_and_vllm_urls_together_are_a_config_error() {
    let (ok, _, stderr) =
        check_config("vllm_url: http://127.0.0.1:8000\nvllm_urls: [\"http://127.0.0.1:8001\"]\n");
    assert!(!ok);
    assert!(
        stderr.contains("vllm_urls: vllm_url and vllm_urls are both set"),
        "{stderr}"
    );
    let (ok, stdout, stderr) =
        check_config("vllm_urls: [\"http://127.0.0.1:8001\", \"http://127.0.0.1:8002/\"]\n");
    assert!(ok, "{stderr}");
    let printed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&stdout).unwrap();
    assert_eq!(
        printed["vllm_urls"],
        serde_yaml_ng::to_value(["http://127.0.0.1:8001", "http://127.0.0.1:8002"]).unwrap(),
        "check-config shows the backends: {stdout}"
    );
    assert!(printed.get("vllm_url").is_none(), "{stdout}");
}

/// A warm-up with `load` learns each adapter's base model first: it loads an M2 adapter only
/// into the backend serving M2, and refuses an adapter whose base no backend serves with the
/// message a request gets, downloading nothing for it.
async fn a_warm_up_loads_only_into_backends_of_the_adapters_base(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/two", &AdapterSpec::new(M2_ROOT, 100_000, 4));
    origin.put_adapter("acme/three", &AdapterSpec::new("model-three", 100_000, 5));
    let c = one_node_with(driver, &mixed, "", Some(&origin)).await;
    let [b0, b1, b2] = [c.backend(0, 0), c.backend(0, 1), c.backend(0, 2)];
    let warm = request(
        c.node(0).addr,
        "POST",
        "/admin/cache/warmup",
        r#"{"adapters":["acme/three","acme/two"],"load":true}"#,
    )
    .await
    .json();
    let [three, two] = [&warm["results"][0], &warm["results"][1]];
    assert_eq!(two["adapter"], "acme/two", "{warm}");
    assert_eq!(two["status"], "ok", "{warm}");
    assert_eq!(two["loaded_on"], serde_json::json!([b2.url()]), "{warm}");
    let loads = [b0, b1, b2].map(|b| b.loads("acme/two"));
    assert_eq!(loads, [0, 0, 1], "only M2's backend");
    assert_eq!(three["adapter"], "acme/three", "{warm}");
    let status = three["status"].as_str().unwrap();
    assert!(
        status.starts_with("error: ")
            && status.contains("needs base model model-three")
            && status.contains("served base models: model-one, model-two, two-alias"),
        "{warm}"
    );
    assert_eq!(origin.gets(&format!("acme/three/{SAFETENSORS_FILE}")), 0);
    assert!(!c.stores(0, "acme/three"));
}

/// `storage.preload` learns each adapter's base model first: an M2 adapter is loaded only into
/// the backend serving M2; one whose base no backend serves is skipped (not downloaded) and
/// its status says why.
async fn a_preload_loads_only_into_backends_of_the_adapters_base(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/two", &AdapterSpec::new(M2_ROOT, 100_000, 6));
    origin.put_adapter("acme/three", &AdapterSpec::new("model-three", 100_000, 7));
    let extra = "storage:\n  dir: \"{DIR}/store\"\n  preload: [\"acme/three\", \"acme/two\"]\n";
    let c = one_node_with(driver, &mixed, extra, Some(&origin)).await;
    let [b0, b1, b2] = [c.backend(0, 0), c.backend(0, 1), c.backend(0, 2)];
    // Ready once every preload attempt finished.
    let stats = request(c.node(0).addr, "GET", "/admin/cache/stats", "")
        .await
        .json();
    assert_eq!(stats["preload"]["acme/two"], "loaded", "{stats}");
    let loads = [b0, b1, b2].map(|b| b.loads("acme/two"));
    assert_eq!(loads, [0, 0, 1], "only M2's backend");
    let three = stats["preload"]["acme/three"].as_str().unwrap_or_default();
    assert!(
        three.contains("skipped") && three.contains("model-three"),
        "{stats}"
    );
    assert_eq!(origin.gets(&format!("acme/three/{SAFETENSORS_FILE}")), 0);
    assert!(!c.stores(0, "acme/three"));
}

on_both_drivers!(
    a_preload_loads_only_into_backends_of_the_adapters_base,
    a_warm_up_loads_only_into_backends_of_the_adapters_base,
    base_requests_go_only_to_backends_serving_their_model,
    backends_share_one_download_and_an_eviction_unloads_from_each,
    the_node_is_healthy_and_ready_while_one_backend_is,
    a_base_model_only_a_peer_serves_is_forwarded_to_its_backend,
);
