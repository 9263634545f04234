//! What the tests of `deploy/` share: its files (the Grafana dashboard, the Prometheus rules),
//! the metric names their expressions use, and a two-node loraplex cluster (the real binary,
//! the stand-in vLLM and HTTP origin) driven so that every `loraplex_*` family is exported.

#![allow(dead_code)]

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use loraplex::{
    cluster::placement::Placement,
    testkit::{
        adapters::AdapterSpec,
        origin::{OriginConfig, OriginStandIn},
        vllm::{VllmConfig, VllmStandIn},
    },
};
use serde_json::Value;

use crate::common::{Node, Raw, chat_with, eventually};

pub const BASE: &str = "tiny-base";

pub fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub const DASHBOARD: &str = "deploy/grafana/loraplex.json";
pub const RULES: &str = "deploy/prometheus/loraplex.rules.yml";

pub fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo(DASHBOARD)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// A YAML file of the repository as JSON values.
pub fn yaml(rel: &str) -> Value {
    let text = std::fs::read_to_string(repo(rel)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every panel of the dashboard, those inside collapsed rows included.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let top = dashboard["panels"].as_array().expect("panels");
    top.iter()
        .flat_map(|p| std::iter::once(p).chain(p["panels"].as_array().into_iter().flatten()))
        .collect()
}

/// `(panel title, expr)` of every query of the dashboard.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|p| {
            p["targets"].as_array().into_iter().flatten().map(|t| {
                let title = p["title"].as_str().unwrap_or_default().to_owned();
                (title, t["expr"].as_str().expect("expr").to_owned())
            })
        })
        .collect()
}

/// Every rule (recording and alerting) of the rules file.
pub fn rules() -> Vec<Value> {
    yaml(RULES)["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

/// The metric names a PromQL expression selects (recording-rule names with `:` included): the
/// identifiers outside strings, ranges, label matchers and grouping lists that are neither
/// keywords, aggregations nor followed by `(` (functions).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 23] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset", // and the aggregations, which may put `by (...)` before their `(`
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut names = BTreeSet::new();
    let (mut i, mut braces, mut grouping) = (0, 0, false);
    let mut previous = "";
    while i < b.len() {
        match b[i] {
            b'"' => i += 1 + expr[i + 1..].find('"').expect("closed string"),
            b'[' => i += expr[i..].find(']').expect("closed range"),
            b'{' => braces += 1,
            b'}' => braces -= 1,
            b'(' => {
                grouping = matches!(
                    previous,
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
                previous = "";
            }
            b')' => grouping = false,
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let call = expr[i..].trim_start().starts_with('(');
                if braces == 0 && !grouping && !call && !KEYWORDS.contains(&word) {
                    names.insert(word.to_owned());
                }
                previous = word;
                continue;
            }
            c if c.is_ascii_digit() => {
                // A number (`0.99`, `1e3`) or a duration: no name starts here.
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// Two loraplex nodes (`127.x.y.1` and `.2`, one port) in a static cluster, each with its own
/// stand-in vLLM reading its store, sharing one HTTP origin.
pub struct Scene {
    pub nodes: Vec<Node>,
    pub vllms: Vec<VllmStandIn>,
    pub origin: OriginStandIn,
    pub peers: Vec<String>,
    /// Requests node 0 served from its disk (`cache_tier="local"`).
    pub local_hits: u64,
    /// An adapter on node 0's disk after [`Scene::drive`].
    pub warm: String,
}

impl Scene {
    pub fn start() -> Scene {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Another subnet than tests/cluster.rs's (`127.p.1+n`), so the two never share a port.
        let net = format!("127.{}.{}", 1 + std::process::id() % 250, 200 + n);
        let port = std::net::TcpListener::bind(format!("{net}.1:0"))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let peers: Vec<String> = (1..=2).map(|i| format!("{net}.{i}:{port}")).collect();
        let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
        let (mut nodes, mut vllms) = (Vec::new(), Vec::new());
        for peer in &peers {
            let dir = tempfile::tempdir().unwrap();
            let store = dir.path().join("store");
            std::fs::create_dir_all(&store).unwrap();
            let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(&store)).unwrap();
            // Room for two of the 400 kB adapters: the third evicts one. A TTL of 1 s makes a
            // later hit start a revalidation.
            let yaml = format!(
                "listen: \"{peer}\"\nvllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n  \
                 health_check_interval: 200ms\ndiscovery:\n  mode: static\n  static:\n    \
                 peers: [\"{}\", \"{}\"]\norigins:\n  - type: http\n    base_url: \"{}\"\n\
                 storage:\n  dir: \"{{DIR}}/store\"\n  max_size: 900KB\n\
                 invalidation:\n  ttl: 1s\n",
                vllm.url(),
                peers[0],
                peers[1],
                origin.base_url()
            );
            nodes.push(Node::start_in(dir, &yaml, &[]));
            vllms.push(vllm);
        }
        Scene {
            nodes,
            vllms,
            origin,
            peers,
            local_hits: 0,
            warm: String::new(),
        }
    }

    /// A key (adapter name) that node `i` owns.
    pub fn owned_by(&self, i: usize, prefix: &str) -> String {
        let placement = Placement::build(&self.peers);
        (0..)
            .map(|n| format!("{prefix}-{n}"))
            .find(|k| placement.owner(k.as_bytes()) == Some(i))
            .unwrap()
    }

    pub async fn metrics(&self, i: usize) -> String {
        let mut c = Raw::connect(self.nodes[i].addr).await;
        c.send(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        String::from_utf8(c.response(false).await.body).unwrap()
    }

    /// Traffic through node 0 after which every family is exported: a base-model request,
    /// three cold adapters where two fit (fetches, bytes, an eviction and an unload), warm
    /// hits, a hit after the TTL (a revalidation), an adapter no origin has (fetch failures),
    /// a bad name (an error), and an adapter node 1 owns (a forward).
    pub async fn drive(&mut self) {
        let entry = self.nodes[0].addr;
        assert_eq!(chat_with(entry, BASE).await.status, 200);
        let names: Vec<String> = (0..3)
            .map(|i| self.owned_by(0, &format!("acme/a{i}")))
            .collect();
        for (i, name) in names.iter().enumerate() {
            self.origin
                .put_adapter(name, &AdapterSpec::new(BASE, 400_000, 40 + i as u64));
            assert_eq!(chat_with(entry, name).await.status, 200, "{name}");
        }
        let last = &names[2];
        self.warm = last.clone();
        for _ in 0..3 {
            assert_eq!(chat_with(entry, last).await.status, 200);
            self.local_hits += 1;
        }
        let vllm = &self.vllms[0];
        eventually("vLLM to be told to unload the evicted adapter", || {
            names.iter().any(|n| vllm.unloads(n) == 1)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(chat_with(entry, last).await.status, 200);
        self.local_hits += 1;
        let missing = self.owned_by(0, "acme/missing");
        assert_eq!(chat_with(entry, &missing).await.status, 404);
        assert_eq!(chat_with(entry, "acme/../x").await.status, 400);
        let remote = self.owned_by(1, "acme/remote");
        self.origin
            .put_adapter(&remote, &AdapterSpec::new(BASE, 100_000, 49));
        assert_eq!(chat_with(entry, &remote).await.status, 200);
        // The revalidation runs in the background.
        self.metrics_until(0, "the revalidation", |t| {
            t.contains("loraplex_revalidations_total{")
        })
        .await;
    }

    /// Node `i`'s `/metrics` once `cond` holds (15 s at most).
    pub async fn metrics_until(&self, i: usize, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = self.metrics(i).await;
            if cond(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
