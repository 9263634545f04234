//! The request pipeline: one function, [`process_request`], that runs every phase in order.
//!
//! 1. the proxy's own endpoints (`/healthz`, `/readyz`, `/metrics`, `/admin/*`);
//! 2. the body, read whole (bounded by `server.max_body_size`);
//! 3. the `model`: the top-level one of a JSON body, or the field of a multipart form;
//! 4. base model or adapter (adapter names validated before anything touches the disk);
//! 5. routing: forward to the node owning the request's hash key, or keep it here, on one of
//!    its vLLM backends (`cluster::router`: only backends serving the requested base model);
//! 6. the adapter on local disk (fetched on a miss), pinned while the request runs;
//! 7. upstream: the chosen vLLM backend, streaming the answer back;
//! 8. metrics.
//!
//! - `upstream.rs`: pooled connections and streaming an answer back.
//! - `forward.rs`: the routing phase.
//! - `local.rs`: the proxy's own endpoints.
//! - `admin_api.rs`: the admin API (`/admin/*`).
//! - `model_list.rs`: `GET /v1/models` merged over the cluster's backends.
//! - `models.rs`: base-model pools: a request's pool, the 404/400 answers, the merged
//!   `/v1/models`, adapters' base models for peers.
//! - `peer_files.rs`: stored adapters served to peers.
//! - `peer_state.rs`: this node's state for its peers.
//! - `trace.rs`: the request's span and those of what it sends on.
//! - `state.rs`: what every worker shares, and each worker's own [`Proxy`] (the server's
//!   handler).
//! - `handles.rs`: a worker's metric handles and adapter names, resolved once.

pub mod admin_api;
pub mod forward;
mod handles;
pub mod local;
mod model_list;
mod models;
pub mod peer_files;
mod peer_state;
mod state;
mod trace;
pub mod upstream;

use std::{borrow::Cow, sync::Arc, time::Instant};

use bytes::Bytes;

use crate::{
    adapter::AdapterName,
    cluster::{
        hashkey::{hash_key, pool_hash},
        protocol,
    },
    config::units::format_duration,
    error::{Error, ErrorKind},
    http::{
        Method, RequestHead,
        model::{extract_model, rewrite_model},
        multipart::{self, Boundary},
        response,
    },
    metrics::Tier,
    server::{Handler, conn::Conn},
    store::Ensured,
    telemetry::Span,
    vllm::BaseModel,
};

pub use self::state::{Pending, Proxy, Shared};
use self::upstream::{Request, Stage, Target};

/// Response header telling the client its adapter was replaced by the base model.
pub const FALLBACK_HEADER: &str = "x-loraplex-fallback";

/// What the client was sent: the status, and whether its connection may serve another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub keep_alive: bool,
}

/// How a request ended, for the metrics and logs: its tier and what the client was sent.
struct Served {
    tier: Tier,
    reply: Reply,
}

impl Handler for Proxy {
    fn handle(&self, conn: &mut Conn, head: RequestHead) -> impl Future<Output = bool> {
        process_request(self, conn, head)
    }
}

/// Handle one request; returns whether the client connection stays open.
pub async fn process_request(w: &Proxy, conn: &mut Conn, head: RequestHead) -> bool {
    let started = Instant::now();
    let shared = &w.shared;
    shared.pending.enter(w.worker);
    let mut body_read = false;
    let mut span = trace::request_span(w, conn, &head);
    let result = pipeline(w, conn, &head, &mut body_read, &mut span).await;
    shared.pending.leave(w.worker);

    let served = match result {
        Ok(served) => {
            trace::finish(&mut span, served.reply.status, served.tier.as_str(), None);
            served
        }
        Err(err) => {
            trace::finish(&mut span, err.status(), Tier::Error.as_str(), Some(&err));
            shared.metrics.count_error(err.kind.as_str());
            if err.kind == ErrorKind::Internal {
                tracing::error!(path = head.path(), error = %err, "internal error");
            } else {
                tracing::debug!(path = head.path(), error = %err, "request refused");
            }
            // Unread body bytes would be taken for the next request: close instead.
            let keep_alive = body_read && head.keep_alive;
            let mut out = Vec::new();
            response::error(&mut out, &err, keep_alive);
            if head.kind == Method::Head {
                response::strip_body(&mut out);
            }
            let written = conn.write_all(out).await.is_ok();
            Served {
                tier: Tier::Error,
                reply: Reply {
                    status: err.status(),
                    keep_alive: keep_alive && written,
                },
            }
        }
    };
    drop(span);
    let tenant = head.header_str("x-tenant-id");
    w.record_request(tenant, served.tier, started.elapsed().as_secs_f64());
    tracing::trace!(
        status = served.reply.status,
        tier = served.tier.as_str(),
        "done"
    );
    served.reply.keep_alive
}

async fn pipeline(
    w: &Proxy,
    conn: &mut Conn,
    head: &RequestHead,
    body_read: &mut bool,
    span: &mut Span,
) -> Result<Served, Error> {
    let shared = &w.shared;
    let cfg = &shared.config.server;

    // 1. The proxy's own endpoints.
    let own = local::route(head.path());

    // 2. The body.
    let body = conn
        .read_body(head, cfg.max_body_size, cfg.body_read_timeout)
        .await?;
    *body_read = true;
    if let Some(endpoint) = own {
        return local::serve(w, conn, head, &body, endpoint).await;
    }
    if model_list::merges(w, head) {
        return model_list::serve(w, conn, head).await;
    }

    // 3. The model: the top-level `model` of a JSON body, or the `model` field of a form.
    let form = Boundary::of(head)?;
    let model = match &form {
        Some(boundary) => multipart::extract_model(&body, boundary)?.map(Cow::Borrowed),
        None if head.carries_model(&body) => extract_model(&body)?,
        None => None,
    };

    // 4. Base model (any name a backend serves its base model by) or adapter.
    let base = match model.as_deref() {
        None | Some("") => None,
        Some(name) => Some(base_backend(w, name).await?),
    };
    // A name no backend here serves but one of another node does is that node's base model.
    let elsewhere = |name: &str| shared.router.view().serves(pool_hash(name));
    let adapter = match (model.as_deref(), &base) {
        (Some(name), Some(None)) if !elsewhere(name) => {
            let adapter = w.handles.adapter_name(name)?;
            span.set_str("loraplex.adapter", adapter.as_str());
            Some(adapter)
        }
        _ => None,
    };
    // A base-model request needs a backend serving that name; an adapter, one serving its
    // base model once the cluster has several (`models.rs`).
    let pools = shared.router.view().pools.clone();
    let pool = match (model.as_deref(), &adapter) {
        (Some(name), None) if !name.is_empty() => pool_hash(name),
        _ => models::pool_of(w, &pools, model.as_deref(), adapter.as_ref()).await?,
    };
    let mut backend = None;
    let mut tier = if adapter.is_some() {
        Tier::Local
    } else {
        Tier::Passthrough
    };

    // 5. Routing. A forwarded request is acknowledged whether its mark is trusted or not
    // (the sender learns it was delivered); only a trusted mark skips routing.
    if protocol::is_marked(head) {
        forward::acknowledge(conn, head).await?;
    }
    if protocol::is_trusted_forward(&shared.router, head, conn.peer.ip()) {
        span.set("loraplex.route", "from_peer");
        let req = forward::route_request(w, None, adapter.as_ref(), pool);
        backend = forward::local_backend(w, &req);
    } else {
        // A base-model request names the base model by the name it uses.
        let base_name = model.as_deref().filter(|_| adapter.is_none());
        let header = |name: &str| head.header_str(name);
        let key = hash_key(&shared.router.hash_on, model.as_deref(), base_name, header);
        span.set_with("loraplex.hash_key.kind", || {
            trace::key_kind(&shared.router.hash_on, key.as_ref())
        });
        // Keyless requests are routed only when they name the base model (inference); the
        // rest (model lists, tokenizer calls, ...) are answered here.
        let base_request = adapter.is_none() && model.as_deref().is_some_and(|m| !m.is_empty());
        if !(key.is_some() || base_request) {
            span.set("loraplex.route", "local");
            let req = forward::route_request(w, None, adapter.as_ref(), pool);
            backend = forward::local_backend(w, &req);
        }
        if key.is_some() || base_request {
            let routed = forward::route(
                w,
                conn,
                head,
                &body,
                key.as_deref(),
                adapter.as_ref(),
                pool,
                span,
            );
            match routed.await? {
                forward::Routed::Done(done) => return Ok(done),
                forward::Routed::Here(b) => backend = b,
            }
            if key.is_some() && adapter.is_none() {
                tier = Tier::Routed;
            }
        }
    }

    // 6. The adapter on local disk (fetched once, however many wait), pinned until the
    //    answer is streamed; or, when it can't be had and `fallback_to_base_model` is on, the
    //    base model with `model` rewritten.
    let mut body = body;
    let mut extra: &[(&str, &[u8])] = &[];
    let _pin = match &adapter {
        None => None,
        Some(name) => match ensure_in_time(w, conn, name, span).await {
            Ok(ensured) => {
                if ensured.fetched {
                    tier = Tier::Origin;
                }
                Some(ensured.pin)
            }
            Err(err) if shared.config.routing.fallback_to_base_model => {
                conn.release_ack();
                let base = base_model(w, backend).await?;
                tracing::warn!(adapter = %name, error = %err, "adapter unavailable: base model");
                body = match &form {
                    Some(boundary) => multipart::rewrite_model(&body, boundary, base.name())?,
                    None => rewrite_model(&body, base.name())?,
                }
                .into();
                extra = &[(FALLBACK_HEADER, b"base-model")];
                tier = Tier::FallbackBase;
                None
            }
            Err(err) => return Err(err),
        },
    };

    // 7. Upstream: the chosen backend; without one (none known to serve the request's base
    // model), the first backend serving its name, else the first (vLLM answers for itself).
    let backend = backend.map(usize::from).unwrap_or_else(|| match &base {
        Some(Some(id)) => *id,
        _ => 0,
    });
    if let (Some(name), Some(_), Some(recent)) = (&adapter, &_pin, w.recent.get(backend)) {
        recent.note(xxhash_rust::xxh3::xxh3_64(name.as_str().as_bytes()));
    }
    span.set_str("loraplex.route.target", shared.router.me.canonical());
    let reply = to_vllm(w, conn, head, body, extra, span, backend).await?;
    Ok(Served { tier, reply })
}

/// The adapter on disk and pinned, waiting at most `storage.fetch_wait_timeout` for its
/// download: past that, a 504 (or the fallback). The download itself goes on, for the requests
/// after this one: it belongs to no request, and the transfer layer stops it if it crawls
/// (`origins[].min_rate`). Before any wait, a peer's acknowledgement held back on `conn` is sent
/// (`Conn::acknowledge`).
async fn ensure_in_time(
    w: &Proxy,
    conn: &Conn,
    name: &AdapterName,
    span: &mut Span,
) -> Result<Ensured, Error> {
    let store = &w.shared.store;
    if let Some(pin) = store.pin(name) {
        return Ok(Ensured {
            pin,
            fetched: false,
        });
    }
    // A download or a wait ahead: a peer's acknowledgement held back goes now.
    conn.release_ack();
    let Some(limit) = w.shared.config.storage.fetch_wait_timeout else {
        return store.ensure_traced(name, span).await;
    };
    match monoio::time::timeout(limit, store.ensure_traced(name, span)).await {
        Ok(ensured) => ensured,
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "adapter {name} is still being downloaded after {} (storage.fetch_wait_timeout); \
                 the download goes on: try again later",
                format_duration(limit)
            ),
        )
        .with_param("model")),
    }
}

/// Which backend serves `model` as its base model (`None`: no backend does, so `model` is an
/// adapter), the backends' base models learnt on first need when not configured.
async fn base_backend(w: &Proxy, model: &str) -> Result<Option<usize>, Error> {
    let backends = &w.shared.backends;
    if !backends.all_known() {
        let backends = backends.clone();
        w.shared
            .control
            .run(async move { backends.learn_base_models().await })
            .await??;
    }
    Ok(backends.base_for(model).map(|(id, _)| id))
}

/// The base model of backend `backend` (the first when `None`), learnt on first need.
async fn base_model(w: &Proxy, backend: Option<u16>) -> Result<Arc<BaseModel>, Error> {
    let vllm = w
        .shared
        .backends
        .get(backend.map_or(0, usize::from))
        .clone();
    if let Some(base) = vllm.base_model() {
        return Ok(base);
    }
    w.shared
        .control
        .run(async move { vllm.learn_base_model().await })
        .await?
}

/// Send the request to local backend `backend` and stream the answer.
async fn to_vllm(
    w: &Proxy,
    conn: &mut Conn,
    head: &RequestHead,
    body: Bytes,
    extra: &[(&str, &[u8])],
    span: &Span,
    backend: usize,
) -> Result<Reply, Error> {
    let vllm = w.shared.backends.get(backend);
    let (mut up, tp) = trace::outgoing(span, "vllm", || {
        vllm.addrs
            .first()
            .map_or_else(String::new, |a| a.to_string())
    });
    let mut buf = Vec::new();
    let upstream_extra = trace::with_traceparent(&[], &tp, &mut buf);
    let target = Target {
        addrs: &vllm.addrs,
        name: "vLLM",
        head_timeout: None,
        acknowledges: false,
        source: None,
        // vLLM runs next to loraplex: plain HTTP.
        tls: None,
    };
    let req = Request::relay(
        &w.pool,
        head,
        upstream_extra,
        &body,
        extra,
        &w.shared.shutdown,
    );
    let result = w.pool.exchange(conn, &target, req).await;
    trace::exchanged(&mut up, &result);
    match result {
        Ok(answered) => Ok(Reply {
            status: answered.status,
            keep_alive: answered.keep_alive,
        }),
        Err(e) => match e.stage {
            Stage::Connect | Stage::Sent => Err(e.error),
            // The client saw a head already, or is gone: nothing to answer, just close.
            Stage::Streaming | Stage::ClientGone => {
                tracing::debug!(error = %e.error, stage = ?e.stage, "exchange cut short");
                Ok(Reply {
                    status: 499,
                    keep_alive: false,
                })
            }
        },
    }
}
