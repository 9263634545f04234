//! Graceful shutdown: one flag every thread can wait on, data plane and control plane alike.
//!
//! SIGTERM/SIGINT trigger it; workers stop accepting, idle keep-alive connections close,
//! requests in flight finish within `server.shutdown_grace`, control-plane loops (discovery,
//! health polls) end, then the process exits 0.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;

/// A cheap clonable shutdown signal: an atomic flag for the hot path, and a tokio `watch`
/// (which works from any runtime) to wait on.
#[derive(Clone, Debug)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            flag: Arc::new(AtomicBool::new(false)),
            tx: Arc::new(tx),
            rx,
        }
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once shutdown has been triggered.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the sender is gone, which only happens at process exit.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}
