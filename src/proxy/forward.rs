//! The routing phase: send a request to the node the router picks (`cluster::router`), or keep
//! it here; count its key's demand (requests entering from clients) on the way.
//!
//! A request is forwarded at most once: the receiving peer sees the forwarded mark and serves it
//! itself. The mark is trusted only from peers (`cluster::protocol::is_trusted_peer`: with
//! `cluster.token` set, the token must come with it; without one, the connection must come from
//! a peer's address). Anything else is ignored (and never passed on), so a client cannot bypass
//! routing by sending the header.
//!
//! A peer acknowledges a forwarded request (`100 Continue`) as soon as it has read it, before
//! any work. Only failures before that acknowledgement (connect refused or timed out, the
//! connection closed or silent past `routing.forward_timeout`) move a request to the next peer
//! of its key; once a peer has acknowledged the request it is never sent elsewhere, because
//! inference is not idempotent. The timeout bounds connect + acknowledgement, never the
//! generation.

use std::{sync::atomic::Ordering, time::Instant};

use bytes::Bytes;

use xxhash_rust::xxh3::xxh3_64;

use crate::{
    adapter::AdapterName,
    cluster::{
        protocol::{FORWARDED_HEADER, TOKEN_HEADER, load},
        router::RouteRequest,
    },
    error::Error,
    http::RequestHead,
    metrics::Tier,
    proxy::Proxy,
    proxy::trace,
    proxy::upstream::{Request, Stage, Target},
    server::conn::Conn,
    telemetry::Span,
};

use super::{Reply, Served};

/// Tell the forwarding peer its request arrived (ends its forward timeout), in the same
/// segment as the answer's head when that follows at once (`Conn::acknowledge`). Peers forward
/// as HTTP/1.1; an HTTP/1.0 client that sends the mark gets no `100 Continue`.
pub async fn acknowledge(conn: &mut Conn, head: &RequestHead) -> Result<(), Error> {
    conn.acknowledge(head)
        .await
        .map_err(|e| Error::bad_request(format!("peer went away: {e}")))
}

/// Where a routed request ended up.
pub(super) enum Routed {
    /// A peer answered (or the client is gone).
    Done(Served),
    /// To be served here, by this local backend (`None`: none serves the request's pool).
    Here(Option<u16>),
}

/// What the router needs to know of a request: its key's hash, its adapter, its pool
/// (`pool_hash` of the base model it needs; 0: any).
pub(super) fn route_request(
    w: &Proxy,
    key_hash: Option<u64>,
    adapter: Option<&AdapterName>,
    pool: u64,
) -> RouteRequest {
    let shared = &w.shared;
    RouteRequest {
        key: key_hash,
        adapter: adapter.map(|a| xxh3_64(a.as_str().as_bytes())),
        local_disk: adapter.is_some_and(|a| shared.store.contains(a)),
        my_load: load(shared.pending.load(Ordering::Relaxed) - 1),
        pool,
    }
}

/// The local backend for a request served here without a routing decision (a peer forwarded
/// it, or it is not routed), counted as sent there.
pub(super) fn local_backend(w: &Proxy, req: &RouteRequest) -> Option<u16> {
    let router = &w.shared.router;
    let view = router.view();
    let b = router.local_backend_sent(&view, req, &w.sent)?;
    w.sent
        .add_local(&view, router.topology().me, usize::from(b));
    Some(b)
}

/// Route a request by its hash key (`None`: no key, a base-model request under `hash_on:
/// model`), for an adapter request the adapter, and the pool of the base model it needs (0:
/// any).
#[allow(clippy::too_many_arguments)]
pub(super) async fn route(
    w: &Proxy,
    conn: &mut Conn,
    head: &RequestHead,
    body: &Bytes,
    key: Option<&str>,
    adapter: Option<&AdapterName>,
    pool: u64,
    span: &mut Span,
) -> Result<Routed, Error> {
    let shared = &w.shared;
    let router = &shared.router;
    let topo = router.topology();
    let key_hash = key.map(|k| xxh3_64(k.as_bytes()));
    if let Some(h) = key_hash {
        w.demand.count(h, pool, key.unwrap_or_default());
    }
    let req = route_request(w, key_hash, adapter, pool);
    let decision = {
        let view = router.view();
        let d = router.decide(&topo, &view, &req, &w.sent);
        w.sent.add(&view, d.peers.iter().next().unwrap_or(topo.me));
        if let (true, Some(b)) = (d.is_local(), d.backend) {
            w.sent.add_local(&view, topo.me, usize::from(b));
        }
        d
    };
    w.count_decision(decision.reason);
    span.set("loraplex.route.reason", decision.reason.as_str());
    if decision.is_local() {
        if decision.overflow {
            shared.metrics.overflow_local.inc();
        }
        let route = if decision.overflow {
            "overflow"
        } else {
            "local"
        };
        span.set("loraplex.route", route);
        return Ok(Routed::Here(decision.backend));
    }
    let peers = decision.peers;
    let token = router.token.as_deref().unwrap_or_default();
    let marks: [(&str, &[u8]); 2] = [(FORWARDED_HEADER, b"1"), (TOKEN_HEADER, token.as_bytes())];
    let extra = if router.token.is_some() {
        &marks[..]
    } else {
        &marks[..1]
    };
    span.set("loraplex.route", "forward");
    for idx in peers.iter() {
        let peer = &topo.peers[idx];
        let started = Instant::now();
        span.set_str("loraplex.route.target", &peer.addr);
        let (mut fwd, tp) = trace::outgoing(span, "forward", || peer.addr.clone());
        let mut buf = Vec::new();
        let extra = trace::with_traceparent(extra, &tp, &mut buf);
        let target = Target {
            addrs: &peer.sockaddrs,
            name: &peer.addr,
            head_timeout: Some(router.forward_timeout),
            acknowledges: true,
            source: router.source_ip,
            tls: shared.tls.peers.as_ref(),
        };
        let req = Request::relay(&w.pool, head, extra, body, &[], &shared.shutdown);
        let result = w.pool.exchange(conn, &target, req).await;
        trace::exchanged(&mut fwd, &result);
        let m = &shared.metrics;
        match result {
            Ok(answered) => {
                w.handles.count_forward(&peer.addr);
                m.forward_duration
                    .observe((answered.head_at - started).as_secs_f64());
                return Ok(Routed::Done(Served {
                    tier: Tier::Forwarded,
                    reply: Reply {
                        status: answered.status,
                        keep_alive: answered.keep_alive,
                    },
                }));
            }
            Err(e) if e.stage == Stage::Connect => {
                tracing::warn!(peer = %peer.addr, error = %e.error, "peer unreachable, trying the next");
                peer.health.mark_down();
            }
            Err(e) if e.stage == Stage::Sent => return Err(e.error),
            Err(e) => {
                tracing::debug!(peer = %peer.addr, error = %e.error, "forward cut short");
                return Ok(Routed::Done(Served {
                    tier: Tier::Forwarded,
                    reply: Reply {
                        status: 499,
                        keep_alive: false,
                    },
                }));
            }
        }
    }
    tracing::warn!(key, "no chosen peer reachable: serving here");
    span.set("loraplex.route", "unreachable");
    Ok(Routed::Here(local_backend(w, &req)))
}
