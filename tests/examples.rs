//! The configs in `examples/` load through the real binary's `check-config` with no warning,
//! and say what their comments say.

use std::process::Command;

/// `loraplex check-config examples/NAME.yaml` with the tokens they reference set: the effective
/// settings it prints, and its stderr.
fn check(name: &str) -> (serde_yaml_ng::Value, String) {
    check_file(name, &format!("examples/{name}.yaml"))
}

/// [`check`] of the config at `path` (relative to the repository, or absolute).
fn check_file(name: &str, path: &str) -> (serde_yaml_ng::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loraplex"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["check-config", path])
        .env("HF_TOKEN", "hf_example")
        .env("LORAPLEX_CLUSTER_TOKEN", "cluster-secret")
        .env("LORAPLEX_ADMIN_TOKEN", "admin-secret")
        .env("ARTIFACTS_TOKEN", "artifacts-secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name}: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains("secret"), "{name}: tokens are not printed");
    (serde_yaml_ng::from_str(&stdout).unwrap(), stderr)
}

fn get<'a>(v: &'a serde_yaml_ng::Value, path: &str) -> &'a serde_yaml_ng::Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

fn assert_keys(name: &str, expected: &[(&str, &str)]) {
    assert_checked(name, check(name), expected);
}

fn assert_checked(
    name: &str,
    (v, stderr): (serde_yaml_ng::Value, String),
    expected: &[(&str, &str)],
) {
    assert!(!stderr.to_lowercase().contains("warn"), "{name}: {stderr}");
    for (path, want) in expected {
        let got = get(&v, path);
        let got = match got {
            serde_yaml_ng::Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other).unwrap().trim().to_owned(),
        };
        assert_eq!(&got, want, "{name}: {path}");
    }
}

#[test]
fn single_node() {
    assert_keys(
        "single-node",
        &[
            ("origins.0.type", "huggingface"),
            ("origins.1.type", "s3"),
            ("origins.1.prefix", "loras/"),
            ("storage.max_size", "500GB"),
            ("routing.fallback_to_base_model", "false"),
        ],
    );
}

#[test]
fn multi_node() {
    assert_keys(
        "multi-node",
        &[
            ("discovery.mode", "static"),
            ("discovery.static.peers.2", "10.0.0.3:9090"),
            ("routing.overflow_threshold", "0.8"),
        ],
    );
}

#[test]
fn storage_only_sidecar() {
    assert_keys(
        "storage-only-sidecar",
        &[
            ("origins.0.type", "http"),
            ("origins.0.idle_timeout", "1m"),
            ("origins.1.type", "file"),
            ("invalidation.ttl", "15m"),
        ],
    );
}

#[test]
fn session_affinity() {
    assert_keys(
        "session-affinity",
        &[
            ("discovery.mode", "file"),
            ("discovery.file.stale_threshold", "15s"),
            ("routing.hash_on", "header:X-Session-ID"),
        ],
    );
}

#[test]
fn document_routing() {
    assert_keys(
        "document-routing",
        &[
            ("routing.hash_on", "header:X-Document-ID/model"),
            ("origins.0.prefix", ""),
        ],
    );
}

/// The Kubernetes config reads its TLS files from the Secret's mount (`/etc/loraplex-tls`), which
/// `check-config` loads: here a certificate for the name peers are checked for, in a tempdir.
#[test]
fn kubernetes() {
    const MOUNT: &str = "/etc/loraplex-tls";
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["loraplex-headless.inference.svc".into()]).unwrap();
    let d = dir.path();
    std::fs::write(d.join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(d.join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(d.join("ca.crt"), cert.cert.pem()).unwrap();
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/k8s/config.yaml"),
    )
    .unwrap();
    assert!(text.contains(MOUNT), "the config reads the Secret's mount");
    let config = d.join("config.yaml");
    std::fs::write(&config, text.replace(MOUNT, &d.display().to_string())).unwrap();
    let tls = |f: &str| d.join(f).display().to_string();
    assert_checked(
        "k8s/config",
        check_file("k8s/config", config.to_str().unwrap()),
        &[
            ("server.tls.cert", tls("tls.crt").as_str()),
            ("server.tls.key", tls("tls.key").as_str()),
            ("cluster.tls.ca", tls("ca.crt").as_str()),
            ("cluster.tls.server_name", "loraplex-headless.inference.svc"),
            ("discovery.mode", "k8s"),
            ("discovery.k8s.service", "loraplex-headless"),
            ("storage.dir", "/data/loraplex"),
            ("admin.token", "<redacted>"),
            ("cluster.token", "<redacted>"),
        ],
    );
}

#[test]
fn two_pools() {
    assert_keys(
        "two-pools",
        &[
            ("vllm_urls.1", "http://localhost:8001"),
            ("routing.base_models.acme/qwen-", "Qwen/Qwen2.5-7B-Instruct"),
            (
                "routing.base_models.acme/llama-",
                "meta-llama/Llama-3.1-8B-Instruct",
            ),
        ],
    );
}
