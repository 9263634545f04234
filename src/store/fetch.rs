//! The fetch leader (a control-plane task): origins in order → manifest → reserve space →
//! stream each file through the checks into the storage thread → `.loraplex_meta` → commit
//! (fsync, atomic rename) → index and policy. Any failure before the commit leaves nothing
//! behind but a temp directory the writer removes.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    Pin, Store,
    fsops::Published,
    index::{Entry, Provenance, now_ms},
    space::Reservation,
    stats::Progress,
    validate::{self, MAX_CONFIG, SafetensorsProbe},
    writer::{Committed, Msg},
};
use crate::{
    adapter::{
        AdapterName, CONFIG_FILE, META_FILE, SAFETENSORS_FILE,
        meta::{AdapterMeta, timestamp_ms},
    },
    error::Error,
    metrics::{OriginLabel, OriginReason, OriginResult},
    origin::{
        FileSpec, Origin, OriginError, OriginErrorKind, check_manifest,
        transfer::{ChunkSink, TransferError, pull_file, with_retries},
    },
    telemetry::{self, Span, SpanKind},
};

/// Reservation step when sizes are unknown.
const GROW_STEP: u64 = 64 << 20;
/// Room for `.loraplex_meta`.
const META_RESERVE: u64 = 4096;

/// Why one origin's attempt failed.
enum Failure {
    /// The origin's fault: try the next one.
    Origin(OriginError),
    /// Ours (disk full, budget, storage I/O): stop.
    Local(Error),
}

impl Store {
    /// Fetch `name` from the first origin that has it. `replacing`: the stored version a
    /// revalidation found outdated (it stays in place until the new one is published). `span`
    /// (the `fetch` span, or nothing) gets a `fetch.origin` child per origin tried.
    pub(super) async fn fetch_version(
        self: &Arc<Self>,
        name: &AdapterName,
        replacing: Option<&Arc<Entry>>,
        span: &mut Span,
    ) -> Result<Pin, Error> {
        self.metrics.fetches_inflight.inc();
        let _inflight = scopeguard(|| {
            self.metrics.fetches_inflight.dec();
        });
        let mut first_err: Option<Error> = None;
        for origin in self.origins.iter() {
            // A new version comes from the configured origins: a peer's copy is one it fetched
            // before, no newer than ours as far as anyone knows (taking it republished the old
            // version at every TTL, for as long as a peer held it).
            if replacing.is_some() && origin.kind() == "peer" {
                continue;
            }
            let started = Instant::now();
            let label = origin.kind();
            let mut attempt = span.child("fetch.origin", SpanKind::Client);
            attempt.set("loraplex.origin", label);
            let outcome = telemetry::with_parent(
                attempt.traceparent(),
                self.fetch_from(origin.as_ref(), name, replacing, &mut attempt),
            )
            .await;
            let result = if outcome.is_ok() { "ok" } else { "error" };
            attempt.set("loraplex.fetch.result", result);
            self.metrics
                .fetches
                .get_or_create(&OriginResult {
                    origin: label,
                    result,
                })
                .inc();
            match outcome {
                Ok(pin) => {
                    self.metrics
                        .fetch_duration
                        .get_or_create(&OriginLabel { origin: label })
                        .observe(started.elapsed().as_secs_f64());
                    span.set("loraplex.origin", label);
                    span.set("loraplex.fetch.bytes", pin.entry().size() as i64);
                    return Ok(pin);
                }
                Err(Failure::Origin(e)) => {
                    self.count_failure(label, e.kind.as_str());
                    attempt.set("error.type", e.kind.as_str());
                    attempt.fail(|| e.to_string());
                    if e.kind == OriginErrorKind::NotFound {
                        tracing::debug!(adapter = %name, origin = %origin.describe(), "not found at origin");
                    } else {
                        tracing::warn!(adapter = %name, origin = %origin.describe(), error = %e, "origin failed; trying the next");
                        first_err.get_or_insert_with(|| e.into_error(name, &origin.describe()));
                    }
                }
                Err(Failure::Local(e)) => {
                    self.count_failure(label, "storage");
                    attempt.set("error.type", "storage");
                    attempt.fail(|| e.to_string());
                    span.fail(|| e.to_string());
                    tracing::warn!(adapter = %name, error = %e, "fetch failed");
                    return Err(e);
                }
            }
        }
        let e = first_err.unwrap_or_else(|| Error::model_not_found(name.as_str()));
        span.fail(|| e.to_string());
        Err(e)
    }

    /// How much to reserve at a time when sizes are unknown (small budgets get small steps).
    fn grow_step(&self) -> u64 {
        GROW_STEP.min(self.opts.max_size / 8).max(1)
    }

    fn count_failure(&self, origin: &'static str, reason: &'static str) {
        self.metrics
            .fetch_failures
            .get_or_create(&OriginReason { origin, reason })
            .inc();
    }

    async fn fetch_from(
        self: &Arc<Self>,
        origin: &dyn Origin,
        name: &AdapterName,
        replacing: Option<&Arc<Entry>>,
        span: &mut Span,
    ) -> Result<Pin, Failure> {
        let mut manifest = with_retries(origin, "manifest", || origin.manifest(name))
            .await
            .map_err(Failure::Origin)?;
        check_manifest(&manifest).map_err(Failure::Origin)?;
        drop_nested_adapters(&mut manifest.files);
        let known = manifest.known_size();
        let mut reservation = self
            .reserve(known.map_or(self.grow_step(), |k| k + META_RESERVE))
            .await
            .map_err(Failure::Local)?;
        let tmp = self.tmp_path("fetch");
        let (tx, done) = self
            .writer
            .begin(&self.opts.dir, tmp)
            .map_err(Failure::Local)?;
        let progress = self.progress.start(name, origin.describe(), known);
        let step = self.grow_step();
        let base = match self.opts.rewrite_base_model {
            true => self.hooks.base_model_for(name),
            false => None,
        };
        let sent = async {
            let mut sink = Sink {
                tx: &tx,
                reservation: &mut reservation,
                progress: &progress,
                written: 0,
                kind: FileKind::Other,
                config: Vec::new(),
                probe: SafetensorsProbe::default(),
                step,
            };
            for file in &manifest.files {
                sink.begin(file).await?;
                pull_file(origin, name, &manifest, file, &mut sink).await?;
                // The checks that need the whole file (a safetensors header, a config).
                let mut verify = match sink.kind {
                    FileKind::Other => Span::OFF,
                    _ => span.child("verify", SpanKind::Internal),
                };
                verify.set_str("loraplex.file", &file.path);
                let checked = sink.end(base.as_deref()).await;
                if let Err(e) = &checked {
                    verify.fail(|| match e {
                        TransferError::Origin(e) => e.to_string(),
                        TransferError::Sink(e) => e.to_string(),
                    });
                }
                checked?;
            }
            let meta = AdapterMeta {
                origin: origin.kind().to_owned(),
                etag: manifest.etag.clone(),
                revision: manifest.revision.clone(),
                // A peer's copy keeps its time (never later than now: clocks differ).
                fetched_at: timestamp_ms(
                    manifest.fetched_at_ms.map_or(now_ms(), |t| t.min(now_ms())),
                ),
                ttl_seconds: self.opts.ttl.map_or(0, |t| t.as_secs() as i64),
            };
            sink.send(Msg::File(META_FILE.into(), None)).await?;
            sink.send(Msg::Data(meta.to_bytes().into())).await?;
            sink.send(Msg::Commit(self.opts.dir.join(name.rel_path())))
                .await?;
            Ok::<AdapterMeta, TransferError>(meta)
        }
        .await;
        span.set("loraplex.fetch.files", manifest.files.len() as i64);
        span.set("loraplex.fetch.bytes", progress.bytes() as i64);
        // fsync, atomic rename, then the index.
        let mut publish = match sent {
            Ok(_) => span.child("publish", SpanKind::Internal),
            Err(_) => Span::OFF,
        };
        drop(tx);
        let committed = done
            .await
            .unwrap_or_else(|_| Err(Error::internal("the storage thread stopped")));
        if let Err(e) = &committed {
            publish.fail(|| e.to_string());
        }
        let (meta, committed) = match (sent, committed) {
            (Ok(meta), Ok(c)) => (meta, c),
            // The channel closed under the sender: the writer's error (ENOSPC...) is the cause.
            (Ok(_), Err(e)) => return Err(Failure::Local(e)),
            (Err(TransferError::Sink(e)), Err(we)) => {
                return Err(Failure::Local(if e == writer_gone() { we } else { e }));
            }
            (Err(TransferError::Sink(e)), Ok(_)) => return Err(Failure::Local(e)),
            (Err(TransferError::Origin(e)), _) => return Err(Failure::Origin(e)),
        };
        self.metrics
            .fetch_bytes
            .get_or_create(&OriginLabel {
                origin: origin.kind(),
            })
            .inc_by(progress.bytes());
        tracing::info!(
            adapter = %name, origin = %origin.describe(),
            bytes = committed.bytes(),
            secs = progress.elapsed().as_secs_f64(), "adapter fetched and published"
        );
        let pin = self
            .install(name, meta, committed, reservation, replacing)
            .await;
        publish.end();
        Ok(pin)
    }

    /// Index the published adapter; delete what it replaced once vLLM has been told.
    async fn install(
        self: &Arc<Self>,
        name: &AdapterName,
        meta: AdapterMeta,
        committed: Committed,
        reservation: Reservation,
        replacing: Option<&Arc<Entry>>,
    ) -> Pin {
        let provenance = Provenance {
            origin: Some(meta.origin.clone()),
            etag: meta.etag.clone(),
            revision: meta.revision.clone(),
        };
        // One pin held from birth, for the flight: no eviction before every waiter pinned it.
        let entry = Arc::new(Entry::new(
            name.clone(),
            committed.bytes(),
            committed.files,
            provenance,
            meta.fetched_at_ms(),
            1,
        ));
        let pin = Pin::held(entry.clone());
        let replaced_bytes = {
            let mut l = self.ledger();
            l.reserved -= reservation.take();
            let old = l.policy.remove(name);
            let old_bytes = match (&committed.published, old) {
                (Published::Replaced(_), Some(old)) => old.size(),
                _ => 0,
            };
            l.freeing += old_bytes;
            match replacing {
                Some(_) => l
                    .policy
                    .insert_main(name.clone(), entry.size(), entry.clone()),
                None => l.policy.insert(name.clone(), entry.size(), entry.clone()),
            }
            self.index.insert(entry.clone());
            self.flights.set_stored(name, true);
            old_bytes
        };
        self.update_gauges();
        if let Published::Replaced(old_dir) = committed.published {
            // The new files are in place; vLLM must drop what it cached of the old ones.
            self.unload(name).await;
            Store::remove_later(old_dir).await;
            self.ledger().freeing -= replaced_bytes;
            self.update_gauges();
        }
        pin
    }
}

/// Files in a subdirectory that holds its own `adapter_config.json` are another adapter's
/// (`x/y`, which an S3 prefix listing of `x` includes): `x` does not take them.
fn drop_nested_adapters(files: &mut Vec<FileSpec>) {
    let config = format!("/{CONFIG_FILE}");
    let nested: Vec<String> = files
        .iter()
        .filter_map(|f| f.path.strip_suffix(config.as_str()))
        .map(|dir| format!("{dir}/"))
        .collect();
    if !nested.is_empty() {
        files.retain(|f| !nested.iter().any(|dir| f.path.starts_with(dir.as_str())));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Config,
    Safetensors,
    Other,
}

/// The fetch side of the writer channel, checking content on its way.
struct Sink<'a> {
    tx: &'a mpsc::Sender<Msg>,
    reservation: &'a mut Reservation,
    progress: &'a Progress,
    /// Bytes sent, for the reservation.
    written: u64,
    kind: FileKind,
    /// The config is held whole: it is validated (and maybe rewritten) before being written.
    config: Vec<u8>,
    probe: SafetensorsProbe,
    /// Reservation growth step.
    step: u64,
}

/// The error a send sees when the writer has stopped; its own result says why.
fn writer_gone() -> Error {
    Error::internal("the storage writer stopped")
}

fn invalid(msg: String) -> TransferError {
    TransferError::Origin(OriginError::invalid(msg))
}

impl Sink<'_> {
    async fn send(&mut self, msg: Msg) -> Result<(), TransferError> {
        self.tx
            .send(msg)
            .await
            .map_err(|_| TransferError::Sink(writer_gone()))
    }

    async fn begin(&mut self, file: &FileSpec) -> Result<(), TransferError> {
        self.kind = match file.path.as_str() {
            CONFIG_FILE => FileKind::Config,
            SAFETENSORS_FILE => FileKind::Safetensors,
            _ => FileKind::Other,
        };
        self.config.clear();
        self.probe = SafetensorsProbe::default();
        self.send(Msg::File(file.path.clone(), file.size)).await
    }

    async fn end(&mut self, base: Option<&str>) -> Result<(), TransferError> {
        match self.kind {
            FileKind::Config => {
                let config = std::mem::take(&mut self.config);
                let out = match validate::check_config(&config, base).map_err(invalid)? {
                    Some(rewritten) => rewritten,
                    None => config,
                };
                self.account(out.len() as u64).await?;
                self.send(Msg::Data(out.into())).await
            }
            FileKind::Safetensors => self.probe.finish().map_err(invalid),
            FileKind::Other => Ok(()),
        }
    }

    /// Keep the reservation ahead of the bytes written.
    async fn account(&mut self, n: u64) -> Result<(), TransferError> {
        self.written += n;
        if self.written > self.reservation.bytes() {
            let more = (self.written - self.reservation.bytes()).max(self.step);
            self.reservation
                .grow(more)
                .await
                .map_err(TransferError::Sink)?;
        }
        Ok(())
    }
}

impl ChunkSink for Sink<'_> {
    async fn accept(&mut self, chunk: Bytes) -> Result<(), TransferError> {
        self.progress.add(chunk.len() as u64);
        match self.kind {
            FileKind::Config => {
                if self.config.len() + chunk.len() > MAX_CONFIG {
                    return Err(invalid(format!(
                        "{CONFIG_FILE} is larger than {MAX_CONFIG} bytes"
                    )));
                }
                self.config.extend_from_slice(&chunk);
                Ok(())
            }
            FileKind::Safetensors => {
                self.probe.feed(&chunk).map_err(invalid)?;
                self.account(chunk.len() as u64).await?;
                self.send(Msg::Data(chunk)).await
            }
            FileKind::Other => {
                self.account(chunk.len() as u64).await?;
                self.send(Msg::Data(chunk)).await
            }
        }
    }
}

/// Run `f` when dropped (also when the future holding it is dropped).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_adapters_files_are_left_out() {
        let mut files: Vec<FileSpec> = [
            CONFIG_FILE,
            SAFETENSORS_FILE,
            "sub/tokenizer.json",
            "y/adapter_config.json",
            "y/adapter_model.safetensors",
            "y/z/adapter_config.json",
            "yy/notes.txt",
        ]
        .into_iter()
        .map(|p| FileSpec::new(p, Some(1)))
        .collect();
        drop_nested_adapters(&mut files);
        let kept: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            kept,
            [
                CONFIG_FILE,
                SAFETENSORS_FILE,
                "sub/tokenizer.json",
                "yy/notes.txt"
            ]
        );
    }
}
