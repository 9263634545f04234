//! A loraplex node: builds every part in order (control plane, its vLLM backends, cluster,
//! origins, store), then serves the proxy on the server's workers; waits for a signal, shuts down
//! gracefully.

mod pool_hooks;
mod preload;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
};

use crate::{
    cluster::{
        discovery::Discovery, identity::Identity, peering, protocol::PeerClient, router::Router,
        state::ClusterState,
    },
    config::Config,
    control::{Control, ControlPlane},
    error::Error,
    metrics::Metrics,
    origin::{Origin, OriginChain, base::BaseModels, peer::PeerOrigin},
    proxy::{Pending, Proxy, Shared},
    server::{
        Server, bind,
        runtime::{self, DriverKind},
    },
    shutdown::Shutdown,
    store::{Store, StoreOptions},
    telemetry::Tracer,
    tls::Tls,
    vllm::{Backends, Hooks},
};

/// A running loraplex: its workers, control plane and shared state.
pub struct Node {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Server,
    control_plane: ControlPlane,
}

/// Keep freed heap memory in the process instead of handing it back to the kernel at once.
///
/// A fetch streams the origin through receive buffers of up to ~400 KiB that the writer thread
/// frees a moment later. With glibc's defaults (a trim threshold and an mmap threshold that
/// start at 128 KiB and 256 KiB), much of that memory went back to the kernel and came back as
/// fresh pages: page faults, zeroing and memcg charging were ~16 % of the control-plane CPU of
/// a 1 GiB fetch (`perf` during `scripts/bench-fetch.sh`), and gone with these settings.
/// Freed memory up to the thresholds stays mapped; it is reused by the next fetch, and the
/// peak RSS of a fetch does not change (its bound is the writer channel, not the allocator).
/// `MALLOC_*` environment variables are overridden. Other allocators (musl) are left alone.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only adjusts glibc's malloc parameters; it is thread-safe.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
            }
        });
    }
}

impl Node {
    /// Bind, start every thread, return at once.
    pub fn start(config: Config) -> Result<Node, Error> {
        keep_freed_memory();
        let driver = runtime::resolve(config.server.driver)?;
        let control_plane = ControlPlane::start(2)?;
        let control = control_plane.control();
        let metrics = Arc::new(Metrics::new());
        // The TLS files are read before anything binds: a bad certificate stops the start.
        let tls = Tls::from_config(&config, metrics.clone())
            .map_err(|e| Error::internal(e.to_string()))?;
        let backends = Arc::new(Backends::new(&config, metrics.clone())?);
        if backends.len() > 1 && config.vllm.model_name.is_some() {
            tracing::warn!(
                "vllm.model_name is ignored with several vLLM backends: each one's base model is \
                 learnt from its /v1/models"
            );
        }
        let listeners = bind(&config.listen, config.server.workers.max(1))?;
        let addr = listeners[0].local_addr()?;
        let shutdown = Shutdown::new();

        // The cluster: who we are, who the peers are, where each key lives.
        let me = Identity::new(addr, config.self_addr.as_deref())?;
        let discovery = Discovery::start(&config.discovery, &me, &control, shutdown.clone())?;
        let router = Arc::new(Router::new(&config, me, metrics.clone()));
        let peer_client =
            PeerClient::new(router.source_ip, router.token.clone(), tls.peers.clone())?;
        tls.watch(&control, shutdown.clone());
        let tracer = Tracer::start(&config.tracing, router.me.canonical(), &metrics, &control)?;
        let interval = config.vllm.health_check_interval;
        peering::start(
            router.clone(),
            discovery,
            peer_client.clone(),
            &control,
            interval,
            shutdown.clone(),
        );

        // The store: peers first (an adapter already in the cluster is copied, not refetched),
        // then the configured origins in order.
        let configured = OriginChain::from_config(&config, &control)?;
        // Adapters' base models: rules, then disk, the name's owner, the configured origins.
        let bases = BaseModels::new(
            &config.routing.base_models,
            configured.clone(),
            config.storage.dir.clone(),
            Some((router.clone(), peer_client.clone())),
            control.clone(),
        );
        let peers: Arc<dyn Origin> = Arc::new(PeerOrigin::new(
            router.clone(),
            peer_client.clone(),
            bases.clone(),
        ));
        let origins = OriginChain::new(
            std::iter::once(peers)
                .chain(configured.iter().cloned())
                .collect(),
        );
        // `storage.rewrite_base_model` writes the `--model` of the adapter's pool here.
        let hooks = Arc::new(pool_hooks::PoolHooks {
            inner: Arc::new(Hooks {
                backends: backends.clone(),
                control: control.clone(),
            }),
            backends: backends.clone(),
            bases: bases.clone(),
        });
        let preloaded = preload::names(&config)?;
        let store = Store::open(
            StoreOptions {
                preload: preloaded.clone(),
                ..StoreOptions::from_config(&config)
            },
            origins,
            hooks,
            control.clone(),
            metrics.clone(),
        )?;
        // Adapters loaded ahead: the ones this node would serve, refused when they cannot fit.
        let preload_here = preload::mine(&config, &router, &preloaded);
        preload::check_size(
            &control,
            &store,
            &configured,
            &preload_here,
            config.storage.max_size,
        )?;
        let preload_done = Arc::new(AtomicBool::new(false));
        // What routing reads: the local vLLM's metrics, the peers' states, the demand.
        let cluster = ClusterState::new(
            router.clone(),
            metrics.clone(),
            config.vllm.metrics_interval,
            backends.len(),
        );
        cluster.set_urls(backends.all().iter().map(|b| b.url.clone()).collect());
        let stored = store.clone();
        cluster.set_stored(move || {
            stored
                .stored_names()
                .iter()
                .map(|n| xxhash_rust::xxh3::xxh3_64(n.as_str().as_bytes()))
                .collect()
        });
        peering::start_state_poll(
            cluster.clone(),
            router.clone(),
            peer_client.clone(),
            &control,
            config.vllm.metrics_interval,
            shutdown.clone(),
        );
        backends.spawn_metrics_scrapes(cluster.clone(), &control, shutdown.clone());
        let shared = Arc::new(Shared {
            config,
            metrics,
            backends,
            control,
            shutdown,
            pending: Pending::new(listeners.len()),
            router,
            cluster,
            peer_client,
            store,
            tracer,
            tls,
            preload_done: preload_done.clone(),
            bases,
        });
        preload::start(
            preloaded,
            shared.store.clone(),
            shared.backends.clone(),
            (shared.bases.clone(), shared.router.clone()),
            &shared.control,
            preload_done,
            shared.shutdown.clone(),
        );
        shared
            .backends
            .spawn_health_polls(&shared.control, shared.shutdown.clone());
        let for_workers = shared.clone();
        let server = Server::start(
            listeners,
            driver,
            &shared.config.server,
            shared.shutdown.clone(),
            shared.metrics.clone(),
            shared.tls.acceptor.clone(),
            move |id| Proxy::new(for_workers.clone(), id),
        )?;
        log_summary(&shared, driver, addr);
        Ok(Node {
            shared,
            addr,
            server,
            control_plane,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown_handle(&self) -> Shutdown {
        self.shared.shutdown.clone()
    }

    pub fn control(&self) -> Control {
        self.control_plane.control()
    }

    /// Stop on SIGTERM/SIGINT.
    pub fn stop_on_signals(&self) {
        let shutdown = self.shared.shutdown.clone();
        self.control().spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            shutdown.trigger();
        });
    }

    /// Wait until every worker has stopped (after shutdown is triggered and drained).
    pub fn wait(self) {
        self.server.wait();
        self.shared.store.shutdown();
        // The spans of the last requests; bounded (a few seconds), before the control plane
        // goes with `self`.
        self.shared.tracer.shutdown();
        tracing::info!("stopped");
    }
}

fn log_summary(shared: &Shared, driver: DriverKind, addr: SocketAddr) {
    let cfg = &shared.config;
    if cfg.admin.token.is_none() {
        if cfg.admin.open {
            tracing::warn!(
                listen = %addr,
                "admin.open without admin.token: any client can evict adapters (here and on \
                 every peer) and start downloads"
            );
        } else if !addr.ip().to_canonical().is_loopback() {
            tracing::warn!(
                listen = %addr,
                "no admin.token while listening beyond loopback: evict and warm-up answer only \
                 loopback clients and peers; set admin.token to call them from elsewhere"
            );
        }
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        driver = driver.as_str(),
        workers = cfg.server.workers,
        listen = %addr,
        node = %shared.router.me.canonical(),
        discovery = cfg.discovery.mode(),
        vllm = %cfg.vllm_urls.join(","),
        tls = match (&cfg.server.tls, &cfg.cluster.tls) {
            (None, _) => "off",
            (Some(t), None) if t.allow_plain => "server (plain allowed)",
            (Some(_), None) => "server",
            (Some(t), Some(_)) if t.allow_plain => "server and peers (plain allowed)",
            (Some(_), Some(_)) => "server and peers",
        },
        storage = %cfg.storage.dir.display(),
        write_mode = shared.store.write_mode().as_str(),
        max_size = %crate::config::units::format_size(cfg.storage.max_size),
        origins = %cfg.origins.iter().map(|o| o.type_name()).collect::<Vec<_>>().join(","),
        base_model = cfg.vllm.model_name.as_deref().unwrap_or("(learnt from /v1/models)"),
        policy = cfg.routing.policy.as_str(),
        "loraplex started"
    );
}
