//! SHA-256 of a transfer, computed beside it rather than in its way.
//!
//! Hashing on the receive path makes the download wait for the hash: on this machine class
//! SHA-256 (SHA-NI) runs at about the speed of a loopback transfer, so hashing inline roughly
//! halves throughput. [`PipelinedSha256`] hands the chunks (reference-counted `Bytes`, no copy)
//! to a blocking-pool thread in batches of about 1 MiB; the receiver only waits when the hasher
//! falls a whole queue behind, and the digest is ready a moment after the last byte.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::{sync::mpsc, task::JoinHandle};

/// Bytes gathered before a batch is handed over (amortizes the channel).
const BATCH: usize = 1 << 20;
/// Batches in flight before `update` waits for the hasher.
const QUEUE: usize = 16;

/// A SHA-256 computed on another thread, fed in order.
pub struct PipelinedSha256 {
    tx: Option<mpsc::Sender<Vec<Bytes>>>,
    batch: Vec<Bytes>,
    batch_len: usize,
    worker: JoinHandle<[u8; 32]>,
}

impl PipelinedSha256 {
    /// Start the hashing thread (from inside a tokio runtime).
    pub fn new() -> Self {
        let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(QUEUE);
        let worker = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            while let Some(batch) = rx.blocking_recv() {
                for chunk in batch {
                    h.update(&chunk);
                }
            }
            h.finalize().into()
        });
        PipelinedSha256 {
            tx: Some(tx),
            batch: Vec::new(),
            batch_len: 0,
            worker,
        }
    }

    /// Add the next chunk.
    pub async fn update(&mut self, chunk: Bytes) {
        self.batch_len += chunk.len();
        self.batch.push(chunk);
        if self.batch_len >= BATCH {
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        self.batch_len = 0;
        if let Some(tx) = &self.tx {
            // The receiver lives until `tx` is dropped; a send can only fail if the hashing
            // thread panicked, which `finish` reports.
            let _ = tx.send(batch).await;
        }
    }

    /// The digest of everything added.
    pub async fn finish(mut self) -> [u8; 32] {
        self.flush().await;
        self.tx = None;
        (&mut self.worker)
            .await
            .expect("the SHA-256 thread does not panic")
    }
}

impl Default for PipelinedSha256 {
    fn default() -> Self {
        PipelinedSha256::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_digest_as_inline_hashing() {
        let data: Vec<u8> = (0..3_000_017u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut p = PipelinedSha256::new();
        // Uneven chunks, crossing batch boundaries.
        for chunk in data.chunks(65_537) {
            p.update(Bytes::copy_from_slice(chunk)).await;
        }
        let want: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!(p.finish().await, want);
        let empty: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(PipelinedSha256::new().finish().await, empty);
    }
}
