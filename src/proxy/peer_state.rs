//! `GET /_loraplex/state?since=V&instance=I`: this node's state for its peers
//! (`cluster::protocol::PeerState`: its vLLM per backend, its hot keys, the disk-filter
//! segments newer than `since`). Only peers may ask (the trust of the other peer endpoints).

use crate::{
    cluster::protocol::is_trusted_peer,
    error::{Error, ErrorKind},
    http::{RequestHead, response},
    proxy::Proxy,
    server::conn::Conn,
};

/// The query's `since` and `instance` (both 0 when absent).
fn query(head: &RequestHead) -> Result<(u64, u64), Error> {
    let (mut since, mut instance) = (0, 0);
    let Some((_, q)) = head.target().split_once('?') else {
        return Ok((0, 0));
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n = v
            .parse()
            .map_err(|_| Error::bad_request(format!("{k}={v:?}: not a number")))?;
        match k {
            "since" => since = n,
            "instance" => instance = n,
            _ => {}
        }
    }
    Ok((since, instance))
}

/// Answer into `out`; returns the status.
pub(super) fn serve(
    w: &Proxy,
    conn: &Conn,
    head: &RequestHead,
    out: &mut Vec<u8>,
) -> Result<u16, Error> {
    if !is_trusted_peer(&w.shared.router, head, conn.peer.ip()) {
        return Err(Error::new(
            ErrorKind::Unauthorized,
            "the peer state is for peers only",
        ));
    }
    let (since, instance) = query(head)?;
    let state = w.shared.cluster.publish(since, instance);
    response::json(out, 200, &state, head.keep_alive);
    Ok(200)
}
