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
//! how tests prove a proxy closes its upstream connection when its client disconnects. A peer
//! that half-closes (shuts down its write side) while waiting counts as gone too, as it does
//! for uvicorn in front of vLLM.
//!
//! A server may close keep-alive connections left idle after an answer
//! ([`Server::start_with`]), as uvicorn in front of vLLM does after 5 s: a client's pooled
//! connection then goes stale under it.
//!
//! Request parsing lives in [`super::wire`], response writing in [`super::response`]; this file
//! owns the listener, the connection loop and the counters.

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

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::watch,
    task::JoinHandle,
};

pub use super::response::{Framing, Piece, Response};
pub use super::wire::{Request, RequestHead};
use super::{
    response::{Written, peer_gone, write_head, write_response},
    wire::{ReadOutcome, read_request},
};

/// The future a handler returns.
pub type BoxFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// What a stand-in does with each request.
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture + Send + Sync>;

/// Counters every stand-in exposes.
#[derive(Debug)]
pub struct ServerStats {
    connections: AtomicU64,
    requests: AtomicU64,
    cancelled: AtomicU64,
    keep_heads: usize,
    heads: Mutex<VecDeque<RequestHead>>,
    cancelled_targets: Mutex<Vec<String>>,
    /// Milliseconds to wait after a request's head before reading its body.
    body_delay_ms: AtomicU64,
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
            body_delay_ms: AtomicU64::new(0),
        }
    }

    /// From now on, wait `delay` after each request's head before reading its body (a busy
    /// server: a large body fills the socket buffers and its sender's write blocks meanwhile).
    pub fn delay_body_reads(&self, delay: Duration) {
        self.body_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
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
    /// Bind `bind` (use `127.0.0.1:0`) and serve on the runtime behind `rt`; idle keep-alive
    /// connections stay open until the client closes them.
    pub fn start_on(
        rt: &Handle,
        bind: SocketAddr,
        keep_heads: usize,
        handler: Handler,
    ) -> io::Result<Server> {
        Server::start_with(rt, bind, keep_heads, None, handler)
    }

    /// [`Server::start_on`], closing a keep-alive connection on which no byte of a next request
    /// came within `keep_alive_timeout` of an answer (uvicorn's `timeout_keep_alive`; a fresh
    /// connection has no such limit, as in uvicorn).
    pub fn start_with(
        rt: &Handle,
        bind: SocketAddr,
        keep_heads: usize,
        keep_alive_timeout: Option<Duration>,
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
        let accept_task = rt.spawn(accept_loop(
            listener,
            handler,
            stats.clone(),
            keep_alive_timeout,
            rx,
        ));
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
    keep_alive_timeout: Option<Duration>,
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
                            _ = serve_connection(stream, handler, stats, keep_alive_timeout) => {}
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

async fn serve_connection(
    stream: TcpStream,
    handler: Handler,
    stats: Arc<ServerStats>,
    keep_alive_timeout: Option<Duration>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(8192);
    let mut answered = false;
    loop {
        // After an answer, wait at most `keep_alive_timeout` for the next request to begin.
        if let Some(limit) = keep_alive_timeout.filter(|_| answered && buf.is_empty()) {
            match tokio::time::timeout(limit, rd.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => {
                    let _ = wr.shutdown().await;
                    return;
                }
            }
        }
        answered = true;
        let body_delay = Duration::from_millis(stats.body_delay_ms.load(Ordering::SeqCst));
        let req = match read_request(&mut rd, &mut wr, &mut buf, body_delay).await {
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

/// Wrap an async fn into a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}
