//! Static discovery: the configured peer list (`--peers`, `discovery.static.peers`).
//!
//! The list is checked at start (a bad entry refuses to start, naming it) and published at
//! once, with this node added when no entry names it (so every node can share one list, or a
//! node can be left out of its own list, and an empty list means a single node).
//!
//! The set itself never changes, but whether an entry *is this node* depends on DNS for host
//! names: a StatefulSet pod's own name may not resolve until it is ready. While some host name
//! does not resolve, the list is re-examined every [`RETRY`]; once all resolve, the task ends.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{Members, PeerSet, Publisher, canonical_peer};
use crate::{
    cluster::identity::{self, Identity},
    control::Control,
    error::Error,
    shutdown::Shutdown,
};

/// How often unresolved host names are retried.
const RETRY: Duration = Duration::from_secs(5);

/// Publish the static set; keep re-checking self-identity while some host name is unresolved.
pub(super) fn start(
    peers: &[String],
    me: &Identity,
    control: &Control,
    shutdown: Shutdown,
) -> Result<watch::Receiver<PeerSet>, Error> {
    let peers = peers
        .iter()
        .map(|p| canonical_peer(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::bad_request(format!("discovery.static.peers: {e}")))?;
    let (publisher, rx) = Publisher::new(Members::build(&peers, me));
    if !all_resolve(&peers) {
        tracing::warn!(?peers, "some static peers do not resolve yet; retrying");
        let (peers, me) = (Arc::new(peers), me.clone());
        control.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
                let (peers, me) = (peers.clone(), me.clone());
                let checked = tokio::task::spawn_blocking(move || {
                    (Members::build(peers.iter(), &me), all_resolve(&peers))
                });
                match checked.await {
                    Ok((members, done)) => {
                        publisher.publish(members);
                        if done {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "static discovery: resolver task failed");
                        return;
                    }
                }
            }
        });
    }
    Ok(rx)
}

fn all_resolve(peers: &[String]) -> bool {
    peers.iter().all(|p| !identity::resolve(p).is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_list_is_published_at_once_with_self() {
        let me = Identity::new("127.0.0.1:9090".parse().unwrap(), None).unwrap();
        let peers = vec!["127.0.0.2:9090".to_owned(), "localhost:9091".to_owned()];
        let rx = start(&peers, &me, &Control::current(), Shutdown::new()).unwrap();
        let set = rx.borrow().clone();
        assert_eq!(
            set.peers(),
            ["127.0.0.1:9090", "127.0.0.2:9090", "localhost:9091"]
        );
        assert_eq!(set.me(), "127.0.0.1:9090");
    }

    #[tokio::test]
    async fn bad_static_entry_refuses_to_start() {
        let me = Identity::new("127.0.0.1:9090".parse().unwrap(), None).unwrap();
        let peers = vec!["127.0.0.2:9090".to_owned(), "http://x:1".to_owned()];
        let err = start(&peers, &me, &Control::current(), Shutdown::new()).unwrap_err();
        assert!(err.message.contains("discovery.static.peers"), "{err}");
        assert!(err.message.contains("http://x:1"), "{err}");
    }
}
