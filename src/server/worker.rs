//! A data-plane worker thread: its monoio runtime, its accept loop on its own `SO_REUSEPORT`
//! listener, and the drain at shutdown.

use std::{
    cell::Cell,
    net::TcpListener as StdListener,
    rc::Rc,
    sync::Arc,
    thread::{self, JoinHandle},
    time::Duration,
};

use monoio::net::TcpListener;

use super::{
    Common, Handler, Worker,
    closing::Closing,
    conn,
    runtime::{self, DriverKind},
};

/// Start worker `id` on its own thread, serving `listener` with the handler `make` builds.
pub fn spawn<H, F>(
    id: usize,
    common: Arc<Common>,
    listener: StdListener,
    driver: DriverKind,
    make: Arc<F>,
) -> std::io::Result<JoinHandle<()>>
where
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    thread::Builder::new()
        .name(format!("loraplex-w{id}"))
        .spawn(move || {
            let mut rt = match runtime::build(driver) {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(worker = id, error = %e, "cannot build the worker runtime");
                    common.shutdown.trigger();
                    return;
                }
            };
            rt.block_on(run(id, common, listener, make(id)));
        })
}

async fn run<H: Handler>(id: usize, common: Arc<Common>, listener: StdListener, handler: H) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(worker = id, error = %e, "cannot register the listener");
            common.shutdown.trigger();
            return;
        }
    };
    let shutdown = common.shutdown.clone();
    let worker = Rc::new(Worker {
        id,
        common,
        handler,
        closing: Closing::default(),
        conns: Cell::new(0),
    });
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
async fn drain<H>(worker: &Worker<H>) {
    let grace = worker.common.config.shutdown_grace;
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
