//! Routes of the stand-in vLLM that exist only to test proxy transparency and framing.
//!
//! - `ANY /echo/...`: JSON of what arrived: `method`, `target` (path and query, raw),
//!   `version` ("HTTP/1.1"), `headers` (`[[name, value], ...]`, names lowercased, wire order),
//!   `body_len`, `body_xxh3` (16 hex), `chunked`, `body_chunks`.
//! - `GET|HEAD /framing/length`, `/framing/chunked`, `/framing/close`: a body of `size` bytes
//!   (default 4096, pseudo-random from `seed`) in `pieces` pieces `gap_ms` apart, delimited by
//!   `Content-Length`, chunks (one per piece) or closing the connection. Headers
//!   `x-body-len` and `x-body-xxh3` tell what the body must be.
//! - `GET /framing/cut?size=N&after=K`: announces N bytes, sends K, closes.
//! - `ANY /status/CODE`: that status (no body for 204 and 304).
//! - `ANY /slow?ms=N`: waits N ms before the head (`ms` default 10000); a client leaving
//!   meanwhile is counted as cancelled by the server.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

use super::{
    adapters::{hash16, pseudo_random_bytes},
    server::{Framing, Piece, Request, Response},
};

/// Largest body the framing routes make.
const MAX_SIZE: u64 = 64 << 20;

/// Answer `req` if it is a probe route.
pub async fn handle(req: &Request) -> Option<Response> {
    let path = req.head.path();
    if path == "/echo" || path.starts_with("/echo/") {
        return Some(echo(req));
    }
    if let Some(kind) = path.strip_prefix("/framing/") {
        return Some(framing(req, kind));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return Some(status(code));
    }
    if path == "/slow" {
        let ms = req.head.query_u64("ms", 10_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Some(Response::json(200, &json!({"slept_ms": ms})));
    }
    None
}

fn echo(req: &Request) -> Response {
    let head = &req.head;
    let headers: Vec<[&str; 2]> = head
        .headers
        .iter()
        .map(|(n, v)| [n.as_str(), v.as_str()])
        .collect();
    Response::json(
        200,
        &json!({
            "method": head.method,
            "target": head.target,
            "version": format!("HTTP/1.{}", head.version),
            "headers": headers,
            "body_len": req.body.len(),
            "body_xxh3": hash16(xxh3_64(&req.body)),
            "chunked": req.chunked,
            "body_chunks": req.body_chunks,
        }),
    )
}

/// Split `data` into `pieces` nearly equal parts, `gap` before each but the first.
pub fn split_pieces(data: Bytes, pieces: u64, gap: Duration) -> Vec<Piece> {
    let pieces = pieces.clamp(1, data.len().max(1) as u64) as usize;
    let step = data.len().div_ceil(pieces).max(1);
    let mut out = Vec::with_capacity(pieces);
    let mut at = 0;
    while at < data.len() || out.is_empty() {
        let end = (at + step).min(data.len());
        let delay = if out.is_empty() { Duration::ZERO } else { gap };
        out.push(Piece::new(delay, data.slice(at..end)));
        at = end;
    }
    out
}

fn framing(req: &Request, kind: &str) -> Response {
    let q = &req.head;
    let size = q.query_u64("size", 4096).min(MAX_SIZE);
    let body = Bytes::from(pseudo_random_bytes(q.query_u64("seed", 0), size as usize));
    let described = |resp: Response| {
        resp.header("content-type", "application/octet-stream")
            .header("x-body-len", size.to_string())
            .header("x-body-xxh3", hash16(xxh3_64(&body)))
    };
    let gap = Duration::from_millis(q.query_u64("gap_ms", 0));
    let pieces = split_pieces(body.clone(), q.query_u64("pieces", 1), gap);
    match kind {
        "length" => described(Response::new(200)).pieces(Framing::Length, pieces),
        "chunked" => described(Response::new(200)).pieces(Framing::Chunked, pieces),
        "close" => described(Response::new(200)).pieces(Framing::CloseDelimited, pieces),
        "cut" => {
            let after = q.query_u64("after", size / 2).min(size) as usize;
            described(Response::new(200))
                .pieces(
                    Framing::Length,
                    vec![Piece::new(Duration::ZERO, body.slice(..after))],
                )
                .announce_len(size)
                .abort_after_pieces()
        }
        _ => Response::json(404, &json!({"detail": "Not Found"})),
    }
}

fn status(code: &str) -> Response {
    match code.parse::<u16>() {
        Ok(code @ (204 | 304)) => Response::new(code),
        Ok(code @ 200..=599) => Response::json(code, &json!({"status": code})),
        _ => Response::json(400, &json!({"detail": "status must be 200..=599"})),
    }
}
