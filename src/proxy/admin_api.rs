//! The admin API under `/admin/*` (the Go project's paths and JSON shapes).
//!
//! - `GET /admin/cache/stats`: `items`, `size`, `max_size`, `dir` (Go) plus write mode, hits,
//!   misses, fetches in flight, pinned.
//! - `GET /admin/cache/fetches`: fetches in flight with bytes, total, rate, elapsed.
//! - `POST /admin/cache/warmup {"adapters": [...], "load": bool}`: fetch now; per adapter `ok`
//!   or the error; the base model learnt first (pools: a base nobody serves is refused as a
//!   request is); with `load`, also load each into every vLLM backend of the node serving it
//!   (`"loaded": true` when one at least took it, `"loaded_on"`: their URLs), so its first
//!   request pays no load; an adapter no vLLM of this node can take is sent on to the node of
//!   its pool its requests go to (`"node"` in its result), once at most. The wait is bounded by
//!   `storage.fetch_wait_timeout` (a 504 past it, the downloads going on), as a request's.
//! - `POST /admin/cache/evict {"adapter": NAME}`: remove it here (vLLM is told to unload it)
//!   and on every peer. The name is validated: nothing outside the storage dir is touched. A
//!   preloaded adapter (`storage.preload`) is refused with 409.
//! - `GET /admin/peers`: the peers with load and health, each node's first vLLM as routing
//!   sees it (`vllm`), and all its backends as it last published them (`backends`: URL,
//!   base-model names, health, load figures).
//!
//! Who may call them ([`authorize`]): with `admin.token` set, every admin request needs
//! `Authorization: Bearer <token>`. Without one, the reads are open but the calls that change
//! something (warm-up, evict: an evict reaches every peer) answer only clients on loopback and
//! authenticated peers (`cluster.token`, else a peer's address), 403 for others; `admin.open`
//! opens them to every client, as the Go project does.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    adapter::AdapterName,
    cluster::{
        hashkey::pool_hash,
        peering::broadcast_evict,
        protocol::{BackendReport, is_marked, is_trusted_peer, load},
        router::backend_json,
    },
    config::{AdminConfig, units::format_duration},
    error::{Clipped, Error, ErrorKind},
    http::{Method, RequestHead, constant_time_eq, response},
    origin::base::Base,
    proxy::{Proxy, models},
    server::conn::Conn,
    vllm::Serving,
};

/// Answer an admin request into `out`; returns the status written.
pub async fn serve(
    w: &Proxy,
    conn: &Conn,
    head: &RequestHead,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<u16, Error> {
    let shared = &w.shared;
    let from = conn.peer.ip().to_canonical();
    authorize(&shared.config.admin, head, || {
        from.is_loopback() || is_trusted_peer(&shared.router, head, from)
    })?;
    let store = &shared.store;
    let answer = match (head.kind, head.path()) {
        (Method::Get | Method::Head, "/admin/cache/stats") => store.stats(),
        (Method::Get | Method::Head, "/admin/cache/fetches") => store.fetches(),
        (Method::Get | Method::Head, "/admin/peers") => {
            let load = load(shared.pending.load(Ordering::Relaxed) - 1);
            let topo = shared.router.topology();
            let mut answer = topo.to_json(load);
            let view = shared.router.view();
            if view.generation == topo.generation
                && let Some(peers) = answer["peers"].as_array_mut()
            {
                for (p, node) in peers.iter_mut().zip(&view.nodes) {
                    p["vllm"] = backend_json(&node.backends()[0]);
                }
            }
            // Each node's backends, as it last published them (this node's: now).
            if let Some(peers) = answer["peers"].as_array_mut() {
                for (p, peer) in peers.iter_mut().zip(&topo.peers) {
                    let backends = shared.cluster.reports_of(&peer.addr);
                    p["backends"] = backends.iter().map(backend_report_json).collect();
                }
            }
            answer
        }
        (Method::Post, "/admin/cache/warmup") => {
            let req: WarmupRequest = parse(body)?;
            // A peer's warm-up is done here or refused, never sent on.
            let forwards = req.load && !is_marked(head);
            let (wanted, elsewhere, bases) =
                bases_first(w, &req.adapters, req.load, forwards).await;
            // Under way on the control plane while this node warms its own.
            let forwarded = forward_warm(w, &elsewhere);
            let mut answer = warm(w, wanted).await?;
            if req.load {
                load_warmed(w, &mut answer, &bases).await;
            }
            let forwarded = forwarded.await?;
            merge_elsewhere(&req.adapters, &mut answer, elsewhere, forwarded);
            answer
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
    /// Also load each adapter into vLLM once its files are here.
    #[serde(default)]
    load: bool,
}

/// The base model of each adapter of a warm-up first, learnt as a request learns it (once the
/// cluster serves two base models; else none is needed): the adapters to fetch here, those
/// warmed elsewhere (by name: refused with the message a request for them would get, or, with
/// `load` and no vLLM of this node serving their base, sent to the node of their pool that
/// requests for them go to when `forwards`, else refused), and each known base model for the
/// loads.
async fn bases_first(
    w: &Proxy,
    adapters: &[String],
    load: bool,
    forwards: bool,
) -> (
    Vec<String>,
    HashMap<String, Elsewhere>,
    HashMap<String, Arc<str>>,
) {
    let pools = w.shared.router.view().pools.clone();
    let (mut wanted, mut elsewhere, mut bases) = (Vec::new(), HashMap::new(), HashMap::new());
    for raw in adapters {
        let name = AdapterName::parse(raw).ok().filter(|_| pools.multi());
        if let Some(name) = name
            && let Base::Known(base) = models::base_of(w, &name, true).await
        {
            match w.shared.backends.serving(&pools, &base) {
                Serving::Nowhere => {
                    let e = models::unserved(w, &pools, &name, &base);
                    elsewhere.insert(raw.clone(), Elsewhere::Refused(e));
                    continue;
                }
                Serving::Elsewhere if load => {
                    // Where its requests go (the pool's owner, or the next node while that
                    // one is down); not to this node, whose view may still list a vLLM it no
                    // longer has.
                    let router = &w.shared.router;
                    let topo = router.topology();
                    let me = &topo.peers[topo.me].addr;
                    let node = forwards
                        .then(|| router.pool_target(raw.as_bytes(), pool_hash(&base)))
                        .flatten()
                        .filter(|node| node != me);
                    let to = match node {
                        Some(node) => Elsewhere::Sent(node),
                        None => Elsewhere::Refused(Error::bad_request(format!(
                            "adapter {name} needs base model {base}, which no vLLM of this \
                             node serves: warm it up on a node of its pool (requests for it go \
                             there)"
                        ))),
                    };
                    elsewhere.insert(raw.clone(), to);
                    continue;
                }
                Serving::Here | Serving::Elsewhere => {
                    bases.insert(raw.clone(), base);
                }
            }
        }
        wanted.push(raw.clone());
    }
    (wanted, elsewhere, bases)
}

/// What became of a warm-up's adapter not warmed on this node.
enum Elsewhere {
    Refused(Error),
    /// Sent to this node (`host:port`), which serves its base model.
    Sent(String),
}

/// Time a node's forwarded warm-up may take beyond `storage.fetch_wait_timeout` (its loads), and
/// in all without that bound.
const FORWARD_LOADS: Duration = Duration::from_secs(60);
const FORWARD_UNBOUNDED: Duration = Duration::from_secs(30 * 60);

/// The warm-ups sent to other nodes, one call per node, on the control plane: each adapter's
/// result as that node gave it, with `"node"`, or the error of the call.
fn forward_warm(
    w: &Proxy,
    elsewhere: &HashMap<String, Elsewhere>,
) -> impl Future<Output = Result<HashMap<String, Value>, Error>> + use<> {
    let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (raw, to) in elsewhere {
        if let Elsewhere::Sent(node) = to {
            by_node.entry(node.clone()).or_default().push(raw.clone());
        }
    }
    let client = w.shared.peer_client.clone();
    let token = w.shared.config.admin.token.clone();
    let timeout = w
        .shared
        .config
        .storage
        .fetch_wait_timeout
        .map_or(FORWARD_UNBOUNDED, |t| t + FORWARD_LOADS);
    let control = w.shared.control.clone();
    async move {
        if by_node.is_empty() {
            // Nothing for another node: no task on the control plane.
            return Ok(HashMap::new());
        }
        control
            .run(async move {
                let calls = by_node.into_iter().map(|(node, adapters)| {
                    let (client, token) = (&client, token.as_deref());
                    async move {
                        let answer = client.warmup(&node, &adapters, token, timeout).await;
                        (node, adapters, answer)
                    }
                });
                let mut results = HashMap::new();
                for (node, adapters, answer) in futures_util::future::join_all(calls).await {
                    if let Err(why) = &answer {
                        tracing::warn!(%node, error = %why, "forwarded warm-up failed");
                    }
                    for raw in adapters {
                        let mut r = match &answer {
                            Ok(results) => results
                                .iter()
                                .find(|r| r["adapter"] == raw.as_str())
                                .cloned()
                                .unwrap_or_else(|| json!({"status": "error: not in its answer"})),
                            Err(why) => json!({"status": format!("error: {why}"), "loaded": false}),
                        };
                        r["adapter"] = json!(raw);
                        r["node"] = json!(node);
                        results.insert(raw, r);
                    }
                }
                results
            })
            .await
    }
}

/// Put the results of the adapters warmed elsewhere (refused, or another node's) back in the
/// warm-up's answer, in the request's order.
fn merge_elsewhere(
    adapters: &[String],
    answer: &mut Value,
    elsewhere: HashMap<String, Elsewhere>,
    forwarded: HashMap<String, Value>,
) {
    if elsewhere.is_empty() {
        return;
    }
    let Some(done) = answer["results"].as_array_mut().map(std::mem::take) else {
        return;
    };
    let mut done = done.into_iter();
    let results: Vec<Value> = adapters
        .iter()
        // By name: a name listed twice gets its result twice, and takes no other's.
        .filter_map(|raw| match elsewhere.get(raw) {
            Some(Elsewhere::Refused(e)) => {
                Some(json!({"adapter": raw, "status": format!("error: {}", e.message)}))
            }
            Some(Elsewhere::Sent(_)) => forwarded.get(raw).cloned(),
            None => done.next(),
        })
        .collect();
    answer["results"] = Value::Array(results);
}

/// The warm-up's downloads, run on the control plane, waited for at most
/// `storage.fetch_wait_timeout` as a request waits: past that, a 504 while they go on (the
/// adapters after the one downloading too, one after another), so a later warm-up or request
/// finds them stored.
async fn warm(w: &Proxy, adapters: Vec<String>) -> Result<Value, Error> {
    let store = w.shared.store.clone();
    let count = adapters.len();
    let first = adapters.first().map(|n| Clipped(n).to_string());
    let warm = w
        .shared
        .control
        .run(async move { store.warmup(&adapters).await });
    let Some(limit) = w.shared.config.storage.fetch_wait_timeout else {
        return warm.await;
    };
    match monoio::time::timeout(limit, warm).await {
        Ok(answer) => answer,
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "the warm-up of {count} adapter(s) ({}{}) is still downloading after {} \
                 (storage.fetch_wait_timeout); the downloads go on: warm up again later to see \
                 them stored",
                first.unwrap_or_default(),
                if count > 1 { ", ..." } else { "" },
                format_duration(limit)
            ),
        )
        .with_param("adapters")),
    }
}

/// Load every adapter the warm-up stored into vLLM (`POST /v1/load_lora_adapter`); each result
/// gets `"loaded": true`, or its status becomes the error.
async fn load_warmed(w: &Proxy, answer: &mut Value, bases: &HashMap<String, Arc<str>>) {
    let Some(results) = answer["results"].as_array_mut() else {
        return;
    };
    for r in results {
        let ok = r["status"] == "ok";
        let name = r["adapter"]
            .as_str()
            .and_then(|n| AdapterName::parse(n).ok());
        let (Some(name), true) = (name, ok) else {
            r["loaded"] = json!(false);
            continue;
        };
        let backends = w.shared.backends.clone();
        let path = w.shared.store.dir().join(name.rel_path());
        let base = r["adapter"]
            .as_str()
            .and_then(|raw| bases.get(raw))
            .cloned();
        let loaded = w
            .shared
            .control
            .run(async move {
                backends
                    .load_for(name.as_str(), &path, base.as_deref())
                    .await
            })
            .await
            .and_then(|r| r);
        match loaded {
            Ok(on) => {
                r["loaded"] = json!(true);
                r["loaded_on"] = json!(on);
            }
            Err(e) => {
                r["loaded"] = json!(false);
                r["status"] = json!(format!("error: {}", e.message));
            }
        }
    }
}

/// One backend of a node for `/admin/peers`: its URL, base-model names (`root` first), health
/// and load figures.
fn backend_report_json(b: &BackendReport) -> Value {
    json!({
        "url": b.url,
        "models": b.models,
        "known": b.known,
        "healthy": b.healthy,
        "running": b.running,
        "waiting": b.waiting,
        "kv_cache_usage": b.kv,
        "lora_slots": b.max_lora,
        "lora_busy": b.lora_busy,
        "capacity_rps": b.capacity,
        "gpu_adapters": b.gpu.len(),
    })
}

#[derive(Deserialize)]
struct EvictRequest {
    adapter: String,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::bad_request(format!("invalid JSON body: {e}")))
}

/// Whether `head` may use the admin API: the Bearer token when one is configured; else any
/// read, and a call that changes something (any method but GET and HEAD) when `admin.open` or
/// when `local_or_peer()` (a loopback client or an authenticated peer).
pub fn authorize(
    admin: &AdminConfig,
    head: &RequestHead,
    local_or_peer: impl FnOnce() -> bool,
) -> Result<(), Error> {
    let Some(token) = admin.token.as_deref() else {
        let reads = matches!(head.kind, Method::Get | Method::Head);
        if reads || admin.open || local_or_peer() {
            return Ok(());
        }
        return Err(Error::new(
            ErrorKind::Forbidden,
            "without admin.token, evict and warm-up answer only loopback clients and peers \
             (set admin.token, or admin.open: true)",
        ));
    };
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

    fn request(method: &str, auth: Option<&str>) -> RequestHead {
        let h = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let raw = format!(
            "{method} /admin/cache/evict HTTP/1.1
Host: a
{h}Content-Length: 0

"
        );
        RequestHead::parse(raw.as_bytes()).unwrap().unwrap().0
    }

    fn head(auth: Option<&str>) -> RequestHead {
        request("GET", auth)
    }

    fn admin(token: Option<&str>, open: bool) -> AdminConfig {
        AdminConfig {
            token: token.map(str::to_owned),
            open,
        }
    }

    #[test]
    fn token_is_required_when_set() {
        let with = admin(Some("s3cret"), false);
        let anyone = || true;
        assert!(authorize(&admin(None, false), &head(None), anyone).is_ok());
        assert!(authorize(&with, &head(Some("Bearer s3cret")), anyone).is_ok());
        for auth in [None, Some("Bearer s3cre"), Some("s3cret")] {
            let e = authorize(&with, &head(auth), anyone).unwrap_err();
            assert_eq!(e.status(), 401, "{auth:?}");
        }
    }

    #[test]
    fn without_a_token_changes_need_a_local_client_or_a_peer() {
        let closed = admin(None, false);
        let (local, stranger) = (|| true, || false);
        assert!(authorize(&closed, &request("POST", None), local).is_ok());
        let e = authorize(&closed, &request("POST", None), stranger).unwrap_err();
        assert_eq!(
            (e.status(), e.kind.openai_type()),
            (403, "PermissionDeniedError")
        );
        for read in ["GET", "HEAD"] {
            assert!(authorize(&closed, &request(read, None), stranger).is_ok());
        }
        assert!(authorize(&admin(None, true), &request("POST", None), stranger).is_ok());
        // With a token, where the client is from does not matter.
        let with = admin(Some("t"), false);
        assert!(authorize(&with, &request("POST", Some("Bearer t")), stranger).is_ok());
        assert_eq!(
            authorize(&with, &request("POST", None), local)
                .unwrap_err()
                .status(),
            401
        );
    }
}
