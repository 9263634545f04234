//! Every wait of the server is bounded and every limit is exact, as the README's configuration
//! table says: the head and body read timeouts (408 and close), the idle keep-alive timeout, the
//! head size limit (431, nothing forwarded), the upstream connect timeout (504), and SIGTERM's
//! grace. The real binary on real sockets; every case runs under both io drivers
//! (`io_uring::case`, `epoll::case`).

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{Driver, Node, Raw};
use loraplex::testkit::vllm::{VllmConfig, VllmStandIn};
use tokio::io::AsyncWriteExt;

const BASE: &str = "tiny-base";

fn vllm() -> VllmStandIn {
    VllmStandIn::start(VllmConfig::new(BASE)).unwrap()
}

fn node(driver: Driver, vllm_url: &str, server: &str) -> Node {
    Node::start_on(
        driver,
        &format!(
            "vllm_url: \"{vllm_url}\"\nvllm:\n  model_name: \"{BASE}\"\n  \
             health_check_interval: 1h\nserver:\n  workers: 2\n{server}"
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

/// `loraplex_errors_total{kind}` as the node reports it.
async fn errors_of_kind(addr: SocketAddr, kind: &str) -> u64 {
    let mut c = Raw::connect(addr).await;
    c.send(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let text = String::from_utf8(c.response(false).await.body).unwrap();
    let series = format!("loraplex_errors_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Write `bytes` to `c`'s connection one byte every `gap` (from a task of its own, on a
/// duplicate of the socket, so the test reads answers meanwhile), until they are all sent or the
/// server closes.
fn trickle(c: &Raw, bytes: Vec<u8>, gap: Duration) -> tokio::task::JoinHandle<()> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: dup of a socket this test owns; the new fd is owned by the std stream.
    let fd = unsafe { libc::dup(c.stream.as_raw_fd()) };
    assert!(fd >= 0);
    let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    std.set_nonblocking(true).unwrap();
    let mut w = tokio::net::TcpStream::from_std(std).unwrap();
    tokio::spawn(async move {
        for b in bytes {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    })
}

/// The 408 answer: OpenAI's shape, `connection: close`, then the connection ends.
async fn assert_408_and_close(c: &mut Raw, what: &str) {
    let r = c.response(false).await;
    assert_eq!(r.status, 408, "{what}: {}", r.head);
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{what}");
    let err = &r.json()["error"];
    assert_eq!(err["type"], "RequestTimeoutError", "{what}");
    assert_eq!(err["code"], 408, "{what}");
    assert!(c.closed().await, "{what}: the connection stays open");
}

/// A body that keeps coming, one byte every 50 ms, is cut at `server.body_read_timeout`: the
/// limit is on the whole body, not on each read.
async fn a_trickled_body_gets_408_and_close(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm.url(), "  body_read_timeout: 1s\n");
    let body = format!(r#"{{"model":"{BASE}","prompt":"{}"}}"#, "x".repeat(400));
    for (name, head, body) in [
        (
            "length",
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            ),
            body.clone().into_bytes(),
        ),
        (
            "chunked",
            "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
                .to_owned(),
            format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).into_bytes(),
        ),
    ] {
        let mut c = Raw::connect(lp.addr).await;
        c.send(head.as_bytes()).await;
        // 400-odd bytes at 50 ms each take 20 s, longer than the reads wait: the answer comes
        // first.
        let sender = trickle(&c, body, Duration::from_millis(50));
        assert_408_and_close(&mut c, name).await;
        assert!(!sender.is_finished(), "{name}: the whole body went through");
        sender.abort();
    }
    assert_eq!(app_requests(&vllm), 0, "nothing reached vLLM");
    assert_eq!(errors_of_kind(lp.addr, "request_timeout").await, 2);
}

/// A head that keeps coming, one byte every 50 ms, is cut at `server.header_read_timeout` with
/// a 408, on a new connection and on a kept-alive one; a connection that sends nothing is
/// closed without an answer; an idle kept-alive one after `server.idle_timeout`.
async fn slow_heads_get_408_and_idle_connections_close(driver: Driver) {
    let vllm = vllm();
    let lp = node(
        driver,
        &vllm.url(),
        "  header_read_timeout: 1s\n  idle_timeout: 3s\n",
    );
    let slow = format!(
        "GET /echo/slow HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(400)
    );

    // A new connection.
    let mut c = Raw::connect(lp.addr).await;
    let sender = trickle(&c, slow.clone().into_bytes(), Duration::from_millis(50));
    assert_408_and_close(&mut c, "first head").await;
    sender.abort();

    // A kept-alive connection: the second head is slow.
    let mut c = Raw::connect(lp.addr).await;
    c.send(b"GET /echo/1 HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    let sender = trickle(&c, slow.into_bytes(), Duration::from_millis(50));
    assert_408_and_close(&mut c, "second head").await;
    sender.abort();

    // Nothing sent: closed quietly once the head timeout is over.
    let started = Instant::now();
    let mut c = Raw::connect(lp.addr).await;
    assert!(c.closed().await, "a silent connection gets no answer");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed early"
    );

    // Idle between requests: closed quietly after the idle timeout (not the head timeout).
    let mut c = Raw::connect(lp.addr).await;
    // Before the request: the server's idle wait starts after its answer.
    let idle_from = Instant::now();
    c.send(b"GET /echo/2 HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    assert!(c.closed().await, "an idle connection gets no answer");
    assert!(
        idle_from.elapsed() >= Duration::from_secs(3),
        "closed early"
    );

    assert_eq!(errors_of_kind(lp.addr, "request_timeout").await, 2);
    assert_eq!(
        app_requests(&vllm),
        2,
        "only the two whole requests reached vLLM"
    );
}

/// A request head of `len` bytes exactly (the request line, headers and the blank line).
fn head_of(len: usize) -> Vec<u8> {
    let start = "GET /echo/limit HTTP/1.1\r\nHost: t\r\n";
    let mut head = start.to_owned();
    // 1000-byte header lines, then one to make up the rest.
    while len - head.len() - 2 > 1100 {
        head.push_str(&format!(
            "X-P{:03}: {}\r\n",
            head.len() % 1000,
            "p".repeat(990)
        ));
    }
    let rest = len - head.len() - 2 - "X-Last: \r\n".len();
    head.push_str(&format!("X-Last: {}\r\n\r\n", "l".repeat(rest)));
    assert_eq!(head.len(), len);
    head.into_bytes()
}

/// `server.max_header_size` is exact: a head of that many bytes passes, one byte more is a
/// 431 from loraplex with nothing forwarded, and so is a head twice the limit.
async fn the_head_limit_is_exact(driver: Driver) {
    let vllm = vllm();
    let lp = node(driver, &vllm.url(), "  max_header_size: 64KB\n");
    let limit = 64 * 1024;

    let mut c = Raw::connect(lp.addr).await;
    c.send(&head_of(limit)).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "a head of exactly the limit: {}", r.head);
    assert_eq!(app_requests(&vllm), 1);

    for len in [limit + 1, 127 * 1024] {
        let mut c = Raw::connect(lp.addr).await;
        c.send(&head_of(len)).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 431, "a head of {len} bytes: {}", r.head);
        assert_eq!(
            r.json()["error"]["type"],
            "RequestHeaderFieldsTooLargeError"
        );
        assert!(c.closed().await);
    }
    assert_eq!(app_requests(&vllm), 1, "nothing more reached vLLM");
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
/// neither succeeds nor fails (as a firewalled or dead host). Keep the returned sockets.
fn blackhole() -> (SocketAddr, socket2::Socket, Vec<std::net::TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    // Connect until the queue is full: then connects time out (twice in a row, so one slow
    // handshake on a loaded machine is not taken for it).
    let mut timeouts = 0;
    while timeouts < 2 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => {
                queued.push(s);
                timeouts = 0;
            }
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
                timeouts += 1;
            }
        }
        assert!(queued.len() < 64, "the accept queue never fills");
    }
    (addr, listener, queued)
}

/// vLLM's address swallows SYNs: the request gets a 504 once
/// `server.upstream_connect_timeout` is over, in OpenAI's shape.
async fn upstream_connect_timeout_is_504(driver: Driver) {
    let (addr, _listener, _queued) = blackhole();
    let lp = node(
        driver,
        &format!("http://{addr}"),
        "  upstream_connect_timeout: 1s\n",
    );
    let mut c = Raw::connect(lp.addr).await;
    let body = format!(r#"{{"model":"{BASE}","prompt":"hi"}}"#);
    c.send(&common::post("/v1/completions", &body, "")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    let err = &r.json()["error"];
    assert_eq!(err["type"], "GatewayTimeoutError");
    assert!(
        err["message"].as_str().unwrap().contains("timed out"),
        "{err}"
    );
}

/// SIGTERM: the listeners close at once (new connections are refused), a request that ends
/// within `server.shutdown_grace` is answered, one that would not is cut when the grace is
/// over, and the process exits 0.
async fn sigterm_refuses_new_connections_and_cuts_requests_past_the_grace(driver: Driver) {
    let vllm = vllm();
    let mut lp = node(driver, &vllm.url(), "  shutdown_grace: 6s\n");
    let mut quick = Raw::connect(lp.addr).await;
    quick
        .send(b"GET /slow?ms=1000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let mut long = Raw::connect(lp.addr).await;
    long.send(b"GET /slow?ms=60000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    common::eventually("both requests to reach vLLM", || app_requests(&vllm) == 2).await;
    unsafe { libc::kill(lp.child.id() as i32, libc::SIGTERM) };

    // New connections are refused while the two requests are still in flight.
    let addr = lp.addr;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // While the listeners close, a connection may still be queued on one (and then reset).
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{e}"),
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let r = quick.response(false).await;
    assert_eq!(r.status, 200, "the request within the grace finished");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    // The long one is cut at the end of the grace: no answer, the connection closes, vLLM sees
    // the request cancelled, and the process is gone long before the request would have ended.
    assert!(long.closed().await, "the request past the grace was cut");
    let status = tokio::task::spawn_blocking(move || {
        common::wait_exit(&mut lp.child, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    common::eventually("vLLM to see the long request cancelled", || {
        vllm.cancelled() == 1
    })
    .await;
}

on_both_drivers!(
    a_trickled_body_gets_408_and_close,
    slow_heads_get_408_and_idle_connections_close,
    the_head_limit_is_exact,
    upstream_connect_timeout_is_504,
    sigterm_refuses_new_connections_and_cuts_requests_past_the_grace,
);
