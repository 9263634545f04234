//! Clusters of real nodes on a loopback subnet of their own (`127.x.y.1..n`, one port), each in
//! front of its own stand-in vLLM reading the node's store, for the routing tests; or of
//! several stand-in vLLMs ([`Spec::backends`], `vllm_urls`), all reading the node's one store.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use loraplex::{
    cluster::placement::Placement,
    testkit::{
        origin::OriginStandIn,
        vllm::{VllmConfig, VllmStandIn},
    },
};

use super::{Driver, Node, Raw, metric_at};

pub const BASE: &str = "tiny-base";

/// A cluster under test; a failing test prints every node's log.
pub struct Cluster {
    pub nodes: Vec<Option<Node>>,
    /// Node `i`'s (first) stand-in vLLM; [`Cluster::backend`] for the others.
    pub vllms: Vec<VllmStandIn>,
    pub peers: Vec<String>,
    /// Node `i`'s stand-ins after its first, with [`Spec::backends`].
    more: Vec<Vec<VllmStandIn>>,
    /// Node `i`'s config, to start it again ([`Cluster::restart`]).
    yamls: Vec<String>,
    driver: Driver,
    /// [`Spec::admin_token`], sent with the harness's own admin calls.
    admin_token: Option<String>,
}

/// A loopback subnet nobody else uses in this process (nodes listen with `SO_REUSEPORT`: two
/// clusters on the same address and port would share connections).
fn subnet() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("127.{}.{}", 1 + std::process::id() % 250, 128 + n % 120)
}

fn free_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
    l.local_addr().unwrap().port()
}

/// YAML of one node of [`Spec::per_node`]: `(i, dir, ip) -> yaml`.
pub type NodeYaml<'a> = dyn Fn(usize, &Path, &str) -> String + 'a;

/// How to build a cluster.
pub struct Spec<'a> {
    pub nodes: usize,
    /// The stand-in vLLM of node `i` (its `lora_dir` is set to the node's store).
    pub vllm: &'a dyn Fn(usize) -> VllmConfig,
    /// YAML added to every node's config.
    pub extra: String,
    pub origin: Option<&'a OriginStandIn>,
    /// Nodes whose vLLM exports no metrics (their state stays unknown).
    pub unknown: Vec<usize>,
    /// Node `i`'s stand-in vLLMs when it fronts several (replaces `vllm`; each one's
    /// `lora_dir` is the node's store). The node lists them in `vllm_urls` in this order
    /// (backend ids 0, 1, ...) and learns each one's base model from its `/v1/models` (no
    /// `vllm.model_name`); [`Cluster::backend`]`(i, j)` is backend `j` of node `i`.
    pub backends: Option<&'a dyn Fn(usize) -> Vec<VllmConfig>>,
    /// YAML added to node `i`'s config after `extra`: `(i, dir, ip)` is the node's index,
    /// tempdir (`{DIR}` in its YAML; files a node needs, such as TLS ones, go there) and IP.
    pub per_node: Option<&'a NodeYaml<'a>>,
    /// `admin.token` of every node; the harness's admin calls (`/admin/peers`) carry it.
    pub admin_token: Option<&'a str>,
}

impl Spec<'_> {
    pub fn new(nodes: usize) -> Spec<'static> {
        Spec {
            nodes,
            vllm: &|_| VllmConfig::new(BASE),
            extra: String::new(),
            origin: None,
            unknown: Vec::new(),
            backends: None,
            per_node: None,
            admin_token: None,
        }
    }
}

impl Cluster {
    /// Start the cluster and wait until every node sees every other healthy.
    pub async fn start(driver: Driver, spec: Spec<'_>) -> Cluster {
        let unknown = spec.unknown.clone();
        let c = Cluster::launch(driver, spec).await;
        c.wait_until_all_see_each_other(&unknown).await;
        c
    }

    /// Start the nodes, one after the other, without waiting for them to see each other (for
    /// clusters whose nodes cannot, or that the harness cannot ask in plain HTTP).
    pub async fn launch(driver: Driver, spec: Spec<'_>) -> Cluster {
        let net = subnet();
        let port = free_port(&format!("{net}.1"));
        let peers: Vec<String> = (1..=spec.nodes)
            .map(|i| format!("{net}.{i}:{port}"))
            .collect();
        let dirs: Vec<tempfile::TempDir> = (0..spec.nodes)
            .map(|_| tempfile::tempdir().unwrap())
            .collect();
        let mut vllms: Vec<VllmStandIn> = Vec::new();
        let mut more: Vec<Vec<VllmStandIn>> = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            let store = d.path().join("store");
            std::fs::create_dir_all(&store).unwrap();
            let configs = match spec.backends {
                Some(f) => f(i),
                None => vec![(spec.vllm)(i)],
            };
            assert!(!configs.is_empty(), "node {i} needs one vLLM at least");
            let mut started = configs
                .into_iter()
                .map(|c| VllmStandIn::start(c.lora_dir(&store)).unwrap());
            vllms.push(started.next().unwrap());
            more.push(started.collect());
        }
        let origins = spec.origin.map_or(String::new(), |o| {
            format!(
                "origins:\n  - type: http\n    base_url: \"{}\"\n",
                o.base_url()
            )
        });
        let list = peers
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let admin = spec
            .admin_token
            .map_or(String::new(), |t| format!("admin:\n  token: \"{t}\"\n"));
        let mut yamls = Vec::new();
        let nodes = dirs
            .into_iter()
            .enumerate()
            .map(|(i, dir)| {
                let backends = match spec.backends {
                    Some(_) => {
                        let urls: Vec<String> = std::iter::once(&vllms[i])
                            .chain(&more[i])
                            .map(|v| format!("\"{}\"", v.url()))
                            .collect();
                        format!("vllm_urls: [{}]\nvllm:\n", urls.join(", "))
                    }
                    None => format!(
                        "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n",
                        vllms[i].url()
                    ),
                };
                let own = spec.per_node.map_or(String::new(), |f| {
                    f(i, dir.path(), peers[i].split(':').next().unwrap())
                });
                let yaml = format!(
                    "listen: \"{peer}\"\n{backends}  \
                     health_check_interval: 200ms\n  metrics_interval: 200ms\ndiscovery:\n  \
                     mode: static\n  static:\n    peers: [{list}]\n{origins}{admin}{extra}{own}",
                    peer = peers[i],
                    extra = spec.extra,
                );
                let yaml = driver.config(&yaml);
                let node = start_node(driver, dir, &yaml);
                yamls.push(yaml);
                Some(node)
            })
            .collect();
        Cluster {
            nodes,
            vllms,
            peers,
            more,
            yamls,
            driver,
            admin_token: spec.admin_token.map(str::to_owned),
        }
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) {
        let mut dead = self.nodes[i].take().unwrap();
        dead.child.kill().unwrap();
        let _ = dead.child.wait();
    }

    /// Start node `i` again, same address and config (a fresh store; its vLLMs still read
    /// the first one's).
    pub fn restart(&mut self, i: usize) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        self.nodes[i] = Some(start_node(self.driver, dir, &self.yamls[i]));
    }

    /// Every node has checked every peer and has fresh vLLM state for all of them (but the
    /// `unknown` ones).
    pub async fn wait_until_all_see_each_other(&self, unknown: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let unknown: Vec<&str> = unknown.iter().map(|&i| self.peers[i].as_str()).collect();
        for n in self.nodes.iter().flatten() {
            loop {
                let peers = self.admin_peers(n).await;
                // Every backend's state known, base models included.
                let backends_known = |p: &serde_json::Value| {
                    p["backends"].as_array().is_some_and(|bs| {
                        !bs.is_empty()
                            && bs.iter().all(|b| {
                                b["known"] == true
                                    && b["models"].as_array().is_some_and(|m| !m.is_empty())
                            })
                    })
                };
                let all_ok = peers["peers"].as_array().unwrap().iter().all(|p| {
                    ((p["vllm"]["known"] == true && backends_known(p))
                        || unknown.contains(&p["addr"].as_str().unwrap_or_default()))
                        && (p["self"] == true
                            || (p["healthy"] == true
                                && p["vllm_healthy"] == true
                                && p["checks_ok"].as_u64() > Some(0)))
                });
                if all_ok && peers["count"] == self.peers.len() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster never converged: {peers}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    pub async fn admin_peers(&self, n: &Node) -> serde_json::Value {
        let mut raw = Raw::connect(n.addr).await;
        let auth = self
            .admin_token
            .as_ref()
            .map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        raw.send(format!("GET /admin/peers HTTP/1.1\r\nHost: t\r\n{auth}\r\n").as_bytes())
            .await;
        raw.response(false).await.json()
    }

    /// Backend `j` of node `i` (its position in the node's `vllm_urls`).
    pub fn backend(&self, i: usize, j: usize) -> &VllmStandIn {
        match j {
            0 => &self.vllms[i],
            j => &self.more[i][j - 1],
        }
    }

    /// Every stand-in vLLM of node `i`, by backend id.
    pub fn backends_of(&self, i: usize) -> impl Iterator<Item = &VllmStandIn> {
        std::iter::once(&self.vllms[i]).chain(&self.more[i])
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().unwrap()
    }

    /// The node owning `key`, as every node computes it.
    pub fn owner_of(&self, key: &str) -> usize {
        let placement = Placement::build(&self.peers);
        let owner = placement.owner(key.as_bytes()).unwrap();
        self.index_of(&placement.peers()[owner])
    }

    /// The key's nodes, owner first (what every node computes).
    pub fn order_of(&self, key: &str) -> Vec<usize> {
        let placement = Placement::build(&self.peers);
        placement
            .order(key.as_bytes())
            .map(|p| self.index_of(&placement.peers()[p]))
            .collect()
    }

    fn index_of(&self, peer: &str) -> usize {
        self.peers.iter().position(|p| p == peer).unwrap()
    }

    /// The nodes whose (first) stand-in vLLM saw `session` in an `X-Session-ID` header.
    pub fn served_by(&self, session: &str) -> Vec<usize> {
        (0..self.vllms.len())
            .filter(|&i| {
                self.vllms[i]
                    .recent_heads()
                    .iter()
                    .any(|h| h.header("x-session-id") == Some(session))
            })
            .collect()
    }

    /// A key owned by node `i`.
    pub fn key_owned_by(&self, i: usize, prefix: &str) -> String {
        (0..)
            .map(|n| format!("{prefix}-{n}"))
            .find(|k| self.owner_of(k) == i)
            .unwrap()
    }

    /// Whether node `i`'s store holds `adapter`.
    pub fn stores(&self, i: usize, adapter: &str) -> bool {
        self.node(i)
            .path("store")
            .join(adapter)
            .join("adapter_config.json")
            .is_file()
    }

    /// Node `i`'s `/metrics` value of `series` ([`metric_sum`](super::metric_sum)).
    pub async fn metric(&self, i: usize, series: &str) -> f64 {
        metric_at(&reqwest::Client::new(), &self.node(i).url(), series).await
    }
}

/// Start one node of a cluster (`yaml` has its driver set already).
fn start_node(driver: Driver, dir: tempfile::TempDir, yaml: &str) -> Node {
    let node = tokio::task::block_in_place(|| Node::start_in(dir, yaml, &[]));
    node.assert_driver(driver);
    node
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, n) in self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| Some((i, n.as_ref()?)))
            {
                eprintln!("--- node {i} ({}) log:", self.peers[i]);
                for line in n.logs.lock().unwrap().iter() {
                    eprintln!("{line}");
                }
            }
        }
    }
}
