//! One worker's handles on the metrics and names it uses per request, resolved once and kept,
//! so that a request in steady state looks nothing up in a shared map, takes no lock and
//! allocates nothing: request metrics by tenant and tier, forwards by peer, adapter names.
//!
//! Every cache is bounded: tenants by [`MAX_TENANTS`] (tenants past it share the `_other`
//! handles; telling them apart still takes the process-wide tenant set's lock), peers and
//! names by a cap past which the cache starts again empty.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    sync::Arc,
};

use prometheus_client::metrics::counter::Counter;

use crate::{
    adapter::AdapterName,
    error::Error,
    metrics::{MAX_TENANTS, Metrics, PeerLabel, RequestHandles, Tier},
};

/// Peers whose forward counters a worker keeps (a cluster larger than this still works; its
/// cache starts over when full).
const MAX_PEERS: usize = 1024;
/// Adapter names a worker keeps parsed.
const MAX_NAMES: usize = 4096;

/// A tenant's request handles by tier (`Tier::ALL` order), made on first use.
type ByTier = [Option<RequestHandles>; Tier::ALL.len()];

#[derive(Default)]
struct Tenants {
    /// Tenants with a label of their own.
    named: HashMap<Box<str>, ByTier>,
    /// Every tenant past [`MAX_TENANTS`].
    other: ByTier,
}

/// One worker's handles (see the module doc).
pub struct Handles {
    metrics: Arc<Metrics>,
    /// Requests without a tenant (`_default`), by tier.
    untenanted: [RequestHandles; Tier::ALL.len()],
    tenants: RefCell<Tenants>,
    /// `loraplex_peer_forwards_total` by peer address.
    peers: RefCell<Vec<(Box<str>, Counter)>>,
    names: RefCell<HashSet<AdapterName>>,
}

impl Handles {
    pub fn new(metrics: Arc<Metrics>) -> Handles {
        Handles {
            untenanted: Tier::ALL.map(|t| metrics.request_handles(None, t)),
            metrics,
            tenants: RefCell::default(),
            peers: RefCell::default(),
            names: RefCell::default(),
        }
    }

    /// Count one finished request of `tenant` (none or empty: `_default`).
    pub fn record_request(&self, tenant: Option<&str>, tier: Tier, seconds: f64) {
        let Some(tenant) = tenant.filter(|t| !t.is_empty()) else {
            self.untenanted[tier.index()].record(seconds);
            return;
        };
        let mut tenants = self.tenants.borrow_mut();
        let tenants = &mut *tenants;
        let by_tier = if let Some(by_tier) = tenants.named.get_mut(tenant) {
            by_tier
        } else if tenants.named.len() < MAX_TENANTS && self.metrics.tenant_kept(tenant) {
            tenants.named.entry(tenant.into()).or_default()
        } else {
            &mut tenants.other
        };
        by_tier[tier.index()]
            .get_or_insert_with(|| self.metrics.request_handles(Some(tenant), tier))
            .record(seconds);
    }

    /// Count a request forwarded to `peer` (`loraplex_peer_forwards_total{target_peer}`).
    pub fn count_forward(&self, peer: &str) {
        let mut peers = self.peers.borrow_mut();
        if let Some((_, counter)) = peers.iter().find(|(p, _)| **p == *peer) {
            counter.inc();
            return;
        }
        if peers.len() >= MAX_PEERS {
            peers.clear();
        }
        let label = PeerLabel {
            target_peer: peer.to_owned(),
        };
        let counter = self.metrics.peer_forwards.get_or_create(&label).clone();
        counter.inc();
        peers.push((peer.into(), counter));
    }

    /// `name` validated ([`AdapterName::parse`]), shared with the earlier requests for it.
    pub fn adapter_name(&self, name: &str) -> Result<AdapterName, Error> {
        let mut names = self.names.borrow_mut();
        if let Some(known) = names.get(name) {
            return Ok(known.clone());
        }
        let parsed = AdapterName::parse(name)?;
        if names.len() >= MAX_NAMES {
            names.clear();
        }
        names.insert(parsed.clone());
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_past_the_limit_share_other() {
        let metrics = Arc::new(Metrics::new());
        let h = Handles::new(metrics.clone());
        for i in 0..MAX_TENANTS + 5 {
            h.record_request(Some(&format!("t{i}")), Tier::Local, 0.01);
        }
        h.record_request(Some("t0"), Tier::Local, 0.01);
        h.record_request(None, Tier::Passthrough, 0.01);
        let text = metrics.encode();
        let count = |labels: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("loraplex_requests_total{{{labels}}}")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!(count(r#"tenant="t0",cache_tier="local""#), Some(2));
        assert_eq!(count(r#"tenant="_other",cache_tier="local""#), Some(5));
        assert_eq!(
            count(r#"tenant="_default",cache_tier="passthrough""#),
            Some(1)
        );
        assert_eq!(h.tenants.borrow().named.len(), MAX_TENANTS);
    }

    #[test]
    fn forwards_counted_by_peer_and_names_shared() {
        let metrics = Arc::new(Metrics::new());
        let h = Handles::new(metrics.clone());
        for peer in ["10.0.0.2:9090", "10.0.0.3:9090", "10.0.0.2:9090"] {
            h.count_forward(peer);
        }
        let text = metrics.encode();
        assert!(text.contains(r#"loraplex_peer_forwards_total{target_peer="10.0.0.2:9090"} 2"#));
        assert!(text.contains(r#"loraplex_peer_forwards_total{target_peer="10.0.0.3:9090"} 1"#));

        let a = h.adapter_name("acme/x").unwrap();
        let b = h.adapter_name("acme/x").unwrap();
        assert!(
            std::ptr::eq(a.as_str(), b.as_str()),
            "the second is the first, shared"
        );
        assert_eq!(h.adapter_name("../x").unwrap_err().status(), 400);
        assert_eq!(h.names.borrow().len(), 1, "refused names are not kept");
    }
}
