//! A data-plane worker: one thread, one monoio runtime, one `SO_REUSEPORT` listener.
//!
//! Everything a worker touches per request is its own (`Rc`, `Cell`, its upstream pool);
//! what all workers share lives in [`Shared`] behind an `Arc`.

use std::{
    cell::Cell,
    net::TcpListener as StdListener,
    rc::Rc,
    sync::Arc,
    thread::{self, JoinHandle},
    time::Duration,
};

use monoio::net::TcpListener;

use crate::{
    metrics::{RequestHandles, Tier},
    proxy::upstream::Pool,
    server::{
        Shared,
        closing::Closing,
        conn,
        runtime::{self, DriverKind},
    },
};

/// Per-thread state of a worker.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// Keep-alive connections to vLLM and peers, owned by this thread.
    pub pool: Pool,
    /// Wakes this worker's idle connections at shutdown.
    pub closing: Closing,
    /// Request metrics of requests without a tenant, by tier (`Tier::ALL` order).
    pub untenanted: Vec<RequestHandles>,
    conns: Cell<usize>,
}

/// Counts a live client connection for graceful shutdown.
pub struct ConnGuard<'a>(&'a Cell<usize>);

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl Worker {
    /// Count one finished request.
    pub fn record_request(&self, tenant: Option<&str>, tier: Tier, seconds: f64) {
        match tenant.filter(|t| !t.is_empty()) {
            None => {
                let i = Tier::ALL
                    .iter()
                    .position(|&t| t == tier)
                    .expect("every tier is in ALL");
                self.untenanted[i].record(seconds);
            }
            Some(_) => self.shared.metrics.record_request(tenant, tier, seconds),
        }
    }

    pub fn conn_guard(&self) -> ConnGuard<'_> {
        self.conns.set(self.conns.get() + 1);
        ConnGuard(&self.conns)
    }
}

/// Start worker `id` on its own thread, serving `listener`.
pub fn spawn(
    id: usize,
    shared: Arc<Shared>,
    listener: StdListener,
    driver: DriverKind,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("loraplex-w{id}"))
        .spawn(move || {
            let mut rt = match runtime::build(driver) {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(worker = id, error = %e, "cannot build the worker runtime");
                    shared.shutdown.trigger();
                    return;
                }
            };
            rt.block_on(run(id, shared, listener));
        })
}

async fn run(id: usize, shared: Arc<Shared>, listener: StdListener) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(worker = id, error = %e, "cannot register the listener");
            shared.shutdown.trigger();
            return;
        }
    };
    let worker = Rc::new(Worker {
        id,
        pool: Pool::new(&shared.config.server, shared.metrics.clone()),
        shared: shared.clone(),
        closing: Closing::default(),
        untenanted: Tier::ALL
            .iter()
            .map(|&t| shared.metrics.request_handles(None, t))
            .collect(),
        conns: Cell::new(0),
    });
    let shutdown = shared.shutdown.clone();
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(conn::serve(worker.clone(), stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(worker = id, error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait() => break,
        }
    }
    drop(listener);
    worker.closing.close();
    drain(&worker).await;
}

/// Wait for this worker's connections to finish, at most `server.shutdown_grace`.
async fn drain(worker: &Worker) {
    let grace = worker.shared.config.server.shutdown_grace;
    let start = monoio::time::Instant::now();
    while worker.conns.get() > 0 && start.elapsed() < grace {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    if worker.conns.get() > 0 {
        tracing::warn!(
            worker = worker.id,
            connections = worker.conns.get(),
            "shutdown grace elapsed with requests still in flight"
        );
    }
}
