//! The store as operators see it, for the admin API: `stats` (the Go shape `items`, `size`,
//! `max_size`, `dir`, plus ours), `warmup` (the Go shape `{"results":[{"adapter","status"}]}`),
//! the fetches in flight with their progress, and the periodic progress log of long fetches.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::{Value, json};

use super::{Store, flight::FlightKind};
use crate::{adapter::AdapterName, error::Clipped};

/// A long fetch logs its progress this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// One fetch in flight, as `GET /admin/cache/fetches` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FetchProgress {
    pub adapter: String,
    pub origin: String,
    pub bytes: u64,
    /// Total bytes, when the origin said.
    pub total: Option<u64>,
    pub bytes_per_sec: f64,
    pub elapsed_secs: f64,
}

/// Live progress of one fetch.
pub struct Progress {
    name: AdapterName,
    origin: String,
    total: Option<u64>,
    started: Instant,
    bytes: AtomicU64,
    last_log: Mutex<Instant>,
}

impl Progress {
    pub fn add(&self, n: u64) {
        let bytes = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < LOG_EVERY {
            return;
        }
        *last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        let rate = bytes as f64 / secs.max(1e-9);
        let eta = self
            .total
            .map(|t| t.saturating_sub(bytes) as f64 / rate.max(1.0));
        tracing::info!(
            adapter = %self.name, origin = %self.origin, bytes, total = ?self.total,
            mb_per_sec = rate / 1e6, eta_secs = ?eta, "fetch in progress"
        );
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn snapshot(&self) -> FetchProgress {
        let secs = self.started.elapsed().as_secs_f64();
        let bytes = self.bytes();
        FetchProgress {
            adapter: self.name.to_string(),
            origin: self.origin.clone(),
            bytes,
            total: self.total,
            bytes_per_sec: bytes as f64 / secs.max(1e-9),
            elapsed_secs: secs,
        }
    }
}

/// Fetches in flight.
#[derive(Default)]
pub struct ProgressBoard {
    map: Arc<Mutex<HashMap<u64, Arc<Progress>>>>,
    seq: AtomicU64,
}

/// Registered while its fetch runs.
pub struct ProgressGuard {
    map: Arc<Mutex<HashMap<u64, Arc<Progress>>>>,
    id: u64,
    progress: Arc<Progress>,
}

impl std::ops::Deref for ProgressGuard {
    type Target = Progress;
    fn deref(&self) -> &Progress {
        &self.progress
    }
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl ProgressBoard {
    pub fn start(&self, name: &AdapterName, origin: String, total: Option<u64>) -> ProgressGuard {
        let progress = Arc::new(Progress {
            name: name.clone(),
            origin,
            total,
            started: Instant::now(),
            bytes: AtomicU64::new(0),
            last_log: Mutex::new(Instant::now()),
        });
        let id = self.seq.fetch_add(1, Ordering::Relaxed);
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, progress.clone());
        ProgressGuard {
            map: self.map.clone(),
            id,
            progress,
        }
    }

    fn snapshot(&self) -> Vec<FetchProgress> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.values().map(|p| p.snapshot()).collect();
        v.sort_by(|a, b| a.adapter.cmp(&b.adapter));
        v
    }
}

impl Store {
    /// `GET /admin/cache/stats`.
    pub fn stats(&self) -> Value {
        let (size, reserved) = {
            let l = self.ledger();
            (l.used(), l.reserved)
        };
        let pinned = self.index.entries().iter().filter(|e| e.pins() > 0).count();
        json!({
            "items": self.index.len(),
            "size": size,
            "max_size": self.opts.max_size,
            "dir": self.opts.dir.display().to_string(),
            "write_mode": self.writer.mode().as_str(),
            "driver": self.writer.driver(),
            "reserved": reserved,
            "fetches_in_flight": self.flights.count(FlightKind::Fetch),
            "revalidations_in_flight": self.flights.count(FlightKind::Revalidate),
            "hits": self.hits.get(),
            "misses": self.misses.get(),
            "pinned": pinned,
            "preload": self.preload_status.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }

    /// Bytes of a stored adapter, if stored.
    pub fn stored_size(&self, name: &AdapterName) -> Option<u64> {
        self.index.get(name).map(|e| e.size())
    }

    /// The names of the stored adapters (for the disk set peers see).
    pub fn stored_names(&self) -> Vec<AdapterName> {
        self.index
            .entries()
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// The fetches in flight and their progress.
    pub fn fetch_progress(&self) -> Vec<FetchProgress> {
        self.progress.snapshot()
    }

    /// `GET /admin/cache/fetches`: `{"fetches":[...]}`.
    pub fn fetches(&self) -> Value {
        json!({ "fetches": self.fetch_progress() })
    }

    /// `POST /admin/cache/warmup`: fetch each adapter (one after the other, as the Go project
    /// does); `{"results":[{"adapter": name, "status": "ok" | "error: ..."}]}`.
    pub async fn warmup(self: &Arc<Self>, names: &[String]) -> Value {
        let mut results = Vec::with_capacity(names.len());
        for raw in names {
            let (adapter, status) = match AdapterName::parse(raw) {
                Ok(name) => match self.ensure(&name).await {
                    Ok(_) => (raw.clone(), "ok".to_owned()),
                    Err(e) => (raw.clone(), format!("error: {}", e.message)),
                },
                // A bad name may be huge: the answer repeats only its start.
                Err(e) => (Clipped(raw).to_string(), format!("error: {}", e.message)),
            };
            results.push(json!({ "adapter": adapter, "status": status }));
        }
        json!({ "results": results })
    }
}
