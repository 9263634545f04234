//! A node whose adapter store is in its tempdir, read by the stand-in vLLM as vLLM's filesystem
//! resolver reads it, and what the store's tests ask of it over HTTP (stats, metrics, the
//! ledger against the files on disk).

use std::{net::SocketAddr, path::Path};

use loraplex::testkit::{
    adapters::AdapterSpec,
    origin::OriginStandIn,
    vllm::{VllmConfig, VllmStandIn},
};
use serde_json::Value;

use super::{
    Driver, Node, Raw, RawResponse,
    s3::{ACCESS_KEY, SECRET_KEY},
};

pub const BASE: &str = "tiny-base";
/// `cluster.token`: what a peer asking for a manifest shows.
pub const PEER_TOKEN: &str = "peer-secret";

pub fn spec(size: u64, seed: u64) -> AdapterSpec {
    AdapterSpec::new(BASE, size, seed)
}

/// A node whose store is `{dir}/store` (1 GB unless `extra` says), read by `vllm`, with
/// `origins` (YAML list items) and `extra` YAML (its `storage:` keys join the store's).
pub fn node(
    driver: Driver,
    dir: tempfile::TempDir,
    vllm: &VllmStandIn,
    origins: &str,
    extra: &str,
) -> Node {
    let (mut storage, mut rest) = (String::new(), String::new());
    let mut in_storage = false;
    for line in extra.lines() {
        in_storage = line == "storage:" || (in_storage && line.starts_with("  "));
        match (in_storage, line == "storage:") {
            (true, false) => storage += &format!("{line}\n"),
            (true, true) => {}
            (false, _) => rest += &format!("{line}\n"),
        }
    }
    if !storage.contains("max_size:") {
        storage += "  max_size: 1GB\n";
    }
    let yaml = format!(
        "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: 1h\n\
         origins:\n{origins}storage:\n  dir: \"{{DIR}}/store\"\n{storage}\
         cluster:\n  token: {PEER_TOKEN}\n{rest}",
        vllm.url()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let node = tokio::task::block_in_place(|| Node::start_in(dir, &driver.config(&yaml), &env));
    node.assert_driver(driver);
    node
}

pub fn http_origin(origin: &OriginStandIn) -> String {
    format!("  - type: http\n    base_url: \"{}\"\n", origin.base_url())
}

/// A tempdir with `store/` in it, and the stand-in vLLM reading that store.
pub fn stand_ins() -> (tempfile::TempDir, VllmStandIn) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(&store)).unwrap();
    (dir, vllm)
}

/// Stop `node` and start it again on the same directory.
pub fn restart(
    mut lp: Node,
    driver: Driver,
    vllm: &VllmStandIn,
    origins: &str,
    extra: &str,
) -> Node {
    assert!(lp.terminate().success());
    let dir = std::mem::replace(&mut lp.dir, tempfile::tempdir().unwrap());
    drop(lp);
    node(driver, dir, vllm, origins, extra)
}

pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> RawResponse {
    let mut c = Raw::connect(addr).await;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nx-loraplex-token: {PEER_TOKEN}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    c.send(format!("{head}{body}").as_bytes()).await;
    c.response(false).await
}

pub async fn stats(addr: SocketAddr) -> Value {
    request(addr, "GET", "/admin/cache/stats", "").await.json()
}

/// The node's `/metrics` text.
pub async fn metrics(addr: SocketAddr) -> String {
    String::from_utf8(request(addr, "GET", "/metrics", "").await.body).unwrap()
}

/// Bytes of the regular files under `dir`, the temp area left out (what `du -b` counts).
pub fn apparent_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() && entry.file_name() != ".loraplex-tmp" {
            total += apparent_size(&entry.path());
        } else if kind.is_file() {
            total += entry.metadata().unwrap().len();
        }
    }
    total
}

pub async fn assert_ledger_matches_disk(lp: &Node) {
    let on_disk = apparent_size(&lp.path("store"));
    let s = stats(lp.addr).await;
    assert_eq!(s["size"].as_u64(), Some(on_disk), "ledger vs disk: {s}");
    assert_eq!(s["reserved"], 0, "{s}");
}
