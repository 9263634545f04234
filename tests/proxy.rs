//! The proxy as a user meets it: the real binary on real sockets in front of the stand-in vLLM.
//! Transparency (method, target, query, headers, bodies in every framing), keep-alive,
//! pipelining, streaming, limits, errors in OpenAI's shape, health, shutdown. Every case runs
//! under both io drivers (`io_uring::case`, `epoll::case`).

mod common;

use std::time::{Duration, Instant};

use common::{Driver, Node, Raw, eventually, post};
use loraplex::testkit::{
    adapters::hash16,
    vllm::{VllmConfig, VllmStandIn},
};
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64;

const BASE: &str = "tiny-base";

fn vllm() -> VllmStandIn {
    VllmStandIn::start(VllmConfig::new(BASE)).unwrap()
}

/// A node whose vLLM health poll runs once at start, so it doesn't blur connection counts.
fn node(driver: Driver, vllm: &VllmStandIn, extra: &str) -> Node {
    node_polling(driver, vllm, "1h", extra)
}

fn node_polling(driver: Driver, vllm: &VllmStandIn, interval: &str, extra: &str) -> Node {
    Node::start_on(
        driver,
        &format!(
            "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: {interval}\n{extra}",
            vllm.url()
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

fn header<'a>(echo: &'a Value, name: &str) -> Option<&'a str> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|h| (h[0].as_str() == Some(name)).then(|| h[1].as_str().unwrap()))
}

async fn keeps_method_target_query_and_end_to_end_headers(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "");
    let mut c = Raw::connect(lp.addr).await;
    c.send(
        b"PUT /echo/a%20b?x=1&y=two HTTP/1.1\r\nHost: example\r\nAuthorization: Bearer t\r\n\
          Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
          X-Custom: kept\r\nX-Loraplex-Forwarded: 1\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["target"], "/echo/a%20b?x=1&y=two");
    assert_eq!(header(&echo, "host"), Some("example"));
    assert_eq!(header(&echo, "authorization"), Some("Bearer t"));
    assert_eq!(header(&echo, "x-custom"), Some("kept"));
    for hop in [
        "x-hop",
        "keep-alive",
        "te",
        "connection",
        "x-loraplex-forwarded",
    ] {
        assert_eq!(header(&echo, hop), None, "{hop} must not be forwarded");
    }
    assert_eq!(echo["body_len"], 3);
    assert_eq!(echo["body_xxh3"], hash16(xxh3_64(b"abc")));
}

async fn chunked_request_body_arrives_whole_with_a_length(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "");
    let mut c = Raw::connect(lp.addr).await;
    c.send(b"POST /echo/x HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send(b"7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")
        .await;
    let echo = c.response(false).await.json();
    assert_eq!(echo["body_len"], 12);
    assert_eq!(echo["body_xxh3"], hash16(xxh3_64(b"hello, world")));
    assert_eq!(
        echo["chunked"], false,
        "the proxy re-frames with Content-Length"
    );
}

async fn expect_100_continue_is_answered_before_the_body(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "");
    let mut c = Raw::connect(lp.addr).await;
    let body = r#"{"model":"tiny-base","prompt":"hi"}"#;
    c.send(
        format!(
            "POST /echo/e HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let interim = c.any_response(false).await;
    assert_eq!(interim.status, 100);
    c.send(body.as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["body_len"], body.len());
    assert_eq!(header(&echo, "expect"), None);
}

async fn keep_alive_on_both_sides_and_pipelining_in_order(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "");
    // The start-up poll: `/health`, then `/v1/models` (the base model's names).
    eventually("the start-up health poll", || {
        let heads = vllm.recent_heads();
        heads.len() == 2 && heads[1].target == "/v1/models"
    })
    .await;
    let before = vllm.connections();
    let mut c = Raw::connect(lp.addr).await;
    for i in 0..20 {
        c.send(format!("GET /echo/seq{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await;
        assert_eq!(
            c.response(false).await.json()["target"],
            format!("/echo/seq{i}")
        );
    }
    // One client connection lives on one worker: one upstream connection serves all 20.
    assert_eq!(vllm.connections() - before, 1);

    // Three requests in one write come back in order.
    let mut all = Vec::new();
    for i in 0..3 {
        all.extend(post(
            &format!("/echo/p{i}"),
            &format!(r#"{{"model":"{BASE}","n":{i}}}"#),
            "",
        ));
    }
    c.send(&all).await;
    for i in 0..3 {
        assert_eq!(
            c.response(false).await.json()["target"],
            format!("/echo/p{i}")
        );
    }
}

async fn every_response_framing_passes_through(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "");
    for kind in ["length", "chunked", "close"] {
        let mut c = Raw::connect(lp.addr).await;
        c.send(format!("GET /framing/{kind}?size=300000&pieces=5&gap_ms=5&seed=7 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{kind}");
        assert_eq!(r.body.len(), 300_000, "{kind}");
        assert_eq!(
            r.header("x-body-xxh3").unwrap(),
            hash16(xxh3_64(&r.body)),
            "{kind}"
        );
        if kind == "close" {
            assert!(
                c.closed().await,
                "a close-delimited answer closes the client connection too"
            );
        }
    }
    // HTTP/1.0 clients get chunked answers decoded, ended by close.
    let mut c = Raw::connect(lp.addr).await;
    c.send(b"GET /framing/chunked?size=5000&pieces=3 HTTP/1.0\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert!(r.head.starts_with("HTTP/1.0 200"));
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.header("x-body-xxh3").unwrap(), hash16(xxh3_64(&r.body)));
    // HEAD, 204.
    let mut c = Raw::connect(lp.addr).await;
    c.send(b"HEAD /framing/length?size=1234 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let r = c.response(true).await;
    assert_eq!(r.header("content-length").as_deref(), Some("1234"));
    c.send(b"GET /status/204 HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 204);
    c.send(b"GET /echo/after HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(c.response(false).await.json()["target"], "/echo/after");
}

async fn sse_events_are_flushed_one_by_one(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "");
    let mut c = Raw::connect(lp.addr).await;
    let body = format!(r#"{{"model":"{BASE}","stream":true,"max_tokens":5,"messages":[]}}"#);
    let started = Instant::now();
    c.send(&post(
        "/v1/chat/completions",
        &body,
        "x-test-event-gap-ms: 300\r\n",
    ))
    .await;
    // Read the raw stream and note when each event arrives.
    let mut seen = Vec::new();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    use tokio::io::AsyncReadExt;
    while !text.contains("data: [DONE]") {
        let n = c.stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push((started.elapsed(), text.matches("data: ").count()));
    }
    let total = started.elapsed();
    // The first event reached the client long before the last one was produced (4 gaps of
    // 300 ms): nothing buffered the stream.
    let first = seen.iter().find(|(_, events)| *events >= 1).unwrap().0;
    assert!(
        total >= Duration::from_millis(1200),
        "the stand-in paces events: {total:?}"
    );
    assert!(
        first + Duration::from_millis(900) <= total,
        "first event at {first:?}, all at {total:?}"
    );
}

async fn body_over_the_limit_is_413_and_the_connection_closes(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "server:\n  max_body_size: 1KB\n");
    let mut c = Raw::connect(lp.addr).await;
    let big = format!(r#"{{"model":"{BASE}","prompt":"{}"}}"#, "x".repeat(2000));
    c.send(&post("/v1/completions", &big, "")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["type"], "RequestTooLargeError");
    assert_eq!(r.json()["error"]["code"], 413);
    assert!(c.closed().await);
    // With Expect: 100-continue the answer comes before the body is sent.
    let mut c = Raw::connect(lp.addr).await;
    c.send(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 99999\r\n\r\n")
        .await;
    assert_eq!(c.response(false).await.status, 413);
    assert_eq!(app_requests(&vllm), 0, "nothing reached vLLM");
}

async fn bad_names_and_bad_json_are_400_in_openai_shape(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "");
    let mut c = Raw::connect(lp.addr).await;
    for (body, needle) in [
        (
            r#"{"model":"../etc/passwd","prompt":"x"}"#,
            "invalid adapter name",
        ),
        (r#"{"model":"a//b"}"#, "invalid adapter name"),
        (r#"{"model":".hidden"}"#, "invalid adapter name"),
        (r#"{"model":"/abs"}"#, "invalid adapter name"),
        (r#"{"model":"acme/x","model":"acme/y"}"#, "duplicate field"),
        (r#"{"model":42}"#, "invalid type"),
        (r#"{"model":"acme/x""#, "invalid JSON"),
        (r#"["model"]"#, "JSON object"),
    ] {
        c.send(&post("/v1/chat/completions", body, "")).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 400, "{body}");
        let err = &r.json()["error"];
        assert_eq!(err["type"], "BadRequestError");
        assert_eq!(err["code"], 400);
        assert!(
            err["message"].as_str().unwrap().contains(needle),
            "{body}: {err}"
        );
    }
    // The connection survived every refusal (bodies were read whole).
    c.send(b"GET /echo/still HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    assert_eq!(app_requests(&vllm), 1, "only the last request reached vLLM");
}

async fn client_disconnect_cancels_the_upstream_request(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "");
    let mut c = Raw::connect(lp.addr).await;
    c.send(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually("the request to reach vLLM", || app_requests(&vllm) == 1).await;
    drop(c);
    eventually("vLLM to see the request cancelled", || {
        vllm.cancelled() == 1
    })
    .await;
}

async fn health_readiness_and_metrics(driver: Driver) {
    let vllm = vllm();
    let lp = node_polling(driver, &vllm, "100ms", "");
    let get = |path: &'static str| {
        let addr = lp.addr;
        async move {
            let mut c = Raw::connect(addr).await;
            c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .await;
            c.response(false).await
        }
    };
    let mut ready = false;
    for _ in 0..200 {
        if get("/readyz").await.status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "ready once vLLM answers /health");
    // The previous request counts until its handler returns, just after its answer is out.
    let mut h = get("/healthz").await.json();
    for _ in 0..100 {
        if h["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        h = get("/healthz").await.json();
    }
    assert_eq!(h["status"], "ok");
    assert_eq!(h["vllm_healthy"], true);
    assert_eq!(h["pending"], 0);
    assert_eq!(h["load"], 0.0);

    vllm.set_healthy(false);
    let mut degraded = false;
    for _ in 0..200 {
        let r = get("/healthz").await;
        assert_eq!(r.status, 200, "liveness stays 200");
        if r.json()["status"] == "degraded" {
            degraded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(degraded);
    assert_eq!(get("/readyz").await.status, 503);

    let m = get("/metrics").await;
    let text = String::from_utf8(m.body).unwrap();
    for name in [
        "loraplex_requests_total",
        "loraplex_vllm_healthy 0",
        "loraplex_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
}

/// A `/health` check that gets no answer (the connection cut) leaves vLLM healthy; the second
/// in a row marks it down; an answer brings it back.
async fn one_unanswered_health_check_is_not_down_two_in_a_row_are(driver: Driver) {
    let vllm = vllm();
    let lp = node_polling(driver, &vllm, "100ms", "");
    let ready = || {
        let addr = lp.addr;
        async move {
            let mut c = Raw::connect(addr).await;
            c.send(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n").await;
            c.response(false).await.status == 200
        }
    };
    let until = |want: bool| async move {
        for _ in 0..300 {
            if ready().await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("/readyz never became {}", if want { 200 } else { 503 });
    };
    until(true).await;

    vllm.hang_up_health(1);
    // Ready all along, through the cut check and the checks after it.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        assert!(ready().await, "one unanswered check made vLLM down");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(vllm.health_hang_ups_left(), 0, "the cut check happened");

    vllm.hang_up_health(u64::MAX);
    until(false).await;
    vllm.hang_up_health(0);
    until(true).await;
}

async fn base_model_is_learnt_from_vllm_when_not_configured(driver: Driver) {
    let vllm = vllm();
    let lp = Node::start_on(driver, &format!("vllm_url: \"{}\"", vllm.url()));
    let mut c = Raw::connect(lp.addr).await;
    c.send(&post(
        "/v1/chat/completions",
        &format!(r#"{{"model":"{BASE}","messages":[]}}"#),
        "",
    ))
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(vllm.served(BASE), 1);
}

async fn unreachable_vllm_is_503_in_openai_shape(driver: Driver) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let lp = Node::start_on(
        driver,
        &format!("vllm_url: \"http://{closed}\"\nvllm:\n  model_name: \"{BASE}\""),
    );
    let mut c = Raw::connect(lp.addr).await;
    c.send(&post(
        "/v1/chat/completions",
        &format!(r#"{{"model":"{BASE}"}}"#),
        "",
    ))
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["type"], "ServiceUnavailableError");
}

async fn admin_needs_the_token_when_set(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm, "admin:\n  token: s3cret\n");
    let mut c = Raw::connect(lp.addr).await;
    c.send(b"GET /admin/cache/stats HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "AuthenticationError");
}

async fn sigterm_lets_requests_in_flight_finish_then_exits_0(driver: Driver) {
    let vllm = vllm();
    let mut lp = node(driver, &vllm, "");
    let mut c = Raw::connect(lp.addr).await;
    c.send(b"GET /slow?ms=800 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually("the request to reach vLLM", || app_requests(&vllm) == 1).await;
    let pid = lp.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "the request in flight finished");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    let status = tokio::task::spawn_blocking(move || {
        common::wait_exit(&mut lp.child, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
}

on_both_drivers!(
    keeps_method_target_query_and_end_to_end_headers,
    chunked_request_body_arrives_whole_with_a_length,
    expect_100_continue_is_answered_before_the_body,
    keep_alive_on_both_sides_and_pipelining_in_order,
    every_response_framing_passes_through,
    sse_events_are_flushed_one_by_one,
    body_over_the_limit_is_413_and_the_connection_closes,
    bad_names_and_bad_json_are_400_in_openai_shape,
    client_disconnect_cancels_the_upstream_request,
    health_readiness_and_metrics,
    one_unanswered_health_check_is_not_down_two_in_a_row_are,
    base_model_is_learnt_from_vllm_when_not_configured,
    unreachable_vllm_is_503_in_openai_shape,
    admin_needs_the_token_when_set,
    sigterm_lets_requests_in_flight_finish_then_exits_0,
);
