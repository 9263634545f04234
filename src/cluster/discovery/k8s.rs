//! Kubernetes discovery (`discovery.k8s.{service, namespace}`): the ready endpoints of a
//! headless Service, followed through `discovery.k8s.io/v1` EndpointSlices (the Go project
//! polls the deprecated core/v1 Endpoints every 5 s; a watch reacts at once and costs nothing
//! while nothing changes).
//!
//! - Client: in-cluster config, else kubeconfig (`kube::Client::try_default`); while neither
//!   works the error is logged and retried with backoff, and this node runs alone.
//! - Watch: kube-runtime's `watcher` on the slices labelled `kubernetes.io/service-name=<svc>`
//!   in the namespace (empty: the client's default, i.e. the pod's own namespace), fed into a
//!   reflector store; list, watch, re-list on `410 Gone`, re-watch on errors, all with
//!   kube's default backoff. Errors are logged, never fatal.
//! - Peers: every endpoint whose `conditions.ready` is not `false` (unset means ready, as the
//!   API says), its first address, and the port of its slice named `loraplex`, else `http`
//!   (the Go project's names; the example manifests use `http`), else the slice's only TCP
//!   port, else our own listen port (all nodes run the same config). Dual-stack Services have
//!   one slice per family: IPv6 slices are used only when no IPv4 slice exists, so every node
//!   counts each pod once. FQDN slices (never made for a Service with a selector) are skipped.

use std::{
    net::{IpAddr, SocketAddr},
    pin::pin,
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt, reflector,
        watcher::{self, Event},
    },
};
use tokio::sync::watch;

use super::{Members, PeerSet, Publisher};
use crate::{cluster::identity::Identity, control::Control, error::Error, shutdown::Shutdown};

/// The label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// Which Service to follow.
#[derive(Debug, Clone)]
pub(super) struct Target {
    service: String,
    /// Empty: the client's default namespace.
    namespace: String,
}

impl Target {
    /// Check the names (they end up in a label selector and a URL path).
    pub(super) fn new(service: &str, namespace: &str) -> Result<Target, Error> {
        if !is_dns_label(service) {
            return Err(Error::bad_request(format!(
                "discovery.k8s.service {service:?}: expected a Service name (lowercase letters, digits, '-')"
            )));
        }
        if !namespace.is_empty() && !is_dns_label(namespace) {
            return Err(Error::bad_request(format!(
                "discovery.k8s.namespace {namespace:?}: expected a namespace name"
            )));
        }
        Ok(Target {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
        })
    }
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Start with this node alone and follow the Service's slices until shutdown.
pub(super) fn start(
    client: Option<Client>,
    target: Target,
    me: &Identity,
    control: &Control,
    shutdown: Shutdown,
) -> watch::Receiver<PeerSet> {
    let (publisher, rx) = Publisher::new(Members::build(Vec::<String>::new(), me));
    let me = me.clone();
    control.spawn(async move {
        tokio::select! {
            _ = shutdown.wait() => {}
            _ = follow(client, target, me, publisher) => {}
        }
    });
    rx
}

async fn follow(client: Option<Client>, target: Target, me: Identity, publisher: Publisher) {
    let client = match client {
        Some(c) => c,
        None => connect().await,
    };
    let namespace = match target.namespace.as_str() {
        "" => client.default_namespace().to_owned(),
        ns => ns.to_owned(),
    };
    tracing::info!(service = %target.service, %namespace, "discovery.k8s: watching EndpointSlices");
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{SERVICE_LABEL}={}", target.service));
    let (store, writer) = reflector::store();
    let mut events = pin!(reflector(writer, watcher::watcher(api, config)).default_backoff());
    while let Some(event) = events.next().await {
        match event {
            // During a (re-)list the store keeps the old state until `InitDone` swaps it in.
            Ok(Event::Init | Event::InitApply(_)) => {}
            Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => {
                let found = peers_of(&store.state(), me.port());
                publisher.publish(Members::build(found, &me));
            }
            Err(e) => tracing::warn!(error = %e, "discovery.k8s: watch failed; retrying"),
        }
    }
}

/// A client from the in-cluster config or kubeconfig, retried with backoff until one works.
async fn connect() -> Client {
    let mut delay = Duration::from_secs(1);
    loop {
        match Client::try_default().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?delay,
                    "discovery.k8s: no in-cluster config or kubeconfig; running alone");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// `ip:port` of every ready endpoint of `slices` (see the module doc for the rules).
pub(crate) fn peers_of(slices: &[Arc<EndpointSlice>], listen_port: u16) -> Vec<String> {
    let has_v4 = slices.iter().any(|s| s.address_type == "IPv4");
    let mut out = Vec::new();
    for slice in slices {
        let usable = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => !has_v4,
            _ => false,
        };
        if !usable {
            continue;
        }
        let port = pick_port(slice.ports.as_deref().unwrap_or_default(), listen_port);
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            match ep.addresses.first().map(|a| a.parse::<IpAddr>()) {
                Some(Ok(ip)) => out.push(SocketAddr::new(ip, port).to_string()),
                _ => tracing::debug!(addresses = ?ep.addresses, "discovery.k8s: skipping endpoint"),
            }
        }
    }
    out
}

fn pick_port(ports: &[EndpointPort], listen_port: u16) -> u16 {
    let valid = |p: &EndpointPort| {
        let tcp = p.protocol.as_deref().is_none_or(|proto| proto == "TCP");
        p.port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| tcp && *n != 0)
    };
    for name in ["loraplex", "http"] {
        if let Some(n) = ports
            .iter()
            .filter(|p| p.name.as_deref() == Some(name))
            .find_map(valid)
        {
            return n;
        }
    }
    let tcp: Vec<u16> = ports.iter().filter_map(valid).collect();
    match tcp.as_slice() {
        [only] => *only,
        _ => listen_port,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    use super::*;

    fn slice(
        family: &str,
        ports: &[(&str, i32)],
        eps: &[(&str, Option<bool>)],
    ) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            address_type: family.into(),
            endpoints: eps
                .iter()
                .map(|(addr, ready)| Endpoint {
                    addresses: vec![(*addr).into()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some((*name).into()),
                        port: Some(*port),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        })
    }

    #[test]
    fn ready_endpoints_with_the_named_port() {
        let s = slice(
            "IPv4",
            &[("metrics", 9100), ("http", 9090)],
            &[
                ("10.0.0.1", Some(true)),
                ("10.0.0.2", None),
                ("10.0.0.3", Some(false)),
            ],
        );
        assert_eq!(peers_of(&[s], 1), ["10.0.0.1:9090", "10.0.0.2:9090"]);
        let s = slice(
            "IPv4",
            &[("http", 80), ("loraplex", 9090)],
            &[("10.0.0.1", None)],
        );
        assert_eq!(
            peers_of(&[s], 1),
            ["10.0.0.1:9090"],
            "loraplex wins over http"
        );
    }

    #[test]
    fn port_fallbacks() {
        let only = slice("IPv4", &[("", 7000)], &[("10.0.0.1", None)]);
        assert_eq!(peers_of(&[only], 1), ["10.0.0.1:7000"], "the only port");
        let two = slice("IPv4", &[("a", 7000), ("b", 7001)], &[("10.0.0.1", None)]);
        assert_eq!(peers_of(&[two], 9090), ["10.0.0.1:9090"], "our listen port");
    }

    #[test]
    fn dual_stack_counts_each_pod_once() {
        let v4 = slice("IPv4", &[("http", 9090)], &[("10.0.0.1", None)]);
        let v6 = slice("IPv6", &[("http", 9090)], &[("fd00::1", None)]);
        let fqdn = slice("FQDN", &[("http", 9090)], &[("a.example", None)]);
        assert_eq!(peers_of(&[v6.clone(), v4, fqdn], 1), ["10.0.0.1:9090"]);
        assert_eq!(peers_of(&[v6], 1), ["[fd00::1]:9090"]);
    }

    #[test]
    fn target_names_are_checked() {
        assert!(Target::new("loraplex-headless", "").is_ok());
        assert!(Target::new("loraplex-headless", "inference").is_ok());
        assert!(Target::new("", "x").is_err());
        assert!(Target::new("svc,evil=1", "x").is_err());
        assert!(Target::new("svc", "Bad/NS").is_err());
    }
}
