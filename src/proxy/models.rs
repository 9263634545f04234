//! Base-model pools in the pipeline: an adapter's base model (`crate::origin::base`) before it
//! is routed, the clear answers when no backend of the cluster can serve a request, and the
//! base-model endpoint peers ask (`GET /_loraplex/base/{name}`).

use crate::{
    adapter::AdapterName,
    cluster::protocol::{BASE_PREFIX, PeerBase, is_trusted_peer},
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
