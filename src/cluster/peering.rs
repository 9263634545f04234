//! The cluster's control-plane work (tokio): following discovery into topology rebuilds,
//! polling every peer's `/healthz` for health and load, polling every peer's state (its vLLM,
//! hot keys, disk filter) and ticking the cluster state, and broadcasting evictions.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use crate::{
    cluster::{
        discovery::{Discovery, Members},
        protocol::PeerClient,
        router::Router,
        state::ClusterState,
    },
    control::Control,
    shutdown::Shutdown,
};

/// Start following `discovery` and polling peers every `interval`, until `shutdown`.
pub fn start(
    router: Arc<Router>,
    discovery: Discovery,
    client: PeerClient,
    control: &Control,
    interval: Duration,
    shutdown: Shutdown,
) {
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

/// Poll every peer's state, then tick the cluster state, every `interval` until `shutdown`.
pub fn start_state_poll(
    cluster: Arc<ClusterState>,
    router: Arc<Router>,
    client: PeerClient,
    control: &Control,
    interval: Duration,
    shutdown: Shutdown,
) {
    control.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            let topo = router.topology();
            let polls = topo
                .peers
                .iter()
                .enumerate()
                .filter(|(i, p)| *i != topo.me && p.health.is_up())
                .map(|(_, p)| {
                    let (cluster, client) = (&cluster, &client);
                    async move {
                        let (since, instance) = cluster.poll_args(&p.addr);
                        match client.state(&p.addr, since, instance).await {
                            Ok(state) => cluster.set_peer(&p.addr, state),
                            // Its last state ages out on its own.
                            Err(e) => tracing::debug!(peer = %p.addr, error = %e, "peer state poll failed"),
                        }
                    }
                });
            futures_util::future::join_all(polls).await;
            let peers: Vec<String> = topo.peers.iter().map(|p| p.addr.clone()).collect();
            cluster.forget_peers_not_in(&peers);
            cluster.tick();
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

async fn poll_peers(router: &Router, client: &PeerClient) {
    let topo = router.topology();
    let checks = topo
        .peers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != topo.me)
        .map(|(_, p)| async move {
            match client.healthz(&p.addr).await {
                Ok(h) => {
                    if !p.health.is_up() {
                        tracing::info!(peer = %p.addr, "peer is reachable again");
                    }
                    p.health.observe(h.vllm_healthy, h.load);
                }
                Err(e) => {
                    let was_up = p.health.is_up();
                    if p.health.check_failed() && was_up {
                        tracing::warn!(peer = %p.addr, error = %crate::error::chain(&e), "peer is down");
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
    client: &PeerClient,
    adapter: &str,
    admin_token: Option<&str>,
) -> Vec<(String, bool)> {
    let topo = router.topology();
    let calls = topo
        .peers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != topo.me)
        .map(|(_, p)| async move {
            let ok = client.evict(&p.addr, adapter, admin_token).await;
            if !ok {
                tracing::warn!(peer = %p.addr, adapter, "evict broadcast failed");
            }
            (p.addr.clone(), ok)
        });
    futures_util::future::join_all(calls).await
}
