//! Reading the TLS files again: on SIGHUP, and when their contents change (checked every
//! [`POLL`]; a Kubernetes Secret update swaps the mounted files, a cert-manager renewal or an
//! operator's `cp` rewrites them). A handshake after a reload gets the new certificate (or
//! checks peers against the new CA); connections already established keep theirs. Files that
//! do not load (a key that does not match the certificate, half-written PEM) leave the running
//! ones in place, logged and counted; they are tried again when they change or on SIGHUP.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use xxhash_rust::xxh3::Xxh3;

use super::{certs, verify::PeerVerifier};
use crate::{config::ConfigError, control::Control, metrics::Metrics, shutdown::Shutdown};

/// How often the files are compared with what was loaded.
pub const POLL: Duration = Duration::from_secs(2);

/// The server certificate of the moment.
#[derive(Debug)]
pub struct CertResolver(ArcSwap<CertifiedKey>);

impl CertResolver {
    pub fn new(key: CertifiedKey) -> CertResolver {
        CertResolver(ArcSwap::from_pointee(key))
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Reloaded,
    Failed(String),
}

/// The files of `server.tls` and `cluster.tls` and what was built from them.
pub struct Reloader {
    pub(super) server: Option<ServerFiles>,
    pub(super) peers: Option<PeerFiles>,
    metrics: Arc<Metrics>,
}

pub(super) struct ServerFiles {
    cert: PathBuf,
    key: PathBuf,
    pub(super) resolver: Arc<CertResolver>,
    /// Fingerprint of the contents last tried.
    seen: Mutex<u64>,
}

pub(super) struct PeerFiles {
    ca: PathBuf,
    pub(super) verifier: Arc<PeerVerifier>,
    seen: Mutex<u64>,
}

fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h = Xxh3::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.digest()
}

/// Whether what was read (contents, or the error reading them) differs from what was seen last
/// (or `force`); remembers it. A file that stays broken is reported once, not at every poll.
fn changed(seen: &Mutex<u64>, read: &Result<(Vec<u8>, Vec<u8>), ConfigError>, force: bool) -> bool {
    let fp = match read {
        Ok((a, b)) => fingerprint(&[a, b]),
        Err(e) => fingerprint(&[b"error", e.to_string().as_bytes()]),
    };
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let changed = fp != *seen || force;
    *seen = fp;
    changed
}

impl ServerFiles {
    pub(super) fn load(cert: PathBuf, key: PathBuf) -> Result<ServerFiles, ConfigError> {
        let c = certs::read("server.tls.cert", &cert)?;
        let k = certs::read("server.tls.key", &key)?;
        let ck = certs::certified_key(&cert, &c, &key, &k)?;
        Ok(ServerFiles {
            resolver: Arc::new(CertResolver::new(ck)),
            seen: Mutex::new(fingerprint(&[&c, &k])),
            cert,
            key,
        })
    }

    fn check(&self, force: bool) -> Result<bool, ConfigError> {
        let read = certs::read("server.tls.cert", &self.cert)
            .and_then(|c| Ok((c, certs::read("server.tls.key", &self.key)?)));
        if !changed(&self.seen, &read, force) {
            return Ok(false);
        }
        let (c, k) = read?;
        let ck = certs::certified_key(&self.cert, &c, &self.key, &k)?;
        self.resolver.0.store(Arc::new(ck));
        Ok(true)
    }
}

impl PeerFiles {
    pub(super) fn load(ca: PathBuf, name: Option<&str>) -> Result<PeerFiles, ConfigError> {
        let bytes = certs::read("cluster.tls.ca", &ca)?;
        let roots = certs::roots(&ca, &bytes)?;
        Ok(PeerFiles {
            verifier: Arc::new(PeerVerifier::new(roots, name)?),
            seen: Mutex::new(fingerprint(&[&bytes, &[]])),
            ca,
        })
    }

    fn check(&self, force: bool) -> Result<bool, ConfigError> {
        let read = certs::read("cluster.tls.ca", &self.ca).map(|b| (b, Vec::new()));
        if !changed(&self.seen, &read, force) {
            return Ok(false);
        }
        let (bytes, _) = read?;
        self.verifier.set_roots(certs::roots(&self.ca, &bytes)?)?;
        Ok(true)
    }
}

impl Reloader {
    pub(super) fn new(
        server: Option<ServerFiles>,
        peers: Option<PeerFiles>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            server,
            peers,
            metrics,
        }
    }

    /// Compare the files with what was loaded and load what changed (everything when
    /// `force`: SIGHUP). Logs and counts what happened.
    pub fn check(&self, force: bool) -> Outcome {
        let mut reloaded = false;
        let mut failed = Vec::new();
        if let Some(s) = &self.server {
            match s.check(force) {
                Ok(r) => reloaded |= r,
                Err(e) => failed.push(e.to_string()),
            }
        }
        if let Some(p) = &self.peers {
            match p.check(force) {
                Ok(r) => reloaded |= r,
                Err(e) => failed.push(e.to_string()),
            }
        }
        let result = |r| crate::metrics::ResultLabel { result: r };
        if !failed.is_empty() {
            let why = failed.join("; ");
            tracing::error!(error = %why, "TLS files not reloaded: the ones loaded before stay in use");
            self.metrics
                .tls_reloads
                .get_or_create(&result("error"))
                .inc();
            return Outcome::Failed(why);
        }
        if reloaded {
            tracing::info!("TLS files reloaded: new handshakes use them");
            self.metrics.tls_reloads.get_or_create(&result("ok")).inc();
            return Outcome::Reloaded;
        }
        Outcome::Unchanged
    }

    /// Check on SIGHUP and every [`POLL`], on the control plane, until shutdown.
    pub fn watch(self: Arc<Self>, control: &Control, shutdown: Shutdown) {
        control.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler: TLS files reload on change only");
                    None
                }
            };
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let force = tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    } } => true,
                };
                if force {
                    tracing::info!("SIGHUP: reloading the TLS files");
                }
                let me = self.clone();
                // Reading and parsing files: off the runtime's async threads.
                let _ = tokio::task::spawn_blocking(move || me.check(force)).await;
            }
        });
    }
}
