//! Peer discovery: who is in the cluster right now, published as one [`PeerSet`] snapshot on a
//! tokio `watch` channel that changes only on a real membership change (the same set found
//! again notifies nobody, so ring rebuilds count real changes only).
//!
//! - `static_peers.rs`: the configured list (`--peers`, `discovery.static.peers`).
//! - `file.rs`: heartbeat files in a shared directory (`discovery.file`).
//! - `k8s.rs`: the EndpointSlices of a headless Service, watched with kube-rs (`discovery.k8s`).
//!
//! Every snapshot holds canonical `host:port` strings ([`canonical_peer`]), sorted and
//! deduplicated, and exactly one entry for this node ([`Members::me`]): entries that name this
//! node ([`Identity::is_self`]) collapse into one, and this node's canonical address is added
//! when no entry names it (a k8s pod that is not ready yet, a static list without us).

pub mod file;
pub mod k8s;
pub mod static_peers;

use std::sync::Arc;

use tokio::sync::watch;

pub use crate::cluster::identity::canonical_peer;
use crate::{
    cluster::identity::Identity, config::DiscoveryConfig, control::Control, error::Error,
    shutdown::Shutdown,
};

/// One membership snapshot: every node, this one included exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// Canonical `host:port`, sorted, deduplicated.
    peers: Vec<String>,
    /// Index of this node in `peers`.
    me: usize,
}

/// The current peer set, cheap to clone and share across threads.
pub type PeerSet = Arc<Members>;

impl Members {
    /// Build a snapshot from discovered entries. Entries that are not `host:port` are dropped
    /// with a warning. Among entries naming this node, the one spelled like
    /// [`Identity::canonical`] is kept, else the first in sorted order; the others are dropped
    /// (they would route to us anyway). May resolve host names (see [`Identity::is_self`]).
    pub fn build<I, S>(entries: I, me: &Identity) -> Members
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut peers: Vec<String> = entries
            .into_iter()
            .filter_map(|e| match canonical_peer(e.as_ref()) {
                Ok(p) => Some(p),
                Err(err) => {
                    tracing::warn!(error = %err, "discovery: ignoring a bad peer address");
                    None
                }
            })
            .collect();
        peers.sort_unstable();
        peers.dedup();
        let selves: Vec<usize> = (0..peers.len())
            .filter(|&i| me.is_self(&peers[i]))
            .collect();
        let mine = selves
            .iter()
            .copied()
            .find(|&i| peers[i] == me.canonical())
            .or(selves.first().copied())
            .map(|i| peers[i].clone());
        if selves.len() > 1 {
            tracing::warn!(
                entries = ?selves.iter().map(|&i| &peers[i]).collect::<Vec<_>>(),
                kept = ?mine,
                "discovery: several peer entries name this node; keeping one"
            );
        }
        let mine = mine.unwrap_or_else(|| me.canonical().to_owned());
        let mut i = 0;
        peers.retain(|_| {
            i += 1;
            !selves.contains(&(i - 1))
        });
        let at = peers.binary_search(&mine).unwrap_err();
        peers.insert(at, mine);
        Members { peers, me: at }
    }

    /// Every node, sorted; this one included.
    pub fn peers(&self) -> &[String] {
        &self.peers
    }

    /// This node's entry.
    pub fn me(&self) -> &str {
        &self.peers[self.me]
    }

    /// Whether `peer` (an entry of [`Members::peers`]) is this node. Textual: never resolves.
    pub fn is_me(&self, peer: &str) -> bool {
        self.me() == peer
    }

    /// Every node but this one.
    pub fn others(&self) -> impl Iterator<Item = &str> {
        self.peers
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != self.me)
            .map(|(_, p)| p.as_str())
    }
}

/// The running discovery of one mode. Clones share it.
#[derive(Clone)]
pub struct Discovery {
    rx: watch::Receiver<PeerSet>,
    mode: &'static str,
    /// File mode: our heartbeat, removed by [`Discovery::leave`].
    heartbeat: Option<Arc<file::Heartbeat>>,
}

impl Discovery {
    /// Start discovery on the control plane; it stops when `shutdown` is triggered. Static and
    /// file modes publish their first set before returning (a static list with host names is
    /// resolved here, so this may block briefly on DNS; a file scan reads the directory); k8s
    /// starts with this node alone and follows the API server from there.
    pub fn start(
        cfg: &DiscoveryConfig,
        me: &Identity,
        control: &Control,
        shutdown: Shutdown,
    ) -> Result<Discovery, Error> {
        match cfg {
            DiscoveryConfig::Static { peers } => {
                let tx = static_peers::start(peers, me, control, shutdown)?;
                Ok(Discovery::from_parts(tx, "static", None))
            }
            DiscoveryConfig::File {
                dir,
                heartbeat_interval,
                stale_threshold,
            } => {
                let timing = file::Timing {
                    interval: *heartbeat_interval,
                    stale: *stale_threshold,
                };
                let (tx, hb) = file::start(dir, timing, me, control, shutdown)?;
                Ok(Discovery::from_parts(tx, "file", Some(hb)))
            }
            DiscoveryConfig::K8s { service, namespace } => {
                let target = k8s::Target::new(service, namespace)?;
                let tx = k8s::start(None, target, me, control, shutdown);
                Ok(Discovery::from_parts(tx, "k8s", None))
            }
        }
    }

    /// Kubernetes discovery with a given client (tests, or a caller that built its own config);
    /// [`Discovery::start`] infers one (in-cluster config, else kubeconfig).
    pub fn start_k8s(
        client: kube::Client,
        service: &str,
        namespace: &str,
        me: &Identity,
        control: &Control,
        shutdown: Shutdown,
    ) -> Result<Discovery, Error> {
        let target = k8s::Target::new(service, namespace)?;
        let tx = k8s::start(Some(client), target, me, control, shutdown);
        Ok(Discovery::from_parts(tx, "k8s", None))
    }

    fn from_parts(
        rx: watch::Receiver<PeerSet>,
        mode: &'static str,
        heartbeat: Option<Arc<file::Heartbeat>>,
    ) -> Discovery {
        Discovery {
            rx,
            mode,
            heartbeat,
        }
    }

    /// The current peer set.
    pub fn current(&self) -> PeerSet {
        self.rx.borrow().clone()
    }

    /// A receiver that is notified on every real membership change.
    pub fn subscribe(&self) -> watch::Receiver<PeerSet> {
        self.rx.clone()
    }

    /// `static`, `file` or `k8s`.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Leave the cluster now: file mode removes our heartbeat file and stops writing it
    /// (peers drop us at their next scan instead of after `stale_threshold`). Also done when
    /// `shutdown` triggers; call it directly when the process may exit before the control
    /// plane gets to run. Idempotent; a no-op in the other modes.
    pub fn leave(&self) {
        if let Some(hb) = &self.heartbeat {
            hb.leave();
        }
    }
}

/// The sending side every mode uses: publishes a snapshot only when it differs.
struct Publisher {
    tx: watch::Sender<PeerSet>,
}

impl Publisher {
    fn new(first: Members) -> (Publisher, watch::Receiver<PeerSet>) {
        let (tx, rx) = watch::channel(Arc::new(first));
        (Publisher { tx }, rx)
    }

    /// Publish `next` if it differs from the current set; returns whether it did.
    fn publish(&self, next: Members) -> bool {
        let changed = self.tx.send_if_modified(|cur| {
            if **cur == next {
                return false;
            }
            *cur = Arc::new(next.clone());
            true
        });
        if changed {
            tracing::info!(peers = ?next.peers(), me = next.me(), "discovery: membership changed");
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(listen: &str) -> Identity {
        let ips = vec!["127.0.0.1".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        Identity::with_local_ips(listen.parse().unwrap(), None, ips).unwrap()
    }

    #[test]
    fn members_are_sorted_deduplicated_and_hold_self_once() {
        let me = me("0.0.0.0:9090");
        let m = Members::build(
            ["10.0.0.3:9090", "10.0.0.2:9090", "10.0.0.3:9090", "junk"],
            &me,
        );
        assert_eq!(
            m.peers(),
            ["10.0.0.1:9090", "10.0.0.2:9090", "10.0.0.3:9090"]
        );
        assert_eq!(
            m.me(),
            "10.0.0.1:9090",
            "self added under its canonical address"
        );
        assert_eq!(
            m.others().collect::<Vec<_>>(),
            ["10.0.0.2:9090", "10.0.0.3:9090"]
        );
        assert!(m.is_me("10.0.0.1:9090") && !m.is_me("10.0.0.2:9090"));
    }

    #[test]
    fn entries_naming_self_collapse_into_one() {
        let me = me("0.0.0.0:9090");
        // The list spells us three ways; canonical (10.0.0.1:9090) wins.
        let m = Members::build(
            [
                "localhost:9090",
                "10.0.0.1:9090",
                "127.0.0.1:9090",
                "10.0.0.2:9090",
            ],
            &me,
        );
        assert_eq!(m.peers(), ["10.0.0.1:9090", "10.0.0.2:9090"]);
        assert_eq!(m.me(), "10.0.0.1:9090");
        // Only a non-canonical spelling: kept as written (it is what the other nodes use).
        let m = Members::build(["localhost:9090", "10.0.0.2:9090"], &me);
        assert_eq!(m.peers(), ["10.0.0.2:9090", "localhost:9090"]);
        assert_eq!(m.me(), "localhost:9090");
    }

    #[test]
    fn publisher_notifies_only_on_real_changes() {
        let me = me("127.0.0.1:9090");
        let (publisher, mut rx) = Publisher::new(Members::build(["127.0.0.1:9091"], &me));
        rx.mark_unchanged();
        assert!(!publisher.publish(Members::build(["127.0.0.1:9091", "127.0.0.1:9091"], &me)));
        assert!(!rx.has_changed().unwrap());
        assert!(publisher.publish(Members::build(["127.0.0.1:9092"], &me)));
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update().peers(),
            ["127.0.0.1:9090", "127.0.0.1:9092"]
        );
    }
}
