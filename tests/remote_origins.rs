//! Remote origins through the real binary: the stand-in Hub (redirects to a CDN on another
//! port, `X-Linked-Etag` checksums, the public Hub's 401 for a missing repo) first, an
//! in-process S3 (`s3s` + `s3s-fs`) second, the stand-in vLLM reading the store as vLLM's
//! filesystem resolver does; and an HTTP origin that crawls below `min_rate`.

mod common;

use common::{
    Node, chat_with as chat,
    s3::{ACCESS_KEY, S3Server, SECRET_KEY},
    store::metrics,
};
use loraplex::testkit::{
    adapters::{AdapterSpec, SAFETENSORS_FILE, adapter_files, file_hash, safetensors_bytes},
    hub::{CdnHost, HubFile, StandInHub},
    origin::{OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmStandIn},
};

const BASE: &str = "tiny-base";
const BUCKET: &str = "loras";

fn hub_files(spec: &AdapterSpec) -> Vec<HubFile> {
    adapter_files(spec)
        .into_iter()
        .map(|(name, bytes)| {
            if name == SAFETENSORS_FILE {
                HubFile::lfs(name, bytes)
            } else {
                HubFile::small(name, bytes)
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_then_s3_through_the_binary_with_pinned_revisions() {
    let hub = StandInHub::start(Some("hf_secret"), CdnHost::Other)
        .await
        .unwrap();
    let s3 = S3Server::start(&[BUCKET]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(&store)).unwrap();

    // On the Hub: two commits of acme/hf-lora, `main` at the second, `v1` at the first.
    let (v1, v2) = (
        AdapterSpec::new(BASE, 200_000, 1),
        AdapterSpec::new(BASE, 200_000, 2),
    );
    hub.add_commit("acme/hf-lora", &"1".repeat(40), &["v1"], hub_files(&v1));
    hub.add_commit("acme/hf-lora", &"2".repeat(40), &["main"], hub_files(&v2));
    // Only in S3, under the prefix.
    let s3_spec = AdapterSpec::new(BASE, 150_000, 3);
    for (file, bytes) in adapter_files(&s3_spec) {
        s3.put_file(BUCKET, &format!("adapters/acme/s3-lora/{file}"), &bytes);
    }

    let yaml = format!(
        "vllm_url: \"{vllm}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: 1h\n\
         origins:\n  - type: huggingface\n    endpoint: \"{hub}\"\n    token: \"${{HF_TOKEN}}\"\n\
         \x20 - type: s3\n    bucket: {BUCKET}\n    region: us-east-1\n    prefix: adapters/\n\
         \x20   endpoint: \"{s3}\"\n",
        vllm = vllm.url(),
        hub = hub.url(),
        s3 = s3.url,
    );
    let node = tokio::task::block_in_place(|| {
        Node::start_in(
            dir,
            &yaml,
            &[
                ("HF_TOKEN", "hf_secret"),
                ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ],
        )
    });

    // From the Hub: `main` (the second commit), and `@v1` pinned, each under its own name.
    for (model, spec) in [("acme/hf-lora", &v2), ("acme/hf-lora@v1", &v1)] {
        let r = chat(node.addr, model).await;
        assert_eq!(
            r.status,
            200,
            "{model}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(vllm.served(model), 1, "{model}");
        let stored = node.path("store").join(model).join(SAFETENSORS_FILE);
        assert_eq!(
            std::fs::read(&stored).unwrap(),
            safetensors_bytes(spec),
            "{model}: the revision asked for"
        );
        assert_eq!(vllm.loaded_hash(model), Some(file_hash(&stored).unwrap()));
    }
    // Not on the Hub (404): from S3.
    let r = chat(node.addr, "acme/s3-lora").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(
            node.path("store")
                .join("acme/s3-lora")
                .join(SAFETENSORS_FILE)
        )
        .unwrap(),
        safetensors_bytes(&s3_spec)
    );
    // Nowhere: vLLM's own 404 for an unknown model, in OpenAI's shape.
    let r = chat(node.addr, "acme/nowhere").await;
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"]["message"].is_string());
    // Warm: no second download.
    let lfs_hits = hub.hits(&StandInHub::cdn_path(&hub_files(&v2)[1]));
    assert_eq!(chat(node.addr, "acme/hf-lora").await.status, 200);
    assert_eq!(
        hub.hits(&StandInHub::cdn_path(&hub_files(&v2)[1])),
        lfs_hits
    );

    let text = metrics(node.addr).await;
    for origin in ["huggingface", "s3"] {
        assert!(
            text.lines().any(|l| l.starts_with("loraplex_fetches_total")
                && l.contains(&format!("origin=\"{origin}\""))
                && l.contains("ok")
                && !l.ends_with(" 0")),
            "no successful {origin} fetch in:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_no_origin_has_is_vllms_404_even_when_the_hub_answers_401() {
    // The public Hub answers 401, not 404, for a repo that does not exist when the request
    // carries no token: that is "not found", not an authentication failure.
    let hub = StandInHub::start(None, CdnHost::Other).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(&store)).unwrap();
    let spec = AdapterSpec::new(BASE, 50_000, 4);
    hub.add_commit("acme/public", &"4".repeat(40), &["main"], hub_files(&spec));
    let yaml = format!(
        "vllm_url: \"{vllm}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: 1h\n\
         origins:\n  - type: huggingface\n    endpoint: \"{hub}\"\n",
        vllm = vllm.url(),
        hub = hub.url(),
    );
    let node = tokio::task::block_in_place(|| Node::start_in(dir, &yaml, &[]));
    let r = chat(node.addr, "acme/public").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = chat(node.addr, "acme/nowhere").await;
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    let e = &r.json()["error"];
    assert_eq!(e["type"], "NotFoundError", "vLLM's shape: {e}");
    assert_eq!(e["message"], "The model `acme/nowhere` does not exist.");
    assert_eq!(
        hub.hits("/api/models/acme/nowhere/revision/main"),
        1,
        "asked once: no retries"
    );
    let text = metrics(node.addr).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("loraplex_fetch_failures_total")
                && l.contains("reason=\"not_found\"")
                && !l.ends_with(" 0")),
        "{text}"
    );
    assert!(!text.contains("reason=\"auth\""), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_origin_crawling_below_min_rate_is_left_for_the_next() {
    // The first origin sends 8 KB/s, an eighth of `min_rate`; the window is shortened from
    // 30 s to 2 s (the hidden `min_rate_window`). Each attempt is cut when its window ends,
    // the retry resumes with Range, then the store moves on to the second origin.
    let slow = OriginStandIn::start(OriginConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = AdapterSpec::new(BASE, 400_000, 5);
    slow.put_adapter("acme/crawl", &spec);
    slow.set_throttle(Some(8_000));
    let good = dir.path().join("good");
    for (file, bytes) in adapter_files(&spec) {
        let path = good.join("acme/crawl").join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(&store)).unwrap();
    let yaml = format!(
        "vllm_url: \"{vllm}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: 1h\n\
         origins:\n  - type: http\n    base_url: \"{slow}\"\n    min_rate: 64KiB\n\
         \x20   min_rate_window: 2s\n    retries: 1\n\
         \x20 - type: file\n    path: \"{good}\"\n",
        vllm = vllm.url(),
        slow = slow.base_url(),
        good = good.display(),
    );
    let node = tokio::task::block_in_place(|| Node::start_in(dir, &yaml, &[]));
    // Every assertion shows the node's log: what the transfer saw.
    let logs = || node.logs.lock().unwrap().join("\n");
    let started = std::time::Instant::now();
    let r = chat(node.addr, "acme/crawl").await;
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "{body}\n{}", logs());
    // Two windows of 2 s and a backoff; at 8 KB/s the slow origin alone needed ~50 s.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let stored = node.path("store").join("acme/crawl").join(SAFETENSORS_FILE);
    assert_eq!(std::fs::read(&stored).unwrap(), safetensors_bytes(&spec));
    // Two GETs of the weights at the slow origin (the try and the retry), the second ranged.
    let weights = format!("acme/crawl/{SAFETENSORS_FILE}");
    assert_eq!(slow.gets(&weights), 2, "{}", logs());
    let ranged = slow
        .recent_heads()
        .iter()
        .filter(|h| h.path().ends_with(&weights))
        .filter_map(|h| h.header("range").map(str::to_owned))
        .collect::<Vec<_>>();
    assert_eq!(ranged.len(), 1, "{ranged:?}\n{}", logs());
    assert!(
        ranged[0].starts_with("bytes=") && !ranged[0].starts_with("bytes=0-"),
        "{ranged:?}"
    );
    let text = metrics(node.addr).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("loraplex_fetch_failures_total")
                && l.contains("origin=\"http\"")
                && l.contains("reason=\"transient\"")
                && !l.ends_with(" 0")),
        "{text}"
    );
    assert!(node.log_contains("slower than min_rate"), "{}", logs());
}
