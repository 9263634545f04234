//! Loading, defaults, refusals and printing of the whole config.

use std::time::Duration;

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str) -> Result<Loaded, ConfigError> {
    Config::resolve(Some(text), &Overrides::default(), no_env)
}

fn cfg(text: &str) -> Config {
    load(text).unwrap_or_else(|e| panic!("{e}")).config
}

fn err(text: &str) -> String {
    match load(text) {
        Ok(l) => panic!("accepted: {text}\n{:?}", l.config),
        Err(e) => e.to_string(),
    }
}

#[test]
fn no_file_is_the_default_config() {
    let l = Config::resolve(None, &Overrides::default(), no_env).unwrap();
    assert_eq!(l.config, Config::default());
    assert!(l.warnings.is_empty());
    assert_eq!(cfg(""), Config::default());
}

/// Go's `TestLoadMinimalConfig` / `TestLoadAppliesAllDefaults`.
#[test]
fn go_defaults_apply() {
    let c = cfg("storage:\n  dir: \"/tmp/loraplex\"\n");
    assert_eq!(c.listen, ":8080");
    assert_eq!(c.vllm_url(), "http://localhost:8000");
    assert_eq!(c.storage.dir, PathBuf::from("/tmp/loraplex"));
    assert_eq!(c.storage.max_size, 100 << 30);
    assert_eq!(c.invalidation.ttl, Some(Duration::from_secs(3600)));
    assert_eq!(c.discovery, DiscoveryConfig::Static { peers: vec![] });
    assert_eq!(c.routing.hash_on, HashOn::Model);
    assert_eq!(c.routing.vnodes_per_peer, 150);
    assert_eq!(c.routing.overflow_threshold, 0.8);
    assert_eq!(c.routing.forward_timeout, Duration::from_secs(5));
    assert_eq!(c.vllm.max_loras, 200);
    assert_eq!(c.vllm.max_lora_rank, 64);
    assert_eq!(c.vllm.health_check_interval, Duration::from_secs(10));
}

#[test]
fn empty_strings_and_zeros_mean_go_defaults() {
    let c = cfg(
        "listen: \"\"\nvllm_url: ''\nstorage: {dir: '', max_size: ''}\n\
         invalidation: {ttl: ''}\nrouting: {hash_on: '', vnodes_per_peer: 0, \
         overflow_threshold: 0, forward_timeout: ''}\nvllm: {max_loras: 0, max_lora_rank: 0, \
         model_name: ''}\nserver: {workers: 0}\n",
    );
    assert_eq!(c, Config::default());
}

#[test]
fn ttl_zero_disables_revalidation() {
    assert_eq!(cfg("invalidation:\n  ttl: 0\n").invalidation.ttl, None);
    assert_eq!(cfg("invalidation:\n  ttl: \"0s\"\n").invalidation.ttl, None);
    assert_eq!(
        cfg("invalidation:\n  ttl: 1.5h\n").invalidation.ttl,
        Some(Duration::from_secs(5400))
    );
}

#[test]
fn bad_values_name_key_and_value() {
    for (text, want) in [
        (
            "storage:\n  max_size: 10XB\n",
            r#"storage.max_size: invalid size "10XB" (examples: 500MB, 100GB, 1.5TB)"#,
        ),
        (
            "storage:\n  max_size: -1GB\n",
            r#"storage.max_size: negative size "-1GB" (examples: 500MB, 100GB, 1.5TB)"#,
        ),
        (
            "storage:\n  max_size: 99999999PB\n",
            r#"storage.max_size: size too large "99999999PB" (examples: 500MB, 100GB, 1.5TB)"#,
        ),
        (
            "storage:\n  max_size: 0\n",
            "storage.max_size: must be more than 0",
        ),
        (
            "routing:\n  overflow_threshold: 1.5\n",
            "routing.overflow_threshold: 1.5 is not between 0 and 1",
        ),
        (
            "routing:\n  overflow_threshold: -0.1\n",
            "routing.overflow_threshold: -0.1 is not between 0 and 1",
        ),
        (
            "routing:\n  overflow_threshold: lots\n",
            r#"routing.overflow_threshold: invalid number "lots""#,
        ),
        (
            "origins:\n  - type: huggingface\n  - type: gcs\n",
            r#"origins[1].type: unknown origin type "gcs" (huggingface, s3, http, file)"#,
        ),
        (
            "origins:\n  - token: x\n",
            "origins[0].type: missing (huggingface, s3, http, file)",
        ),
        (
            "invalidation:\n  ttl: 1d\n",
            r#"invalidation.ttl: invalid duration "1d" (examples: 5s, 1h30m, 500ms)"#,
        ),
        (
            "invalidation:\n  ttl: -5m\n",
            r#"invalidation.ttl: negative duration "-5m" (examples: 5s, 1h30m, 500ms)"#,
        ),
        (
            "routing:\n  forward_timeout: 0s\n",
            "routing.forward_timeout: must be more than 0",
        ),
        (
            "vllm:\n  health_check_interval: 5\n",
            r#"vllm.health_check_interval: invalid duration "5" (examples: 5s, 1h30m, 500ms)"#,
        ),
        (
            "discovery:\n  mode: banana\n",
            r#"discovery.mode: unknown discovery mode "banana" (static, file, k8s)"#,
        ),
        (
            "routing:\n  hash_on: banana\n",
            r#"routing.hash_on: invalid hash_on "banana" (model, tenant, tenant/model, header:<name>, header:<name>/model)"#,
        ),
        (
            "routing:\n  vnodes_per_peer: -3\n",
            r#"routing.vnodes_per_peer: invalid number "-3" (a whole number, 0 or more)"#,
        ),
        (
            "routing:\n  vnodes_per_peer: 5000000000\n",
            "routing.vnodes_per_peer: 5000000000 is too large",
        ),
        (
            "routing:\n  base_models:\n    acme/: \"\"\n",
            r#"routing.base_models."acme/": the base model name is empty"#,
        ),
        (
            "routing:\n  base_models: [a, b]\n",
            "routing.base_models: invalid type: sequence, expected a map at line 2 column 16",
        ),
        (
            "routing:\n  fallback_to_base_model: maybe\n",
            r#"routing.fallback_to_base_model: invalid boolean "maybe" (true or false)"#,
        ),
        (
            "listen: \"9090\"\n",
            r#"listen: invalid address "9090" (examples: :8080, 0.0.0.0:9090, 10.0.0.1:9090)"#,
        ),
        (
            "listen: \":99999\"\n",
            r#"listen: invalid address ":99999" (examples: :8080, 0.0.0.0:9090, 10.0.0.1:9090)"#,
        ),
        (
            "vllm_url: https://vllm:8000\n",
            r#"vllm_url: URL "https://vllm:8000" must start with http://"#,
        ),
        (
            "vllm_url: localhost:8000\n",
            r#"vllm_url: URL "localhost:8000" must start with http://"#,
        ),
        (
            "discovery:\n  static:\n    peers: [\"10.0.0.1:9090\", \"\"]\n",
            r#"discovery.static.peers[1]: invalid address "" (examples: :8080, 0.0.0.0:9090, 10.0.0.1:9090)"#,
        ),
        (
            "discovery:\n  mode: file\n",
            "discovery.file.dir: required when discovery.mode is file",
        ),
        (
            "discovery:\n  mode: file\n  file:\n    dir: /d\n    heartbeat_interval: 10s\n    \
             stale_threshold: 10s\n",
            "discovery.file.stale_threshold: 10s must be more than \
             discovery.file.heartbeat_interval (10s)",
        ),
        (
            "discovery:\n  mode: k8s\n",
            "discovery.k8s.service: required when discovery.mode is k8s",
        ),
        (
            "discovery:\n  mode: k8s\n  k8s:\n    service: ../secrets\n",
            r#"discovery.k8s.service: invalid name "../secrets" (lowercase letters, digits and '-')"#,
        ),
        (
            "origins:\n  - type: s3\n    region: us-east-1\n",
            "origins[0].bucket: required for type s3",
        ),
        (
            "origins:\n  - type: http\n",
            "origins[0].base_url: required for type http",
        ),
        (
            "origins:\n  - type: http\n    base_url: ftp://x\n",
            r#"origins[0].base_url: URL "ftp://x" must start with http:// or https://"#,
        ),
        (
            "origins:\n  - type: file\n",
            "origins[0].path: required for type file",
        ),
        (
            "origins:\n  - type: s3\n    bucket: b\n    retries: 1000\n",
            "origins[0].retries: 1000 is more than 100",
        ),
        (
            "origins:\n  - type: huggingface\n    idle_timeout: 0\n",
            "origins[0].idle_timeout: must be more than 0",
        ),
        (
            "storage:\n  direct_io: always\n",
            r#"storage.direct_io: unknown direct_io mode "always" (auto, off)"#,
        ),
        (
            "server:\n  driver: kqueue\n",
            r#"server.driver: unknown driver "kqueue" (auto, io_uring, epoll)"#,
        ),
        (
            "server:\n  log_format: xml\n",
            r#"server.log_format: unknown log format "xml" (text, json)"#,
        ),
        (
            "server:\n  workers: 100000\n",
            "server.workers: 100000 is more than 4096",
        ),
        (
            "server:\n  max_header_size: 100\n",
            "server.max_header_size: 100 bytes is less than the minimum, 1KB",
        ),
        (
            "server:\n  max_body_size: 0\n",
            "server.max_body_size: must be more than 0",
        ),
        (
            "server:\n  idle_timeout: 0\n",
            "server.idle_timeout: must be more than 0",
        ),
    ] {
        assert_eq!(err(text), want, "{text}");
    }
}

/// Go's `TestValidationHashOn`, plus what our header check adds.
#[test]
fn hash_on_like_go() {
    for (s, want) in [
        ("model", HashOn::Model),
        ("tenant", HashOn::Tenant),
        ("tenant/model", HashOn::TenantModel),
        ("header:X-Region", HashOn::Header("X-Region".into())),
        (
            "header:X-Customer-ID/model",
            HashOn::HeaderModel("X-Customer-ID".into()),
        ),
    ] {
        let text = format!("routing:\n  hash_on: \"{s}\"\n");
        assert_eq!(cfg(&text).routing.hash_on, want, "{s}");
    }
    for bad in ["banana", "header:", "header:/model", "header:X Y", "Model"] {
        let text = format!("routing:\n  hash_on: \"{bad}\"\n");
        assert!(err(&text).starts_with("routing.hash_on: "), "{bad}");
    }
}

#[test]
fn origins_of_every_type() {
    let c = cfg("origins:\n\
         - type: huggingface\n  token: hf_x\n  connect_timeout: 2s\n  retries: 0\n\
         - type: s3\n  bucket: b\n  prefix: adapters\n  endpoint: http://127.0.0.1:9000/\n\
         - type: s3\n  bucket: c\n  region: eu-west-1\n\
         - type: http\n  base_url: https://models.example/loras/\n\
         - type: file\n  path: /mnt/nfs/adapters\n");
    let t = TransferConfig::default();
    assert_eq!(
        c.origins,
        vec![
            OriginConfig::HuggingFace {
                endpoint: "https://huggingface.co".into(),
                token: Some("hf_x".into()),
                transfer: TransferConfig {
                    connect_timeout: Duration::from_secs(2),
                    retries: 0,
                    ..t.clone()
                },
            },
            OriginConfig::S3 {
                bucket: "b".into(),
                region: None,
                prefix: "adapters/".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                transfer: t.clone(),
            },
            OriginConfig::S3 {
                bucket: "c".into(),
                region: Some("eu-west-1".into()),
                prefix: String::new(),
                endpoint: None,
                transfer: t.clone(),
            },
            OriginConfig::Http {
                base_url: "https://models.example/loras".into(),
                token: None,
                transfer: t,
            },
            OriginConfig::File {
                path: "/mnt/nfs/adapters".into()
            },
        ]
    );
}

#[test]
fn hf_endpoint_from_file_then_env_then_default() {
    let env = |k: &str| (k == "HF_ENDPOINT").then(|| "http://127.0.0.1:5555/".to_string());
    let endpoint = |text: &str, env: &dyn Fn(&str) -> Option<String>| match &Config::resolve(
        Some(text),
        &Overrides::default(),
        env,
    )
    .unwrap()
    .config
    .origins[0]
    {
        OriginConfig::HuggingFace { endpoint, .. } => endpoint.clone(),
        o => panic!("{o:?}"),
    };
    let plain = "origins:\n  - type: huggingface\n";
    assert_eq!(endpoint(plain, &no_env), "https://huggingface.co");
    assert_eq!(endpoint(plain, &env), "http://127.0.0.1:5555");
    let explicit = "origins:\n  - type: huggingface\n    endpoint: https://hub.internal\n";
    assert_eq!(endpoint(explicit, &env), "https://hub.internal");
    let bad_env = |k: &str| (k == "HF_ENDPOINT").then(|| "hub".to_string());
    let e = Config::resolve(Some(plain), &Overrides::default(), bad_env).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("origins[0].endpoint (from HF_ENDPOINT): invalid URL \"hub\""),
        "{e}"
    );
}

#[test]
fn env_vars_expand_before_parsing() {
    let env = |k: &str| match k {
        "HF_TOKEN" => Some("hf_secret".to_string()),
        "MAX" => Some("2TB".to_string()),
        _ => None,
    };
    let c = Config::resolve(
        Some(
            "storage:\n  max_size: $MAX\norigins:\n  - type: huggingface\n    token: \"${HF_TOKEN}\"\n\
             admin:\n  token: ${UNSET}\n",
        ),
        &Overrides::default(),
        env,
    )
    .unwrap()
    .config;
    assert_eq!(c.storage.max_size, 2 << 40);
    assert!(
        matches!(&c.origins[0], OriginConfig::HuggingFace { token: Some(t), .. } if t == "hf_secret")
    );
    assert_eq!(c.admin.token, None);
}

#[test]
fn unknown_and_unused_keys_warn_but_load() {
    let l = load(
        "listn: \":1\"\nrouting:\n  hash_onn: tenant\norigins:\n  - type: huggingface\n    \
         bucket: b\n    token: ''\n  - type: file\n    path: /p\n    retries: 3\n",
    )
    .unwrap();
    assert_eq!(l.config.listen, ":8080");
    assert_eq!(
        l.warnings,
        [
            "unknown key listn (ignored)",
            "unknown key routing.hash_onn (ignored)",
            "origins[0].bucket is not used by type huggingface (ignored)",
            "origins[1].retries is not used by type file (ignored)",
        ]
    );
}

#[test]
fn discovery_modes() {
    let c = cfg("discovery:\n  mode: file\n  file:\n    dir: /shared/peers\n");
    assert_eq!(
        c.discovery,
        DiscoveryConfig::File {
            dir: "/shared/peers".into(),
            heartbeat_interval: Duration::from_secs(5),
            stale_threshold: Duration::from_secs(15),
        }
    );
    // Only the active mode is read: a broken static list does not matter in k8s mode.
    let c = cfg("discovery:\n  mode: k8s\n  k8s:\n    service: lp\n  static:\n    peers: ['']\n");
    let want_ns = std::fs::read_to_string(convert::K8S_NAMESPACE_FILE)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "default".into());
    assert_eq!(
        c.discovery,
        DiscoveryConfig::K8s {
            service: "lp".into(),
            namespace: want_ns
        }
    );
}

#[test]
fn overrides_win_and_errors_name_the_flag() {
    let ov = Overrides {
        listen: Some(":7000".into()),
        self_addr: Some("10.0.0.9:7000".into()),
        vllm_urls: vec!["http://127.0.0.1:8001".into()],
        dir: Some("/tmp/x".into()),
        discovery: Some("static".into()),
        peers: Some(vec!["10.0.0.9:7000".into(), "10.0.0.8:7000".into()]),
        workers: Some(3),
        model: Some("base/m".into()),
    };
    let file = "listen: \":9090\"\nstorage:\n  dir: /data\ndiscovery:\n  mode: file\n  file:\n    dir: /peers\n";
    let c = Config::resolve(Some(file), &ov, no_env).unwrap().config;
    assert_eq!(c.listen, ":7000");
    assert_eq!(c.self_addr.as_deref(), Some("10.0.0.9:7000"));
    assert_eq!(c.vllm_url(), "http://127.0.0.1:8001");
    assert_eq!(c.storage.dir, PathBuf::from("/tmp/x"));
    assert_eq!(c.server.workers, 3);
    assert_eq!(c.vllm.model_name.as_deref(), Some("base/m"));
    assert_eq!(
        c.discovery,
        DiscoveryConfig::Static {
            peers: vec!["10.0.0.9:7000".into(), "10.0.0.8:7000".into()]
        }
    );
    // Empty flags change nothing (as in Go).
    let empty = Overrides {
        listen: Some(String::new()),
        ..Overrides::default()
    };
    assert_eq!(
        Config::resolve(Some(file), &empty, no_env)
            .unwrap()
            .config
            .listen,
        ":9090"
    );

    let bad = |ov: Overrides| Config::resolve(None, &ov, no_env).unwrap_err().to_string();
    let e = bad(Overrides {
        listen: Some("nope".into()),
        ..Overrides::default()
    });
    assert!(
        e.starts_with("listen (--listen): invalid address \"nope\""),
        "{e}"
    );
    let e = bad(Overrides {
        peers: Some(vec!["a:1".into(), "b".into()]),
        ..Overrides::default()
    });
    assert!(
        e.starts_with("discovery.static.peers[1] (--peers): invalid address \"b\""),
        "{e}"
    );
}

/// A config using every key prints as YAML that loads back to the same config.
#[test]
fn base_models_longest_prefix_first() {
    let c = cfg(
        "routing:\n  base_models:\n    acme/: org/m1\n    acme/qwen-: org/m2\n    \
                 \"\": org/m0\n",
    );
    let rules: Vec<(&str, &str)> = c
        .routing
        .base_models
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        rules,
        [
            ("acme/qwen-", "org/m2"),
            ("acme/", "org/m1"),
            ("", "org/m0")
        ]
    );
    assert!(cfg("").routing.base_models.is_empty());
}

#[test]
fn printed_config_loads_back() {
    let text = "listen: \"0.0.0.0:9090\"\nself_addr: 10.0.0.1:9090\nvllm_url: http://127.0.0.1:8000\n\
        storage: {dir: /mnt/x, max_size: 1.5TB, rewrite_base_model: true, direct_io: off, fetch_wait_timeout: 0}\n\
        origins:\n\
        - {type: huggingface, token: t1, endpoint: 'https://hf.local', idle_timeout: 1m, retries: 5}\n\
        - {type: s3, bucket: b, region: r, prefix: p/, endpoint: 'http://s3.local:9000', min_rate: 0}\n\
        - {type: http, base_url: 'http://o.local/a', token: t2, connect_timeout: 250ms, min_rate: 1MB/s, min_rate_window: 2s}\n\
        - {type: file, path: /srv/adapters}\n\
        invalidation: {ttl: 0}\n\
        discovery: {mode: static, static: {peers: ['10.0.0.1:9090', '[::1]:9090']}}\n\
        routing: {hash_on: 'header:X-Session-ID/model', vnodes_per_peer: 10, forward_timeout: 2m3.5s, \
                  overflow_threshold: 0.65, fallback_to_base_model: true, \
                  base_models: {'acme/qwen-': Qwen/Qwen2.5-0.5B, '': org/m1}}\n\
        vllm: {model_name: base/m, max_loras: 8, max_lora_rank: 16, health_check_interval: 750ms}\n\
        server: {workers: 3, driver: epoll, max_body_size: 1MB, max_header_size: 8KB, \
                 header_read_timeout: 7s, body_read_timeout: 9s, idle_timeout: 1h, upstream_connect_timeout: 1s, \
                 upstream_idle_timeout: 2s, shutdown_grace: 0, log_format: json, \
                 tls: {cert: /etc/t/tls.crt, key: /etc/t/tls.key, allow_plain: true}}\n\
        admin: {token: a, open: true}\ncluster: {token: c, tls: {ca: /etc/t/ca.crt, server_name: peers.local}}\n\
        tracing: {otlp_endpoint: 'https://otel.local:4318/custom/traces', service_name: lp, sample_ratio: 0.25}\n";
    let c = cfg(text);
    let printed = c.to_yaml(Redact::Nothing);
    assert_eq!(cfg(&printed), c, "{printed}");
    for other in [
        "discovery: {mode: file, file: {dir: /d, heartbeat_interval: 1s, stale_threshold: 3s}}\n",
        "discovery: {mode: k8s, k8s: {service: s, namespace: ns}}\n",
        "",
    ] {
        let c = cfg(other);
        assert_eq!(cfg(&c.to_yaml(Redact::Nothing)), c);
    }
    let redacted = c.to_yaml(Redact::Secrets);
    assert!(
        !redacted.contains("t1") && !redacted.contains("t2"),
        "{redacted}"
    );
    assert_eq!(redacted.matches("<redacted>").count(), 4, "{redacted}");
}

#[test]
fn tracing_is_off_by_default_and_its_keys_are_checked() {
    let d = cfg("");
    assert_eq!(d.tracing.otlp_endpoint, None);
    assert_eq!(d.tracing.service_name, "loraplex");
    assert_eq!(d.tracing.sample_ratio, 1.0);
    let endpoint = |v: &str| {
        cfg(&format!("tracing:\n  otlp_endpoint: \"{v}\"\n"))
            .tracing
            .otlp_endpoint
            .unwrap()
    };
    // A bare collector address gets the standard path; a path is kept as written.
    assert_eq!(endpoint("http://otel:4318"), "http://otel:4318/v1/traces");
    assert_eq!(endpoint("http://otel:4318/"), "http://otel:4318/v1/traces");
    assert_eq!(
        endpoint("https://tempo.local/otlp/v1/traces"),
        "https://tempo.local/otlp/v1/traces"
    );
    let c = cfg("tracing: {otlp_endpoint: 'http://o:4318', service_name: edge, sample_ratio: 0}\n");
    assert_eq!(c.tracing.service_name, "edge");
    assert_eq!(c.tracing.sample_ratio, 0.0);
    assert_eq!(
        cfg("tracing: {sample_ratio: 1}\n").tracing.sample_ratio,
        1.0
    );
    for (text, want) in [
        (
            "tracing: {otlp_endpoint: 'grpc://o:4317'}\n",
            r#"tracing.otlp_endpoint: URL "grpc://o:4317" must start with http:// or https://"#,
        ),
        (
            "tracing: {otlp_endpoint: 'o:4318'}\n",
            r#"tracing.otlp_endpoint: URL "o:4318" must start with http:// or https://"#,
        ),
        (
            "tracing: {otlp_endpoint: 'http://o:4318/v1/traces?x=1'}\n",
            r#"tracing.otlp_endpoint: invalid URL "http://o:4318/v1/traces?x=1": expected scheme://host[:port][/path]"#,
        ),
        (
            "tracing: {sample_ratio: 1.5}\n",
            "tracing.sample_ratio: 1.5 is not between 0 and 1",
        ),
        (
            "tracing: {sample_ratio: half}\n",
            r#"tracing.sample_ratio: invalid number "half""#,
        ),
    ] {
        assert_eq!(err(text), want, "{text}");
    }
}

#[test]
fn min_rate_is_a_size_per_second_and_0_disables_it() {
    let rate = |v: &str| {
        let c = cfg(&format!(
            "origins:\n  - type: http\n    base_url: http://h\n{v}"
        ));
        match &c.origins[0] {
            OriginConfig::Http { transfer, .. } => (transfer.min_rate, transfer.rate_window),
            other => panic!("{other:?}"),
        }
    };
    let window = Duration::from_secs(30);
    assert_eq!(rate(""), (Some(64 << 10), window), "the default");
    assert_eq!(rate("    min_rate: 64KiB\n"), (Some(64 << 10), window));
    assert_eq!(rate("    min_rate: 1MB/s\n"), (Some(1 << 20), window));
    assert_eq!(rate("    min_rate: \"0\"\n"), (None, window));
    assert_eq!(
        rate("    min_rate: 10KB\n    min_rate_window: 2s\n"),
        (Some(10 << 10), Duration::from_secs(2))
    );
    let e = err("origins:\n  - type: s3\n    bucket: b\n    min_rate: fast\n");
    assert!(
        e.starts_with("origins[0].min_rate: invalid rate \"fast\""),
        "{e}"
    );
    let e = err("origins:\n  - type: s3\n    bucket: b\n    min_rate_window: 0\n");
    assert_eq!(e, "origins[0].min_rate_window: must be more than 0");
    // The window is printed only when it is not the default (it is a test knob).
    let printed =
        cfg("origins:\n  - {type: http, base_url: 'http://h'}\n").to_yaml(Redact::Nothing);
    assert!(
        printed.contains("min_rate: 64KB") && !printed.contains("min_rate_window"),
        "{printed}"
    );
}

#[test]
fn load_reads_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "listen: \":9191\"\n").unwrap();
    assert_eq!(Config::load(&path).unwrap().listen, ":9191");
    let e = Config::load(&dir.path().join("missing.yaml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    std::fs::write(&path, b"listen: \"\xff\"\n").unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("not UTF-8"), "{e}");
}

#[test]
fn tls_keys() {
    let c = cfg("server:\n  tls: {cert: c.pem, key: k.pem}\ncluster:\n  tls: {ca: ca.pem}\n");
    assert_eq!(
        c.server.tls,
        Some(ServerTlsConfig {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            allow_plain: false,
        })
    );
    assert_eq!(
        c.cluster.tls,
        Some(ClusterTlsConfig {
            ca: "ca.pem".into(),
            server_name: None,
        })
    );
    // Nothing set (or empty strings): plain, both ways.
    let c = cfg("server:\n  tls: {cert: '', key: ''}\ncluster:\n  tls: {ca: ''}\n");
    assert_eq!((c.server.tls, c.cluster.tls), (None, None));
    let ip =
        cfg("server:\n  tls: {cert: c, key: k}\ncluster:\n  tls: {ca: a, server_name: 10.0.0.1}\n");
    assert_eq!(
        ip.cluster.tls.unwrap().server_name.as_deref(),
        Some("10.0.0.1")
    );

    for (text, want) in [
        (
            "server:\n  tls: {cert: c.pem}\n",
            "server.tls.key: missing (server.tls.cert is set)",
        ),
        (
            "server:\n  tls: {key: k.pem}\n",
            "server.tls.cert: missing (server.tls.key is set)",
        ),
        (
            "server:\n  tls: {cert: c, key: k, allow_plain: maybe}\n",
            "server.tls.allow_plain: invalid boolean \"maybe\" (true or false)",
        ),
        (
            "cluster:\n  tls: {ca: ca.pem}\n",
            "cluster.tls.ca: peers are dialled over TLS, so every node serves TLS: \
             set server.tls.cert and server.tls.key too",
        ),
        (
            "server:\n  tls: {cert: c, key: k}\ncluster:\n  tls: {server_name: peers}\n",
            "cluster.tls.server_name: set without cluster.tls.ca (the CA peers' certificates \
             are checked against)",
        ),
        (
            "server:\n  tls: {cert: c, key: k}\ncluster:\n  tls: {ca: a, server_name: 'a b'}\n",
            "cluster.tls.server_name: \"a b\" is neither a DNS name nor an IP address",
        ),
    ] {
        assert_eq!(err(text), want, "{text}");
    }
    let l = load("server:\n  tls: {allow_plain: true}\n").unwrap();
    assert_eq!(l.config.server.tls, None);
    assert_eq!(
        l.warnings,
        ["server.tls.allow_plain has no effect without server.tls.cert and key"]
    );
}

#[test]
fn vllm_urls_name_several_backends_and_vllm_url_one() {
    let c = cfg("vllm_urls: [\"http://127.0.0.1:8001/\", \"http://127.0.0.1:8002\"]\n");
    assert_eq!(
        c.vllm_urls,
        ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    );
    assert_eq!(c.vllm_url(), "http://127.0.0.1:8001");
    assert_eq!(cfg("vllm_url: http://v:1\n").vllm_urls, ["http://v:1"]);
    // Printed back as they were given: several as vllm_urls, one as vllm_url.
    let text = c.to_yaml(Redact::Nothing);
    assert!(text.contains("vllm_urls:"), "{text}");
    assert!(!text.contains("vllm_url:"), "{text}");
    assert_eq!(
        cfg(&text).vllm_urls,
        c.vllm_urls,
        "the printed config loads back"
    );
    let one = cfg("vllm_url: http://v:1\n").to_yaml(Redact::Nothing);
    assert!(
        one.contains("vllm_url: http://v:1") && !one.contains("vllm_urls"),
        "{one}"
    );
}

#[test]
fn vllm_url_and_vllm_urls_together_are_refused() {
    assert_eq!(
        err("vllm_url: http://a:1\nvllm_urls: [\"http://b:1\"]\n"),
        "vllm_urls: vllm_url and vllm_urls are both set: use vllm_url for one vLLM or \
         vllm_urls for several, not both"
    );
    assert_eq!(
        err("vllm_urls: []\n"),
        "vllm_urls: empty list: name one vLLM at least"
    );
    assert_eq!(
        err("vllm_urls: [\"http://a:1\", \"http://a:1/\"]\n"),
        "vllm_urls[1]: http://a:1 is listed twice"
    );
    assert_eq!(
        err("vllm_urls: [\"http://a:1\", \"https://b:1\"]\n"),
        r#"vllm_urls[1]: URL "https://b:1" must start with http://"#
    );
}

#[test]
fn repeated_vllm_url_flags_replace_the_files_backends() {
    let text = "vllm_url: http://a:1\n";
    let several = Overrides {
        vllm_urls: vec!["http://b:1".into(), "http://c:1".into()],
        ..Overrides::default()
    };
    let c = Config::resolve(Some(text), &several, no_env)
        .unwrap()
        .config;
    assert_eq!(c.vllm_urls, ["http://b:1", "http://c:1"]);
    let one = Overrides {
        vllm_urls: vec!["http://d:1".into()],
        ..Overrides::default()
    };
    let text = "vllm_urls: [\"http://a:1\", \"http://b:1\"]\n";
    let c = Config::resolve(Some(text), &one, no_env).unwrap().config;
    assert_eq!(c.vllm_urls, ["http://d:1"]);
}
