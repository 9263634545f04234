//! The adapter store: makes sure an adapter's files are in `{storage.dir}/{name}/` (the
//! directory vLLM's `lora_filesystem_resolver` reads) before a request reaches vLLM.
//!
//! - Hit: [`Store::pin`] looks the name up in the lock-free [`index`] and pins the entry (a
//!   pinned adapter is never evicted); no lock, no filesystem access.
//! - Miss: [`Store::ensure`] joins the single [`flight`] for that name; its leader, a task on
//!   the control plane, asks the [`crate::origin`] chain for the files, streams them through a
//!   bounded channel to the storage thread ([`writer`]: O_DIRECT into `.loraplex-tmp/`),
//!   checks them ([`validate`]), and publishes the directory with one atomic rename.
//! - Space: a fetch reserves its bytes first ([`space`]); the eviction [`policy`] (size-aware
//!   S3-FIFO) picks unpinned victims; an evicted adapter disappears from vLLM's sight by a
//!   rename, vLLM is told to unload it ([`VllmHooks`]), then it is deleted.
//! - Names: `x` and `x/y` are never stored together (one directory would hold the other); the
//!   second is a 409 ([`flight`] is also the namespace).
//! - The ledger counts the published files to the byte (each entry records its files), so
//!   `stats` `size` is what the storage directory holds outside the temp area.
//! - Startup ([`recover`]): temp leftovers removed, the index rebuilt from disk, corrupt
//!   entries removed, the budget enforced. TTL revalidation: [`revalidate`].
//!
//! Every future here is runtime-agnostic (tokio sync primitives, work handed to the control
//! plane with [`Control::spawn`]/[`Control::run`]), so monoio workers await them directly.

pub mod aligned;
mod fetch;
mod file_writer;
pub mod flight;
pub mod fsops;
pub mod index;
pub mod policy;
mod recover;
mod revalidate;
mod space;
mod stats;
pub mod validate;
pub mod writer;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;

pub use self::{file_writer::Faults, index::Pin, stats::FetchProgress, writer::WriteMode};
use self::{
    flight::{FlightKind, Flights, Join},
    index::{Index, now_ms},
    space::Ledger,
    stats::ProgressBoard,
    writer::Writer,
};
use crate::{
    adapter::AdapterName,
    config::{Config, DirectIo, Driver},
    control::Control,
    error::{Error, ErrorKind},
    metrics::{Metrics, TierLabel},
    origin::OriginChain,
    telemetry::{Span, SpanKind},
};

/// What the store needs from vLLM (implemented by the vLLM client).
pub trait VllmHooks: Send + Sync + 'static {
    /// `POST /v1/unload_lora_adapter {"lora_name": name}`; a 404 counts as success.
    fn unload(&self, name: &str) -> BoxFuture<'static, Result<(), Error>>;
    /// vLLM's `--model`, what `storage.rewrite_base_model` writes (not a served name), if known.
    fn base_model(&self) -> Option<String>;
    /// What `storage.rewrite_base_model` writes into adapter `name`'s config: the `--model` of
    /// the vLLM of its base model (its pool); by default [`VllmHooks::base_model`].
    fn base_model_for(&self, _name: &AdapterName) -> Option<String> {
        self.base_model()
    }
}

/// No vLLM behind the store (the benchmarks drive a store alone): unloads succeed at once and
/// no base model is known.
pub struct NoVllm;

impl VllmHooks for NoVllm {
    fn unload(&self, _: &str) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn base_model(&self) -> Option<String> {
        None
    }
}

/// The store's settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub dir: PathBuf,
    pub max_size: u64,
    pub rewrite_base_model: bool,
    pub direct_io: DirectIo,
    /// Revalidate after this long; `None` disables.
    pub ttl: Option<Duration>,
    /// The storage thread's io driver.
    pub driver: Driver,
    /// How long a fetch waits for pinned adapters to free up before answering 507.
    pub pinned_wait: Duration,
    /// Fault injection (tests).
    pub faults: Arc<Faults>,
    /// `storage.preload`: never evicted (an explicit evict is refused with 409).
    pub preload: Vec<AdapterName>,
}

impl StoreOptions {
    pub fn from_config(cfg: &Config) -> Self {
        StoreOptions {
            dir: cfg.storage.dir.clone(),
            max_size: cfg.storage.max_size,
            rewrite_base_model: cfg.storage.rewrite_base_model,
            direct_io: cfg.storage.direct_io,
            ttl: cfg.invalidation.ttl,
            driver: cfg.server.driver,
            pinned_wait: Duration::from_secs(2),
            faults: Arc::default(),
            preload: Vec::new(),
        }
    }
}

/// A pinned adapter, and whether getting it took a fetch.
#[derive(Debug)]
pub struct Ensured {
    pub pin: Pin,
    /// True when this call waited for a download (`cache_tier` "origin").
    pub fetched: bool,
}

/// The 409 for `name` while `other` is held: one directory would contain the other's, and
/// loraplex never stores such a pair (a swap or an eviction of the outer one would take the
/// inner one with it; see [`flight`]).
fn conflict(name: &AdapterName, other: &AdapterName) -> Error {
    let how = if other.contains(name.as_str()) {
        "lie inside that of"
    } else {
        "contain that of"
    };
    Error::new(
        ErrorKind::Conflict,
        format!(
            "adapter `{name}` cannot be stored: its directory would {how} adapter `{other}`, \
             which is stored here or being fetched; evict `{other}` first"
        ),
    )
    .with_param("model")
}

/// The adapter store. Shared as `Arc<Store>` by every thread.
pub struct Store {
    opts: StoreOptions,
    /// `.loraplex-tmp` inside the storage dir.
    tmp: PathBuf,
    index: Index,
    ledger: Mutex<Ledger>,
    flights: Arc<Flights>,
    origins: OriginChain,
    hooks: Arc<dyn VllmHooks>,
    control: Control,
    metrics: Arc<Metrics>,
    writer: Writer,
    progress: ProgressBoard,
    seq: AtomicU64,
    /// What became of each preloaded adapter (`/admin/cache/stats`).
    preload_status: Mutex<std::collections::BTreeMap<String, String>>,
    /// `loraplex_cache_hits_total{tier="local"}`, resolved once: the hit path must not
    /// look the label set up (a lock) every time.
    hits: Counter,
    misses: Counter,
}

const LOCAL: TierLabel = TierLabel { tier: "local" };

impl Store {
    /// Open the store: recovery runs here, synchronously, then the storage thread starts.
    pub fn open(
        opts: StoreOptions,
        origins: OriginChain,
        hooks: Arc<dyn VllmHooks>,
        control: Control,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Store>, Error> {
        let recovered = recover::recover(&opts)?;
        let direct = recovered.direct_ok && opts.direct_io == DirectIo::Auto;
        let writer = Writer::start(opts.driver, direct, opts.faults.clone())
            .map_err(|e| Error::internal(format!("starting the storage thread: {e}")))?;
        let hits = metrics.cache_hits.get_or_create(&LOCAL).clone();
        let misses = metrics.cache_misses.get_or_create(&LOCAL).clone();
        metrics
            .cache_max_size_bytes
            .get_or_create(&LOCAL)
            .set(opts.max_size.try_into().unwrap_or(i64::MAX));
        let store = Arc::new(Store {
            tmp: opts.dir.join(fsops::TMP_DIR),
            index: Index::default(),
            ledger: Mutex::new(Ledger::new(opts.max_size)),
            flights: Arc::default(),
            origins,
            hooks,
            control,
            writer,
            progress: ProgressBoard::default(),
            preload_status: Mutex::default(),
            seq: AtomicU64::new(0),
            hits,
            misses,
            metrics,
            opts,
        });
        store.adopt(recovered.entries);
        tracing::info!(
            dir = %store.opts.dir.display(),
            items = store.index.len(),
            bytes = store.ledger().used(),
            write_mode = store.writer.mode().as_str(),
            driver = store.writer.driver(),
            "adapter store open"
        );
        Ok(store)
    }

    /// The hit path: pin `name` if it is stored. Lock-free; no filesystem access. May start
    /// a background revalidation when the TTL has passed.
    #[inline]
    pub fn pin(self: &Arc<Self>, name: &AdapterName) -> Option<Pin> {
        let pin = self.index.pin(name)?;
        let now = now_ms();
        pin.entry().touch(now);
        self.hits.inc();
        self.maybe_revalidate(pin.entry(), now);
        Some(pin)
    }

    /// Make sure `name` is stored and pin it: a hit, or the one fetch for it (joined by every
    /// concurrent caller; a caller going away does not cancel it).
    pub async fn ensure(self: &Arc<Self>, name: &AdapterName) -> Result<Ensured, Error> {
        self.ensure_traced(name, &mut Span::default()).await
    }

    /// [`Store::ensure`] for a traced request: the fetch it leads (if any) is a child span of
    /// `span` (`fetch`, with `fetch.origin`, `verify` and `publish` under it); one it joins is
    /// only noted (`loraplex.fetch` = `led` | `joined`).
    pub async fn ensure_traced(
        self: &Arc<Self>,
        name: &AdapterName,
        span: &mut Span,
    ) -> Result<Ensured, Error> {
        let mut fetched = false;
        loop {
            if let Some(pin) = self.pin(name) {
                return Ok(Ensured { pin, fetched });
            }
            let flight = match self.flights.join(name, FlightKind::Fetch) {
                Join::Lead(lead) => {
                    let flight = lead.flight();
                    let store = self.clone();
                    span.set("loraplex.fetch", "led");
                    let mut fetch = span.child("fetch", SpanKind::Internal);
                    self.control.spawn(async move {
                        fetch.set_str("loraplex.adapter", lead.name().as_str());
                        let outcome = store.fetch_version(lead.name(), None, &mut fetch).await;
                        lead.finish(outcome.map(Some));
                    });
                    flight
                }
                Join::Follow(flight) => {
                    if flight.kind == FlightKind::Fetch {
                        span.set("loraplex.fetch", "joined");
                    }
                    flight
                }
                Join::Conflict(other) => return Err(conflict(name, &other)),
            };
            if flight.kind == FlightKind::Fetch {
                self.misses.inc();
                fetched = true;
            }
            match flight.wait().await {
                Ok(Some(pin)) if flight.kind == FlightKind::Fetch => {
                    return Ok(Ensured {
                        pin: pin.clone(),
                        fetched,
                    });
                }
                Err(e) if flight.kind == FlightKind::Fetch => return Err(e),
                // An eviction or revalidation of this name finished: look again.
                _ => {}
            }
        }
    }

    /// Whether `name` is in `storage.preload` (never evicted).
    pub fn is_preloaded(&self, name: &AdapterName) -> bool {
        self.opts.preload.contains(name)
    }

    /// Record what became of a preloaded adapter (shown in `/admin/cache/stats`).
    pub fn set_preload_status(&self, name: &AdapterName, status: impl Into<String>) {
        self.preload_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), status.into());
    }

    /// Whether `name` is stored (lock-free, no pin, no filesystem access).
    #[inline]
    pub fn contains(&self, name: &AdapterName) -> bool {
        self.index.contains(name)
    }

    /// The directory of a stored adapter, pinned (for serving files to peers).
    pub fn adapter_dir(self: &Arc<Self>, name: &AdapterName) -> Option<(PathBuf, Pin)> {
        let pin = self.pin(name)?;
        Some((self.opts.dir.join(name.rel_path()), pin))
    }

    /// The storage directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.opts.dir
    }

    /// How files are written now.
    pub fn write_mode(&self) -> WriteMode {
        self.writer.mode()
    }

    /// Stop the storage thread. Fetches in flight fail; their temp dirs go at next start.
    pub fn shutdown(&self) {
        self.writer.shutdown();
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh path in the temp area: `{tmp}/{what}-{seq}`. The name stays out of it: a
    /// flattened `org/name` could pass the filesystem's 255 bytes long before the name's own
    /// limits do (the logs say which adapter a temp path is for).
    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{what}-{n}"))
    }

    /// Refresh the size and item gauges.
    fn update_gauges(&self) {
        let used = self.ledger().used();
        self.metrics
            .cache_size_bytes
            .get_or_create(&LOCAL)
            .set(used as i64);
        self.metrics
            .cache_items
            .get_or_create(&LOCAL)
            .set(self.index.len() as i64);
    }

    /// Tell vLLM to forget `name` (after an eviction or a replacement); failures are logged.
    /// The vLLM client counts the call (`loraplex_vllm_unloads_total`, by its outcome).
    async fn unload(&self, name: &AdapterName) {
        if let Err(e) = self.hooks.unload(name.as_str()).await {
            tracing::warn!(adapter = %name, error = %e, "vLLM unload failed");
        }
    }

    /// Remove a tree on the blocking pool (control plane context).
    async fn remove_later(path: PathBuf) {
        let p = path.clone();
        let r = tokio::task::spawn_blocking(move || fsops::remove_tree(&p)).await;
        if let Ok(Err(e)) | Err(e) = r.map_err(std::io::Error::other) {
            tracing::error!(path = %path.display(), error = %e, "removing an old adapter copy");
        }
    }
}
