//! What a traced request records: its server span (parent: the client's `traceparent`), the
//! attributes the pipeline adds on the way (adapter, hash key kind, route and target, cache
//! tier), and the client spans of what it sends on (`forward` to a peer, `vllm`), whose
//! `traceparent` replaces the client's. With tracing off every function here is one branch.
//!
//! Attribute names: OpenTelemetry's HTTP conventions where one fits (`http.request.method`,
//! `url.path`, `http.response.status_code`, `server.address`, `error.type`), `loraplex.*` for
//! the rest (README, "Tracing").

use std::borrow::Cow;

use crate::{
    config::HashOn,
    error::Error,
    http::RequestHead,
    proxy::{
        Proxy,
        local::{self, Endpoint},
        upstream::{Answered, Stage, UpstreamError},
    },
    server::conn::Conn,
    telemetry::{KeyValue, Span, SpanKind, TRACEPARENT, TraceParent},
};

/// The span of a request that came in. The proxy's own endpoints are not traced (health
/// probes and scrapes would drown the traces), but for adapter copies between peers, which a
/// traced fetch on another node asked for.
pub(super) fn request_span(w: &Proxy, conn: &Conn, head: &RequestHead) -> Span {
    let tracer = &w.shared.tracer;
    if !tracer.is_on() {
        return Span::OFF;
    }
    if !matches!(local::route(head.path()), None | Some(Endpoint::Peer)) {
        return Span::OFF;
    }
    tracer.server_span(
        || Cow::Owned(format!("{} {}", head.method(), head.path())),
        |name| head.header_str(name),
        || {
            vec![
                KeyValue::new("http.request.method", head.method().to_owned()),
                KeyValue::new("url.path", head.path().to_owned()),
                KeyValue::new("client.address", conn.peer.ip().to_string()),
            ]
        },
    )
}

/// How the request ended: the status it got, and why it failed (5xx mark the span failed,
/// as OpenTelemetry's HTTP conventions have it for servers).
pub(super) fn finish(span: &mut Span, status: u16, tier: &'static str, err: Option<&Error>) {
    if !span.is_on() {
        return;
    }
    span.set("http.response.status_code", i64::from(status));
    span.set("loraplex.cache_tier", tier);
    if let Some(err) = err {
        span.set("error.type", err.kind.as_str());
        if status >= 500 {
            span.fail(|| err.message.to_string());
        }
    }
}

/// Which kind of hash key placed the request (`loraplex.hash_key.kind`): the `routing.hash_on`
/// part that made it, `model` when a composite mode fell back to the model alone (those keys
/// are borrowed from the request; a composite one is built), `none` without a key.
pub(super) fn key_kind(hash_on: &HashOn, key: Option<&Cow<'_, str>>) -> &'static str {
    let Some(key) = key else {
        return "none";
    };
    let composite = matches!(key, Cow::Owned(_));
    match hash_on {
        HashOn::Model => "model",
        HashOn::Tenant => "tenant",
        HashOn::Header(_) => "header",
        HashOn::TenantModel if composite => "tenant/model",
        HashOn::HeaderModel(_) if composite => "header/model",
        HashOn::TenantModel | HashOn::HeaderModel(_) => "model",
    }
}

/// A client span for what goes on to `target` (a peer, vLLM), and the `traceparent` that
/// makes it the parent of the next hop's span.
pub(super) fn outgoing(
    span: &Span,
    name: &'static str,
    target: impl FnOnce() -> String,
) -> (Span, Option<TraceParent>) {
    let mut out = span.child(name, SpanKind::Client);
    out.set_with("server.address", target);
    let tp = out.traceparent();
    (out, tp)
}

/// What came back from the next hop: its status, or how the exchange failed (`error.type` is
/// the stage: `connect`, `sent`, `streaming`, `client_gone`).
pub(super) fn exchanged(span: &mut Span, result: &Result<Answered, UpstreamError>) {
    if !span.is_on() {
        return;
    }
    match result {
        Ok(answered) => {
            span.set("http.response.status_code", i64::from(answered.status));
            if answered.status >= 500 {
                span.fail(|| format!("status {}", answered.status));
            }
        }
        Err(e) => {
            let stage = match e.stage {
                Stage::Connect => "connect",
                Stage::Sent => "sent",
                Stage::Streaming => "streaming",
                Stage::ClientGone => "client_gone",
            };
            span.set("error.type", stage);
            span.fail(|| e.error.message.to_string());
        }
    }
}

/// `extra` with the `traceparent` of `tp` added (into `buf`), or `extra` as it is.
pub(super) fn with_traceparent<'a>(
    extra: &'a [(&'a str, &'a [u8])],
    tp: &'a Option<TraceParent>,
    buf: &'a mut Vec<(&'a str, &'a [u8])>,
) -> &'a [(&'a str, &'a [u8])] {
    match tp {
        None => extra,
        Some(tp) => {
            buf.extend_from_slice(extra);
            buf.push((TRACEPARENT, tp.as_bytes()));
            buf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::hashkey::hash_key;

    /// The kind of the key `hash_key` really makes, with and without the header.
    fn kind(hash_on: HashOn, header: Option<&'static str>) -> &'static str {
        let key = hash_key(&hash_on, Some("org/a"), Some("base"), |_| header);
        key_kind(&hash_on, key.as_ref())
    }

    #[test]
    fn key_kinds_name_what_made_the_key() {
        let h = || HashOn::Header("x-session".into());
        let hm = || HashOn::HeaderModel("x-session".into());
        assert_eq!(kind(HashOn::Model, None), "model");
        assert_eq!(kind(HashOn::Tenant, Some("t")), "tenant");
        assert_eq!(kind(HashOn::Tenant, None), "none");
        assert_eq!(kind(HashOn::TenantModel, Some("t")), "tenant/model");
        assert_eq!(kind(HashOn::TenantModel, None), "model");
        assert_eq!(kind(h(), Some("s")), "header");
        assert_eq!(kind(hm(), Some("s")), "header/model");
        assert_eq!(kind(hm(), None), "model");
        // The base model alone is no key.
        let base = hash_key(&HashOn::Model, Some("base"), Some("base"), |_| None);
        assert_eq!(key_kind(&HashOn::Model, base.as_ref()), "none");
    }
}
