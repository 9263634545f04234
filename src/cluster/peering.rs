//! The cluster's control-plane work (tokio): following discovery into topology rebuilds,
//! polling every peer's `/healthz` for health and load, and broadcasting evictions.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use serde::Deserialize;

use crate::{
    cluster::{
        discovery::{Discovery, Members},
        router::Router,
    },
    control::Control,
    shutdown::Shutdown,
};

/// Headers that mark a request as sent by a peer.
pub const FORWARDED_HEADER: &str = "x-loraplex-forwarded";
pub const TOKEN_HEADER: &str = "x-loraplex-token";

const PEER_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The Go project's `/healthz` answer.
#[derive(Deserialize)]
struct Healthz {
    #[serde(default)]
    load: f64,
    #[serde(default = "yes")]
    vllm_healthy: bool,
}

fn yes() -> bool {
    true
}

/// Start following `discovery` and polling peers every `interval`, until `shutdown`.
pub fn start(
    router: Arc<Router>,
    discovery: Discovery,
    control: &Control,
    interval: Duration,
    shutdown: Shutdown,
) {
    // A peer gets a few seconds to answer whatever the poll interval: a busy node is slow,
    // not dead (the Go project uses 3 s too).
    let client = reqwest::Client::builder()
        .local_address(router.source_ip)
        .timeout(PEER_CHECK_TIMEOUT)
        .no_proxy()
        .build()
        .expect("a plain HTTP client always builds");
    // The first topology is in place before the workers take a request.
    let mut rx = discovery.subscribe();
    let members = rx.borrow_and_update().clone();
    router.rebuild(&members, control.handle().block_on(resolve(&members)));
    let (r, s) = (router.clone(), shutdown.clone());
    control.spawn(async move {
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = s.wait() => { discovery.leave(); return }
            }
            let members = rx.borrow_and_update().clone();
            let resolved = resolve(&members).await;
            r.rebuild(&members, resolved);
        }
    });
    control.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => poll_peers(&router, &client).await,
                _ = shutdown.wait() => return,
            }
        }
    });
}

async fn resolve(members: &Members) -> HashMap<String, Vec<SocketAddr>> {
    let mut out = HashMap::new();
    for peer in members.peers() {
        match tokio::net::lookup_host(peer.as_str()).await {
            Ok(addrs) => {
                out.insert(peer.clone(), addrs.collect());
            }
            Err(e) => tracing::warn!(peer = %peer, error = %e, "cannot resolve peer"),
        }
    }
    out
}

async fn poll_peers(router: &Router, client: &reqwest::Client) {
    let topo = router.topology();
    let checks = topo
        .peers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != topo.me)
        .map(|(_, p)| {
            let url = format!("http://{}/healthz", p.addr);
            async move {
                let answer = async {
                    client
                        .get(url)
                        .send()
                        .await?
                        .error_for_status()?
                        .json::<Healthz>()
                        .await
                };
                match answer.await {
                    Ok(h) => {
                        if !p.health.is_up() {
                            tracing::info!(peer = %p.addr, "peer is reachable again");
                        }
                        p.health.observe(h.vllm_healthy, h.load);
                    }
                    Err(e) => {
                        let was_up = p.health.is_up();
                        if p.health.check_failed() && was_up {
                            tracing::warn!(peer = %p.addr, error = %e, "peer is down");
                        }
                    }
                }
            }
        });
    futures_util::future::join_all(checks).await;
}

/// Send an admin evict to every other peer (marked as forwarded, so they don't re-broadcast).
/// Returns `(peer, ok)` per peer.
pub async fn broadcast_evict(
    router: &Router,
    adapter: &str,
    admin_token: Option<&str>,
) -> Vec<(String, bool)> {
    let topo = router.topology();
    let mut client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy();
    if let Some(ip) = router.source_ip {
        client = client.local_address(ip);
    }
    let client = client.build().expect("a plain HTTP client always builds");
    let calls = topo
        .peers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != topo.me)
        .map(|(_, p)| {
            let mut req = client
                .post(format!("http://{}/admin/cache/evict", p.addr))
                .header(FORWARDED_HEADER, "1")
                .json(&serde_json::json!({ "adapter": adapter }));
            if let Some(t) = &router.token {
                req = req.header(TOKEN_HEADER, t);
            }
            if let Some(t) = admin_token {
                req = req.bearer_auth(t);
            }
            async move {
                let ok = matches!(req.send().await, Ok(r) if r.status().is_success());
                if !ok {
                    tracing::warn!(peer = %p.addr, adapter, "evict broadcast failed");
                }
                (p.addr.clone(), ok)
            }
        });
    futures_util::future::join_all(calls).await
}
