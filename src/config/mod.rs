//! Configuration: the typed [`Config`] every other module reads.
//!
//! The YAML file keeps the Go loraplex's keys (see `file.rs` for the on-disk shape and its
//! conversion, `units.rs` for sizes and durations, `env.rs` for `${VAR}` expansion). Every value
//! is checked once, here, at start: a bad value is refused with a message naming the key and
//! the value, and nothing downstream re-parses strings.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    time::Duration,
};

mod convert;
pub mod env;
pub mod file;
mod otel;
mod render;
pub mod units;

#[cfg(test)]
mod tests;

pub use otel::TracingConfig;
pub use render::Redact;

use crate::error::Error;

/// Why a config was refused. `Display` is the message for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not YAML, or not a mapping at the top.
    #[error("parse config: {0}")]
    Syntax(String),
    /// A value refused: `key` is the full key (`origins[1].type`), `message` says why and
    /// quotes the value.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The key at fault, when one is.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Settings given on the command line; each replaces the file's value when set and not empty
/// (as the Go flags do).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub listen: Option<String>,
    pub self_addr: Option<String>,
    /// `--vllm-url`, repeatable: one replaces the file's `vllm_url`/`vllm_urls`, several are
    /// the node's backends.
    pub vllm_urls: Vec<String>,
    pub dir: Option<String>,
    pub discovery: Option<String>,
    pub peers: Option<Vec<String>>,
    pub workers: Option<usize>,
    /// `--model`: the served base model (`vllm.model_name`).
    pub model: Option<String>,
}

impl Overrides {
    /// Write the overrides into the file; returns `(key, flag)` for each key it set, so errors
    /// can name the flag.
    fn apply(&self, f: &mut file::FileConfig) -> Vec<(&'static str, &'static str)> {
        use file::Scalar;
        let mut set = Vec::new();
        let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty()).map(Scalar::Str);
        if let Some(v) = given(&self.listen) {
            f.listen = Some(v);
            set.push(("listen", "--listen"));
        }
        if let Some(v) = given(&self.self_addr) {
            f.self_addr = Some(v);
            set.push(("self_addr", "--self"));
        }
        let urls: Vec<String> = self
            .vllm_urls
            .iter()
            .filter(|u| !u.is_empty())
            .cloned()
            .collect();
        match urls.as_slice() {
            [] => {}
            [one] => {
                f.vllm_url = Some(Scalar::Str(one.clone()));
                f.vllm_urls = None;
                set.push(("vllm_url", "--vllm-url"));
            }
            several => {
                f.vllm_url = None;
                f.vllm_urls = Some(
                    several
                        .iter()
                        .map(|u| Some(Scalar::Str(u.clone())))
                        .collect(),
                );
                set.push(("vllm_urls", "--vllm-url"));
            }
        }
        if let Some(v) = given(&self.dir) {
            f.storage.get_or_insert_default().dir = Some(v);
            set.push(("storage.dir", "--dir"));
        }
        if let Some(v) = given(&self.discovery) {
            f.discovery.get_or_insert_default().mode = Some(v);
            set.push(("discovery.mode", "--discovery"));
        }
        if let Some(peers) = &self.peers {
            let disc = f.discovery.get_or_insert_default();
            disc.static_.get_or_insert_default().peers =
                Some(peers.iter().map(|p| Some(Scalar::Str(p.clone()))).collect());
            set.push(("discovery.static.peers", "--peers"));
        }
        if let Some(v) = given(&self.model) {
            f.vllm.get_or_insert_default().model_name = Some(v);
            set.push(("vllm.model_name", "--model"));
        }
        if let Some(n) = self.workers {
            f.server.get_or_insert_default().workers = Some(Scalar::UInt(n as u64));
            set.push(("server.workers", "--workers"));
        }
        set
    }
}

/// A loaded config and what the operator should be told about it (unknown keys, keys that
/// an origin's type does not use).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// The process environment as a lookup, for [`Config::from_yaml_str`] and friends.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// Read a config file as text.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|_| ConfigError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

impl Config {
    /// The first backend's URL (the only one with `vllm_url`).
    pub fn vllm_url(&self) -> &str {
        &self.vllm_urls[0]
    }

    /// Load a file (with `${VAR}` from the process environment), logging its warnings.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::from_yaml_str(&read_file(path)?, process_env)
    }

    /// Parse config text, logging its warnings. `env` answers `${VAR}` and `HF_ENDPOINT`.
    pub fn from_yaml_str(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let loaded = Config::resolve(Some(text), &Overrides::default(), env)?;
        for w in &loaded.warnings {
            tracing::warn!("config: {w}");
        }
        Ok(loaded.config)
    }

    /// The whole pipeline: expand and parse `text` (`None`: no file, all defaults), apply the
    /// command-line `overrides`, apply Go's defaults, check every value. Warnings are returned,
    /// not logged, so the caller can log them once logging is set up.
    pub fn resolve(
        text: Option<&str>,
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Loaded, ConfigError> {
        let (mut f, unknown) = match text {
            Some(text) => file::parse(text, &env)?,
            None => Default::default(),
        };
        let flags = overrides.apply(&mut f);
        let mut conv = convert::Convert {
            env: &env,
            flags,
            warnings: unknown
                .into_iter()
                .map(|k| format!("unknown key {k} (ignored)"))
                .collect(),
        };
        let config = conv.config(&f)?;
        Ok(Loaded {
            config,
            warnings: conv.warnings,
        })
    }

    /// The effective settings as a YAML config file with every key (Go's key names first,
    /// ours after), which loads back to the same `Config`. `Redact::Secrets` hides tokens.
    pub fn to_yaml(&self, redact: Redact) -> String {
        render::render(self, redact)
    }
}

/// Parse a Go-style listen address (`:8080` means every interface).
pub fn listen_addr(listen: &str) -> Result<SocketAddr, Error> {
    let full = if listen.starts_with(':') {
        format!("0.0.0.0{listen}")
    } else {
        listen.into()
    };
    full.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Error::internal(format!("listen: cannot resolve {listen:?}")))
}

/// Everything loraplex runs with, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listen address as written (`:8080`, `0.0.0.0:9090`, `127.0.0.1:0`).
    pub listen: String,
    /// This node's address as peers know it (`--self`); `None`: derived from `listen`.
    pub self_addr: Option<String>,
    /// The node's vLLMs (its backends), base URLs `http://host:port` (no TLS: vLLM is on the
    /// same host or pod), at least one: `vllm_url`, or `vllm_urls` for several. A backend's id
    /// is its position here.
    pub vllm_urls: Vec<String>,
    pub storage: StorageConfig,
    /// Tried in order for every cold adapter.
    pub origins: Vec<OriginConfig>,
    pub invalidation: InvalidationConfig,
    pub discovery: DiscoveryConfig,
    pub routing: RoutingConfig,
    pub vllm: VllmConfig,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub cluster: ClusterConfig,
    pub tracing: TracingConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    /// The directory vLLM's filesystem resolver reads (`VLLM_LORA_RESOLVER_CACHE_DIR`).
    pub dir: PathBuf,
    /// Disk budget in bytes for all adapters together.
    pub max_size: u64,
    /// Rewrite `base_model_name_or_path` in stored adapter configs to the served base model
    /// (vLLM's resolver compares it exactly with `--model`).
    pub rewrite_base_model: bool,
    /// How adapter files are written.
    pub direct_io: DirectIo,
    /// Adapters fetched at start on the node(s) that would serve them, loaded into vLLM (again
    /// after it restarts) and never evicted.
    pub preload: Vec<String>,
    /// How long a request waits for its adapter's download before a 504 (the download goes
    /// on for later requests); `None`: no limit.
    pub fetch_wait_timeout: Option<Duration>,
}

/// O_DIRECT policy for adapter writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectIo {
    /// O_DIRECT where the filesystem accepts it, buffered + fsync where it does not (tmpfs).
    Auto,
    /// Always buffered + fsync.
    Off,
}

/// Per-origin transfer settings shared by every origin type.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferConfig {
    pub connect_timeout: Duration,
    /// A transfer with no byte for this long is aborted (never a total-time limit).
    pub idle_timeout: Duration,
    /// Retries of one file after a 5xx, reset or stall (with `Range` where allowed).
    pub retries: u32,
    /// Bytes per second below which a transfer counts as stalled when its average over any
    /// [`rate_window`](Self::rate_window) stays under it (`None`: no floor).
    pub min_rate: Option<u64>,
    /// The window of `min_rate`: 30 s; the hidden key `min_rate_window` shortens it for tests.
    pub rate_window: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OriginConfig {
    /// `{base_url}/{name}/adapter_config.json`, `adapter_model.safetensors` (or `.bin`).
    Http {
        base_url: String,
        token: Option<String>,
        transfer: TransferConfig,
    },
    /// A local or NFS directory with the same layout: `{path}/{name}/...`.
    File { path: PathBuf },
    /// The Hugging Face Hub; repo id = adapter name.
    HuggingFace {
        endpoint: String,
        token: Option<String>,
        transfer: TransferConfig,
    },
    /// S3 or an S3-compatible store: objects under `{prefix}{name}/`.
    S3 {
        bucket: String,
        region: Option<String>,
        prefix: String,
        endpoint: Option<String>,
        transfer: TransferConfig,
    },
}

impl OriginConfig {
    /// `http`, `file`, `huggingface`, `s3`: the config `type` and the metric label.
    pub fn type_name(&self) -> &'static str {
        match self {
            OriginConfig::Http { .. } => "http",
            OriginConfig::File { .. } => "file",
            OriginConfig::HuggingFace { .. } => "huggingface",
            OriginConfig::S3 { .. } => "s3",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct InvalidationConfig {
    /// Revalidate a stored adapter after this long; `None` (`ttl: "0"`) disables.
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DiscoveryConfig {
    Static {
        peers: Vec<String>,
    },
    File {
        dir: PathBuf,
        heartbeat_interval: Duration,
        stale_threshold: Duration,
    },
    K8s {
        service: String,
        namespace: String,
    },
}

impl DiscoveryConfig {
    pub fn mode(&self) -> &'static str {
        match self {
            DiscoveryConfig::Static { .. } => "static",
            DiscoveryConfig::File { .. } => "file",
            DiscoveryConfig::K8s { .. } => "k8s",
        }
    }
}

/// What a request is hashed on to pick its node (`routing.hash_on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// The `model` field (default).
    Model,
    /// `X-Tenant-ID`.
    Tenant,
    /// `X-Tenant-ID` + `/` + model; the model alone when the header is missing.
    TenantModel,
    /// A header's value (session pinning).
    Header(String),
    /// A header's value + `/` + model; the model alone when the header is missing.
    HeaderModel(String),
}

/// How requests are routed between nodes (`routing.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingPolicy {
    /// By what each vLLM holds and how busy it is, hot keys over more nodes.
    Auto,
    /// Round 1's: the key's owner, shedding to the next nodes past the overflow threshold.
    Hash,
    /// The least loaded node by vLLM's queue, ignoring where adapters are.
    LeastLoad,
}

impl RoutingPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingPolicy::Auto => "auto",
            RoutingPolicy::Hash => "hash",
            RoutingPolicy::LeastLoad => "least-load",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    pub hash_on: HashOn,
    pub policy: RoutingPolicy,
    /// Accepted for compatibility; placement uses a fixed slot table instead of vnodes.
    pub vnodes_per_peer: u32,
    /// Bounds connect + response headers of a forward, never the generation itself.
    pub forward_timeout: Duration,
    /// Load (0..=1) above which an owner sheds requests to the next node of the key.
    pub overflow_threshold: f64,
    pub fallback_to_base_model: bool,
    /// `routing.base_models`: adapter-name prefix → the base model its adapters need, longest
    /// prefix first (the longest matching prefix wins). Empty: learnt from each adapter's
    /// `adapter_config.json`.
    pub base_models: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VllmConfig {
    /// The served base model (`--model`); `None`: learnt from `GET /v1/models`.
    pub model_name: Option<String>,
    pub max_loras: u32,
    pub max_lora_rank: u32,
    pub health_check_interval: Duration,
    /// How often vLLM's `/metrics` is read and the peers' state polled.
    pub metrics_interval: Duration,
}

/// Which io driver the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    IoUring,
    Epoll,
}

/// New keys of ours (not in the Go project).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Data-plane threads; default one per core.
    pub workers: usize,
    pub driver: Driver,
    pub max_body_size: usize,
    /// Largest accepted request head.
    pub max_header_size: usize,
    /// A client must send a whole request head within this.
    pub header_read_timeout: Duration,
    /// A client must send a whole request body within this (counted from the end of the head).
    pub body_read_timeout: Duration,
    /// An idle keep-alive client connection is closed after this.
    pub idle_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    /// Idle pooled upstream connections are dropped after this.
    pub upstream_idle_timeout: Duration,
    /// How long SIGTERM waits for requests in flight.
    pub shutdown_grace: Duration,
    /// `text` or `json` logs.
    pub log_format: LogFormat,
    /// `server.tls`: serve clients (and peers) over TLS; `None`: plain HTTP.
    pub tls: Option<ServerTlsConfig>,
}

/// `server.tls`: the certificate the listener presents. Both files are read again when they
/// change or on SIGHUP (a new handshake gets the new certificate, a connection keeps its own).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Also serve plain HTTP on the same port, told apart by a connection's first byte: the
    /// phase of a move to TLS where peers and clients still speak plain.
    pub allow_plain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdminConfig {
    /// Bearer token required on `/admin/*` when set.
    pub token: Option<String>,
    /// Without a token, let any client evict and warm up (the Go project's behaviour); by
    /// default only loopback clients and authenticated peers may.
    pub open: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterConfig {
    /// Shared secret that authenticates forwards between peers when set.
    pub token: Option<String>,
    /// `cluster.tls`: dial peers over TLS; `None`: plain HTTP.
    pub tls: Option<ClusterTlsConfig>,
}

/// `cluster.tls`: how a peer's certificate is checked when this node dials it (forwards, adapter
/// copies, health polls, evict broadcasts).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterTlsConfig {
    /// PEM certificate(s) of the cluster CA a peer's certificate must chain to (read again
    /// with the server's certificate).
    pub ca: PathBuf,
    /// The name a peer's certificate must carry (one certificate shared by every node, as a
    /// Kubernetes Secret is); `None`: the peer's IP address, as an IP SAN.
    pub server_name: Option<String>,
}

impl Default for Config {
    /// The Go project's defaults, plus ours for the new keys.
    fn default() -> Self {
        Config {
            listen: ":8080".into(),
            self_addr: None,
            vllm_urls: vec!["http://localhost:8000".into()],
            storage: StorageConfig {
                dir: "/mnt/nvme/loraplex".into(),
                max_size: 100 << 30,
                rewrite_base_model: false,
                direct_io: DirectIo::Auto,
                preload: Vec::new(),
                fetch_wait_timeout: Some(Duration::from_secs(120)),
            },
            origins: Vec::new(),
            invalidation: InvalidationConfig {
                ttl: Some(Duration::from_secs(3600)),
            },
            discovery: DiscoveryConfig::Static { peers: Vec::new() },
            routing: RoutingConfig {
                hash_on: HashOn::Model,
                policy: RoutingPolicy::Auto,
                vnodes_per_peer: 150,
                forward_timeout: Duration::from_secs(5),
                overflow_threshold: 0.8,
                fallback_to_base_model: false,
                base_models: Vec::new(),
            },
            vllm: VllmConfig {
                model_name: None,
                max_loras: 200,
                max_lora_rank: 64,
                health_check_interval: Duration::from_secs(10),
                metrics_interval: Duration::from_secs(1),
            },
            server: ServerConfig {
                workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
                driver: Driver::Auto,
                max_body_size: 32 << 20,
                max_header_size: 64 << 10,
                header_read_timeout: Duration::from_secs(30),
                body_read_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(120),
                upstream_connect_timeout: Duration::from_secs(5),
                upstream_idle_timeout: Duration::from_secs(60),
                shutdown_grace: Duration::from_secs(15),
                log_format: LogFormat::Text,
                tls: None,
            },
            admin: AdminConfig::default(),
            cluster: ClusterConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            retries: 3,
            min_rate: Some(64 << 10),
            rate_window: Duration::from_secs(30),
        }
    }
}
