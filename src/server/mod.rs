//! The server: one `SO_REUSEPORT` listener and one data-plane worker thread per core, the
//! connection loop, graceful shutdown. It reads request heads and knows nothing of what a
//! request is for: each worker runs the [`Handler`] it was started with (the proxy).
//!
//! - `runtime.rs`: a monoio runtime on io_uring or epoll.
//! - `worker.rs`: a worker thread and its accept loop.
//! - `conn.rs`: one client connection (heads, bodies, keep-alive, timeouts).
//! - `closing.rs`: a worker's own view of shutdown, for its idle connections.

pub mod closing;
pub mod conn;
pub mod runtime;
pub mod worker;

use std::{
    cell::Cell,
    future::Future,
    net::{SocketAddr, TcpListener as StdListener},
    sync::Arc,
    thread::JoinHandle,
};

use socket2::{Domain, Protocol, Socket, Type};

use self::{closing::Closing, conn::Conn, runtime::DriverKind};
use crate::{
    config::ServerConfig, error::Error, http::RequestHead, metrics::Metrics, shutdown::Shutdown,
    tls::Acceptor,
};

/// What a worker does with each request. One handler per worker, built on the worker's own
/// thread (it may hold `Rc`s and cells: monoio tasks stay on their thread), called for every
/// request head in turn. The server is generic over it, so the call is static and its future
/// is neither boxed nor `Send`.
pub trait Handler: 'static {
    /// Serve `head` on `conn`: read its body, write the whole answer. Returns whether the
    /// connection may serve another request.
    fn handle(&self, conn: &mut Conn, head: RequestHead) -> impl Future<Output = bool>;
}

/// What every worker of a server shares.
pub struct Common {
    pub config: ServerConfig,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    /// `server.tls`: connections start with a TLS handshake (`None`: plain HTTP).
    pub tls: Option<Acceptor>,
}

/// Per-thread state of a worker. Everything a worker touches per request is its own (`Rc`,
/// `Cell`, the handler's state); what all workers share lives in [`Common`] behind an `Arc`.
pub struct Worker<H> {
    pub id: usize,
    pub common: Arc<Common>,
    /// What requests are handed to.
    pub handler: H,
    /// Wakes this worker's idle connections at shutdown.
    pub closing: Closing,
    conns: Cell<usize>,
}

/// Counts a live client connection for graceful shutdown.
pub struct ConnGuard<'a>(&'a Cell<usize>);

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl<H> Worker<H> {
    pub fn conn_guard(&self) -> ConnGuard<'_> {
        self.conns.set(self.conns.get() + 1);
        ConnGuard(&self.conns)
    }
}

/// Running workers.
pub struct Server {
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Start one worker per listener on `driver`. Each builds its handler with `make(id)` on its
    /// own thread. The workers stop accepting when `shutdown` triggers, then drain. With `tls`,
    /// every connection starts with a TLS handshake (see [`Acceptor`]).
    pub fn start<H, F>(
        listeners: Vec<StdListener>,
        driver: DriverKind,
        config: &ServerConfig,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
        tls: Option<Acceptor>,
        make: F,
    ) -> std::io::Result<Server>
    where
        H: Handler,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        let common = Arc::new(Common {
            config: config.clone(),
            shutdown,
            metrics,
            tls,
        });
        let make = Arc::new(make);
        let mut workers = Vec::with_capacity(listeners.len());
        for (id, listener) in listeners.into_iter().enumerate() {
            workers.push(worker::spawn(
                id,
                common.clone(),
                listener,
                driver,
                make.clone(),
            )?);
        }
        Ok(Server { workers })
    }

    /// Wait until every worker has stopped (after shutdown is triggered and drained).
    pub fn wait(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// One `SO_REUSEPORT` listener per worker, all on the same port (the kernel spreads
/// connections over them). With port 0 the first bind picks the port for the rest.
pub fn bind(listen: &str, n: usize) -> Result<Vec<StdListener>, Error> {
    let mut addr: SocketAddr = crate::config::listen_addr(listen)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&addr.into())
            .map_err(|e| Error::internal(format!("listen on {addr}: {e}")))?;
        socket.listen(4096)?;
        let listener: StdListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}
