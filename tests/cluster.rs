//! Three real nodes on loopback (127.0.0.1, .2, .3, one port), each with its own stand-in vLLM:
//! one owner per key, the same vLLM for a key from any entry node, dead and overloaded owners,
//! a spoofed forward mark, SSE through a peer.

mod common;

use std::time::{Duration, Instant};

use common::{Node, Raw, post};
use loraplex::{
    cluster::placement::Placement,
    testkit::vllm::{VllmConfig, VllmStandIn},
};

const BASE: &str = "tiny-base";

struct Cluster {
    nodes: Vec<Option<Node>>,
    vllms: Vec<VllmStandIn>,
    peers: Vec<String>,
}

/// A loopback subnet of its own for each cluster (`127.x.y.1-3`): nodes listen with
/// `SO_REUSEPORT`, so two clusters that happened to pick the same port on the same address would
/// silently share connections.
fn subnet() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("127.{}.{}", 1 + std::process::id() % 250, 1 + n)
}

/// A free port on `ip`.
fn free_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
    l.local_addr().unwrap().port()
}

async fn cluster(extra: &str) -> Cluster {
    let net = subnet();
    let port = free_port(&format!("{net}.1"));
    let peers: Vec<String> = (1..=3).map(|i| format!("{net}.{i}:{port}")).collect();
    let vllms: Vec<VllmStandIn> = (0..3)
        .map(|_| VllmStandIn::start(VllmConfig::new(BASE)).unwrap())
        .collect();
    let nodes = (0..3)
        .map(|i| {
            Some(tokio::task::block_in_place(|| Node::start(&format!(
                "listen: \"{peer}\"\nvllm_url: \"{url}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: 200ms\n\
                 discovery:\n  mode: static\n  static:\n    peers: [{list}]\n{extra}",
                peer = peers[i],
                url = vllms[i].url(),
                list = peers.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", "),
            ))))
        })
        .collect();
    let c = Cluster {
        nodes,
        vllms,
        peers,
    };
    c.wait_until_all_see_each_other().await;
    c
}

impl Drop for Cluster {
    /// A failing test shows what each node logged.
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

impl Cluster {
    /// Every node has checked every peer successfully at least once (nodes start one after
    /// the other, so the first checks of the early ones fail).
    async fn wait_until_all_see_each_other(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in self.nodes.iter().flatten() {
            loop {
                let mut raw = Raw::connect(n.addr).await;
                raw.send(b"GET /admin/peers HTTP/1.1\r\nHost: t\r\n\r\n")
                    .await;
                let peers = raw.response(false).await.json();
                let all_ok = peers["peers"].as_array().unwrap().iter().all(|p| {
                    p["self"] == true || (p["healthy"] == true && p["checks_ok"].as_u64() > Some(0))
                });
                if all_ok && peers["count"] == 3 {
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

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().unwrap()
    }

    /// The node owning `key`, as every node computes it (peers sort the same as node order).
    fn owner_of(&self, key: &str) -> usize {
        Placement::build(&self.peers).owner(key.as_bytes()).unwrap()
    }

    /// A key owned by node `i`.
    fn key_owned_by(&self, i: usize, prefix: &str) -> String {
        (0..)
            .map(|n| format!("{prefix}-{n}"))
            .find(|k| self.owner_of(k) == i)
            .unwrap()
    }

    /// Which stand-in vLLM served `session` (by the session header it saw).
    fn served_by(&self, session: &str) -> Vec<usize> {
        (0..3)
            .filter(|&i| {
                self.vllms[i]
                    .recent_heads()
                    .iter()
                    .any(|h| h.header("x-session-id") == Some(session))
            })
            .collect()
    }
}

async fn chat(addr: std::net::SocketAddr, session: &str, stream: bool) -> common::RawResponse {
    let mut c = Raw::connect(addr).await;
    let body = format!(r#"{{"model":"{BASE}","stream":{stream},"messages":[]}}"#);
    c.send(&post(
        "/v1/chat/completions",
        &body,
        &format!("X-Session-ID: {session}\r\n"),
    ))
    .await;
    c.response(false).await
}

const SESSION: &str = "hash_on: \"header:X-Session-ID\"";

#[tokio::test(flavor = "multi_thread")]
async fn a_session_lands_on_one_node_from_any_entry_node() {
    let c = cluster(&format!("routing:\n  {SESSION}\n")).await;
    // Ten sessions, each entered through all three nodes.
    for s in 0..10 {
        let session = format!("sess-{s}");
        for entry in 0..3 {
            assert_eq!(chat(c.node(entry).addr, &session, false).await.status, 200);
        }
        assert_eq!(
            c.served_by(&session),
            vec![c.owner_of(&session)],
            "{session}"
        );
    }
    // Sessions spread over the nodes (10 keys over 3 nodes: all on one would be a broken ring).
    let owners: std::collections::HashSet<usize> = (0..10)
        .map(|s| c.served_by(&format!("sess-{s}"))[0])
        .collect();
    assert!(owners.len() >= 2, "{owners:?}");
    // A request without the header is served where it enters.
    let before: Vec<u64> = c.vllms.iter().map(|v| v.served(BASE)).collect();
    let mut raw = Raw::connect(c.node(1).addr).await;
    raw.send(&post(
        "/v1/chat/completions",
        &format!(r#"{{"model":"{BASE}"}}"#),
        "",
    ))
    .await;
    assert_eq!(raw.response(false).await.status, 200);
    assert_eq!(c.vllms[1].served(BASE), before[1] + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_streams_through_a_peer_event_by_event() {
    let c = cluster(&format!("routing:\n  {SESSION}\n")).await;
    // A session owned by node 2, entered through node 0.
    let session = c.key_owned_by(2, "stream");
    for v in &c.vllms {
        v.set_event_gap(Duration::from_millis(250));
    }
    let mut raw = Raw::connect(c.node(0).addr).await;
    let body = format!(r#"{{"model":"{BASE}","stream":true,"max_tokens":5,"messages":[]}}"#);
    let started = Instant::now();
    raw.send(&post(
        "/v1/chat/completions",
        &body,
        &format!("X-Session-ID: {session}\r\n"),
    ))
    .await;
    use tokio::io::AsyncReadExt;
    let (mut text, mut first) = (String::new(), None);
    let mut buf = [0u8; 4096];
    while !text.contains("data: [DONE]") {
        let n = raw.stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if first.is_none() && text.contains("data: {") {
            first = Some(started.elapsed());
        }
    }
    let total = started.elapsed();
    assert!(total >= Duration::from_millis(1000));
    assert!(
        first.unwrap() + Duration::from_millis(700) <= total,
        "{first:?} vs {total:?}"
    );
    assert_eq!(c.served_by(&session), vec![2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_owner_moves_its_keys_to_the_next_node() {
    let mut c = cluster(&format!("routing:\n  {SESSION}\n")).await;
    let session = "dead-owner";
    chat(c.node(0).addr, session, false).await;
    let owner = c.served_by(session)[0];
    let entry = (owner + 1) % 3;
    let mut dead = c.nodes[owner].take().unwrap();
    dead.child.kill().unwrap();
    let _ = dead.child.wait();
    // Right away (before any health poll notices): a refused connect goes to the next node.
    let r = chat(c.node(entry).addr, session, false).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let now = c.served_by(session);
    assert!(now.len() == 2 && now.contains(&owner), "{now:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overloaded_owner_sheds_to_the_next_node() {
    let c = cluster(&format!(
        "routing:\n  {SESSION}\n  overflow_threshold: 0.01\n"
    ))
    .await;
    let session = "hot-session";
    chat(c.node(0).addr, session, false).await;
    let owner = c.served_by(session)[0];
    // Three slow requests held on the owner's vLLM: load 3/200 > 0.01.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut raw = Raw::connect(c.node(owner).addr).await;
        raw.send(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        held.push(raw);
    }
    let entry = (owner + 1) % 3;
    // Once a health poll has seen the load, new requests of the key go elsewhere.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(chat(c.node(entry).addr, session, false).await.status, 200);
        if c.served_by(session).len() > 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the owner never shed load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = reqwest::get(format!("{}/metrics", c.node(entry).url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let shed_here = c.served_by(session).contains(&entry);
    let overflow: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("loraplex_overflow_local_total "))
        .map_or(0, |v| v.trim().parse().unwrap());
    assert!(!shed_here || overflow >= 1, "{m}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spoofed_forward_mark_does_not_bypass_routing() {
    // With a cluster token: the mark without it is ignored.
    let c = cluster(&format!(
        "routing:\n  {SESSION}\ncluster:\n  token: t0ken\n"
    ))
    .await;
    let session = "spoof";
    chat(c.node(0).addr, session, false).await;
    let owner = c.served_by(session)[0];
    let entry = (owner + 1) % 3;
    let mut raw = Raw::connect(c.node(entry).addr).await;
    let body = format!(r#"{{"model":"{BASE}"}}"#);
    raw.send(&post(
        "/v1/chat/completions",
        &body,
        &format!(
            "X-Session-ID: {session}\r\nX-Loraplex-Forwarded: 1\r\nX-Loraplex-Token: wrong\r\n"
        ),
    ))
    .await;
    assert_eq!(raw.response(false).await.status, 200);
    assert_eq!(
        c.served_by(session),
        vec![owner],
        "routed to the owner, not served at entry"
    );
    // The forwarded request carried no client-sent internal header.
    let head = c.vllms[owner].recent_heads().into_iter().last().unwrap();
    assert!(
        head.headers
            .iter()
            .all(|(n, _)| !n.starts_with("x-loraplex-")),
        "{head:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_only_peer_addresses_are_trusted() {
    let c = cluster(&format!("routing:\n  {SESSION}\n")).await;
    let session = "spoof-ip";
    chat(c.node(0).addr, session, false).await;
    let owner = c.served_by(session)[0];
    let entry = (owner + 1) % 3;
    // A client on 127.0.0.9 (not a peer) sends the mark.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let stream = sock.connect(c.node(entry).addr).await.unwrap();
    let mut raw = Raw::from_stream(stream);
    let body = format!(r#"{{"model":"{BASE}"}}"#);
    raw.send(&post(
        "/v1/chat/completions",
        &body,
        &format!("X-Session-ID: {session}\r\nX-Loraplex-Forwarded: 1\r\n"),
    ))
    .await;
    assert_eq!(raw.response(false).await.status, 200);
    assert_eq!(c.served_by(session), vec![owner]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_a_peer_acknowledged_is_never_sent_elsewhere() {
    let mut c = cluster(&format!("routing:\n  {SESSION}\n")).await;
    let session = c.key_owned_by(1, "delivered");
    let mut raw = Raw::connect(c.node(0).addr).await;
    let head = format!("GET /slow?ms=4000 HTTP/1.1\r\nHost: t\r\nX-Session-ID: {session}\r\n\r\n");
    raw.send(head.as_bytes()).await;
    let slow_seen = |v: &VllmStandIn| {
        v.recent_heads()
            .iter()
            .any(|h| h.target.starts_with("/slow"))
    };
    common::eventually("the owner's vLLM to get the request", || {
        slow_seen(&c.vllms[1])
    })
    .await;
    let mut owner = c.nodes[1].take().unwrap();
    owner.child.kill().unwrap();
    let _ = owner.child.wait();
    let r = raw.response(false).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        !slow_seen(&c.vllms[0]) && !slow_seen(&c.vllms[2]),
        "re-sent elsewhere"
    );
}
