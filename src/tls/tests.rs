//! The pieces of `crate::tls` on their own: how a peer's certificate is checked, the PEM files
//! and their reload, and the TLS stream over real monoio sockets (both drivers), a cancelled
//! read included.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use monoio::{
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
    net::{TcpListener, TcpStream},
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::{
    client::danger::ServerCertVerifier,
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::{
    Accepted, Acceptor, Outcome, PeerVerifier, Stream, certs,
    reload::{PeerFiles, Reloader, ServerFiles},
};
use crate::metrics::Metrics;

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new() -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
    }

    /// (certificate PEM, key PEM) for `sans`.
    fn leaf(&self, sans: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &self.0)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> rustls::RootCertStore {
        certs::roots(Path::new("ca.crt"), self.0.pem().as_bytes()).unwrap()
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn ip(s: &str) -> ServerName<'static> {
    ServerName::IpAddress(s.parse::<IpAddr>().unwrap().into())
}

fn verify(v: &PeerVerifier, cert: &str, dialled: &str) -> Result<(), rustls::Error> {
    v.verify_server_cert(&der(cert), &[], &ip(dialled), &[], UnixTime::now())
        .map(drop)
}

#[test]
fn a_peer_certificate_must_chain_to_the_ca_and_name_the_dialled_ip() {
    let ca = Ca::new();
    let v = PeerVerifier::new(ca.roots(), None).unwrap();
    let (good, _) = ca.leaf(&["10.0.0.1"]);
    verify(&v, &good, "10.0.0.1").unwrap();
    // Another node's certificate, presented at this address.
    let e = verify(&v, &good, "10.0.0.2").unwrap_err();
    assert!(e.to_string().contains("not valid for name"), "{e}");
    // Right address, another CA (of the same name: its signature does not check out).
    let (rogue, _) = Ca::new().leaf(&["10.0.0.1"]);
    let e = verify(&v, &rogue, "10.0.0.1").unwrap_err();
    assert!(e.to_string().contains("BadSignature"), "{e}");
}

#[test]
fn a_shared_certificate_is_checked_for_the_configured_name() {
    let ca = Ca::new();
    let (shared, _) = ca.leaf(&["loraplex.peers"]);
    let v = PeerVerifier::new(ca.roots(), Some("loraplex.peers")).unwrap();
    verify(&v, &shared, "10.0.0.1").unwrap();
    verify(&v, &shared, "10.0.0.2").unwrap();
    let other = PeerVerifier::new(ca.roots(), Some("elsewhere")).unwrap();
    assert!(verify(&other, &shared, "10.0.0.1").is_err());
}

#[test]
fn a_new_ca_applies_from_the_next_check() {
    let (old, new) = (Ca::new(), Ca::new());
    let v = PeerVerifier::new(old.roots(), None).unwrap();
    let (cert, _) = new.leaf(&["10.0.0.1"]);
    assert!(verify(&v, &cert, "10.0.0.1").is_err());
    v.set_roots(new.roots()).unwrap();
    verify(&v, &cert, "10.0.0.1").unwrap();
}

#[test]
fn bad_files_are_refused_with_their_key() {
    let ca = Ca::new();
    let (cert, _) = ca.leaf(&["127.0.0.1"]);
    let (_, other_key) = ca.leaf(&["127.0.0.1"]);
    let (c, k) = (Path::new("/t/tls.crt"), Path::new("/t/tls.key"));
    let e = certs::certified_key(c, cert.as_bytes(), k, other_key.as_bytes())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("server.tls.key: /t/tls.key: does not go with server.tls.cert"),
        "{e}"
    );
    let e = certs::certified_key(c, b"junk", k, other_key.as_bytes())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "server.tls.cert: /t/tls.crt: no PEM certificate in it");
    let e = certs::roots(Path::new("/t/ca.crt"), b"")
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "cluster.tls.ca: /t/ca.crt: no PEM certificate in it");
    let e = certs::read("server.tls.cert", Path::new("/nonexistent/x"))
        .err()
        .unwrap();
    assert_eq!(e.key(), Some("server.tls.cert"));
}

#[test]
fn a_check_reloads_what_changed_and_keeps_the_last_good_files() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (crt, key, cap) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("ca.crt"),
    );
    let first = ca.leaf(&["127.0.0.1"]);
    std::fs::write(&crt, &first.0).unwrap();
    std::fs::write(&key, &first.1).unwrap();
    std::fs::write(&cap, ca.0.pem()).unwrap();
    let server = ServerFiles::load(crt.clone(), key.clone()).unwrap();
    let resolver = server.resolver.clone();
    let served = || resolver.current().cert[0].clone();
    let peers = PeerFiles::load(cap.clone(), None).unwrap();
    let metrics = Arc::new(Metrics::new());
    let r = Reloader::new(Some(server), Some(peers), metrics);
    assert_eq!(r.check(false), Outcome::Unchanged);
    assert_eq!(r.check(true), Outcome::Reloaded);

    let second = ca.leaf(&["127.0.0.1"]);
    std::fs::write(&crt, &second.0).unwrap();
    std::fs::write(&key, &second.1).unwrap();
    assert_eq!(r.check(false), Outcome::Reloaded);
    assert_eq!(served(), der(&second.0));

    // Half-written: refused once (not at every poll), the last good certificate stays.
    std::fs::write(&crt, &second.0[..second.0.len() / 2]).unwrap();
    assert!(matches!(r.check(false), Outcome::Failed(e) if e.contains("server.tls.cert")));
    assert_eq!(r.check(false), Outcome::Unchanged);
    assert_eq!(served(), der(&second.0));
    std::fs::write(&crt, &second.0).unwrap();
    assert_eq!(r.check(false), Outcome::Reloaded);
    std::fs::remove_file(&cap).unwrap();
    assert!(matches!(r.check(false), Outcome::Failed(e) if e.contains("cluster.tls.ca")));
}

#[derive(PartialEq)]
enum DriverKind {
    IoUring,
    Epoll,
}

/// Run `f` on a monoio runtime of `kind` (as the server's workers build them).
fn on(kind: DriverKind, f: impl AsyncFnOnce()) {
    match kind {
        DriverKind::IoUring if !monoio::utils::detect_uring() => {
            eprintln!("SKIPPED: this kernel refuses io_uring");
        }
        DriverKind::IoUring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f()),
        DriverKind::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f()),
    }
}

/// A TLS listener for 127.0.0.1 and a client config trusting it.
fn endpoints(allow_plain: bool) -> (Acceptor, Arc<rustls::ClientConfig>) {
    let ca = Ca::new();
    let (c, k) = ca.leaf(&["127.0.0.1"]);
    let key = certs::certified_key(Path::new("c"), c.as_bytes(), Path::new("k"), k.as_bytes());
    let resolver = Arc::new(super::reload::CertResolver::new(key.unwrap()));
    let server = certs::server_config(resolver).unwrap();
    let verifier = Arc::new(PeerVerifier::new(ca.roots(), None).unwrap());
    let client = certs::client_config(verifier).unwrap();
    (
        Acceptor::new(Arc::new(server), allow_plain),
        Arc::new(client),
    )
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

async fn read_some(s: &mut Stream) -> Vec<u8> {
    let (n, buf) = s.read(Vec::with_capacity(64 * 1024)).await;
    let n = n.unwrap();
    buf[..n].to_vec()
}

/// Bytes both ways, a big write (many records), a read cancelled by a timeout and the stream
/// still whole after it, then a close_notify seen as EOF.
async fn stream_round_trip() {
    let (acceptor, client) = endpoints(false);
    let (l, addr) = listener().await;
    let server = monoio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let Accepted::Tls(mut s) = acceptor.accept(tcp, 1024).await.unwrap() else {
            panic!("not TLS");
        };
        assert_eq!(read_some(&mut s).await, b"ping");
        let big = vec![7u8; 300_000];
        let (r, _) = s.write_all(big).await;
        r.unwrap();
        // The client's read times out before this arrives.
        monoio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"after".to_vec()).await.0.unwrap();
        s.shutdown().await.unwrap();
    });
    let tcp = TcpStream::connect_addr(addr).await.unwrap();
    let mut s = super::connect(&client, tcp, addr.ip()).await.unwrap();
    assert!(s.is_tls());
    s.write_all(b"ping".to_vec()).await.0.unwrap();
    let mut got = 0;
    while got < 300_000 {
        let chunk = read_some(&mut s).await;
        assert!(!chunk.is_empty() && chunk.iter().all(|&b| b == 7));
        got += chunk.len();
    }
    assert_eq!(got, 300_000);
    let cancelled = monoio::time::timeout(Duration::from_millis(20), read_some(&mut s)).await;
    assert!(cancelled.is_err(), "nothing was sent yet");
    assert_eq!(read_some(&mut s).await, b"after");
    assert_eq!(read_some(&mut s).await, b"", "close_notify: EOF");
    server.await;
}

/// Plain HTTP on a TLS port: refused, or let in with its first bytes kept.
async fn plain_is_sniffed() {
    for allow in [false, true] {
        let (acceptor, _) = endpoints(allow);
        let (l, addr) = listener().await;
        let mut c = TcpStream::connect_addr(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n".to_vec())
            .await
            .0
            .unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        match (acceptor.accept(tcp, 1024).await.unwrap(), allow) {
            (Accepted::Plain { stream, read }, true)
            | (Accepted::Refused { stream, read }, false) => {
                assert!(!stream.is_tls());
                assert_eq!(read, b"GET / HTTP/1.1\r\n\r\n");
            }
            _ => panic!("allow_plain {allow}: wrong outcome"),
        }
    }
    // A connection closed before a byte.
    let (acceptor, _) = endpoints(false);
    let (l, addr) = listener().await;
    drop(TcpStream::connect_addr(addr).await.unwrap());
    let (tcp, _) = l.accept().await.unwrap();
    assert!(matches!(
        acceptor.accept(tcp, 1024).await.unwrap(),
        Accepted::Closed
    ));
}

#[test]
fn stream_round_trip_epoll() {
    on(DriverKind::Epoll, stream_round_trip);
}

#[test]
fn stream_round_trip_io_uring() {
    on(DriverKind::IoUring, stream_round_trip);
}

#[test]
fn plain_is_sniffed_epoll() {
    on(DriverKind::Epoll, plain_is_sniffed);
}

#[test]
fn plain_is_sniffed_io_uring() {
    on(DriverKind::IoUring, plain_is_sniffed);
}
