//! The wire layer under the stand-ins: a small, scripted HTTP/1.1 server on tokio.
//!
//! Why not hyper or axum: the stand-ins exist to test a proxy's HTTP handling, so they must see
//! and produce exact bytes. hyper groups repeated headers, hides how a request body was framed
//! and cannot answer a close-delimited body on HTTP/1.1; here a handler sees the raw target, the
//! headers in wire order (names lowercased) and whether the body came chunked, and its
//! [`Response`] says exactly how the body goes out: one `Content-Length` body, chunks, or bytes
//! until close, each piece after its own delay, optionally cut short.
//!
//! The server also notices a peer that goes away while a request is in progress (while the
//! handler runs, between body pieces, on a failed write) and counts it as *cancelled*: that is
//! how tests prove a proxy closes its upstream connection when its client disconnects.
//!
//! Request parsing lives in [`super::wire`]; this file owns the listener, the connection loop,
//! response writing and the counters.

use std::{
    collections::VecDeque,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    runtime::Handle,
    sync::watch,
    task::JoinHandle,
};

use super::wire::{ReadOutcome, read_request};
pub use super::wire::{Request, RequestHead};

/// Bytes of pipelined input buffered while a request is in progress before reading pauses.
const MAX_PIPELINED: usize = 1 << 20;

/// The future a handler returns.
pub type BoxFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// What a stand-in does with each request.
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture + Send + Sync>;

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` (the sum of the pieces unless [`Response::announced_len`] says more).
    Length,
    /// `Transfer-Encoding: chunked`, one chunk per non-empty piece.
    Chunked,
    /// No length: the body ends when the server closes the connection.
    CloseDelimited,
}

/// Part of a body, written after `delay`.
#[derive(Debug, Clone)]
pub struct Piece {
    pub delay: Duration,
    pub data: Bytes,
}

impl Piece {
    pub fn new(delay: Duration, data: impl Into<Bytes>) -> Piece {
        Piece {
            delay,
            data: data.into(),
        }
    }
}

/// A scripted answer. HEAD requests and 1xx/204/304 statuses get the head only.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Written in order, as given. Framing headers are added by the server.
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    pub pieces: Vec<Piece>,
    /// `Content-Length` to announce when it differs from the bytes sent (a cut body).
    pub announced_len: Option<u64>,
    /// Close the connection right after the last piece, without finishing the framing.
    pub abort: bool,
}

impl Response {
    /// An empty `Content-Length: 0` answer.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            framing: Framing::Length,
            pieces: Vec::new(),
            announced_len: None,
            abort: false,
        }
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A whole body in one piece with `Content-Length`.
    pub fn body(self, content_type: &str, data: impl Into<Bytes>) -> Response {
        self.header("content-type", content_type)
            .pieces(Framing::Length, vec![Piece::new(Duration::ZERO, data)])
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let body = serde_json::to_vec(value).expect("a Value always serializes");
        Response::new(status).body("application/json", body)
    }

    pub fn text(status: u16, text: impl Into<String>) -> Response {
        Response::new(status).body("text/plain; charset=utf-8", text.into())
    }

    pub fn pieces(mut self, framing: Framing, pieces: Vec<Piece>) -> Response {
        self.framing = framing;
        self.pieces = pieces;
        self
    }

    /// Announce `len` bytes in `Content-Length` whatever the pieces hold.
    pub fn announce_len(mut self, len: u64) -> Response {
        self.announced_len = Some(len);
        self
    }

    /// Close the connection after the pieces, leaving the body unfinished.
    pub fn abort_after_pieces(mut self) -> Response {
        self.abort = true;
        self
    }

    /// Bytes of body the pieces hold.
    pub fn body_len(&self) -> u64 {
        self.pieces.iter().map(|p| p.data.len() as u64).sum()
    }
}

/// Counters every stand-in exposes.
#[derive(Debug)]
pub struct ServerStats {
    connections: AtomicU64,
    requests: AtomicU64,
    cancelled: AtomicU64,
    keep_heads: usize,
    heads: Mutex<VecDeque<RequestHead>>,
    cancelled_targets: Mutex<Vec<String>>,
}

impl ServerStats {
    fn new(keep_heads: usize) -> ServerStats {
        ServerStats {
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            keep_heads,
            heads: Mutex::new(VecDeque::new()),
            cancelled_targets: Mutex::new(Vec::new()),
        }
    }

    /// TCP connections accepted (keep-alive reuse shows as fewer connections than requests).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Request heads received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests whose peer went away before the whole answer was written.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Targets of the cancelled requests, oldest first.
    pub fn cancelled_targets(&self) -> Vec<String> {
        lock(&self.cancelled_targets).clone()
    }

    /// The last request heads received, oldest first.
    pub fn recent_heads(&self) -> Vec<RequestHead> {
        lock(&self.heads).iter().cloned().collect()
    }

    fn record_head(&self, head: &RequestHead) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut heads = lock(&self.heads);
        if heads.len() == self.keep_heads {
            heads.pop_front();
        }
        if self.keep_heads > 0 {
            heads.push_back(head.clone());
        }
    }

    fn record_cancel(&self, target: &str) {
        self.cancelled.fetch_add(1, Ordering::SeqCst);
        lock(&self.cancelled_targets).push(target.to_owned());
    }
}

/// Lock a mutex, ignoring poisoning: a panicking handler must not hide the counters.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running server. Dropping it stops accepting and ends every connection.
pub struct Server {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    shutdown: Option<watch::Sender<()>>,
    accept_task: Option<JoinHandle<()>>,
}

impl Server {
    /// Bind `bind` (use `127.0.0.1:0`) and serve on the runtime behind `rt`.
    pub fn start_on(
        rt: &Handle,
        bind: SocketAddr,
        keep_heads: usize,
        handler: Handler,
    ) -> io::Result<Server> {
        let std_listener = std::net::TcpListener::bind(bind)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        let stats = Arc::new(ServerStats::new(keep_heads));
        let (tx, rx) = watch::channel(());
        let accept_task = rt.spawn(accept_loop(listener, handler, stats.clone(), rx));
        Ok(Server {
            addr,
            stats,
            shutdown: Some(tx),
            accept_task: Some(accept_task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stop and wait until the listening socket is closed (new connections are refused).
    pub async fn shutdown(mut self) {
        self.shutdown.take();
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping the sender wakes every `changed()`: the accept loop and all connections end.
        self.shutdown.take();
    }
}

async fn accept_loop(
    listener: TcpListener,
    handler: Handler,
    stats: Arc<ServerStats>,
    mut stop: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    stats.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_nodelay(true);
                    let (handler, stats, mut stop) = (handler.clone(), stats.clone(), stop.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = serve_connection(stream, handler, stats) => {}
                            _ = stop.changed() => {}
                        }
                    });
                }
                // EMFILE and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            _ = stop.changed() => return,
        }
    }
}

async fn serve_connection(stream: TcpStream, handler: Handler, stats: Arc<ServerStats>) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        let req = match read_request(&mut rd, &mut wr, &mut buf).await {
            Ok(ReadOutcome::Request(req)) => req,
            Ok(ReadOutcome::Closed) | Err(_) => return,
            Ok(ReadOutcome::Bad(status, why)) => {
                let resp = Response::text(status, why).header("connection", "close");
                let _ = write_head(&mut wr, &resp, resp.body_len(), true).await;
                let _ = wr.write_all(why.as_bytes()).await;
                return;
            }
        };
        stats.record_head(&req.head);
        let target = req.head.target.clone();
        let head_only = req.head.method == "HEAD";
        let client_close = req.head.wants_close();
        let http10 = req.head.version == 0;

        // Run the handler, but notice the peer leaving while it works (a `/slow` answer).
        let fut = handler(req);
        tokio::pin!(fut);
        let resp = loop {
            tokio::select! {
                resp = &mut fut => break resp,
                gone = peer_gone(&mut rd, &mut buf) => if gone {
                    stats.record_cancel(&target);
                    return;
                },
            }
        };
        let outcome = write_response(
            &mut rd,
            &mut wr,
            &mut buf,
            resp,
            head_only,
            client_close,
            http10,
        )
        .await;
        match outcome {
            Written::KeepAlive => continue,
            Written::Close => {
                let _ = wr.shutdown().await;
                return;
            }
            Written::PeerGone => {
                stats.record_cancel(&target);
                return;
            }
        }
    }
}

/// Wait for input from the peer; `true` when it closed (or errored), `false` when bytes arrived
/// (pipelined requests, kept in `buf`).
async fn peer_gone(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> bool {
    if buf.len() >= MAX_PIPELINED {
        return std::future::pending().await;
    }
    !matches!(rd.read_buf(buf).await, Ok(n) if n > 0)
}

/// Sleep `delay`, unless the peer goes away first (`false`).
async fn pause(rd: &mut OwnedReadHalf, buf: &mut BytesMut, delay: Duration) -> bool {
    if delay.is_zero() {
        return true;
    }
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            gone = peer_gone(rd, buf) => if gone { return false },
        }
    }
}

enum Written {
    KeepAlive,
    Close,
    PeerGone,
}

fn no_body_status(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

async fn write_response(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    mut resp: Response,
    head_only: bool,
    client_close: bool,
    http10: bool,
) -> Written {
    // An HTTP/1.0 client cannot read chunks: fall back to ending the body by closing.
    if http10 && resp.framing == Framing::Chunked {
        resp.framing = Framing::CloseDelimited;
    }
    let close = client_close || http10 || resp.abort || resp.framing == Framing::CloseDelimited;
    let announced = resp.announced_len.unwrap_or_else(|| resp.body_len());
    if write_head(wr, &resp, announced, close).await.is_err() {
        return Written::PeerGone;
    }
    if head_only || no_body_status(resp.status) {
        return if close {
            Written::Close
        } else {
            Written::KeepAlive
        };
    }
    for piece in &resp.pieces {
        if !pause(rd, buf, piece.delay).await {
            return Written::PeerGone;
        }
        if piece.data.is_empty() {
            continue;
        }
        let sent = match resp.framing {
            Framing::Chunked => {
                let mut framed = format!("{:x}\r\n", piece.data.len()).into_bytes();
                framed.extend_from_slice(&piece.data);
                framed.extend_from_slice(b"\r\n");
                wr.write_all(&framed).await
            }
            Framing::Length | Framing::CloseDelimited => wr.write_all(&piece.data).await,
        };
        if sent.is_err() {
            return Written::PeerGone;
        }
    }
    if resp.abort {
        return Written::Close;
    }
    if resp.framing == Framing::Chunked && wr.write_all(b"0\r\n\r\n").await.is_err() {
        return Written::PeerGone;
    }
    if close {
        Written::Close
    } else {
        Written::KeepAlive
    }
}

async fn write_head(
    wr: &mut OwnedWriteHalf,
    resp: &Response,
    announced: u64,
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (name, value) in &resp.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !no_body_status(resp.status) {
        match resp.framing {
            Framing::Length => head.push_str(&format!("content-length: {announced}\r\n")),
            Framing::Chunked => head.push_str("transfer-encoding: chunked\r\n"),
            Framing::CloseDelimited => {}
        }
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    wr.write_all(head.as_bytes()).await
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Wrap an async fn into a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// The body of `resp` as one buffer (for tests of handlers without sockets).
pub fn collect_body(resp: &Response) -> Bytes {
    let mut out = BytesMut::new();
    for p in &resp.pieces {
        out.extend_from_slice(&p.data);
    }
    out.freeze()
}
