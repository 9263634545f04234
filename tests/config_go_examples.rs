//! The Go loraplex's example configs (same keys and values, in `tests/fixtures/go-config/`)
//! load unchanged, with no warning, to the values they spell out.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use loraplex::config::{
    Config, DiscoveryConfig, HashOn, Loaded, OriginConfig, Overrides, TransferConfig, read_file,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/go-config")
}

fn env(name: &str) -> Option<String> {
    (name == "HF_TOKEN").then(|| "hf_test_token".to_owned())
}

fn load(rel: &str) -> Config {
    let text = read_file(&fixtures().join(rel)).unwrap();
    let Loaded { config, warnings } = Config::resolve(Some(&text), &Overrides::default(), env)
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert!(warnings.is_empty(), "{rel}: {warnings:?}");
    config
}

fn hf(token: Option<&str>) -> OriginConfig {
    OriginConfig::HuggingFace {
        endpoint: "https://huggingface.co".into(),
        token: token.map(Into::into),
        transfer: TransferConfig::default(),
    }
}

fn three_peers() -> DiscoveryConfig {
    DiscoveryConfig::Static {
        peers: vec![
            "10.0.0.1:9090".into(),
            "10.0.0.2:9090".into(),
            "10.0.0.3:9090".into(),
        ],
    }
}

/// What every example shares.
fn check_common(c: &Config, max_size_gb: u64) {
    assert_eq!(c.listen, ":9090");
    assert_eq!(c.vllm_url(), "http://localhost:8000");
    assert_eq!(
        c.vllm.model_name.as_deref(),
        Some("meta-llama/Llama-3.1-8B-Instruct")
    );
    assert_eq!((c.vllm.max_loras, c.vllm.max_lora_rank), (200, 64));
    assert_eq!(c.vllm.health_check_interval, Duration::from_secs(10));
    assert_eq!(c.storage.max_size, max_size_gb << 30);
    assert_eq!(c.routing.vnodes_per_peer, 150);
    assert_eq!(c.routing.forward_timeout, Duration::from_secs(5));
    assert_eq!(c.routing.overflow_threshold, 0.8);
}

#[test]
fn config_example() {
    let c = load("config.example.yaml");
    check_common(&c, 100);
    assert_eq!(c.storage.dir, PathBuf::from("/mnt/nvme/loraplex"));
    assert_eq!(c.origins, vec![hf(None)]);
    assert_eq!(c.invalidation.ttl, Some(Duration::from_secs(3600)));
    assert_eq!(
        c.discovery,
        DiscoveryConfig::Static {
            peers: vec!["localhost:9090".into()]
        }
    );
    assert_eq!(c.routing.hash_on, HashOn::Model);
    assert!(c.routing.fallback_to_base_model);
    // Also through the file-reading entry point (the process environment may set
    // HF_ENDPOINT, which only moves the origin's endpoint).
    let mut loaded = Config::load(&fixtures().join("config.example.yaml")).unwrap();
    assert!(matches!(
        loaded.origins[..],
        [OriginConfig::HuggingFace { .. }]
    ));
    loaded.origins = c.origins.clone();
    assert_eq!(loaded, c);
}

#[test]
fn single_node() {
    let c = load("single-node.yaml");
    check_common(&c, 100);
    assert_eq!(c.origins, vec![hf(None)]);
    assert_eq!(c.invalidation.ttl, Some(Duration::from_secs(3600)));
    assert!(c.routing.fallback_to_base_model);
    // The same settings as config.example.yaml, which only adds the default interval.
    assert_eq!(c, load("config.example.yaml"));
}

#[test]
fn multi_node() {
    let c = load("multi-node.yaml");
    check_common(&c, 200);
    assert_eq!(c.origins, vec![hf(Some("hf_test_token"))]);
    assert_eq!(c.invalidation.ttl, Some(Duration::from_secs(1800)));
    assert_eq!(c.discovery, three_peers());
    assert_eq!(c.routing.hash_on, HashOn::Model);
    assert!(!c.routing.fallback_to_base_model);
}

#[test]
fn cache_only_sidecar() {
    let c = load("cache-only-sidecar.yaml");
    check_common(&c, 100);
    assert_eq!(
        c.origins,
        vec![OriginConfig::S3 {
            bucket: "my-lora-adapters".into(),
            region: Some("us-east-1".into()),
            prefix: "adapters/".into(),
            endpoint: None,
            transfer: TransferConfig::default(),
        }]
    );
    assert_eq!(c.invalidation.ttl, Some(Duration::from_secs(900)));
}

#[test]
fn session_affinity() {
    let c = load("session-affinity.yaml");
    check_common(&c, 200);
    assert_eq!(c.routing.hash_on, HashOn::Header("X-Session-ID".into()));
    assert_eq!(c.discovery, three_peers());
    assert!(c.routing.fallback_to_base_model);
}

#[test]
fn document_routing() {
    let c = load("document-routing.yaml");
    check_common(&c, 200);
    assert_eq!(c.routing.hash_on, HashOn::Header("X-Document-ID".into()));
    assert_eq!(c.origins, vec![hf(Some("hf_test_token"))]);
}

#[test]
fn k8s() {
    let c = load("k8s/loraplex-config.yaml");
    check_common(&c, 200);
    assert_eq!(c.storage.dir, PathBuf::from("/data/loraplex"));
    assert_eq!(
        c.origins,
        vec![
            hf(Some("hf_test_token")),
            OriginConfig::S3 {
                bucket: "company-adapters".into(),
                region: Some("us-east-1".into()),
                prefix: String::new(),
                endpoint: None,
                transfer: TransferConfig::default(),
            }
        ]
    );
    assert_eq!(c.invalidation.ttl, Some(Duration::from_secs(1800)));
    assert_eq!(
        c.discovery,
        DiscoveryConfig::K8s {
            service: "loraplex-headless".into(),
            namespace: "inference".into()
        }
    );
    assert!(!c.routing.fallback_to_base_model);
}

/// Every fixture has a test above: a new file cannot sit here untested.
#[test]
fn every_fixture_is_checked() {
    let mut found = Vec::new();
    for dir in [fixtures(), fixtures().join("k8s")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                found.push(p.strip_prefix(fixtures()).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    assert_eq!(
        found,
        [
            "cache-only-sidecar.yaml",
            "config.example.yaml",
            "document-routing.yaml",
            "k8s/loraplex-config.yaml",
            "multi-node.yaml",
            "session-affinity.yaml",
            "single-node.yaml",
        ]
    );
}

/// With `HF_TOKEN` unset the token expands to nothing, which is no token (as in Go).
#[test]
fn unset_token_is_no_token() {
    let text = read_file(&fixtures().join("multi-node.yaml")).unwrap();
    let c = Config::resolve(Some(&text), &Overrides::default(), |_| None)
        .unwrap()
        .config;
    assert_eq!(c.origins, vec![hf(None)]);
}
