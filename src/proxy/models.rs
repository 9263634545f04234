//! Base-model pools in the pipeline: an adapter's base model (`crate::origin::base`) before it
//! is routed, the clear answers when no backend of the cluster can serve a request, and the
//! base-model endpoint peers ask (`GET /_loraplex/base/{name}`).

use crate::{
    adapter::AdapterName,
    cluster::{
        hashkey::pool_hash,
        pools::Pools,
        protocol::{BASE_PREFIX, PeerBase, is_trusted_peer},
    },
    error::{Error, ErrorKind},
    http::{RequestHead, response},
    origin::base::{Base, LEARN_TIMEOUT},
    proxy::Proxy,
    server::conn::Conn,
};

/// The base model of adapter `name`, learnt at most once per cluster, waiting at most
/// [`LEARN_TIMEOUT`] (then [`Base::Unknown`]: routed as if pools did not exist).
/// `ask_owner`: false when a peer asks.
pub(super) async fn base_of(w: &Proxy, name: &AdapterName, ask_owner: bool) -> Base {
    match w.shared.bases.lookup(name, ask_owner) {
        Ok(base) => base,
        Err(waiter) => monoio::time::timeout(LEARN_TIMEOUT, waiter.wait())
            .await
            .unwrap_or(Base::Unknown),
    }
}

/// The pool a request needs ([`pool_hash`] of its base model; 0: any, routed as today), or the
/// clear answer when no backend of the cluster can serve it. Pools are in play once the cluster
/// serves two base models; the answers are given once every node reported its backends
/// (`Pools::complete`), never on a guess:
/// - a base-model request: the name it asks for;
/// - an adapter: its base model ([`base_of`]); a base no backend serves is a 400 naming it and
///   the served ones; an adapter no origin has (and no base model of that name) is vLLM's 404,
///   unless `routing.fallback_to_base_model` serves the base model instead; a base not learnt
///   (no origin, an origin failing, a config without the field): 0.
pub(super) async fn pool_of(
    w: &Proxy,
    pools: &Pools,
    model: Option<&str>,
    adapter: Option<&AdapterName>,
) -> Result<u64, Error> {
    if !pools.multi() {
        return Ok(0);
    }
    let Some(adapter) = adapter else {
        return Ok(model
            .filter(|m| !m.is_empty())
            .map(pool_hash)
            .filter(|&p| pools.serves(p))
            .unwrap_or(0));
    };
    match base_of(w, adapter, true).await {
        Base::Known(base) => {
            let pool = pool_hash(&base);
            if pools.serves(pool) {
                Ok(pool)
            } else if pools.complete() {
                Err(unserved(w, pools, adapter, &base))
            } else {
                Ok(0)
            }
        }
        Base::Missing if pools.complete() && !w.shared.config.routing.fallback_to_base_model => {
            Err(Error::model_not_found(adapter.as_str()))
        }
        Base::Missing | Base::Unknown => Ok(0),
    }
}

/// The 400 for an adapter whose base model no backend of the cluster serves.
pub(super) fn unserved(w: &Proxy, pools: &Pools, adapter: &AdapterName, base: &str) -> Error {
    let served: Vec<&str> = pools.names().collect();
    let hint = if w.shared.config.storage.rewrite_base_model {
        " (with storage.rewrite_base_model, map the adapter's name to the base model it runs \
         on with routing.base_models)"
    } else {
        ""
    };
    Error::bad_request(format!(
        "adapter {adapter} needs base model {base}, which no backend of this cluster serves; \
         served base models: {}{hint}",
        served.join(", ")
    ))
    .with_param("model")
}

/// `GET /_loraplex/base/{name}` (peers only): the base model of `name` as this node learns it
/// (its disk, else its origins; never passed on to another node).
pub(super) async fn serve_base(
    w: &Proxy,
    conn: &Conn,
    head: &RequestHead,
    out: &mut Vec<u8>,
) -> Result<u16, Error> {
    if !is_trusted_peer(&w.shared.router, head, conn.peer.ip()) {
        return Err(Error::new(
            ErrorKind::Unauthorized,
            "adapters' base models are for peers only",
        ));
    }
    let raw = head.path().strip_prefix(BASE_PREFIX).unwrap_or_default();
    let name = AdapterName::parse(raw)?;
    let base = base_of(w, &name, false).await;
    let body = PeerBase {
        adapter: name.as_str().to_owned(),
        base_model: base.name().map(str::to_owned),
        missing: base == Base::Missing,
    };
    response::json(out, 200, &body, head.keep_alive);
    Ok(200)
}
