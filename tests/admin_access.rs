//! Who may evict and warm up. Without `admin.token`, only loopback clients and authenticated
//! peers (by `cluster.token`, else by address) may: another client gets a 403 in OpenAI's
//! shape and nothing happens. `admin.open` restores the Go project's open API, and the startup
//! log warns about it, as it does about a node listening beyond loopback without a token.
//!
//! The client that is neither on loopback nor a peer lives in a network namespace
//! (`common::netns`); the node listens on its side of the veth pair. Every case runs under both
//! io drivers (`io_uring::case`, `epoll::case`).

mod common;

use std::net::SocketAddr;

use common::{Driver, Node, Raw, RawResponse, netns::Netns};
use loraplex::testkit::{
    adapters::AdapterSpec,
    origin::{OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmStandIn},
};

const BASE: &str = "tiny-base";
const WARMUP: &str = r#"{"adapters":["acme/warm"]}"#;
const EVICT: &str = r#"{"adapter":"acme/warm"}"#;

struct Setup {
    vllm: VllmStandIn,
    origin: OriginStandIn,
}

fn setup() -> Setup {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/warm", &AdapterSpec::new(BASE, 10_000, 1));
    Setup {
        vllm: VllmStandIn::start(VllmConfig::new(BASE)).unwrap(),
        origin,
    }
}

/// A node listening on `ip`, with `extra` config (`{LISTEN}` in it: the node's own address).
fn node(driver: Driver, s: &Setup, ip: std::net::Ipv4Addr, extra: &str) -> Node {
    let port = std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("{ip}:{port}");
    let yaml = format!(
        "listen: \"{listen}\"\nvllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n  \
         health_check_interval: 1h\norigins:\n  - type: http\n    base_url: \"{}\"\n{}",
        s.vllm.url(),
        s.origin.base_url(),
        extra.replace("{LISTEN}", &listen),
    );
    let node = Node::start(&driver.config(&yaml));
    node.assert_driver(driver);
    node
}

async fn call(mut c: Raw, method: &str, path: &str, body: &str, extra: &str) -> RawResponse {
    c.send(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    c.response(false).await
}

/// From inside the namespace: neither loopback nor (unless configured so) a peer.
async fn from_ns(
    ns: &Netns,
    to: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    extra: &str,
) -> RawResponse {
    call(Raw::from_stream(ns.connect(to)), method, path, body, extra).await
}

fn assert_forbidden(r: &RawResponse) {
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let e = &r.json()["error"];
    assert_eq!(e["type"], "PermissionDeniedError");
    assert_eq!(e["code"], 403);
    assert!(
        e["message"].as_str().unwrap().contains("admin.token"),
        "{e}"
    );
}

async fn without_a_token_changes_answer_only_loopback_clients_and_peers(driver: Driver) {
    let test = "without_a_token_changes_answer_only_loopback_clients_and_peers";
    let Some(ns) = Netns::new(test) else { return };
    let s = setup();

    // Neither loopback nor a peer: reads yes, changes no, and nothing happens.
    let lp = node(driver, &s, ns.host_ip, "");
    assert!(
        lp.log_contains("no admin.token while listening beyond loopback"),
        "the startup log warns"
    );
    for (path, body) in [
        ("/admin/cache/warmup", WARMUP),
        ("/admin/cache/evict", EVICT),
    ] {
        assert_forbidden(&from_ns(&ns, lp.addr, "POST", path, body, "").await);
    }
    assert_eq!(
        s.origin.requests(),
        0,
        "the refused warm-up fetched nothing"
    );
    let stats = from_ns(&ns, lp.addr, "GET", "/admin/cache/stats", "", "").await;
    assert_eq!(stats.status, 200);
    assert_eq!(stats.json()["items"], 0);

    // The same client as a peer (its address in the static peers): allowed.
    let peers = format!(
        "discovery:\n  mode: static\n  static:\n    peers: [\"{{LISTEN}}\", \"{}:9\"]\n",
        ns.ns_ip
    );
    let lp = node(driver, &s, ns.host_ip, &peers);
    let r = from_ns(&ns, lp.addr, "POST", "/admin/cache/warmup", WARMUP, "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["results"][0]["status"], "ok");

    // With cluster.token a peer is who carries it, wherever it connects from.
    let token = "cluster:\n  token: c0de\n";
    let lp = node(driver, &s, ns.host_ip, token);
    let wrong = "X-Loraplex-Token: nope\r\n";
    assert_forbidden(&from_ns(&ns, lp.addr, "POST", "/admin/cache/warmup", WARMUP, wrong).await);
    let right = "X-Loraplex-Token: c0de\r\n";
    let r = from_ns(&ns, lp.addr, "POST", "/admin/cache/warmup", WARMUP, right).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = from_ns(&ns, lp.addr, "POST", "/admin/cache/evict", EVICT, right).await;
    assert_eq!(r.json()["evicted"], true);

    // On loopback, any client.
    let lp = node(driver, &s, std::net::Ipv4Addr::LOCALHOST, "");
    assert!(!lp.log_contains("no admin.token"), "no warning on loopback");
    let r = call(
        Raw::connect(lp.addr).await,
        "POST",
        "/admin/cache/warmup",
        WARMUP,
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

async fn admin_open_and_admin_token_decide_for_every_client(driver: Driver) {
    let test = "admin_open_and_admin_token_decide_for_every_client";
    let Some(ns) = Netns::new(test) else { return };
    let s = setup();

    let lp = node(driver, &s, ns.host_ip, "admin:\n  open: true\n");
    assert!(
        lp.log_contains("admin.open without admin.token"),
        "the startup log warns"
    );
    let r = from_ns(&ns, lp.addr, "POST", "/admin/cache/warmup", WARMUP, "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = from_ns(&ns, lp.addr, "POST", "/admin/cache/evict", EVICT, "").await;
    assert_eq!(r.json()["evicted"], true);

    // A token: everyone needs it, a peer's address or loopback are not enough.
    let lp = node(driver, &s, ns.host_ip, "admin:\n  token: s3cret\n");
    assert!(!lp.log_contains("no admin.token"));
    let r = from_ns(&ns, lp.addr, "POST", "/admin/cache/warmup", WARMUP, "").await;
    assert_eq!(r.status, 401);
    let bearer = "Authorization: Bearer s3cret\r\n";
    let r = from_ns(&ns, lp.addr, "POST", "/admin/cache/warmup", WARMUP, bearer).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

on_both_drivers!(
    without_a_token_changes_answer_only_loopback_clients_and_peers,
    admin_open_and_admin_token_decide_for_every_client,
);
