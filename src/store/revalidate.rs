//! TTL revalidation, stale-while-revalidate done right (`invalidation.ttl`).
//!
//! An access after the TTL serves the stored copy and starts one background task (a
//! Revalidate flight: never two at once, and no eviction meanwhile). It asks the origins for
//! the current content id (`head`):
//! - same id: `fetched_at` is refreshed in `.loraplex_meta` (rewritten atomically: written in
//!   the temp area, fsynced, renamed over the old one);
//! - another id (or an origin that has none to compare): the new version is downloaded next
//!   to the old one, swapped in with one `RENAME_EXCHANGE`, then vLLM is told to unload the
//!   name so its next request loads the new files, then the old copy is deleted;
//! - failure: the old copy stays; no new attempt before a back-off that doubles per failure.
//!
//! Adapters without a `.loraplex_meta` (copied in by hand) have no origin and are left alone.

use std::{
    fs,
    io::Write,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use super::{
    Store,
    flight::FlightKind,
    fsops,
    index::{Entry, now_ms},
};
use crate::{
    adapter::{
        META_FILE,
        meta::{AdapterMeta, timestamp_ms},
    },
    error::Error,
    metrics::ResultLabel,
    telemetry::Span,
};

const BACKOFF_MIN: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// Wait after the `failures`-th failure in a row: max(ttl/10, 5 s), doubling, capped at 1 h.
pub fn backoff(ttl: Duration, failures: u32) -> Duration {
    let base = (ttl / 10).max(BACKOFF_MIN);
    base.saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX)
}

impl Store {
    /// On the hit path: start a revalidation if this entry is due. A few relaxed loads.
    #[inline]
    pub(super) fn maybe_revalidate(self: &Arc<Self>, entry: &Arc<Entry>, now: u64) {
        let Some(ttl) = self.opts.ttl else { return };
        if entry.provenance.origin.is_none()
            || now < entry.fetched_at_ms().saturating_add(ttl.as_millis() as u64)
            || now < entry.next_revalidation_ms.load(Ordering::Relaxed)
            || entry.revalidating.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let store = self.clone();
        let entry = entry.clone();
        self.control
            .spawn(async move { store.revalidate(entry, ttl).await });
    }

    async fn revalidate(self: Arc<Self>, entry: Arc<Entry>, ttl: Duration) {
        let name = entry.name.clone();
        let current = || {
            self.index
                .get(&name)
                .is_some_and(|e| Arc::ptr_eq(&e, &entry))
        };
        let Some(lead) = self.flights.try_lead(&name, FlightKind::Revalidate, || {
            current() && !entry.is_evicting()
        }) else {
            entry.revalidating.store(false, Ordering::Release);
            return;
        };
        let result = match self.revalidate_once(&entry).await {
            Ok(label) => {
                entry.revalidation_failures.store(0, Ordering::Relaxed);
                label
            }
            Err(e) => {
                let n = entry.revalidation_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let wait = backoff(ttl, n);
                entry
                    .next_revalidation_ms
                    .store(now_ms() + wait.as_millis() as u64, Ordering::Relaxed);
                tracing::warn!(adapter = %name, error = %e, retry_in = ?wait, "revalidation failed; keeping the stored copy");
                "failed"
            }
        };
        self.metrics
            .revalidations
            .get_or_create(&ResultLabel { result })
            .inc();
        entry.revalidating.store(false, Ordering::Release);
        lead.finish(Ok(None));
    }

    async fn revalidate_once(self: &Arc<Self>, entry: &Arc<Entry>) -> Result<&'static str, Error> {
        let name = &entry.name;
        let (_, id) = self
            .origins
            .head(name)
            .await
            .map_err(|e| e.into_error(name, "the origins"))?;
        if id.is_some() && id.as_deref() == entry.provenance.content_id() {
            let now = now_ms();
            self.refresh_meta(entry, now).await?;
            entry.set_fetched_at_ms(now);
            tracing::debug!(adapter = %name, "revalidated: unchanged");
            return Ok("unchanged");
        }
        tracing::info!(adapter = %name, old = ?entry.provenance.content_id(), new = ?id, "adapter changed at the origin; fetching the new version");
        drop(
            self.fetch_version(name, Some(entry), &mut Span::default())
                .await?,
        );
        Ok("updated")
    }

    /// Rewrite `.loraplex_meta` with a new `fetched_at`, atomically and durably.
    async fn refresh_meta(&self, entry: &Entry, now: u64) -> Result<(), Error> {
        let meta = AdapterMeta {
            origin: entry.provenance.origin.clone().unwrap_or_default(),
            etag: entry.provenance.etag.clone(),
            revision: entry.provenance.revision.clone(),
            fetched_at: timestamp_ms(now),
            ttl_seconds: self.opts.ttl.map_or(0, |t| t.as_secs() as i64),
        };
        let dir = self.opts.dir.join(entry.name.rel_path());
        let tmp: PathBuf = self.tmp_path("meta");
        let bytes = meta.to_bytes();
        let new_len = bytes.len() as u64;
        let old_len = tokio::task::spawn_blocking(move || {
            let path = dir.join(META_FILE);
            let old_len = fs::metadata(&path).map_or(0, |m| m.len());
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            let r = fs::rename(&tmp, &path).and_then(|_| fsops::fsync_dir(&dir));
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r.map(|()| old_len)
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))?
        .map_err(|e| super::file_writer::storage_error(e, "refreshing .loraplex_meta"))?;
        if new_len != old_len {
            // The ledger counts what is on disk, to the byte.
            let mut l = self.ledger();
            let size = (entry.size() + new_len).saturating_sub(old_len);
            if l.policy.resize(&entry.name, size) {
                entry.set_size(size);
            }
            drop(l);
            self.update_gauges();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let hour = Duration::from_secs(3600);
        assert_eq!(backoff(hour, 1), Duration::from_secs(360));
        assert_eq!(backoff(hour, 2), Duration::from_secs(720));
        assert_eq!(backoff(hour, 30), BACKOFF_MAX);
        assert_eq!(backoff(Duration::from_millis(50), 1), BACKOFF_MIN);
    }
}
