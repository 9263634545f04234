//! The disk budget: reservations for fetches in flight, eviction to make room, admin evict.
//!
//! `used` = bytes of the adapters in the policy + bytes of evicted adapters not yet deleted;
//! a fetch may start only when `used + reserved + its size <= max_size`, so the disk never
//! holds more than the budget. To make room, the policy picks victims among unpinned entries
//! with no flight (claim = CAS pins 0 → EVICTING, done together with registering an Evict
//! flight, under the flight registry's lock). If nothing can be evicted (everything pinned),
//! the fetch waits up to `pinned_wait`, then fails with 507.
//!
//! An eviction: out of the index (hits miss from now on) → renamed into the temp area (vLLM
//! can no longer see it) → the Evict flight ends (a new fetch of the name may start) → vLLM
//! unloads it → deleted → its bytes leave `used`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    LOCAL, Store,
    flight::{FlightKind, Lead},
    fsops,
    index::Entry,
    policy::S3Fifo,
};
use crate::{
    adapter::AdapterName,
    error::{Error, ErrorKind},
};

/// How often a fetch blocked by pinned adapters looks again.
const PINNED_POLL: Duration = Duration::from_millis(25);

pub struct Ledger {
    pub policy: S3Fifo<AdapterName, Arc<Entry>>,
    pub max: u64,
    /// Bytes promised to fetches in flight.
    pub reserved: u64,
    /// Bytes of evicted or replaced copies not yet deleted.
    pub freeing: u64,
}

impl Ledger {
    pub fn new(max: u64) -> Self {
        Ledger {
            policy: S3Fifo::new(max),
            max,
            reserved: 0,
            freeing: 0,
        }
    }

    /// Bytes on disk (stored + being deleted).
    pub fn used(&self) -> u64 {
        self.policy.bytes() + self.freeing
    }
}

/// Bytes promised to one fetch; given back when dropped.
pub struct Reservation {
    store: Arc<Store>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reserve `more` bytes on top (a transfer longer than announced, or of unknown size).
    pub async fn grow(&mut self, more: u64) -> Result<(), Error> {
        let mut extra = self.store.reserve(more).await?;
        self.bytes += std::mem::take(&mut extra.bytes);
        Ok(())
    }

    /// Hand the bytes over to the caller's bookkeeping (under the ledger lock): nothing is
    /// given back on drop.
    pub fn take(mut self) -> u64 {
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // After `take` there is nothing to give back (and the caller holds the ledger lock).
        if self.bytes > 0 {
            self.store.ledger().reserved -= self.bytes;
        }
    }
}

/// A victim claimed from the policy, with its Evict flight.
struct Victim {
    entry: Arc<Entry>,
    lead: Lead,
}

impl Store {
    /// Reserve `bytes`, evicting unpinned adapters as needed (control plane context).
    pub(super) async fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, Error> {
        if bytes > self.opts.max_size {
            return Err(Error::new(
                ErrorKind::InsufficientStorage,
                format!(
                    "adapter needs {bytes} bytes, more than storage.max_size ({} bytes)",
                    self.opts.max_size
                ),
            ));
        }
        let deadline = Instant::now() + self.opts.pinned_wait;
        loop {
            let (victims, others_freeing) = {
                let mut l = self.ledger();
                if l.used() + l.reserved + bytes <= l.max {
                    l.reserved += bytes;
                    return Ok(Reservation {
                        store: self.clone(),
                        bytes,
                    });
                }
                // What other evictions will free already counts toward the need.
                let mut need = (l.used() + l.reserved + bytes - l.max).saturating_sub(l.freeing);
                let others = l.freeing;
                let mut victims = Vec::new();
                while need > 0 {
                    let flights = &self.flights;
                    let mut lead = None;
                    let picked = l.policy.evict(|name, entry| {
                        if self.is_preloaded(name) {
                            return false;
                        }
                        lead = flights.try_lead(name, FlightKind::Evict, || entry.try_claim());
                        lead.is_some()
                    });
                    let Some((_, entry, size)) = picked else {
                        break;
                    };
                    l.freeing += size;
                    need = need.saturating_sub(size);
                    victims.push(Victim {
                        entry,
                        lead: lead.expect("claimed with its flight"),
                    });
                }
                (victims, others)
            };
            if victims.is_empty() {
                if others_freeing == 0 && Instant::now() >= deadline {
                    return Err(Error::new(
                        ErrorKind::InsufficientStorage,
                        format!(
                            "no room for {bytes} bytes: every stored adapter is in use or being fetched (storage.max_size {} bytes)",
                            self.opts.max_size
                        ),
                    ));
                }
                tokio::time::sleep(PINNED_POLL).await;
                continue;
            }
            // Victims go in parallel: each waits for vLLM's unload before its delete.
            futures_util::future::join_all(
                victims
                    .into_iter()
                    .map(|v| self.evict_claimed(v.entry, v.lead)),
            )
            .await;
        }
    }

    /// Finish an eviction claimed and taken out of the policy (its bytes are in `freeing`).
    async fn evict_claimed(self: &Arc<Self>, entry: Arc<Entry>, lead: Lead) {
        let name = entry.name.clone();
        self.index.remove_if_same(&entry);
        let target = self.opts.dir.join(name.rel_path());
        let hidden = self.tmp_path("evict");
        let (t, h) = (target.clone(), hidden.clone());
        let hid = tokio::task::spawn_blocking(move || fsops::hide(&t, &h))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match &hid {
            // Out of `{dir}/{name}`: names inside or around it may be fetched now.
            Ok(_) => self.flights.set_stored(&name, false),
            Err(e) => {
                tracing::error!(adapter = %name, error = %e, "evict: could not move the adapter away")
            }
        }
        lead.finish(Ok(None));
        self.unload(&name).await;
        let root = self.opts.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = fsops::remove_tree(&hidden) {
                tracing::error!(path = %hidden.display(), error = %e, "evict: delete failed");
            }
            fsops::remove_empty_parents(&root, &target);
        })
        .await;
        self.ledger().freeing -= entry.size();
        self.metrics.cache_evictions.get_or_create(&LOCAL).inc();
        self.update_gauges();
        tracing::info!(adapter = %name, bytes = entry.size(), "evicted");
    }

    /// Admin evict: `Ok(false)` when not stored. Waits briefly for in-flight requests and
    /// for a fetch or revalidation of the same name; 503 if they don't finish.
    pub async fn evict(self: &Arc<Self>, name: &AdapterName) -> Result<bool, Error> {
        let store = self.clone();
        let name = name.clone();
        self.control
            .run(async move { store.evict_now(&name).await })
            .await?
    }

    async fn evict_now(self: &Arc<Self>, name: &AdapterName) -> Result<bool, Error> {
        if self.is_preloaded(name) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("{name} is in storage.preload: it is never evicted"),
            ));
        }
        let deadline = Instant::now() + self.opts.pinned_wait;
        loop {
            let Some(entry) = self.index.get(name) else {
                return Ok(false);
            };
            if entry.is_evicting() {
                // Another eviction has it; wait for it to leave the index.
                tokio::time::sleep(PINNED_POLL).await;
                continue;
            }
            let claimed = {
                let mut l = self.ledger();
                let lead = self
                    .flights
                    .try_lead(name, FlightKind::Evict, || entry.try_claim());
                lead.inspect(|_| {
                    l.policy.remove(name);
                    l.freeing += entry.size();
                })
            };
            if let Some(lead) = claimed {
                self.evict_claimed(entry, lead).await;
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("adapter {name} is in use (requests or a fetch in flight); try again"),
                ));
            }
            tokio::time::sleep(PINNED_POLL).await;
        }
    }
}
