//! Shared harness of the integration tests: the real `loraplex` binary on `127.0.0.1:0`, its
//! config in a tempdir, its JSON log lines, and raw-HTTP helpers for byte-exact checks.
#![allow(dead_code)]

#[cfg(feature = "demo")]
pub mod cluster;
pub mod netns;
pub mod s3;
pub mod store;
pub mod tools;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Poll `cond` (async) every 50 ms for up to `secs`.
pub async fn until<F, Fut>(what: &str, secs: u64, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(50),
        cond,
    )
    .await
}

/// Poll `cond` every 10 ms; fail after 15 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let cond = || std::future::ready(cond());
    poll(
        what,
        Duration::from_secs(15),
        Duration::from_millis(10),
        cond,
    )
    .await
}

/// Await `cond` every `every` until it holds; fail naming `what` after `limit`.
async fn poll<F, Fut>(what: &str, limit: Duration, every: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

/// A running loraplex process.
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Start the binary with `yaml` (a full config; `listen` and log format are added).
    pub fn start(yaml: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        Node::start_in(dir, yaml, &[])
    }

    pub fn start_in(dir: tempfile::TempDir, yaml: &str, env: &[(&str, &str)]) -> Node {
        let cfg = dir.path().join("loraplex.yaml");
        // `{DIR}` in the YAML is the node's own tempdir; a store there unless the test says.
        let yaml = yaml.replace("{DIR}", &dir.path().display().to_string());
        let storage = if yaml.contains("storage:") {
            String::new()
        } else {
            format!(
                "storage:\n  dir: {:?}\n",
                dir.path().join("store").display().to_string()
            )
        };
        let server = if yaml.contains("server:") {
            String::new()
        } else {
            "server:\n  workers: 2\n".to_owned()
        };
        let listen = if yaml.contains("listen:") {
            ""
        } else {
            "listen: \"127.0.0.1:0\"\n"
        };
        let full = format!("{listen}{yaml}\n{storage}{server}");
        std::fs::write(&cfg, full).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_loraplex"))
            .arg("--config")
            .arg(&cfg)
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or("info".into()),
            )
            .env("LORAPLEX_LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn loraplex");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let started = line.contains("loraplex started").then(|| {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    v["listen"].as_str().unwrap().parse::<SocketAddr>().unwrap()
                });
                // Logged before the address is handed over: the startup line is there to read.
                sink.lock().unwrap().push(line);
                if let Some(addr) = started {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("loraplex did not start: {:#?}", logs.lock().unwrap());
            }
        };
        Node {
            child,
            addr,
            dir,
            logs,
        }
    }

    /// Wait (bounded) until `/readyz` answers 200: the first vLLM health probe has passed.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut c = Raw::connect(self.addr).await;
            c.send(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await;
            if c.response(false).await.status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "loraplex never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start the binary with `yaml` on `driver`, and check that it runs that driver.
    pub fn start_on(driver: Driver, yaml: &str) -> Node {
        let node = Node::start(&driver.config(yaml));
        node.assert_driver(driver);
        node
    }

    /// The node's startup line names `driver`.
    pub fn assert_driver(&self, driver: Driver) {
        let want = format!("\"driver\":\"{}\"", driver.as_str());
        assert!(
            self.logs
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("loraplex started") && l.contains(&want)),
            "the node does not run {driver:?}"
        );
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        wait_exit(&mut self.child, Duration::from_secs(20))
    }
}

/// A data-plane io driver (`server.driver`). Proxy-level tests run each case under both, as
/// monoio's own tests do ([`on_both_drivers!`](crate::on_both_drivers)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }

    /// Whether this machine runs the driver. A kernel that refuses io_uring (seccomp,
    /// `kernel.io_uring_disabled`) skips the io_uring cases, loudly.
    pub fn runnable(self) -> bool {
        if self == Driver::IoUring && !monoio::utils::detect_uring() {
            eprintln!("SKIPPED: this kernel refuses io_uring; only the epoll cases run");
            return false;
        }
        true
    }

    /// `yaml` with `server.driver` set to this driver (and the harness's two workers when it
    /// has no `server:` section of its own).
    pub fn config(self, yaml: &str) -> String {
        let line = format!("  driver: {}\n", self.as_str());
        match yaml.lines().position(|l| l.trim_end() == "server:") {
            Some(i) => {
                let mut lines: Vec<String> = yaml.lines().map(|l| format!("{l}\n")).collect();
                lines.insert(i + 1, line);
                lines.concat()
            }
            None => format!("{yaml}\nserver:\n  workers: 2\n{line}"),
        }
    }
}

/// Generate, for each `case(driver)`, two tests: `io_uring::case` and `epoll::case`.
#[macro_export]
macro_rules! on_both_drivers {
    ($($case:ident),* $(,)?) => {
        mod io_uring {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $case() {
                    if super::common::Driver::IoUring.runnable() {
                        super::$case(super::common::Driver::IoUring).await
                    }
                }
            )*
        }
        mod epoll {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $case() {
                    super::$case(super::common::Driver::Epoll).await
                }
            )*
        }
    };
}

/// Log lines of a node a failing test prints (its last ones).
const LOG_TAIL: usize = 60;

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what its nodes logged, so that a failure seen once (in CI, under
        // load) can be read afterwards. `TEST_RUST_LOG=debug` logs more.
        if std::thread::panicking() {
            let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
            let tail = &logs[logs.len().saturating_sub(LOG_TAIL)..];
            eprintln!(
                "--- loraplex at {} logged {} lines; the last {}:",
                self.addr,
                logs.len(),
                tail.len()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A YAML path value.
pub fn yaml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// One HTTP response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A raw client connection that reads responses one by one (keeps extra bytes).
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw::from_stream(TcpStream::connect(addr).await.unwrap())
    }

    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut tmp))
            .await
            .expect("read timed out")
            .unwrap();
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    /// Read the next final response, skipping interim (1xx) ones. HEAD: pass `head_only`.
    pub async fn response(&mut self, head_only: bool) -> RawResponse {
        loop {
            let r = self.any_response(head_only).await;
            if !(100..200).contains(&r.status) {
                return r;
            }
        }
    }

    /// Read one response, interim ones included.
    pub async fn any_response(&mut self, head_only: bool) -> RawResponse {
        let end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            assert!(self.fill().await > 0, "closed before a response head");
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        self.buf.drain(..end);
        // Stray bytes before the status line (a body that should not have been sent) fail here.
        assert!(
            head.starts_with("HTTP/1.1 ") || head.starts_with("HTTP/1.0 "),
            "not a status line: {head:?}"
        );
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let mut resp = RawResponse {
            status,
            head,
            body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
            return resp;
        }
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await > 0, "closed mid-body");
            }
            resp.body = self.buf.drain(..len).collect();
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            resp.body = self.dechunk().await;
        } else {
            while self.fill().await > 0 {}
            resp.body = std::mem::take(&mut self.buf);
        }
        resp
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8(self.buf[..p].to_vec()).unwrap();
                self.buf.drain(..p + 2);
                return line;
            }
            assert!(self.fill().await > 0, "closed mid-chunk");
        }
    }

    async fn dechunk(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let size =
                usize::from_str_radix(self.line().await.split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                while !self.line().await.is_empty() {}
                return body;
            }
            while self.buf.len() < size + 2 {
                assert!(self.fill().await > 0, "closed mid-chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// True when the server closed the connection (EOF, nothing more to read).
    pub async fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill().await == 0
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A POST with a JSON body, as raw bytes.
pub fn post(path: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The value of `series` (a metric's name, or its name and all its labels) in a Prometheus
/// text exposition, summed over the lines of that series; 0 when absent.
pub fn metric_sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of `series` in the `/metrics` of the server at `base_url` ([`metric_sum`]).
pub async fn metric_at(client: &reqwest::Client, base_url: &str, series: &str) -> f64 {
    let text = client
        .get(format!("{base_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_sum(&text, series)
}

/// [`post`] `body` to `path` on a new connection (`extra`: more header lines), the whole answer.
pub async fn post_json(addr: SocketAddr, path: &str, body: &str, extra: &str) -> RawResponse {
    let mut c = Raw::connect(addr).await;
    c.send(&post(path, body, extra)).await;
    c.response(false).await
}

/// A chat completion for `model` (no messages), its whole answer.
pub async fn chat_with(addr: SocketAddr, model: &str) -> RawResponse {
    let body = serde_json::json!({"model": model, "messages": []}).to_string();
    post_json(addr, "/v1/chat/completions", &body, "").await
}
