//! `GET /v1/models` across the cluster: every base model of the cluster and the adapters stored
//! in each pool, in vLLM's shape (`{"object":"list","data":[cards]}`; an adapter's card has
//! `parent`, its base model's served name, as vLLM does).
//!
//! A node with one backend in a single-node cluster does not answer it: vLLM's own answer goes
//! back unchanged (it lists the adapters vLLM loaded). Otherwise this node answers with its own
//! part (`local_part`: its backends' base models, the adapters on its disk) merged with each
//! peer's (`GET /_loraplex/models`, asked at once, 3 s each; a peer that does not answer is left
//! out), each model once (the first card of an id wins). Cards built here carry `id`,
//! `object`, `created`, `owned_by`, `root`, `parent` and `max_model_len: null` (the base
//! model's context length is in vLLM's own answer only).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::{
    cluster::protocol::is_trusted_peer,
    error::{Error, ErrorKind},
    http::{Method, RequestHead, response},
    origin::base::Base,
    proxy::Proxy,
    server::conn::Conn,
};

use super::Served;

/// Whether this node answers `GET /v1/models` itself (several backends or several nodes).
pub(super) fn merges(w: &Proxy, head: &RequestHead) -> bool {
    matches!(head.kind, Method::Get | Method::Head)
        && head.path() == "/v1/models"
        && (w.shared.backends.len() > 1 || !w.shared.router.topology().is_single())
}

fn card(id: &str, root: &str, parent: Option<&str>, created: u64) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": null,
    })
}

/// This node's part: a card per served name of each backend's base model, a card per stored
/// adapter whose parent is the served name of the local backend of its base model (the only
/// base model here when its config names none this node serves; none when there are several).
async fn local_part(w: &Proxy) -> Vec<Value> {
    let shared = &w.shared;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let bases: Vec<_> = shared
        .backends
        .all()
        .iter()
        .filter_map(|b| b.base_model())
        .collect();
    let mut cards = Vec::new();
    for base in &bases {
        for served in &base.served {
            cards.push(card(served, &base.root, None, created));
        }
    }
    let names = shared.store.stored_names();
    let learnt = {
        let (bases, names) = (shared.bases.clone(), names.clone());
        shared
            .control
            .run(async move { bases.stored(&names).await })
            .await
            .unwrap_or_default()
    };
    let only = match &bases[..] {
        [first, rest @ ..] if rest.iter().all(|b| b.root == first.root) => Some(first.name()),
        _ => None,
    };
    for (i, name) in names.iter().enumerate() {
        let parent = match learnt.get(i) {
            Some(Base::Known(b)) => bases.iter().find(|m| m.is_base(b)).map(|m| m.name()),
            _ => None,
        }
        .or(only);
        cards.push(card(
            name.as_str(),
            name.as_str(),
            parent.map(|p| &**p),
            created,
        ));
    }
    cards
}

/// `GET /v1/models` answered here: this node's part and every peer's, merged.
pub(super) async fn serve(w: &Proxy, conn: &mut Conn, head: &RequestHead) -> Result<Served, Error> {
    let mut cards = local_part(w).await;
    let topo = w.shared.router.topology();
    let peers: Vec<String> = topo
        .peers
        .iter()
        .enumerate()
        .filter(|&(i, p)| i != topo.me && p.health.is_up())
        .map(|(_, p)| p.addr.clone())
        .collect();
    if !peers.is_empty() {
        let client = w.shared.peer_client.clone();
        let parts = w
            .shared
            .control
            .run(async move {
                futures_util::future::join_all(peers.iter().map(|p| client.models(p))).await
            })
            .await?;
        for part in parts.into_iter().flatten() {
            if let Some(Value::Array(data)) = part.get("data") {
                cards.extend(data.iter().cloned());
            }
        }
    }
    // Each model once: base models first, then adapters, by id.
    let mut seen = std::collections::HashSet::new();
    cards.retain(|c| seen.insert(c["id"].as_str().unwrap_or_default().to_owned()));
    cards.sort_by(|a, b| {
        let key = |c: &Value| (!c["parent"].is_null(), c["id"].as_str().map(str::to_owned));
        key(a).cmp(&key(b))
    });
    write(w, conn, head, &json!({"object": "list", "data": cards})).await
}

/// `GET /_loraplex/models` (peers only): this node's part.
pub(super) async fn serve_part(
    w: &Proxy,
    conn: &mut Conn,
    head: &RequestHead,
) -> Result<Served, Error> {
    if !is_trusted_peer(&w.shared.router, head, conn.peer.ip()) {
        return Err(Error::new(
            ErrorKind::Unauthorized,
            "a node's model list is for peers only",
        ));
    }
    let cards = local_part(w).await;
    write(w, conn, head, &json!({"object": "list", "data": cards})).await
}

async fn write(
    w: &Proxy,
    conn: &mut Conn,
    head: &RequestHead,
    body: &Value,
) -> Result<Served, Error> {
    let mut out = w.take_answer_buf();
    response::json(&mut out, 200, body, head.keep_alive);
    Ok(super::local::send_answer(w, conn, head, out, 200).await)
}
