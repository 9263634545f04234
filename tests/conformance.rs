//! The HTTP/1.1 rules a keep-alive client or a pooling front proxy relies on, checked byte for
//! byte against the real binary: no body after a HEAD answer (RFC 9110 §9.3.2), no 1xx to
//! HTTP/1.0 (§15.2), one `Host` (RFC 9112 §3.2), transfer codings (§6.1). Every case runs
//! under both io drivers (`io_uring::case`, `epoll::case`).

mod common;

use common::{Driver, Node, Raw};
use loraplex::testkit::{
    adapters::AdapterSpec,
    origin::{OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmStandIn},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BASE: &str = "tiny-base";

fn vllm() -> VllmStandIn {
    VllmStandIn::start(VllmConfig::new(BASE)).unwrap()
}

fn node(driver: Driver, vllm_url: &str, extra: &str) -> Node {
    Node::start_on(
        driver,
        &format!(
            "vllm_url: \"{vllm_url}\"\nvllm:\n  model_name: \"{BASE}\"\n  \
             health_check_interval: 1h\n{extra}"
        ),
    )
}

/// Requests vLLM received other than loraplex's own health and model polls.
fn app_requests(vllm: &VllmStandIn) -> usize {
    vllm.recent_heads()
        .iter()
        .filter(|h| h.target != "/health" && h.target != "/v1/models")
        .count()
}

/// A HEAD request with a JSON body of its own (framed, so the connection stays usable).
fn head_with_body(path: &str, body: &str) -> Vec<u8> {
    format!(
        "HEAD {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The next request on `c` gets its own answer: nothing of the HEAD answer before was left over.
async fn next_answer_parses(c: &mut Raw, after: &str) {
    c.send(b"GET /echo/next HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "after {after}: {}", r.head);
    assert_eq!(r.json()["target"], "/echo/next", "after {after}");
}

/// Every HEAD answer of loraplex's own, errors included, is a head without a body; on a
/// keep-alive connection the next answer parses.
async fn head_answers_have_no_body(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm.url(), "");
    // `/readyz` is one of the cases: wait for the first vLLM probe so it is 200, not 503.
    lp.wait_ready().await;
    let mut c = Raw::connect(lp.addr).await;
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            b"HEAD /admin/nope HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            404,
        ),
        (
            head_with_body("/v1/completions", r#"{"model":"../x"}"#),
            400,
        ),
        (head_with_body("/v1/completions", r#"{"model":1}"#), 400),
        (b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 200),
        (b"HEAD /readyz HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 200),
        (b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 200),
        (
            b"HEAD /admin/cache/stats HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            200,
        ),
        (
            b"HEAD /admin/peers HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            200,
        ),
        (
            b"HEAD /_loraplex/adapters/acme/x/manifest HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            401,
        ),
    ];
    for (req, status) in cases {
        let shown = String::from_utf8_lossy(&req)
            .lines()
            .next()
            .unwrap()
            .to_owned();
        c.send(&req).await;
        let r = c.response(true).await;
        assert_eq!(r.status, status, "{shown}: {}", r.head);
        // The head still says how long the GET answer would be.
        assert!(r.header("content-length").is_some(), "{shown}: {}", r.head);
        next_answer_parses(&mut c, &shown).await;
    }
}

/// Answers that close the connection (413, 431, a 408 on a slow head) have no body either:
/// the connection ends right after the head.
async fn closing_head_answers_have_no_body(driver: Driver) {
    let vllm = vllm();
    let lp = node(
        driver,
        &vllm.url(),
        "server:\n  max_body_size: 1KB\n  max_header_size: 2KB\n  header_read_timeout: 1s\n",
    );
    let too_long = b"HEAD /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n";
    let big_head = format!(
        "HEAD /v1/models HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(3000)
    );
    // A head that never ends.
    let unfinished = b"HEAD /v1/models HTTP/1.1\r\nHost: t\r\n";
    for (req, status) in [
        (too_long.to_vec(), 413),
        (big_head.into_bytes(), 431),
        (unfinished.to_vec(), 408),
    ] {
        let mut c = Raw::connect(lp.addr).await;
        c.send(&req).await;
        let r = c.response(true).await;
        assert_eq!(r.status, status, "{}", r.head);
        assert_eq!(r.header("connection").as_deref(), Some("close"));
        assert!(c.closed().await, "{status}: bytes after the head");
    }
    assert_eq!(app_requests(&vllm), 0, "nothing reached vLLM");
}

/// A peer's adapter files answer HEAD with the head only (the manifest and a file).
async fn peer_file_head_answers_have_no_body(driver: Driver) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(&store)).unwrap();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/x", &AdapterSpec::new(BASE, 4096, 1));
    let yaml = format!(
        "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: 1h\n\
         origins:\n  - type: http\n    base_url: \"{}\"\nstorage:\n  dir: \"{{DIR}}/store\"\n\
         cluster:\n  token: c1\n",
        vllm.url(),
        origin.base_url()
    );
    let lp = Node::start_in(dir, &driver.config(&yaml), &[]);
    lp.assert_driver(driver);
    assert_eq!(common::chat_with(lp.addr, "acme/x").await.status, 200);

    let mut c = Raw::connect(lp.addr).await;
    for path in [
        "/_loraplex/adapters/acme/x/manifest",
        "/_loraplex/adapters/acme/x/files/adapter_config.json",
    ] {
        c.send(
            format!("HEAD {path} HTTP/1.1\r\nHost: t\r\nX-Loraplex-Token: c1\r\n\r\n").as_bytes(),
        )
        .await;
        let r = c.response(true).await;
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        let len: usize = r.header("content-length").unwrap().parse().unwrap();
        assert!(len > 0, "{path}");
        c.send(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-Loraplex-Token: c1\r\n\r\n").as_bytes(),
        )
        .await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        assert_eq!(
            r.body.len(),
            len,
            "{path}: HEAD and GET agree on the length"
        );
    }
}

/// An upstream that wrongly sends a body with its HEAD answer: the client gets the head only,
/// and the next request on its connection gets its own answer (RFC 9112 §6.3: a response to
/// HEAD ends with its head, whatever its headers say).
async fn upstream_body_on_head_is_not_relayed(driver: Driver) {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", upstream.local_addr().unwrap());
    // Answers every request with a 5-byte body, HEAD included; request `n` gets body `n` padded.
    tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            let Ok((mut s, _)) = upstream.accept().await else {
                return;
            };
            n += 1;
            let first = n;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                let mut served = 0;
                loop {
                    while let Some(end) = common::find(&buf, b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        served += 1;
                        let body = format!("{:05}", first * 100 + served);
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n{body}"
                        );
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&tmp[..k]),
                    }
                }
            });
        }
    });
    let lp = node(driver, &url, "");
    let mut c = Raw::connect(lp.addr).await;
    for _ in 0..3 {
        c.send(b"HEAD /v1/models HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let r = c.response(true).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length").as_deref(), Some("5"));
        c.send(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{}", r.head);
        let body = String::from_utf8(r.body).unwrap();
        assert!(
            body.len() == 5 && body.bytes().all(|b| b.is_ascii_digit()),
            "{body:?}"
        );
    }
}

/// Everything the server sends until it closes.
async fn read_to_close(c: &mut Raw) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        c.stream.read_to_end(&mut all),
    )
    .await
    .expect("the server closes after an HTTP/1.0 answer")
    .unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

/// No `100 Continue` ever goes to an HTTP/1.0 client (RFC 9110 §15.2): not as the peer
/// acknowledgement of a marked request, not for `Expect: 100-continue` (which HTTP/1.0 ignores,
/// §10.1.1). HTTP/1.1 keeps both.
async fn no_interim_answer_to_http_1_0(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm.url(), "");
    let body = format!(r#"{{"model":"{BASE}","prompt":"hi"}}"#);
    let marked = format!(
        "POST /echo/m HTTP/1.0\r\nContent-Type: application/json\r\nX-Loraplex-Forwarded: 1\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let expecting = format!(
        "POST /echo/e HTTP/1.0\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for req in [&marked, &expecting] {
        let mut c = Raw::connect(lp.addr).await;
        c.send(req.as_bytes()).await;
        let all = read_to_close(&mut c).await;
        assert!(all.starts_with("HTTP/1.0 200 "), "{req}\n---\n{all}");
        assert!(!all.contains(" 100 "), "{all}");
        assert!(
            all.contains(&format!("\"body_len\":{}", body.len())),
            "{all}"
        );
    }
    // HTTP/1.1: the mark is acknowledged at once, as a forwarding peer needs.
    let mut c = Raw::connect(lp.addr).await;
    c.send(marked.replace("HTTP/1.0", "HTTP/1.1\r\nHost: t").as_bytes())
        .await;
    assert_eq!(c.any_response(false).await.status, 100);
    assert_eq!(c.any_response(false).await.status, 200);
}

/// A body in a transfer coding other than a lone `chunked` (`gzip, chunked`) is a 501 in
/// OpenAI's shape (RFC 9112 §6.1); `chunked` not last is a 400 (its end can't be known). Either
/// way the connection closes and nothing reaches vLLM.
async fn transfer_codings_other_than_chunked_are_refused(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm.url(), "");
    for (te, status, kind) in [
        ("gzip, chunked", 501, "NotImplementedError"),
        ("chunked, chunked", 501, "NotImplementedError"),
        ("gzip", 400, "BadRequestError"),
    ] {
        let mut c = Raw::connect(lp.addr).await;
        c.send(
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let r = c.response(false).await;
        assert_eq!(r.status, status, "{te}: {}", r.head);
        assert_eq!(r.json()["error"]["type"], kind, "{te}");
        assert_eq!(r.json()["error"]["code"], status, "{te}");
        assert!(c.closed().await, "{te}");
    }
    assert_eq!(app_requests(&vllm), 0, "nothing reached vLLM");
}

/// An HTTP/1.1 request needs exactly one `Host`, any request at most one (RFC 9112 §3.2): 400
/// and close. HTTP/1.0 may leave it out; vLLM then gets an empty one (it is sent HTTP/1.1).
async fn one_host_header(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm.url(), "");
    for (req, why) in [
        ("GET /echo/a HTTP/1.1\r\n\r\n", "without a Host"),
        (
            "GET /echo/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "more than one Host",
        ),
        (
            "GET /echo/a HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
            "more than one Host",
        ),
    ] {
        let mut c = Raw::connect(lp.addr).await;
        c.send(req.as_bytes()).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 400, "{req:?}: {}", r.head);
        let err = &r.json()["error"];
        assert_eq!(err["type"], "BadRequestError");
        assert!(err["message"].as_str().unwrap().contains(why), "{err}");
        assert!(c.closed().await, "{req:?}");
    }
    assert_eq!(app_requests(&vllm), 0, "nothing reached vLLM");

    let mut c = Raw::connect(lp.addr).await;
    c.send(b"GET /echo/http10 HTTP/1.0\r\n\r\n").await;
    let all = read_to_close(&mut c).await;
    assert!(all.starts_with("HTTP/1.0 200 "), "{all}");
    let heads = vllm.recent_heads();
    let seen = heads.iter().find(|h| h.target == "/echo/http10").unwrap();
    assert_eq!((seen.version, seen.header("host")), (1, Some("")));
}

on_both_drivers!(
    head_answers_have_no_body,
    closing_head_answers_have_no_body,
    peer_file_head_answers_have_no_body,
    upstream_body_on_head_is_not_relayed,
    no_interim_answer_to_http_1_0,
    transfer_codings_other_than_chunked_are_refused,
    one_host_header,
);
