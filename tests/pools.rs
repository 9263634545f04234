//! Base-model pools across a cluster, through the real binary, stand-in vLLMs and a stand-in
//! HTTP origin: two nodes, three backends (node A: two vLLMs of M1; node B: one of M1, one of
//! M2). Requests for M1, M2 and their adapters land only on backends of their base model; an M2
//! request or adapter entering node A is forwarded to B; a model no backend serves is a 404, an
//! adapter whose base model nobody serves a 400; an adapter's base model is read from the origin
//! once for the whole cluster; `GET /v1/models` on either node lists both base models and the
//! stored adapters with their parent.

mod common;

use std::sync::Arc;

use common::{
    Driver, chat_with as chat,
    cluster::{Cluster, Spec},
    s3::{S3Server, credentials},
    store::request,
    until,
};
use loraplex::{
    adapter::AdapterName,
    config::TransferConfig,
    control::Control,
    origin::{
        Origin, OriginChain,
        base::{Base, BaseModels},
        huggingface::HuggingFace,
        s3::{S3, S3Settings},
    },
    testkit::{
        adapters::{AdapterSpec, CONFIG_FILE, SAFETENSORS_FILE, adapter_files},
        hub::{CdnHost, HubFile, StandInHub},
        origin::{OriginConfig, OriginStandIn},
        vllm::VllmConfig,
    },
};
use serde_json::Value;

const M1: &str = "model-one";
const M2: &str = "model-two";
const A: usize = 0;
const B: usize = 1;

/// Node A: two vLLMs of M1; node B: M1, then M2.
fn backends(node: usize) -> Vec<VllmConfig> {
    match node {
        A => vec![VllmConfig::new(M1), VllmConfig::new(M1)],
        _ => vec![VllmConfig::new(M1), VllmConfig::new(M2)],
    }
}

/// An origin with an adapter of M1, one of M2 and one of a base model no backend serves.
fn three_adapters() -> OriginStandIn {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/one-lora", &AdapterSpec::new(M1, 60_000, 1));
    origin.put_adapter("acme/two-lora", &AdapterSpec::new(M2, 60_000, 2));
    origin.put_adapter(
        "acme/three-lora",
        &AdapterSpec::new("model-three", 60_000, 3),
    );
    origin
}

async fn two_pools(driver: Driver, origin: &OriginStandIn) -> Cluster {
    let spec = Spec {
        backends: Some(&backends),
        origin: Some(origin),
        ..Spec::new(2)
    };
    let c = Cluster::start(driver, spec).await;
    for i in [A, B] {
        c.node(i).wait_ready().await;
    }
    c
}

fn body(r: &common::RawResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Requests of `model` each stand-in of the cluster received, as `[[A0, A1], [B0, B1]]`.
fn spread(c: &Cluster, model: &str) -> [[u64; 2]; 2] {
    [A, B].map(|i| [0, 1].map(|j| c.backend(i, j).requests(model)))
}

async fn requests_land_on_backends_of_their_base_model(driver: Driver) {
    let origin = three_adapters();
    let c = two_pools(driver, &origin).await;
    let (a, b) = (c.node(A).addr, c.node(B).addr);

    // Base models: M1 from both entry nodes on M1's three backends only; M2 entering A is
    // forwarded to B's M2 backend.
    for entry in [a, b, a, b, a, b] {
        let r = chat(entry, M1).await;
        assert_eq!(r.status, 200, "{}", body(&r));
        let r = chat(entry, M2).await;
        assert_eq!(r.status, 200, "{}", body(&r));
    }
    let m1 = spread(&c, M1);
    assert_eq!(m1[0][0] + m1[0][1] + m1[1][0], 6, "{m1:?}");
    assert_eq!(m1[1][1], 0, "M2's backend never gets M1: {m1:?}");
    assert_eq!(
        spread(&c, M2),
        [[0, 0], [0, 6]],
        "M2 only on B's second backend"
    );

    // Adapters: each on a backend of its base model, whichever node it enters.
    for entry in [a, b, a, b] {
        for adapter in ["acme/one-lora", "acme/two-lora"] {
            let r = chat(entry, adapter).await;
            assert_eq!(r.status, 200, "{adapter}: {}", body(&r));
        }
    }
    let one = spread(&c, "acme/one-lora");
    assert_eq!(one[0][0] + one[0][1] + one[1][0], 4, "{one:?}");
    assert_eq!(one[1][1], 0, "an M1 adapter never on M2's backend: {one:?}");
    assert_eq!(
        spread(&c, "acme/two-lora"),
        [[0, 0], [0, 4]],
        "an M2 adapter entering A is forwarded to B's M2 backend"
    );
    assert!(c.stores(B, "acme/two-lora") && !c.stores(A, "acme/two-lora"));

    // The adapter's base model was read from the origin once for the cluster: one config GET
    // to learn it (by the name's owner, asked by the other node), one per download.
    for name in ["acme/one-lora", "acme/two-lora"] {
        let downloads = origin.gets(&format!("{name}/{SAFETENSORS_FILE}"));
        assert_eq!(downloads, 1, "{name}");
        assert_eq!(
            origin.gets(&format!("{name}/{CONFIG_FILE}")),
            1 + downloads,
            "{name}: the base model learnt once per cluster"
        );
    }

    // A model no backend serves (and no origin has): vLLM's 404, from either node, routed
    // nowhere.
    for entry in [a, b] {
        let r = chat(entry, "model-three").await;
        assert_eq!(r.status, 404, "{}", body(&r));
        let e = &r.json()["error"];
        assert_eq!(
            e["message"], "The model `model-three` does not exist.",
            "{e}"
        );
        assert_eq!(e["type"], "NotFoundError");
        assert_eq!(e["param"], "model");
    }
    // An adapter whose base model no backend serves: a 400 naming it and the served ones.
    for entry in [a, b] {
        let r = chat(entry, "acme/three-lora").await;
        assert_eq!(r.status, 400, "{}", body(&r));
        let e = &r.json()["error"];
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains("acme/three-lora")
                && msg.contains("needs base model model-three")
                && msg.contains("served base models: model-one, model-two"),
            "{msg}"
        );
        assert_eq!(e["type"], "BadRequestError");
    }
    assert_eq!(
        origin.gets(&format!("acme/three-lora/{SAFETENSORS_FILE}")),
        0
    );
    for i in [A, B] {
        for j in [0, 1] {
            assert_eq!(c.backend(i, j).requests("acme/three-lora"), 0);
            assert_eq!(c.backend(i, j).requests("model-three"), 0);
        }
    }

    // /v1/models on either node: both base models, each stored adapter under its parent.
    for entry in [a, b] {
        let list = request(entry, "GET", "/v1/models", "").await.json();
        assert_eq!(list["object"], "list", "{list}");
        let data = list["data"].as_array().unwrap();
        let parent = |id: &str| -> Option<Value> {
            data.iter()
                .find(|m| m["id"] == id)
                .map(|m| m["parent"].clone())
        };
        assert_eq!(parent(M1), Some(Value::Null), "{list}");
        assert_eq!(parent(M2), Some(Value::Null), "{list}");
        assert_eq!(parent("acme/one-lora"), Some(Value::from(M1)), "{list}");
        assert_eq!(parent("acme/two-lora"), Some(Value::from(M2)), "{list}");
        assert_eq!(data.len(), 4, "each model once: {list}");
        assert!(data.iter().all(|m| m["object"] == "model"), "{list}");
    }
}

/// `storage.rewrite_base_model` with pools: an adapter whose config names its base by another
/// name (a training path) is mapped to M2 by `routing.base_models`, placed on node B's M2 vLLM
/// and its stored config rewritten to that vLLM's `--model` (not B's first vLLM's, M1's), so
/// the M2 vLLM resolves it.
#[tokio::test(flavor = "multi_thread")]
async fn a_rule_places_and_rewrites_an_adapter_naming_another_base() {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter(
        "acme/two-tuned",
        &AdapterSpec::new("/train/m2-ckpt", 60_000, 4),
    );
    let spec = Spec {
        backends: Some(&backends),
        origin: Some(&origin),
        extra: "storage:\n  dir: \"{DIR}/store\"\n  rewrite_base_model: true\nrouting:\n  \
                base_models:\n    \"acme/two-\": \"model-two\"\n"
            .into(),
        ..Spec::new(2)
    };
    let c = Cluster::start(Driver::Epoll, spec).await;
    for i in [A, B] {
        c.node(i).wait_ready().await;
    }
    for entry in [c.node(A).addr, c.node(B).addr] {
        let r = chat(entry, "acme/two-tuned").await;
        assert_eq!(r.status, 200, "{}", body(&r));
    }
    assert_eq!(spread(&c, "acme/two-tuned"), [[0, 0], [0, 2]]);
    let stored = c
        .node(B)
        .path("store")
        .join("acme/two-tuned")
        .join(CONFIG_FILE);
    let config: Value = serde_json::from_slice(&std::fs::read(stored).unwrap()).unwrap();
    assert_eq!(config["base_model_name_or_path"], M2);
    // The rule answered: the origin's config was read only by the download.
    assert_eq!(origin.gets(&format!("acme/two-tuned/{CONFIG_FILE}")), 1);
}

/// The base model of an adapter from each kind of origin (the Hub's file list then the file; an
/// S3 object; the HTTP origin's file), in chain order, and "missing" when none has it.
#[tokio::test(flavor = "multi_thread")]
async fn the_base_model_is_read_from_each_kind_of_origin() {
    let hub = StandInHub::start(None, CdnHost::Other).await.unwrap();
    let files = |spec: &AdapterSpec| -> Vec<HubFile> {
        adapter_files(spec)
            .into_iter()
            .map(|(n, b)| match n {
                SAFETENSORS_FILE => HubFile::lfs(n, b),
                _ => HubFile::small(n, b),
            })
            .collect()
    };
    hub.add_commit(
        "acme/hub-lora",
        &"a".repeat(40),
        &["main"],
        files(&AdapterSpec::new(M1, 10_000, 1)),
    );
    let s3 = S3Server::start(&["loras"]).await;
    for (file, bytes) in adapter_files(&AdapterSpec::new(M2, 10_000, 2)) {
        s3.put_file("loras", &format!("p/acme/s3-lora/{file}"), &bytes);
    }
    let http = OriginStandIn::start(OriginConfig::default()).unwrap();
    http.put_adapter("acme/http-lora", &AdapterSpec::new("/models/m3", 10_000, 3));
    let s3_origin = S3::with_credentials(
        S3Settings {
            bucket: "loras".into(),
            region: Some("us-east-1".into()),
            prefix: "p/".into(),
            endpoint: Some(s3.url.clone()),
        },
        TransferConfig::default(),
        Some(credentials()),
    );
    let http_origin =
        loraplex::origin::http::HttpOrigin::new(&http.base_url(), None, TransferConfig::default())
            .unwrap();
    let chain = OriginChain::new(vec![
        Arc::new(HuggingFace::new(&hub.url(), None, TransferConfig::default()).unwrap())
            as Arc<dyn Origin>,
        Arc::new(s3_origin),
        Arc::new(http_origin),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let bases = BaseModels::new(&[], chain, dir.path().into(), None, Control::current());
    let base_of = |name: &str| {
        let bases = bases.clone();
        let name = AdapterName::parse(name).unwrap();
        async move {
            match bases.lookup(&name, true) {
                Ok(b) => b,
                Err(waiter) => waiter.wait().await,
            }
        }
    };
    assert_eq!(base_of("acme/hub-lora").await, Base::Known(M1.into()));
    assert_eq!(base_of("acme/s3-lora").await, Base::Known(M2.into()));
    assert_eq!(
        base_of("acme/http-lora").await,
        Base::Known("/models/m3".into())
    );
    assert_eq!(base_of("acme/nowhere").await, Base::Missing);
    // The config file alone: no weights read.
    assert_eq!(http.gets(&format!("acme/http-lora/{CONFIG_FILE}")), 1);
    assert_eq!(http.adapter_gets("acme/http-lora"), 1);
    assert_eq!(
        hub.hits(&StandInHub::cdn_path(
            &files(&AdapterSpec::new(M1, 10_000, 1))[1]
        )),
        0
    );
}

/// Backends with `--served-model-name` (one node: `/models/one` served as `one`, `/models/two`
/// served as `two`): the 400 for an adapter whose base nobody serves lists only the names a
/// request can use (vLLM's `id`s), never a `--model` path; an adapter whose config names the
/// `--model` path still lands on that backend (the `root` counts when matching); a base-model
/// request naming the `--model` path gets vLLM's own answer, a 404 in OpenAI's shape.
async fn only_served_names_are_listed_as_served(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/by-path", &AdapterSpec::new("/models/two", 60_000, 1));
    origin.put_adapter(
        "acme/elsewhere",
        &AdapterSpec::new("model-three", 60_000, 2),
    );
    let named = |_: usize| {
        vec![
            VllmConfig::new("/models/one").served_model_names(["one"]),
            VllmConfig::new("/models/two").served_model_names(["two"]),
        ]
    };
    let spec = Spec {
        backends: Some(&named),
        origin: Some(&origin),
        ..Spec::new(1)
    };
    let c = Cluster::start(driver, spec).await;
    c.node(0).wait_ready().await;
    let addr = c.node(0).addr;

    let r = chat(addr, "acme/elsewhere").await;
    assert_eq!(r.status, 400, "{}", body(&r));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.ends_with("served base models: one, two"), "{msg}");
    assert!(
        !msg.contains("/models/"),
        "a --model path is no usable name: {msg}"
    );

    let r = chat(addr, "acme/by-path").await;
    assert_eq!(r.status, 200, "{}", body(&r));
    assert_eq!(c.backend(0, 1).requests("acme/by-path"), 1);
    assert_eq!(c.backend(0, 0).requests("acme/by-path"), 0);

    for (path, name) in [("/models/two", "two"), ("/models/one", "one")] {
        let r = chat(addr, path).await;
        assert_eq!(r.status, 404, "{}", body(&r));
        let e = &r.json()["error"];
        assert_eq!(
            e["message"],
            format!("The model `{path}` does not exist."),
            "{e}"
        );
        assert_eq!(
            (&e["type"], &e["param"]),
            (&"NotFoundError".into(), &"model".into())
        );
        let r = chat(addr, name).await;
        assert_eq!(r.status, 200, "{}", body(&r));
    }
    assert_eq!(origin.gets(&format!("models/two/{SAFETENSORS_FILE}")), 0);
}

/// A warm-up with `load` on a node none of whose vLLMs serves an adapter's base model sends
/// that adapter to the node of its pool (its result comes back with `"node"`), warms the rest
/// here, and refuses one whose base nobody serves, in the request's order. From a peer (the
/// forwarded mark) it is refused instead: a warm-up is sent on once at most.
async fn a_warm_up_with_load_goes_to_a_node_of_the_adapters_pool(driver: Driver) {
    let origin = three_adapters();
    let c = two_pools(driver, &origin).await;
    let warm = r#"{"adapters":["acme/two-lora","acme/three-lora","acme/one-lora"],"load":true}"#;

    // Marked as a peer's: M2's adapter refused on A, nothing sent to B.
    let marked = common::post_json(
        c.node(A).addr,
        "/admin/cache/warmup",
        warm,
        "X-Loraplex-Forwarded: 1\r\n",
    )
    .await
    .json();
    let status = marked["results"][0]["status"].as_str().unwrap();
    assert!(
        status.contains("warm it up on a node of its pool"),
        "{marked}"
    );
    assert!(!c.stores(B, "acme/two-lora"));

    let r = request(c.node(A).addr, "POST", "/admin/cache/warmup", warm).await;
    assert_eq!(r.status, 200, "{}", body(&r));
    let answer = r.json();
    let [two, three, one] = [0, 1, 2].map(|i| answer["results"][i].clone());
    assert_eq!(two["adapter"], "acme/two-lora", "{answer}");
    assert_eq!(two["status"], "ok", "{answer}");
    assert_eq!(two["loaded"], true, "{answer}");
    assert_eq!(two["node"], c.peers[B].as_str(), "{answer}");
    assert_eq!(two["loaded_on"], serde_json::json!([c.backend(B, 1).url()]));
    let loads =
        [(A, 0), (A, 1), (B, 0), (B, 1)].map(|(i, j)| c.backend(i, j).loads("acme/two-lora"));
    assert_eq!(loads, [0, 0, 0, 1], "only into M2's backend, on B");
    assert!(c.stores(B, "acme/two-lora") && !c.stores(A, "acme/two-lora"));

    assert_eq!(three["adapter"], "acme/three-lora", "{answer}");
    let status = three["status"].as_str().unwrap();
    assert!(status.contains("needs base model model-three"), "{answer}");
    assert!(!c.stores(A, "acme/three-lora") && !c.stores(B, "acme/three-lora"));

    assert_eq!(one["adapter"], "acme/one-lora", "{answer}");
    assert_eq!(
        (&one["status"], &one["loaded"]),
        (&"ok".into(), &true.into())
    );
    assert!(one.get("node").is_none(), "warmed here: {answer}");
    let loads =
        [(A, 0), (A, 1), (B, 0), (B, 1)].map(|(i, j)| c.backend(i, j).loads("acme/one-lora"));
    assert_eq!(loads, [1, 1, 0, 0], "into A's own M1 backends");
}

/// A warm-up sent on goes where the adapter's requests go: with the first node of its pool
/// down, to the next node of its order that serves its base model (A: M1 only; B and C: M1 and
/// M2), not to the dead one, which would fail it.
async fn a_warm_up_sent_on_skips_a_down_node_of_the_pool(driver: Driver) {
    let origin = three_adapters();
    let spec = Spec {
        backends: Some(&backends),
        origin: Some(&origin),
        ..Spec::new(3)
    };
    let mut c = Cluster::start(driver, spec).await;
    for i in 0..3 {
        c.node(i).wait_ready().await;
    }
    c.wait_until_all_see_each_other(&[]).await;
    let name = "acme/two-lora";
    let pool: Vec<usize> = c.order_of(name).into_iter().filter(|&i| i != A).collect();
    let (owner, next) = (pool[0], pool[1]);
    c.kill(owner);
    until("A to see the pool's owner down", 30, || async {
        let peers = c.admin_peers(c.node(A)).await;
        let dead = &peers["peers"][owner];
        dead["addr"] == c.peers[owner].as_str() && dead["healthy"] == false
    })
    .await;

    let warm = format!(r#"{{"adapters":["{name}"],"load":true}}"#);
    let r = request(c.node(A).addr, "POST", "/admin/cache/warmup", &warm).await;
    assert_eq!(r.status, 200, "{}", body(&r));
    let answer = r.json();
    let result = &answer["results"][0];
    assert_eq!(result["node"], c.peers[next].as_str(), "{answer}");
    assert_eq!(
        (&result["status"], &result["loaded"]),
        (&"ok".into(), &true.into()),
        "{answer}"
    );
    assert!(c.stores(next, name));
    assert_eq!(c.backend(next, 1).loads(name), 1);
}

/// `storage.preload` under `hash_on: model` with two pools: each adapter of M2 is preloaded by
/// the node its requests go to, the first node of its name's order serving M2 (here always B),
/// also when its owner by name is A, which serves no M2 and would skip it.
async fn a_preloaded_adapter_goes_to_the_node_of_its_pool(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    // Sixteen names: the chance that none of them is A's by name is 2^-16.
    let names: Vec<String> = (0..16).map(|i| format!("acme/two-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        origin.put_adapter(name, &AdapterSpec::new(M2, 20_000, i as u64));
    }
    let spec = Spec {
        backends: Some(&backends),
        origin: Some(&origin),
        extra: format!(
            "storage:\n  dir: \"{{DIR}}/store\"\n  preload: [{}]\n",
            names.join(", ")
        ),
        ..Spec::new(2)
    };
    let c = Cluster::start(driver, spec).await;
    for i in [A, B] {
        c.node(i).wait_ready().await;
    }
    let stats = common::store::stats(c.node(B).addr).await;
    for name in &names {
        let by_name = c.owner_of(name);
        assert!(
            c.stores(B, name) && !c.stores(A, name),
            "{name} (A's by name: {})",
            by_name == A
        );
        assert_eq!(stats["preload"][name], "loaded", "{name}: {stats}");
        let loads = [(A, 0), (A, 1), (B, 0), (B, 1)].map(|(i, j)| c.backend(i, j).loads(name));
        assert_eq!(loads, [0, 0, 0, 1], "{name}: only into B's M2 backend");
    }
}

on_both_drivers!(
    requests_land_on_backends_of_their_base_model,
    a_preloaded_adapter_goes_to_the_node_of_its_pool,
    only_served_names_are_listed_as_served,
    a_warm_up_with_load_goes_to_a_node_of_the_adapters_pool,
    a_warm_up_sent_on_skips_a_down_node_of_the_pool,
);
