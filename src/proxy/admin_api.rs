//! The admin API under `/admin/*` (the Go project's paths and JSON shapes).
//!
//! - `GET /admin/cache/stats`: `items`, `size`, `max_size`, `dir` (Go) plus write mode, hits,
//!   misses, fetches in flight, pinned.
//! - `GET /admin/cache/fetches`: fetches in flight with bytes, total, rate, elapsed.
//! - `POST /admin/cache/warmup {"adapters": [...]}`: fetch now; per adapter `ok` or the error.
//! - `POST /admin/cache/evict {"adapter": NAME}`: remove it here (vLLM is told to unload it)
//!   and on every peer. The name is validated: nothing outside the storage dir is touched.
//! - `GET /admin/peers`: the peers with load and health.
//!
//! When `admin.token` is set every admin request needs `Authorization: Bearer <token>`.

use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    adapter::AdapterName,
    cluster::{
        peering::broadcast_evict,
        protocol::{is_marked, load},
    },
    error::{Error, ErrorKind},
    http::{Method, RequestHead, constant_time_eq, response},
    proxy::Proxy,
    server::conn::Conn,
};

/// Answer an admin request into `out`; returns the status written.
pub async fn serve(
    w: &Proxy,
    _conn: &Conn,
    head: &RequestHead,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<u16, Error> {
    let shared = &w.shared;
    authorize(shared.config.admin.token.as_deref(), head)?;
    let store = &shared.store;
    let answer = match (head.kind, head.path()) {
        (Method::Get | Method::Head, "/admin/cache/stats") => store.stats(),
        (Method::Get | Method::Head, "/admin/cache/fetches") => store.fetches(),
        (Method::Get | Method::Head, "/admin/peers") => {
            let load = load(shared.pending.load(Ordering::Relaxed) - 1);
            shared.router.topology().to_json(load)
        }
        (Method::Post, "/admin/cache/warmup") => {
            let req: WarmupRequest = parse(body)?;
            store.warmup(&req.adapters).await
        }
        (Method::Post, "/admin/cache/evict") => {
            let req: EvictRequest = parse(body)?;
            let name = AdapterName::parse(&req.adapter)?;
            let evicted = store.evict(&name).await?;
            // A broadcast from a peer is not broadcast again. Any mark stops it (a client that
            // sends one only keeps its own evict local), so evicts can never loop.
            let from_peer = is_marked(head);
            let peers = if from_peer || shared.router.topology().is_single() {
                Vec::new()
            } else {
                let (router, client) = (shared.router.clone(), shared.peer_client.clone());
                let (adapter, token) = (name.to_string(), shared.config.admin.token.clone());
                shared
                    .control
                    .run(async move {
                        broadcast_evict(&router, &client, &adapter, token.as_deref()).await
                    })
                    .await?
            };
            let peers: Vec<Value> = peers
                .into_iter()
                .map(|(peer, ok)| json!({"peer": peer, "ok": ok}))
                .collect();
            json!({"status": "evicted", "adapter": name.as_str(), "evicted": evicted, "peers": peers})
        }
        (_, "/admin/cache/stats" | "/admin/cache/fetches" | "/admin/peers") => {
            return Err(Error::new(ErrorKind::MethodNotAllowed, "GET only"));
        }
        (_, "/admin/cache/warmup" | "/admin/cache/evict") => {
            return Err(Error::new(ErrorKind::MethodNotAllowed, "POST only"));
        }
        _ => {
            let msg = format!("no admin endpoint {} {}", head.method(), head.path());
            return Err(Error::new(ErrorKind::NotFound, msg));
        }
    };
    response::json(out, 200, &answer, head.keep_alive);
    Ok(200)
}

#[derive(Deserialize)]
struct WarmupRequest {
    adapters: Vec<String>,
}

#[derive(Deserialize)]
struct EvictRequest {
    adapter: String,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::bad_request(format!("invalid JSON body: {e}")))
}

/// Check the Bearer token when one is configured.
pub fn authorize(token: Option<&str>, head: &RequestHead) -> Result<(), Error> {
    let Some(token) = token else { return Ok(()) };
    let given = head
        .header("authorization")
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if constant_time_eq(given, token.as_bytes()) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unauthorized,
            "admin endpoints need Authorization: Bearer <admin.token>",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(auth: Option<&str>) -> RequestHead {
        let h = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let raw = format!("GET /admin/cache/stats HTTP/1.1\r\nHost: a\r\n{h}\r\n");
        RequestHead::parse(raw.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn token_is_required_when_set() {
        assert!(authorize(None, &head(None)).is_ok());
        assert!(authorize(Some("s3cret"), &head(Some("Bearer s3cret"))).is_ok());
        assert_eq!(
            authorize(Some("s3cret"), &head(None)).unwrap_err().status(),
            401
        );
        assert_eq!(
            authorize(Some("s3cret"), &head(Some("Bearer s3cre")))
                .unwrap_err()
                .status(),
            401
        );
        assert_eq!(
            authorize(Some("s3cret"), &head(Some("s3cret")))
                .unwrap_err()
                .status(),
            401
        );
    }
}
