//! TLS on both sides, with certificates made here (rcgen): clients over HTTPS and plain HTTP
//! refused; peers (forwards, health polls) over TLS, checked against the cluster CA by IP SAN;
//! a peer whose certificate another CA signed refused; the phase of a move to TLS where plain
//! and TLS peers meet; certificates reloaded when their files change and on SIGHUP.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    Driver, Node, Raw,
    cluster::{BASE, Cluster, NodeYaml, Spec},
    metric_at as metric,
};
use loraplex::testkit::vllm::{VllmConfig, VllmStandIn};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

/// A CA that signs node certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A node certificate for `sans` (IP addresses become IP SANs).
    fn leaf(&self, sans: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "loraplex node");
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A rustls client trusting this CA only.
    fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }

    /// An HTTPS client trusting this CA only.
    fn https(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .tls_backend_preconfigured(self.client_config())
            .build()
            .unwrap()
    }
}

/// `tls.crt`, `tls.key` (the node's) and `ca.crt` in `dir`.
fn write_files(dir: &Path, leaf: &Leaf, ca: &Ca) {
    std::fs::write(dir.join("tls.crt"), &leaf.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &leaf.key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
}

/// The `server.tls` (and, with `peers`, `cluster.tls`) keys for the files of [`write_files`]
/// (`server.driver` is for [`Driver::config`] to add).
fn tls_yaml(allow_plain: bool, peers: bool) -> String {
    let cluster = if peers {
        "cluster:\n  tls:\n    ca: \"{DIR}/ca.crt\"\n"
    } else {
        ""
    };
    format!(
        "server:\n  workers: 2\n  tls:\n    cert: \"{{DIR}}/tls.crt\"\n    \
         key: \"{{DIR}}/tls.key\"\n    allow_plain: {allow_plain}\n{cluster}"
    )
}

/// Two nodes (`common::cluster`), each with its own stand-in vLLM, requests hashed by
/// `X-Session-ID`. `setup(i, dir, ip)` writes node `i`'s files and gives its TLS keys. Not
/// waited for: each test knows which peers can see each other ([`wait_healthy`]).
async fn pair(driver: Driver, setup: &NodeYaml<'_>) -> Cluster {
    let spec = Spec {
        extra: "routing:\n  hash_on: \"header:X-Session-ID\"\n".to_owned(),
        per_node: Some(setup),
        ..Spec::new(2)
    };
    Cluster::launch(driver, spec).await
}

/// Wait until node `i` sees node `j` healthy, health-checked at least once.
async fn wait_healthy(c: &Cluster, client: &reqwest::Client, scheme: &str, i: usize, j: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let url = format!("{scheme}://{}/admin/peers", c.node(i).addr);
        if let Ok(r) = client.get(&url).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
            && v["peers"].as_array().unwrap().iter().any(|p| {
                p["addr"] == c.peers[j].as_str()
                    && p["healthy"] == true
                    && p["vllm_healthy"] == true
                    && p["checks_ok"].as_u64() > Some(0)
            })
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} never saw node {j} healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /v1/chat/completions` for `session`, streamed (SSE); status and body.
async fn chat(client: &reqwest::Client, url: &str, session: &str) -> (u16, String) {
    let body = format!(r#"{{"model":"{BASE}","stream":true,"max_tokens":3,"messages":[]}}"#);
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .header("x-session-id", session)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn https(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

/// Every node serves TLS only and dials its peers over TLS: health polls and forwards work
/// (plain would be refused), SSE comes through a peer, a plain client gets a 400 saying why.
async fn clients_and_peers_speak_tls_only(driver: Driver) {
    let ca = Ca::new("cluster CA");
    let pair = pair(driver, &|_, dir, ip| {
        write_files(dir, &ca.leaf(&[ip]), &ca);
        tls_yaml(false, true)
    })
    .await;
    let client = ca.https();
    wait_healthy(&pair, &client, "https", 0, 1).await;
    wait_healthy(&pair, &client, "https", 1, 0).await;

    // Entered at node 0, owned by node 1: forwarded over TLS, streamed back over TLS.
    let session = pair.key_owned_by(1, "tls");
    let (status, body) = chat(&client, &https(pair.node(0).addr), &session).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");
    assert!(body.matches("data: {").count() >= 2, "{body}");
    assert_eq!(pair.served_by(&session), vec![1]);

    // Plain HTTP on a TLS-only port: a 400 in plain text, then the connection closes.
    let mut raw = Raw::connect(pair.node(0).addr).await;
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 400);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("HTTPS") && msg.contains("allow_plain"),
        "{msg}"
    );
    assert!(raw.closed().await);

    let n0 = https(pair.node(0).addr);
    let n1 = https(pair.node(1).addr);
    let refused = "loraplex_tls_connections_total{result=\"plain_refused\"}";
    // No peer call in plain (health and state polls, forwards): the only refusal is ours.
    assert_eq!(metric(&client, &n0, refused).await, 1.0);
    assert_eq!(metric(&client, &n1, refused).await, 0.0);
    // Node 1 took node 0's health polls and the forward over TLS, never in plain.
    let tls = "loraplex_tls_connections_total{result=\"tls\"}";
    assert!(metric(&client, &n1, tls).await >= 2.0);
    let plain = "loraplex_tls_connections_total{result=\"plain\"}";
    assert_eq!(metric(&client, &n1, plain).await, 0.0);
}

/// Mid-move: node 0 serves TLS and still takes plain, but dials its peers in plain (first
/// step); node 1 also dials over TLS (second step). Both directions work, each peer link as
/// its dialler speaks.
async fn plain_and_tls_peers_meet_while_a_cluster_moves_to_tls(driver: Driver) {
    let ca = Ca::new("cluster CA");
    let pair = pair(driver, &|i, dir, ip| {
        write_files(dir, &ca.leaf(&[ip]), &ca);
        tls_yaml(true, i == 1)
    })
    .await;
    let client = ca.https();
    // A client of the old days, in plain, and one over TLS.
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    wait_healthy(&pair, &plain, "http", 0, 1).await;
    wait_healthy(&pair, &client, "https", 1, 0).await;
    for (entry, owner) in [(0, 1), (1, 0)] {
        let session = pair.key_owned_by(owner, "tls");
        let url = format!("http://{}", pair.node(entry).addr);
        let (status, body) = chat(&plain, &url, &session).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(pair.served_by(&session), vec![owner]);
    }
    let tls = "loraplex_tls_connections_total{result=\"tls\"}";
    let plain_in = "loraplex_tls_connections_total{result=\"plain\"}";
    // Node 0 is dialled over TLS by node 1; node 1 in plain by node 0 (and by the client).
    assert!(metric(&client, &https(pair.node(0).addr), tls).await >= 2.0);
    assert!(metric(&client, &https(pair.node(1).addr), plain_in).await >= 2.0);
}

/// A peer whose certificate another CA signed is not talked to: node 0's health checks of it
/// fail at the handshake (node 1 sees them fail), and a request it owns is served by node 0.
async fn a_peer_certificate_of_another_ca_is_refused(driver: Driver) {
    let ca = Ca::new("cluster CA");
    let rogue = Ca::new("someone else");
    let pair = pair(driver, &|i, dir, ip| {
        let signer = if i == 1 { &rogue } else { &ca };
        write_files(dir, &signer.leaf(&[ip]), &ca);
        tls_yaml(false, true)
    })
    .await;
    let client = ca.https();
    // Node 1's own certificate is not of `ca`: read its metrics without checking it.
    let blind = reqwest::Client::builder()
        .no_proxy()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let n1 = https(pair.node(1).addr);
    let failed = "loraplex_tls_connections_total{result=\"failed\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&blind, &n1, failed).await < 2.0 {
        assert!(Instant::now() < deadline, "node 0 never tried node 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peers: serde_json::Value = client
        .get(format!("{}/admin/peers", https(pair.node(0).addr)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seen = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == pair.peers[1].as_str())
        .unwrap();
    assert_eq!(
        (&seen["healthy"], &seen["checks_ok"]),
        (&false.into(), &0.into()),
        "{peers}"
    );

    let session = pair.key_owned_by(1, "tls");
    let (status, body) = chat(&client, &https(pair.node(0).addr), &session).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(pair.served_by(&session), vec![0]);
}

/// A TLS client that hangs up (close_notify, then FIN) mid-answer cancels the upstream
/// request, as a plain one does: the alert's bytes must not pass for a pipelined request.
async fn a_tls_client_hanging_up_cancels_the_upstream_request(driver: Driver) {
    let ca = Ca::new("cluster CA");
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &ca.leaf(&["127.0.0.1"]), &ca);
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let yaml = format!(
        "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n{}",
        vllm.url(),
        tls_yaml(false, false)
    );
    let node = tokio::task::block_in_place(|| Node::start_in(dir, &driver.config(&yaml), &[]));
    node.assert_driver(driver);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config()));
    let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let name = ServerName::IpAddress(node.addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.unwrap();
    use tokio::io::AsyncWriteExt;
    tls.write_all(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let slow = || {
        vllm.recent_heads()
            .iter()
            .any(|h| h.target.starts_with("/slow"))
    };
    common::eventually("the request to reach vLLM", slow).await;
    tls.shutdown().await.unwrap();
    drop(tls);
    common::eventually("vLLM to see the request cancelled", || {
        vllm.cancelled() == 1
    })
    .await;
}

on_both_drivers!(
    a_tls_client_hanging_up_cancels_the_upstream_request,
    clients_and_peers_speak_tls_only,
    plain_and_tls_peers_meet_while_a_cluster_moves_to_tls,
    a_peer_certificate_of_another_ca_is_refused,
);

/// The leaf certificate `addr` presents in a new handshake.
async fn served_cert(ca: &Ca, addr: SocketAddr) -> CertificateDer<'static> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config()));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// New files are picked up without a restart (a new handshake gets the new certificate); a
/// broken one leaves the last good certificate in place; SIGHUP reloads at once (and does not
/// stop the process).
#[tokio::test(flavor = "multi_thread")]
async fn certificates_reload_on_change_and_on_sighup() {
    let ca = Ca::new("cluster CA");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.leaf(&["127.0.0.1"]);
    write_files(dir.path(), &first, &ca);
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let yaml = format!(
        "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n{}",
        vllm.url(),
        tls_yaml(false, false)
    );
    let yaml = Driver::Epoll.config(&yaml);
    let mut node = tokio::task::block_in_place(|| Node::start_in(dir, &yaml, &[]));
    let addr = node.addr;
    let url = https(addr);
    let client = ca.https();
    assert_eq!(served_cert(&ca, addr).await, der(&first.cert));

    // A renewal: key and certificate rewritten in place.
    let second = ca.leaf(&["127.0.0.1"]);
    std::fs::write(node.path("tls.key"), &second.key).unwrap();
    std::fs::write(node.path("tls.crt"), &second.cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_cert(&ca, addr).await != der(&second.cert) {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ok = "loraplex_tls_reloads_total{result=\"ok\"}";
    let errors = "loraplex_tls_reloads_total{result=\"error\"}";
    let reloads = metric(&client, &url, ok).await;
    assert!(reloads >= 1.0);

    // A key that does not go with the certificate: refused, the last good one stays.
    std::fs::write(node.path("tls.key"), ca.leaf(&["127.0.0.1"]).key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&client, &url, errors).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the broken key was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served_cert(&ca, addr).await, der(&second.cert));
    assert!(node.log_contains("TLS files not reloaded"));

    // Repaired: picked up by the poll. Then SIGHUP with nothing changed: reloaded anyway.
    let repaired = metric(&client, &url, ok).await;
    std::fs::write(node.path("tls.key"), &second.key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&client, &url, ok).await < repaired + 1.0 {
        assert!(
            Instant::now() < deadline,
            "the repaired key was never loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = metric(&client, &url, ok).await;
    unsafe { libc::kill(node.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.log_contains("SIGHUP: reloading the TLS files")
        || metric(&client, &url, ok).await < before + 1.0
    {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "SIGHUP stopped loraplex"
    );
    assert_eq!(served_cert(&ca, addr).await, der(&second.cert));
    assert!(node.terminate().success());
}
