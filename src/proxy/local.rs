//! The proxy's own endpoints; everything else goes to vLLM.
//!
//! - `GET /healthz`: liveness, always 200, the Go project's JSON (`cluster::protocol::Healthz`):
//!   `status` (`ok`|`degraded`), `load`, `pending`, `vllm_healthy`.
//! - `GET /readyz`: readiness, 503 while no vLLM backend is healthy or the `storage.preload`
//!   attempts have not finished. (`vllm_healthy` here and in `/healthz`: at least one backend
//!   is healthy.)
//! - `GET /metrics`: Prometheus text. (vLLM's own `/metrics` stays on vLLM's port.)
//! - `/admin/*`: see `admin_api.rs`; Bearer `admin.token` required when set.
//! - `GET /_loraplex/state`: this node's state for its peers (`peer_state.rs`).
//!
//! HEAD is answered wherever GET is, with the same head and no body; so are errors to HEAD.

use std::sync::atomic::Ordering;

use serde_json::json;

use crate::{
    cluster::protocol::{self, Healthz},
    error::{Error, ErrorKind},
    http::{Method, RequestHead, response},
    metrics::Tier,
    proxy::Proxy,
    server::conn::Conn,
};

use super::{Reply, Served};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    Admin,
    /// Adapter files for peers (`/_loraplex/adapters/...`).
    Peer,
    /// This node's state for its peers (`/_loraplex/state`).
    State,
    /// An adapter's base model, for peers (`/_loraplex/base/...`, `models.rs`).
    Base,
    /// This node's part of the model list, for peers (`/_loraplex/models`, `model_list.rs`).
    Models,
}

/// Which own endpoint `path` is, if any.
pub fn route(path: &str) -> Option<Endpoint> {
    match path {
        "/healthz" => Some(Endpoint::Healthz),
        "/readyz" => Some(Endpoint::Readyz),
        "/metrics" => Some(Endpoint::Metrics),
        p if p == "/admin" || p.starts_with("/admin/") => Some(Endpoint::Admin),
        protocol::STATE_PATH => Some(Endpoint::State),
        p if p.starts_with(protocol::BASE_PREFIX) => Some(Endpoint::Base),
        protocol::MODELS_PATH => Some(Endpoint::Models),
        p if p.starts_with(protocol::PREFIX) => Some(Endpoint::Peer),
        _ => None,
    }
}

pub(super) async fn serve(
    w: &Proxy,
    conn: &mut Conn,
    head: &RequestHead,
    body: &[u8],
    endpoint: Endpoint,
) -> Result<Served, Error> {
    let shared = &w.shared;
    let keep_alive = head.keep_alive;
    if endpoint == Endpoint::Peer {
        let reply = super::peer_files::serve(w, conn, head).await?;
        return Ok(Served {
            tier: Tier::Passthrough,
            reply,
        });
    }
    if endpoint == Endpoint::Models {
        return super::model_list::serve_part(w, conn, head).await;
    }
    if endpoint != Endpoint::Admin && !matches!(head.kind, Method::Get | Method::Head) {
        return Err(Error::new(
            ErrorKind::MethodNotAllowed,
            format!("{} is GET only", head.path()),
        ));
    }
    let mut out = w.take_answer_buf();
    let status = match endpoint {
        Endpoint::Healthz => {
            // This request counts itself; report the others.
            let pending = shared.pending.load(Ordering::Relaxed) - 1;
            let healthy = shared.backends.is_healthy();
            let body = Healthz::new(pending, healthy);
            response::json(&mut out, 200, &body, keep_alive);
            200
        }
        Endpoint::Readyz => {
            let healthy = shared.backends.is_healthy();
            let preloaded = shared.preload_done.load(Ordering::Relaxed);
            let ready = healthy && preloaded;
            let status = if ready { 200 } else { 503 };
            let body =
                json!({ "ready": ready, "vllm_healthy": healthy, "preload_done": preloaded });
            response::json(&mut out, status, &body, keep_alive);
            status
        }
        Endpoint::Metrics => {
            let inflight = shared.pending.load(Ordering::Relaxed);
            shared.metrics.inflight_requests.set(inflight);
            let text = shared.metrics.encode();
            let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            response::write(&mut out, 200, ct, &[], text.as_bytes(), keep_alive);
            200
        }
        Endpoint::Admin => super::admin_api::serve(w, conn, head, body, &mut out).await?,
        Endpoint::State => super::peer_state::serve(w, conn, head, &mut out)?,
        Endpoint::Base => super::models::serve_base(w, conn, head, &mut out).await?,
        Endpoint::Peer | Endpoint::Models => unreachable!("answered above"),
    };
    Ok(send_answer(w, conn, head, out, status).await)
}

/// Write a proxy-made answer `out` (a whole response, status `status`), without its body for
/// HEAD, and hand the buffer back for reuse.
pub(super) async fn send_answer(
    w: &Proxy,
    conn: &mut Conn,
    head: &RequestHead,
    mut out: Vec<u8>,
    status: u16,
) -> Served {
    if head.kind == Method::Head {
        response::strip_body(&mut out);
    }
    let written = match conn.write_all(out).await {
        Ok(out) => {
            w.give_answer_buf(out);
            true
        }
        Err(_) => false,
    };
    Served {
        tier: Tier::Passthrough,
        reply: Reply {
            status,
            keep_alive: head.keep_alive && written,
        },
    }
}
