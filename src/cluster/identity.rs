//! This node's identity in the cluster: the address other nodes know it by
//! ([`Identity::canonical`]) and the answer to "does this peer entry name me?"
//! ([`Identity::is_self`]), plus the one spelling of a peer address everyone agrees on
//! ([`canonical_peer`]).
//!
//! Textual comparison is not enough: with `listen: ":9090"` and a peer list holding
//! `10.0.0.1:9090`, this node *is* `10.0.0.1:9090` when 10.0.0.1 is one of its interface
//! addresses, and forwarding to it would be a hop to itself. So a peer entry names this node when
//! - it equals `--self` (or the canonical address) textually, or
//! - one of its resolved addresses equals one of `--self`'s resolved addresses, or
//! - its port is the listen port and its host resolves to an address our listener accepts:
//!   the listen IP itself when we listen on one address; any interface address or loopback when
//!   we listen on all of them (`0.0.0.0` accepts IPv4 only, `[::]` both families: Linux's
//!   dual-stack default). An empty host (`:9090`, the Go project's single-node default peer
//!   list) and `0.0.0.0` mean "this host", as they do for `connect`.
//!
//! Interface addresses are read once (getifaddrs) when the identity is built.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs},
};

use crate::{config::Config, error::Error};

/// Who this node is.
#[derive(Clone)]
pub struct Identity {
    canonical: String,
    /// `--self`, canonicalised.
    self_addr: Option<String>,
    /// `--self` resolved (for NAT-style setups where peers reach us on another port).
    self_resolved: Vec<SocketAddr>,
    /// The bound listen address (the real port even when configured as `:0`).
    listen: SocketAddr,
    /// This machine's interface addresses (loopback included).
    local_ips: Vec<IpAddr>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("canonical", &self.canonical)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Build from the bound listen address and `--self`. `listen` should be the address the
    /// listener really got (so port 0 in tests becomes the real port). Resolves `self_addr`
    /// (may block on DNS when it is a host name; call at start).
    pub fn new(listen: SocketAddr, self_addr: Option<&str>) -> Result<Identity, Error> {
        let local_ips = if_addrs::get_if_addrs()
            .map_err(|e| Error::internal(format!("cannot list network interfaces: {e}")))?
            .into_iter()
            .map(|i| i.ip())
            .collect();
        Identity::with_local_ips(listen, self_addr, local_ips)
    }

    /// [`Identity::new`] from the config's `listen` and `self_addr` (no bound port yet: a
    /// configured port 0 stays 0; prefer [`Identity::new`] with the bound address).
    pub fn from_config(cfg: &Config) -> Result<Identity, Error> {
        let listen = crate::config::listen_addr(&cfg.listen)?;
        Identity::new(listen, cfg.self_addr.as_deref())
    }

    /// [`Identity::new`] with the interface addresses given instead of read from the system.
    pub fn with_local_ips(
        listen: SocketAddr,
        self_addr: Option<&str>,
        mut local_ips: Vec<IpAddr>,
    ) -> Result<Identity, Error> {
        for ip in &mut local_ips {
            *ip = ip.to_canonical();
        }
        let self_addr = match self_addr.map(str::trim).filter(|s| !s.is_empty()) {
            Some(raw) => Some(
                canonical_peer(raw)
                    .map_err(|e| Error::bad_request(format!("self_addr (--self): {e}")))?,
            ),
            None => None,
        };
        let self_resolved = self_addr.as_deref().map(resolve).unwrap_or_default();
        let canonical = match &self_addr {
            Some(s) => s.clone(),
            None => guess_canonical(listen, &local_ips),
        };
        Ok(Identity {
            canonical,
            self_addr,
            self_resolved,
            listen,
            local_ips,
        })
    }

    /// The address other nodes use for this one: `--self` when given; else the listen address
    /// when it names one IP; else the first non-loopback interface IPv4 (then global IPv6, for
    /// a `[::]` listener) with the listen port; else `127.0.0.1:port`. The guess can pick the
    /// wrong interface on multi-homed hosts (a docker bridge): set `--self` there.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// The listen port.
    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    /// Whether the peer entry `peer` names this node (see the module doc). Host names are
    /// resolved with the system resolver, which may block: call from a blocking context (start,
    /// `spawn_blocking`). IP literals never touch the resolver.
    pub fn is_self(&self, peer: &str) -> bool {
        let peer = peer.trim();
        if self.self_addr.as_deref() == Some(peer) || self.canonical == peer {
            return true;
        }
        resolve(peer)
            .into_iter()
            .any(|addr| self.is_self_addr(addr))
    }

    /// [`Identity::is_self`] for an already-resolved address; never blocks.
    pub fn is_self_addr(&self, addr: SocketAddr) -> bool {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if self.self_resolved.contains(&addr) {
            return true;
        }
        addr.port() == self.listen.port() && self.listener_accepts(addr.ip())
    }

    /// Whether a connection to `ip` on the listen port would reach our listener.
    fn listener_accepts(&self, ip: IpAddr) -> bool {
        // `connect` to the unspecified address goes to this host's loopback.
        let ip = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => other,
        };
        let listen_ip = self.listen.ip().to_canonical();
        if !listen_ip.is_unspecified() {
            return listen_ip == ip;
        }
        // `0.0.0.0` accepts IPv4 only; `[::]` both families (no IPV6_V6ONLY on our sockets).
        let family_ok = listen_ip.is_ipv6() || ip.is_ipv4();
        family_ok && (ip.is_loopback() || self.local_ips.contains(&ip))
    }
}

/// The one spelling of a peer address: `host:port` with a lowercase host, IPv6 in brackets,
/// IP literals in their standard form. An empty host (`:9090`) is kept (it means "this host").
/// Schemes, paths, port 0 and odd characters are refused.
pub fn canonical_peer(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("{raw:?}: port 0"));
        }
        return Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()).to_string());
    }
    let Some((host, port)) = raw.rsplit_once(':') else {
        return Err(format!("{raw:?}: expected host:port"));
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{raw:?}: bad port {port:?}"))?;
    let host_ok = host.len() <= 253
        && !host.starts_with(['.', '-'])
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !host_ok {
        return Err(format!("{raw:?}: bad host {host:?} (expected host:port)"));
    }
    Ok(format!("{}:{port}", host.to_ascii_lowercase()))
}

/// Every address `peer` (`host:port`) resolves to; empty when it does not resolve.
pub(crate) fn resolve(peer: &str) -> Vec<SocketAddr> {
    let Some((host, port)) = peer.rsplit_once(':') else {
        return Vec::new();
    };
    let Ok(port) = port.parse::<u16>() else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)];
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![SocketAddr::new(ip.to_canonical(), port)];
    }
    match (host, port).to_socket_addrs() {
        Ok(addrs) => addrs
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
            .collect(),
        Err(e) => {
            tracing::debug!(peer, error = %e, "peer host does not resolve");
            Vec::new()
        }
    }
}

fn guess_canonical(listen: SocketAddr, local_ips: &[IpAddr]) -> String {
    let listen_ip = listen.ip().to_canonical();
    if !listen_ip.is_unspecified() {
        return SocketAddr::new(listen_ip, listen.port()).to_string();
    }
    let v4 = local_ips
        .iter()
        .find(|ip| ip.is_ipv4() && !ip.is_loopback());
    let v6 = || {
        local_ips.iter().find(|ip| match ip {
            // Link-local (fe80::/10) needs a scope id to be dialled: useless to peers.
            IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => false,
        })
    };
    let ip = v4
        .or_else(|| if listen_ip.is_ipv6() { v6() } else { None })
        .copied()
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, listen.port()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn node(listen: &str, self_addr: Option<&str>) -> Identity {
        let ips = vec![ip("127.0.0.1"), ip("::1"), ip("10.0.0.1"), ip("fd00::2")];
        Identity::with_local_ips(listen.parse().unwrap(), self_addr, ips).unwrap()
    }

    #[test]
    fn all_interfaces_listener_recognises_its_interface_address() {
        // listen ":9090" (0.0.0.0:9090) and the peer list names this host by its IP.
        let me = node("0.0.0.0:9090", None);
        assert!(me.is_self("10.0.0.1:9090"));
        assert!(me.is_self("127.0.0.1:9090"));
        assert!(me.is_self("127.0.0.2:9090"), "all of 127/8 is local");
        assert!(!me.is_self("10.0.0.2:9090"), "another host");
        assert!(!me.is_self("10.0.0.1:9091"), "another port on this host");
        assert!(!me.is_self("[::1]:9090"), "0.0.0.0 does not accept IPv6");
        assert!(
            me.is_self("[::ffff:10.0.0.1]:9090"),
            "v4-mapped is the same host"
        );
    }

    #[test]
    fn localhost_and_empty_host_are_self_in_single_node_configs() {
        // The Go defaults: peers ["localhost:8080"] or [listen] (":8080").
        let me = node("0.0.0.0:8080", None);
        assert!(me.is_self("localhost:8080"));
        assert!(me.is_self(":8080"));
        assert!(me.is_self("0.0.0.0:8080"));
        assert!(!me.is_self("localhost:9090"));
    }

    #[test]
    fn dual_stack_listener_accepts_both_families() {
        let me = node("[::]:9090", None);
        assert!(me.is_self("[::1]:9090"));
        assert!(me.is_self("[fd00::2]:9090"));
        assert!(me.is_self("10.0.0.1:9090"));
        assert!(!me.is_self("[fd00::3]:9090"));
    }

    #[test]
    fn specific_listener_matches_only_its_own_address() {
        // Several nodes on one host, each on its own loopback address or port.
        let me = node("127.0.0.1:9090", None);
        assert!(me.is_self("127.0.0.1:9090"));
        assert!(!me.is_self("127.0.0.2:9090"));
        assert!(
            !me.is_self("10.0.0.1:9090"),
            "not listening on that address"
        );
        assert_eq!(me.canonical(), "127.0.0.1:9090");
    }

    #[test]
    fn self_addr_matches_textually_and_by_resolution() {
        // Behind a port mapping: we listen on 8080, peers reach us at 10.0.0.9:9090.
        let me = node("0.0.0.0:8080", Some("10.0.0.9:9090"));
        assert_eq!(me.canonical(), "10.0.0.9:9090");
        assert!(me.is_self("10.0.0.9:9090"));
        assert!(me.is_self(" 10.0.0.9:9090 "));
        assert!(me.is_self("10.0.0.1:8080"), "still our listener");
        assert!(!me.is_self("10.0.0.9:8080"));
        // A host name that resolves to --self's address (localhost → 127.0.0.1).
        let me = node("0.0.0.0:7000", Some("127.0.0.1:9090"));
        assert!(me.is_self("localhost:9090"));
    }

    #[test]
    fn canonical_guess_prefers_a_routable_ipv4() {
        assert_eq!(node("0.0.0.0:9090", None).canonical(), "10.0.0.1:9090");
        let only_v6 = vec![ip("127.0.0.1"), ip("::1"), ip("fe80::1"), ip("fd00::2")];
        let me =
            Identity::with_local_ips("[::]:9090".parse().unwrap(), None, only_v6.clone()).unwrap();
        assert_eq!(me.canonical(), "[fd00::2]:9090");
        let me = Identity::with_local_ips("0.0.0.0:9090".parse().unwrap(), None, only_v6).unwrap();
        assert_eq!(me.canonical(), "127.0.0.1:9090", "no IPv4 but loopback");
        assert!(me.is_self(me.canonical()));
    }

    #[test]
    fn real_interfaces_include_loopback() {
        let me = Identity::new("0.0.0.0:9090".parse().unwrap(), None).unwrap();
        assert!(me.is_self("127.0.0.1:9090"));
        assert!(me.is_self(me.canonical()));
        for iface in if_addrs::get_if_addrs().unwrap() {
            if iface.ip().is_ipv4() {
                assert!(me.is_self(&SocketAddr::new(iface.ip(), 9090).to_string()));
            }
        }
        // TEST-NET-3: documentation addresses, never assigned to a real interface.
        assert!(!me.is_self("203.0.113.77:9090"));
    }

    #[test]
    fn peers_are_canonicalised() {
        assert_eq!(
            canonical_peer(" Node-A.Example:9090 ").unwrap(),
            "node-a.example:9090"
        );
        assert_eq!(canonical_peer("[0:0::1]:9090").unwrap(), "[::1]:9090");
        assert_eq!(
            canonical_peer("[::ffff:10.0.0.1]:80").unwrap(),
            "10.0.0.1:80"
        );
        assert_eq!(canonical_peer(":8080").unwrap(), ":8080");
        for bad in [
            "10.0.0.1",
            "http://10.0.0.1:9090",
            "a/b:9090",
            "host:0",
            "host:99999",
            "host:",
            "-x:1",
            "",
        ] {
            assert!(canonical_peer(bad).is_err(), "{bad:?} accepted");
        }
        let e = Identity::with_local_ips("0.0.0.0:1".parse().unwrap(), Some("nope"), vec![]);
        assert!(e.unwrap_err().message.contains("self_addr"));
    }
}
