//! Graceful shutdown: one flag every thread can wait on.
//!
//! SIGTERM/SIGINT trigger it; workers stop accepting, idle keep-alive connections close,
//! requests in flight finish within `server.shutdown_grace`, then the process exits 0.

use std::sync::Arc;

use tokio::sync::watch;

/// A cheap clonable shutdown signal (tokio `watch`, which works from any runtime).
#[derive(Clone, Debug)]
pub struct Shutdown {
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
            tx: Arc::new(tx),
            rx,
        }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has been triggered.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the sender is gone, which only happens at process exit.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}
