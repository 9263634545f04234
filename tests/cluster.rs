//! Three real nodes on a loopback subnet of their own (`common::cluster`), each with its own
//! stand-in vLLM: one owner per key, the same vLLM for a key from any entry node, dead, sick
//! (vLLM down), returning and overloaded owners, a spoofed forward mark, SSE and forms through a
//! peer, evict broadcasts. Every case runs under both io drivers (`io_uring::case`,
//! `epoll::case`).

mod common;

use std::time::{Duration, Instant};

use common::{
    Driver, Raw,
    cluster::{BASE, Cluster, Spec},
    post, post_json,
};
use loraplex::testkit::{
    adapters::AdapterSpec,
    origin::{OriginConfig, OriginStandIn},
    vllm::VllmStandIn,
};
use serde_json::json;

/// Three nodes, `extra` in each one's config.
async fn cluster(driver: Driver, extra: &str) -> Cluster {
    cluster_with(driver, extra, None).await
}

/// Three nodes, `extra` in each one's config, `origin` (when given) their http origin.
async fn cluster_with(driver: Driver, extra: &str, origin: Option<&OriginStandIn>) -> Cluster {
    let spec = Spec {
        extra: extra.to_owned(),
        origin,
        ..Spec::new(3)
    };
    Cluster::start(driver, spec).await
}

impl Cluster {
    /// Base-model answers each node's vLLM has given so far.
    fn served(&self) -> Vec<u64> {
        self.vllms.iter().map(|v| v.served(BASE)).collect()
    }

    /// Send `session` through `entry` until `node`'s vLLM answers it (a health poll or two
    /// must see the change first); fails after 15 s.
    async fn until_served_by(&self, entry: usize, session: &str, node: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let before = self.served();
            let r = chat(self.node(entry).addr, session, false).await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let after = self.served();
            let by: Vec<usize> = (0..3).filter(|&i| after[i] > before[i]).collect();
            assert_eq!(by.len(), 1, "one vLLM answers each request: {by:?}");
            if by[0] == node {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never served by node {node}: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

async fn a_session_lands_on_one_node_from_any_entry_node(driver: Driver) {
    let c = cluster(driver, &format!("routing:\n  {SESSION}\n")).await;
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

async fn sse_streams_through_a_peer_event_by_event(driver: Driver) {
    let c = cluster(driver, &format!("routing:\n  {SESSION}\n")).await;
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

async fn a_dead_owner_moves_its_keys_to_the_next_node(driver: Driver) {
    let mut c = cluster(driver, &format!("routing:\n  {SESSION}\n")).await;
    let session = "dead-owner";
    chat(c.node(0).addr, session, false).await;
    let owner = c.served_by(session)[0];
    let entry = (owner + 1) % 3;
    c.kill(owner);
    // Right away (before any health poll notices): a refused connect goes to the next node.
    let r = chat(c.node(entry).addr, session, false).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let now = c.served_by(session);
    assert!(now.len() == 2 && now.contains(&owner), "{now:?}");
}

async fn a_peer_whose_vllm_is_down_loses_its_keys_until_it_recovers(driver: Driver) {
    let c = cluster(driver, &format!("routing:\n  {SESSION}\n")).await;
    let session = "sick-vllm";
    let order = c.order_of(session);
    let (owner, next, last) = (order[0], order[1], order[2]);
    c.until_served_by(last, session, owner, "the owner serves its key")
        .await;
    // The owner's vLLM fails its health checks: peers see `vllm_healthy: false` in its
    // /healthz and send its keys to the next node.
    c.vllms[owner].set_healthy(false);
    c.until_served_by(last, session, next, "the key moves to the next node")
        .await;
    let served = c.served();
    for _ in 0..3 {
        assert_eq!(chat(c.node(last).addr, session, false).await.status, 200);
    }
    assert_eq!(
        c.served()[owner],
        served[owner],
        "nothing more for the sick owner"
    );
    // Its vLLM recovers: the key comes back.
    c.vllms[owner].set_healthy(true);
    c.until_served_by(last, session, owner, "the key comes back to its owner")
        .await;
}

async fn a_peer_that_comes_back_gets_its_keys_back(driver: Driver) {
    let mut c = cluster(driver, &format!("routing:\n  {SESSION}\n")).await;
    let session = "phoenix";
    let order = c.order_of(session);
    let (owner, next, last) = (order[0], order[1], order[2]);
    c.until_served_by(last, session, owner, "the owner serves its key")
        .await;
    c.kill(owner);
    c.until_served_by(last, session, next, "the key moves to the next node")
        .await;
    // The same node starts again (same address): once its peers have seen it healthy, its
    // keys are its own again.
    c.restart(owner);
    c.until_served_by(last, session, owner, "the key comes back to its owner")
        .await;
    c.until_served_by(next, session, owner, "from every node")
        .await;
}

async fn a_transcription_is_served_by_the_owner_of_its_adapter(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let c = cluster_with(driver, "", Some(&origin)).await;
    let name = c.key_owned_by(2, "acme/whisper");
    origin.put_adapter(&name, &AdapterSpec::new(BASE, 30_000, 5));
    let audio: Vec<u8> = (0..=255u8).cycle().take(50_000).collect();
    let mut body =
        b"--BnD\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
            .to_vec();
    body.extend_from_slice(&audio);
    body.extend_from_slice(
        format!("\r\n--BnD\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{name}\r\n--BnD--\r\n")
            .as_bytes(),
    );
    // Entered at node 0: forwarded to the owner, which fetches the adapter and serves it.
    let mut raw = Raw::connect(c.node(0).addr).await;
    let head = format!(
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; \
         boundary=BnD\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    raw.send(&[head.as_bytes(), &body].concat()).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let weights = loraplex::testkit::adapters::file_hash(
        &c.node(2)
            .path("store")
            .join(&name)
            .join("adapter_model.safetensors"),
    )
    .unwrap();
    let want = loraplex::testkit::vllm_audio::transcription_text(Some((&name, weights)), &audio);
    assert_eq!(r.json()["text"], want);
    assert_eq!(
        (0..3).map(|i| c.vllms[i].served(&name)).collect::<Vec<_>>(),
        vec![0, 0, 1]
    );
    assert!(!c.node(0).path("store").join(&name).exists());
}

async fn an_overloaded_owner_sheds_to_the_next_node(driver: Driver) {
    let c = cluster(
        driver,
        &format!("routing:\n  {SESSION}\n  overflow_threshold: 0.01\n"),
    )
    .await;
    let session = "hot-session";
    let order = c.order_of(session);
    let (owner, next, last) = (order[0], order[1], order[2]);
    c.until_served_by(last, session, owner, "the owner serves its key")
        .await;
    // Three slow requests held on the owner: load 3/200 > 0.01.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut raw = Raw::connect(c.node(owner).addr).await;
        raw.send(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        held.push(raw);
    }
    common::eventually("the owner's vLLM to hold the slow requests", || {
        c.vllms[owner]
            .recent_heads()
            .iter()
            .filter(|h| h.target.starts_with("/slow"))
            .count()
            == 3
    })
    .await;
    // Once a health poll has seen the load, the next node of the key serves it: entered
    // there, it serves it itself and counts an overflow...
    c.until_served_by(next, session, next, "the next node keeps the key")
        .await;
    assert!(c.metric(next, "loraplex_overflow_local_total").await >= 1.0);
    // ...and the last node forwards it to the next node, not to the owner or itself.
    c.until_served_by(last, session, next, "the last node forwards to the next")
        .await;
    let served = c.served();
    for _ in 0..3 {
        assert_eq!(chat(c.node(last).addr, session, false).await.status, 200);
    }
    let now = c.served();
    assert_eq!(
        (now[owner], now[next], now[last]),
        (served[owner], served[next] + 3, served[last]),
        "shed to the next node only"
    );
    drop(held);
}

async fn a_spoofed_forward_mark_does_not_bypass_routing(driver: Driver) {
    // With a cluster token: the mark without it is ignored.
    let c = cluster(
        driver,
        &format!("routing:\n  {SESSION}\ncluster:\n  token: t0ken\n"),
    )
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

async fn without_a_token_only_peer_addresses_are_trusted(driver: Driver) {
    let c = cluster(driver, &format!("routing:\n  {SESSION}\n")).await;
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

async fn a_request_a_peer_acknowledged_is_never_sent_elsewhere(driver: Driver) {
    let mut c = cluster(driver, &format!("routing:\n  {SESSION}\n")).await;
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
    c.kill(1);
    let r = raw.response(false).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        !slow_seen(&c.vllms[0]) && !slow_seen(&c.vllms[2]),
        "re-sent elsewhere"
    );
}

async fn each_adapter_lives_on_its_owner_only(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let c = cluster_with(driver, "", Some(&origin)).await;
    let names: Vec<String> = (0..6).map(|i| format!("acme/lora-{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        origin.put_adapter(n, &AdapterSpec::new(BASE, 50_000, i as u64));
    }
    for n in &names {
        for entry in 0..3 {
            let body = format!(r#"{{"model":"{n}","messages":[]}}"#);
            let r = post_json(c.node(entry).addr, "/v1/chat/completions", &body, "").await;
            assert_eq!(r.status, 200, "{n} via {entry}");
        }
        let owner = c.owner_of(n);
        for i in 0..3 {
            let stored = c.node(i).path("store").join(n).exists();
            assert_eq!(stored, i == owner, "{n} on node {i} (owner {owner})");
            assert_eq!(
                c.vllms[i].served(n),
                if i == owner { 3 } else { 0 },
                "{n} served by {i}"
            );
        }
        assert_eq!(origin.adapter_gets(n), 2, "{n}: one download");
    }
}

async fn a_new_owner_copies_the_adapter_from_a_peer_not_the_origin(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let c = cluster_with(driver, "", Some(&origin)).await;
    let name = c.key_owned_by(2, "acme/moved");
    origin.put_adapter(&name, &AdapterSpec::new(BASE, 400_000, 9));
    // Node 0 holds it already (as after a ring change that gave it to node 2).
    let warm = post_json(
        c.node(0).addr,
        "/admin/cache/warmup",
        &format!(r#"{{"adapters":["{name}"]}}"#),
        "",
    )
    .await;
    assert_eq!(warm.json()["results"][0]["status"], "ok");
    let gets = origin.adapter_gets(&name);
    // Later (so a copy stamped with its own time would differ)...
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Asked through node 1, the owner (node 2) fetches it: from node 0.
    let body = format!(r#"{{"model":"{name}","messages":[]}}"#);
    let r = post_json(c.node(1).addr, "/v1/chat/completions", &body, "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        origin.adapter_gets(&name),
        gets,
        "the origin was not asked again"
    );
    assert_eq!(c.vllms[2].served(&name), 1);
    let copied = std::fs::read(
        c.node(2)
            .path("store")
            .join(&name)
            .join("adapter_model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        copied.as_slice(),
        &origin.file(&name, "adapter_model.safetensors").unwrap()[..]
    );
    let m = reqwest::get(format!("{}/metrics", c.node(2).url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("origin=\"peer\",result=\"ok\""), "{m}");
    // The copy keeps when the origin was last asked (node 0's time), not its own.
    let fetched_at = |i: usize| -> serde_json::Value {
        let meta = c.node(i).path("store").join(&name).join(".loraplex_meta");
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(meta).unwrap()).unwrap()
            ["fetched_at"]
            .clone()
    };
    assert!(fetched_at(0).is_string(), "{}", fetched_at(0));
    assert_eq!(fetched_at(2), fetched_at(0));
}

/// Found by the chaos soak (`scripts/soak.sh`): a revalidation that saw a new version at the
/// origin copied a peer's copy instead, which is the old version (the peer fetched it before),
/// so the adapter never changed while any peer held it, and every TTL "updated" it again.
async fn an_update_comes_from_the_origin_not_a_peers_old_copy(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let c = cluster_with(driver, "invalidation:\n  ttl: 1s\n", Some(&origin)).await;
    let name = c.key_owned_by(2, "acme/updated");
    origin.put_adapter(&name, &AdapterSpec::new(BASE, 50_000, 1));
    // The owner (node 2) and node 0 hold version 1 (node 0 as after the owner was down).
    for i in [0, 2] {
        let body = format!(r#"{{"adapters":["{name}"]}}"#);
        let r = post_json(c.node(i).addr, "/admin/cache/warmup", &body, "").await;
        assert_eq!(r.json()["results"][0]["status"], "ok");
    }
    origin.put_adapter(&name, &AdapterSpec::new(BASE, 50_000, 2));
    let new = origin.file(&name, "adapter_model.safetensors").unwrap();
    let new = format!("weights={:016x}", xxhash_rust::xxh3::xxh3_64(&new));
    // Past the TTL, requests to the owner serve its copy and revalidate it: the new version
    // comes (the stand-in vLLM names the weights it loaded in every answer).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let body = format!(r#"{{"model":"{name}","messages":[]}}"#);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = post_json(c.node(2).addr, "/v1/chat/completions", &body, "").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        if String::from_utf8_lossy(&r.body).contains(&new) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still the old version: {}",
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = std::fs::read(
        c.node(2)
            .path("store")
            .join(&name)
            .join("adapter_model.safetensors"),
    );
    assert_eq!(
        stored.unwrap().as_slice(),
        &origin.file(&name, "adapter_model.safetensors").unwrap()[..]
    );
}

async fn an_evict_reaches_every_peer(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    // With an admin token: the broadcast must carry it to the peers.
    let spec = Spec {
        origin: Some(&origin),
        admin_token: Some("adm1n"),
        ..Spec::new(3)
    };
    let c = Cluster::start(driver, spec).await;
    origin.put_adapter("acme/everywhere", &AdapterSpec::new(BASE, 50_000, 3));
    let bearer = "Authorization: Bearer adm1n\r\n";
    let warm = |i: usize| {
        let addr = c.node(i).addr;
        async move {
            let body = r#"{"adapters":["acme/everywhere"]}"#;
            let r = post_json(addr, "/admin/cache/warmup", body, bearer).await;
            assert_eq!(r.json()["results"][0]["status"], "ok");
        }
    };
    for i in 0..3 {
        warm(i).await;
        assert!(c.node(i).path("store/acme/everywhere").exists());
    }
    let evict = r#"{"adapter":"acme/everywhere"}"#;
    let r = post_json(c.node(1).addr, "/admin/cache/evict", evict, bearer)
        .await
        .json();
    assert_eq!(
        (&r["status"], &r["evicted"]),
        (&json!("evicted"), &json!(true))
    );
    let peers: Vec<&str> = r["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["ok"] == true)
        .map(|p| p["peer"].as_str().unwrap())
        .collect();
    assert_eq!(peers, vec![&c.peers[0][..], &c.peers[2][..]], "{r}");
    for i in 0..3 {
        assert!(
            !c.node(i).path("store/acme/everywhere").exists(),
            "still on node {i}"
        );
        let evictions = c.metric(i, "loraplex_cache_evictions_total").await;
        assert_eq!(evictions, 1.0, "node {i} evicted it once");
    }

    // A client's forward mark keeps its evict on the node it sent it to: no broadcast, so
    // no loop either.
    for i in 0..3 {
        warm(i).await;
    }
    let marked = format!("{bearer}X-Loraplex-Forwarded: 1\r\n");
    let r = post_json(c.node(0).addr, "/admin/cache/evict", evict, &marked)
        .await
        .json();
    assert_eq!((&r["evicted"], &r["peers"]), (&json!(true), &json!([])));
    assert!(!c.node(0).path("store/acme/everywhere").exists());
    // Nor does the mark stand in for the token.
    let spoof = post_json(
        c.node(1).addr,
        "/admin/cache/evict",
        evict,
        "X-Loraplex-Forwarded: 1\r\n",
    )
    .await;
    assert_eq!(spoof.status, 401);
    for i in [1, 2] {
        assert!(c.node(i).path("store/acme/everywhere").exists(), "node {i}");
    }
}

/// Three nodes with `routing.forward_timeout: 180ms`, a session key (`prefix-N`) owned by node 1,
/// and a client connection to node 0 that has had one quick answer for it: the next request
/// on it takes the connections that one opened (no fresh connect, which would let the owner's
/// held-back acknowledgement go by itself).
async fn held_ack_cluster(driver: Driver, prefix: &str) -> (Cluster, String, Raw) {
    let c = cluster(
        driver,
        &format!("routing:\n  {SESSION}\n  forward_timeout: 180ms\n"),
    )
    .await;
    let session = c.key_owned_by(1, prefix);
    let mut raw = Raw::connect(c.node(0).addr).await;
    raw.send(&post(
        "/v1/chat/completions",
        &format!(r#"{{"model":"{BASE}","messages":[]}}"#),
        &format!("X-Session-ID: {session}\r\n"),
    ))
    .await;
    assert_eq!(raw.response(false).await.status, 200);
    (c, session, raw)
}

/// `routing.forward_timeout` bounds connect + acknowledgement, never the generation: an answer
/// that takes ten times as long on the owner arrives, from the owner only, run once. The owner
/// holds its acknowledgement back to send it with the answer's head; the timeout is below the
/// kernel's own timer for held bytes (never sooner than 200 ms, Linux's least retransmission
/// timeout; 208 ms measured here), so this also shows that the owner lets it go when the answer
/// is slow to come; 180 ms leaves the acknowledgement, sent after 5 ms, room on a busy machine.
async fn a_forward_longer_than_the_forward_timeout_is_not_cut(driver: Driver) {
    let (c, session, mut raw) = held_ack_cluster(driver, "long").await;
    let started = Instant::now();
    raw.send(&post(
        "/v1/chat/completions",
        &format!(r#"{{"model":"{BASE}","messages":[]}}"#),
        &format!("X-Session-ID: {session}\r\nx-test-ttft-ms: 1500\r\n"),
    ))
    .await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["object"], "chat.completion");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(c.served_by(&session), vec![1]);
    let runs = c.vllms[1]
        .recent_heads()
        .iter()
        .filter(|h| h.header("x-test-ttft-ms").is_some())
        .count();
    assert_eq!(runs, 1, "sent to the owner once");
}

/// The owner of a forwarded request with a large body lets its held-back acknowledgement go
/// before writing the body to its vLLM: a vLLM slow to read it (the owner's write blocks once
/// the socket buffers are full) does not make the entry node time out and send the request
/// elsewhere meanwhile.
async fn a_forward_whose_large_body_vllm_reads_slowly_is_not_sent_elsewhere(driver: Driver) {
    let (c, session, mut raw) = held_ack_cluster(driver, "large").await;
    c.vllms[1].delay_body_reads(Duration::from_millis(800));
    let before = c.served();
    // 4 MiB: more than the loopback socket buffers take while nobody reads (and small enough
    // to be read and parsed well within the forward timeout in a debug build).
    let filler = "x".repeat(4 << 20);
    raw.send(&post(
        "/v1/chat/completions",
        &format!(r#"{{"model":"{BASE}","messages":[],"user":"{filler}"}}"#),
        &format!("X-Session-ID: {session}\r\n"),
    ))
    .await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let after = c.served();
    let by: Vec<u64> = (0..3).map(|i| after[i] - before[i]).collect();
    assert_eq!(by, vec![0, 1, 0], "run once, by the owner's vLLM");
}

/// The owner of an adapter it must download first lets its held-back acknowledgement go before
/// the download: a download slower than `routing.forward_timeout` (and than the kernel's own
/// timer for held bytes) does not send the request elsewhere meanwhile.
async fn a_forward_waiting_for_a_download_is_not_sent_elsewhere(driver: Driver) {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let c = cluster_with(
        driver,
        "routing:\n  forward_timeout: 180ms\n",
        Some(&origin),
    )
    .await;
    let name = c.key_owned_by(1, "acme/slow");
    origin.put_adapter(&name, &AdapterSpec::new(BASE, 400_000, 5));
    origin.set_throttle(Some(500_000)); // about 0.8 s
    let body = format!(r#"{{"model":"{name}","messages":[]}}"#);
    let r = post_json(c.node(0).addr, "/v1/chat/completions", &body, "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for i in 0..3 {
        let stored = c.node(i).path("store").join(&name).exists();
        assert_eq!(stored, i == 1, "stored on node {i}");
        assert_eq!(c.vllms[i].served(&name), u64::from(i == 1), "served by {i}");
    }
}

on_both_drivers!(
    a_session_lands_on_one_node_from_any_entry_node,
    sse_streams_through_a_peer_event_by_event,
    a_dead_owner_moves_its_keys_to_the_next_node,
    an_overloaded_owner_sheds_to_the_next_node,
    a_peer_whose_vllm_is_down_loses_its_keys_until_it_recovers,
    a_peer_that_comes_back_gets_its_keys_back,
    a_transcription_is_served_by_the_owner_of_its_adapter,
    a_spoofed_forward_mark_does_not_bypass_routing,
    without_a_token_only_peer_addresses_are_trusted,
    a_request_a_peer_acknowledged_is_never_sent_elsewhere,
    each_adapter_lives_on_its_owner_only,
    a_new_owner_copies_the_adapter_from_a_peer_not_the_origin,
    an_evict_reaches_every_peer,
    an_update_comes_from_the_origin_not_a_peers_old_copy,
    a_forward_longer_than_the_forward_timeout_is_not_cut,
    a_forward_waiting_for_a_download_is_not_sent_elsewhere,
    a_forward_whose_large_body_vllm_reads_slowly_is_not_sent_elsewhere,
);
