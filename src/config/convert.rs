//! From the file as written ([`FileConfig`]) to the typed [`Config`]: Go's defaults where Go
//! applies them (an empty string, and for some numbers a 0, mean "the default"), then every
//! value checked. An error names the full key and the value; keys set by a command-line flag
//! name the flag too.

use std::{path::PathBuf, time::Duration};

use super::{
    Config, ConfigError, DirectIo, DiscoveryConfig, Driver, HashOn, LogFormat, OriginConfig,
    RoutingPolicy, TransferConfig,
    file::{FileConfig, FileOrigin, Scalar},
    units::{self, UnitError},
};

/// Where Kubernetes mounts the pod's namespace; Go's k8s discovery reads it too.
pub(super) const K8S_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// More data-plane threads than this is a typo, not a machine.
const MAX_WORKERS: u64 = 4096;
const MAX_RETRIES: u64 = 100;
const MIN_HEADER_SIZE: u64 = 1024;

mod tls;

type Leaf = Option<Scalar>;
type Result<T> = std::result::Result<T, ConfigError>;

/// One conversion: the environment (for `HF_ENDPOINT`), which keys came from flags, and the
/// warnings found on the way.
pub(super) struct Convert<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// `(yaml key, flag)` for the keys a command-line flag set.
    pub flags: Vec<(&'static str, &'static str)>,
    pub warnings: Vec<String>,
}

/// The text of a leaf; `None` for a missing key, a null, or an empty string (Go's "unset").
pub(super) fn text(v: &Leaf) -> Option<String> {
    v.as_ref()
        .map(|s| s.text().into_owned())
        .filter(|s| !s.is_empty())
}

impl Convert<'_> {
    fn key(&self, key: &str) -> String {
        for (yaml, flag) in &self.flags {
            if key == *yaml || key.starts_with(&format!("{yaml}[")) {
                return format!("{key} ({flag})");
            }
        }
        key.to_owned()
    }

    pub(super) fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.key(key), message)
    }

    fn size(&self, key: &str, v: &Leaf, default: u64) -> Result<u64> {
        let Some(s) = text(v) else { return Ok(default) };
        units::parse_size(&s).map_err(|e| {
            let why = match e {
                UnitError::Invalid => "invalid size",
                UnitError::Negative => "negative size",
                UnitError::Overflow => "size too large",
            };
            self.err(key, format!("{why} {s:?} (examples: 500MB, 100GB, 1.5TB)"))
        })
    }

    fn duration(&self, key: &str, v: &Leaf, default: Duration) -> Result<Duration> {
        let Some(s) = text(v) else { return Ok(default) };
        units::parse_duration(&s).map_err(|e| {
            let why = match e {
                UnitError::Invalid => "invalid duration",
                UnitError::Negative => "negative duration",
                UnitError::Overflow => "duration too large",
            };
            self.err(key, format!("{why} {s:?} (examples: 5s, 1h30m, 500ms)"))
        })
    }

    /// A rate in bytes per second: a size, optionally followed by `/s` (`64KiB`, `1MB/s`);
    /// `"0"` means none.
    fn rate(&self, key: &str, v: &Leaf, default: Option<u64>) -> Result<Option<u64>> {
        let Some(s) = text(v) else { return Ok(default) };
        let size = s.trim().strip_suffix("/s").unwrap_or(&s);
        let n = units::parse_size(size).map_err(|_| {
            self.err(
                key,
                format!("invalid rate {s:?} (a size per second: 64KiB, 1MB/s; \"0\" for none)"),
            )
        })?;
        Ok((n > 0).then_some(n))
    }

    /// A duration of which 0 means nothing useful (a timeout, a polling interval).
    fn positive_duration(&self, key: &str, v: &Leaf, default: Duration) -> Result<Duration> {
        let d = self.duration(key, v, default)?;
        if d.is_zero() {
            return Err(self.err(key, "must be more than 0"));
        }
        Ok(d)
    }

    /// A whole number; `0` (and unset) means `default` when `zero_is_default`, as in Go.
    fn uint(&self, key: &str, v: &Leaf, default: u64, zero_is_default: bool) -> Result<u64> {
        let Some(s) = text(v) else { return Ok(default) };
        match s.trim().parse::<u64>() {
            Ok(0) if zero_is_default => Ok(default),
            Ok(n) => Ok(n),
            Err(_) => Err(self.err(
                key,
                format!("invalid number {s:?} (a whole number, 0 or more)"),
            )),
        }
    }

    fn boolean(&self, key: &str, v: &Leaf, default: bool) -> Result<bool> {
        let Some(s) = text(v) else { return Ok(default) };
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" => Ok(true),
            "false" | "no" | "off" => Ok(false),
            _ => Err(self.err(key, format!("invalid boolean {s:?} (true or false)"))),
        }
    }

    fn choice<T: Copy>(
        &self,
        key: &str,
        v: &Leaf,
        what: &str,
        options: &[(&str, T)],
        default: T,
    ) -> Result<T> {
        let Some(s) = text(v) else { return Ok(default) };
        options
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(_, t)| t)
            .ok_or_else(|| {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.err(key, format!("unknown {what} {s:?} ({})", names.join(", ")))
            })
    }

    fn address(&self, key: &str, s: &str) -> Result<String> {
        if is_host_port(s) {
            Ok(s.to_owned())
        } else {
            Err(self.err(
                key,
                format!("invalid address {s:?} (examples: :8080, 0.0.0.0:9090, 10.0.0.1:9090)"),
            ))
        }
    }

    /// An `http://` or `https://` base URL, without its trailing `/`.
    fn url(&self, key: &str, s: &str, https: bool) -> Result<String> {
        let url =
            url::Url::parse(s).map_err(|e| self.err(key, format!("invalid URL {s:?}: {e}")))?;
        let scheme_ok = url.scheme() == "http" || (https && url.scheme() == "https");
        if !scheme_ok {
            let want = if https {
                "http:// or https://"
            } else {
                "http://"
            };
            return Err(self.err(key, format!("URL {s:?} must start with {want}")));
        }
        if url.host_str().is_none_or(str::is_empty) || url.query().is_some() {
            return Err(self.err(
                key,
                format!("invalid URL {s:?}: expected scheme://host[:port]"),
            ));
        }
        Ok(s.trim_end_matches('/').to_owned())
    }

    pub(super) fn config(&mut self, f: &FileConfig) -> Result<Config> {
        let d = Config::default();
        let mut cfg = Config {
            listen: d.listen.clone(),
            self_addr: None,
            ..d.clone()
        };
        if let Some(s) = text(&f.listen) {
            cfg.listen = self.address("listen", &s)?;
        }
        if let Some(s) = text(&f.self_addr) {
            cfg.self_addr = Some(self.address("self_addr", &s)?);
        }
        let one = text(&f.vllm_url);
        match (&one, &f.vllm_urls) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "vllm_urls",
                    "vllm_url and vllm_urls are both set: use vllm_url for one vLLM or \
                     vllm_urls for several, not both",
                ));
            }
            (Some(s), None) => cfg.vllm_urls = vec![self.url("vllm_url", s, false)?],
            (None, Some(list)) => {
                cfg.vllm_urls = Vec::new();
                for (i, leaf) in list.iter().enumerate() {
                    let key = format!("vllm_urls[{i}]");
                    let Some(s) = text(leaf) else {
                        return Err(self.err(&key, "empty URL"));
                    };
                    let url = self.url(&key, &s, false)?;
                    if cfg.vllm_urls.contains(&url) {
                        return Err(self.err(&key, format!("{url} is listed twice")));
                    }
                    cfg.vllm_urls.push(url);
                }
                if cfg.vllm_urls.is_empty() {
                    return Err(self.err("vllm_urls", "empty list: name one vLLM at least"));
                }
                if cfg.vllm_urls.len() > usize::from(u16::MAX) {
                    return Err(self.err("vllm_urls", "too many backends"));
                }
            }
            (None, None) => {}
        }

        let st = f.storage.clone().unwrap_or_default();
        if let Some(dir) = text(&st.dir) {
            cfg.storage.dir = PathBuf::from(dir);
        }
        cfg.storage.max_size = self.size("storage.max_size", &st.max_size, d.storage.max_size)?;
        if cfg.storage.max_size == 0 {
            return Err(self.err("storage.max_size", "must be more than 0"));
        }
        cfg.storage.rewrite_base_model =
            self.boolean("storage.rewrite_base_model", &st.rewrite_base_model, false)?;
        cfg.storage.direct_io = self.choice(
            "storage.direct_io",
            &st.direct_io,
            "direct_io mode",
            &[("auto", DirectIo::Auto), ("off", DirectIo::Off)],
            d.storage.direct_io,
        )?;
        // Names are checked as adapter names when the node starts.
        cfg.storage.preload = Vec::new();
        for (i, leaf) in st.preload.iter().flatten().enumerate() {
            let Some(name) = text(leaf) else {
                return Err(self.err(&format!("storage.preload[{i}]"), "empty adapter name"));
            };
            if !cfg.storage.preload.contains(&name) {
                cfg.storage.preload.push(name);
            }
        }
        let wait = self.duration(
            "storage.fetch_wait_timeout",
            &st.fetch_wait_timeout,
            Duration::from_secs(120),
        )?;
        cfg.storage.fetch_wait_timeout = (!wait.is_zero()).then_some(wait);

        cfg.origins = Vec::new();
        for (i, o) in f.origins.iter().flatten().enumerate() {
            cfg.origins.push(self.origin(i, o)?);
        }

        let ttl_leaf = f.invalidation.as_ref().and_then(|i| i.ttl.clone());
        let ttl = self.duration("invalidation.ttl", &ttl_leaf, Duration::from_secs(3600))?;
        cfg.invalidation.ttl = (!ttl.is_zero()).then_some(ttl);

        cfg.discovery = self.discovery(f)?;
        self.routing(f, &mut cfg)?;
        self.vllm(f, &mut cfg)?;
        self.server(f, &mut cfg)?;
        cfg.admin.token = f.admin.as_ref().and_then(|t| text(&t.token));
        let open = f.admin.as_ref().and_then(|a| a.open.clone());
        cfg.admin.open = self.boolean("admin.open", &open, false)?;
        cfg.cluster.token = f.cluster.as_ref().and_then(|t| text(&t.token));
        cfg.tracing = self.tracing(f.tracing.as_ref())?;
        self.tls(f, &mut cfg)?;
        Ok(cfg)
    }

    fn origin(&mut self, i: usize, o: &FileOrigin) -> Result<OriginConfig> {
        let at = |k: &str| format!("origins[{i}].{k}");
        let kind = text(&o.kind)
            .ok_or_else(|| self.err(&at("type"), "missing (huggingface, s3, http, file)"))?;
        // Which keys each type reads; the others are reported, not silently dropped.
        let used: &[&str] = match kind.as_str() {
            "huggingface" => &[
                "token",
                "endpoint",
                "connect_timeout",
                "idle_timeout",
                "retries",
                "min_rate",
                "min_rate_window",
            ],
            "s3" => &[
                "bucket",
                "region",
                "prefix",
                "endpoint",
                "connect_timeout",
                "idle_timeout",
                "retries",
                "min_rate",
                "min_rate_window",
            ],
            "http" => &[
                "base_url",
                "token",
                "connect_timeout",
                "idle_timeout",
                "retries",
                "min_rate",
                "min_rate_window",
            ],
            "file" => &["path"],
            _ => {
                return Err(self.err(
                    &at("type"),
                    format!("unknown origin type {kind:?} (huggingface, s3, http, file)"),
                ));
            }
        };
        for (name, leaf) in [
            ("base_url", &o.base_url),
            ("bucket", &o.bucket),
            ("region", &o.region),
            ("prefix", &o.prefix),
            ("token", &o.token),
            ("endpoint", &o.endpoint),
            ("path", &o.path),
            ("connect_timeout", &o.connect_timeout),
            ("idle_timeout", &o.idle_timeout),
            ("retries", &o.retries),
            ("min_rate", &o.min_rate),
            ("min_rate_window", &o.min_rate_window),
        ] {
            if text(leaf).is_some() && !used.contains(&name) {
                self.warnings
                    .push(format!("{} is not used by type {kind} (ignored)", at(name)));
            }
        }
        let transfer = || -> Result<TransferConfig> {
            let d = TransferConfig::default();
            let retries = self.uint(&at("retries"), &o.retries, u64::from(d.retries), false)?;
            if retries > MAX_RETRIES {
                return Err(self.err(
                    &at("retries"),
                    format!("{retries} is more than {MAX_RETRIES}"),
                ));
            }
            Ok(TransferConfig {
                connect_timeout: self.positive_duration(
                    &at("connect_timeout"),
                    &o.connect_timeout,
                    d.connect_timeout,
                )?,
                idle_timeout: self.positive_duration(
                    &at("idle_timeout"),
                    &o.idle_timeout,
                    d.idle_timeout,
                )?,
                retries: retries as u32,
                min_rate: self.rate(&at("min_rate"), &o.min_rate, d.min_rate)?,
                rate_window: self.positive_duration(
                    &at("min_rate_window"),
                    &o.min_rate_window,
                    d.rate_window,
                )?,
            })
        };
        let required = |k: &str, v: &Leaf| {
            text(v).ok_or_else(|| self.err(&at(k), format!("required for type {kind}")))
        };
        Ok(match kind.as_str() {
            "huggingface" => {
                let endpoint = match (
                    text(&o.endpoint),
                    (self.env)("HF_ENDPOINT").filter(|s| !s.is_empty()),
                ) {
                    (Some(e), _) => self.url(&at("endpoint"), &e, true)?,
                    (None, Some(e)) => {
                        self.url(&format!("{} (from HF_ENDPOINT)", at("endpoint")), &e, true)?
                    }
                    (None, None) => "https://huggingface.co".to_owned(),
                };
                OriginConfig::HuggingFace {
                    endpoint,
                    token: text(&o.token),
                    transfer: transfer()?,
                }
            }
            "s3" => {
                let bucket = required("bucket", &o.bucket)?;
                // Go's S3 origin lists `{prefix}/{name}/`; an empty prefix stays empty here
                // (Go's became "/", a key no bucket has).
                let prefix = match text(&o.prefix) {
                    Some(p) if !p.ends_with('/') => format!("{p}/"),
                    Some(p) => p,
                    None => String::new(),
                };
                let endpoint = match text(&o.endpoint) {
                    Some(e) => Some(self.url(&at("endpoint"), &e, true)?),
                    None => None,
                };
                OriginConfig::S3 {
                    bucket,
                    region: text(&o.region),
                    prefix,
                    endpoint,
                    transfer: transfer()?,
                }
            }
            "http" => {
                let base = required("base_url", &o.base_url)?;
                OriginConfig::Http {
                    base_url: self.url(&at("base_url"), &base, true)?,
                    token: text(&o.token),
                    transfer: transfer()?,
                }
            }
            _ => OriginConfig::File {
                path: PathBuf::from(required("path", &o.path)?),
            },
        })
    }

    fn discovery(&mut self, f: &FileConfig) -> Result<DiscoveryConfig> {
        let disc = f.discovery.clone().unwrap_or_default();
        #[derive(Clone, Copy)]
        enum Mode {
            Static,
            File,
            K8s,
        }
        let mode = self.choice(
            "discovery.mode",
            &disc.mode,
            "discovery mode",
            &[
                ("static", Mode::Static),
                ("file", Mode::File),
                ("k8s", Mode::K8s),
            ],
            Mode::Static,
        )?;
        Ok(match mode {
            Mode::Static => {
                let mut peers = Vec::new();
                let listed = disc.static_.and_then(|s| s.peers).unwrap_or_default();
                for (i, p) in listed.iter().enumerate() {
                    let p = p
                        .as_ref()
                        .map(|s| s.text().into_owned())
                        .unwrap_or_default();
                    peers.push(self.address(&format!("discovery.static.peers[{i}]"), &p)?);
                }
                DiscoveryConfig::Static { peers }
            }
            Mode::File => {
                let fd = disc.file.unwrap_or_default();
                let dir = text(&fd.dir).ok_or_else(|| {
                    self.err("discovery.file.dir", "required when discovery.mode is file")
                })?;
                let heartbeat = self.positive_duration(
                    "discovery.file.heartbeat_interval",
                    &fd.heartbeat_interval,
                    Duration::from_secs(5),
                )?;
                let stale = self.positive_duration(
                    "discovery.file.stale_threshold",
                    &fd.stale_threshold,
                    Duration::from_secs(15),
                )?;
                if stale <= heartbeat {
                    return Err(self.err(
                        "discovery.file.stale_threshold",
                        format!(
                            "{} must be more than discovery.file.heartbeat_interval ({})",
                            units::format_duration(stale),
                            units::format_duration(heartbeat)
                        ),
                    ));
                }
                DiscoveryConfig::File {
                    dir: PathBuf::from(dir),
                    heartbeat_interval: heartbeat,
                    stale_threshold: stale,
                }
            }
            Mode::K8s => {
                let k = disc.k8s.unwrap_or_default();
                let service = text(&k.service).ok_or_else(|| {
                    self.err(
                        "discovery.k8s.service",
                        "required when discovery.mode is k8s",
                    )
                })?;
                self.dns_label("discovery.k8s.service", &service)?;
                let namespace = match text(&k.namespace) {
                    Some(ns) => {
                        self.dns_label("discovery.k8s.namespace", &ns)?;
                        ns
                    }
                    None => std::fs::read_to_string(K8S_NAMESPACE_FILE)
                        .ok()
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "default".to_owned()),
                };
                DiscoveryConfig::K8s { service, namespace }
            }
        })
    }

    /// Service and namespace names go into an API URL path: RFC 1123 labels only.
    fn dns_label(&self, key: &str, s: &str) -> Result<()> {
        let ok = s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(())
        } else {
            Err(self.err(
                key,
                format!("invalid name {s:?} (lowercase letters, digits and '-')"),
            ))
        }
    }

    fn routing(&self, f: &FileConfig, cfg: &mut Config) -> Result<()> {
        let r = f.routing.clone().unwrap_or_default();
        let d = &mut cfg.routing;
        if let Some(s) = text(&r.hash_on) {
            d.hash_on = parse_hash_on(&s).map_err(|m| self.err("routing.hash_on", m))?;
        }
        d.policy = self.choice(
            "routing.policy",
            &r.policy,
            "policy",
            &[
                ("auto", RoutingPolicy::Auto),
                ("hash", RoutingPolicy::Hash),
                ("least-load", RoutingPolicy::LeastLoad),
            ],
            d.policy,
        )?;
        let vnodes = self.uint("routing.vnodes_per_peer", &r.vnodes_per_peer, 150, true)?;
        d.vnodes_per_peer = u32::try_from(vnodes)
            .map_err(|_| self.err("routing.vnodes_per_peer", format!("{vnodes} is too large")))?;
        d.forward_timeout = self.positive_duration(
            "routing.forward_timeout",
            &r.forward_timeout,
            d.forward_timeout,
        )?;
        if let Some(s) = text(&r.overflow_threshold) {
            let t: f64 = s.trim().parse().map_err(|_| {
                self.err(
                    "routing.overflow_threshold",
                    format!("invalid number {s:?}"),
                )
            })?;
            if !(0.0..=1.0).contains(&t) {
                return Err(self.err(
                    "routing.overflow_threshold",
                    format!("{s} is not between 0 and 1"),
                ));
            }
            // Go: 0 means the default.
            d.overflow_threshold = if t == 0.0 { 0.8 } else { t };
        }
        d.fallback_to_base_model = self.boolean(
            "routing.fallback_to_base_model",
            &r.fallback_to_base_model,
            false,
        )?;
        d.base_models = self.base_models(r.base_models.as_ref())?;
        Ok(())
    }

    /// `routing.base_models`: prefixes (any string, `""` for every adapter) to base-model
    /// names (not empty), longest prefix first.
    fn base_models(
        &self,
        map: Option<&std::collections::BTreeMap<String, Leaf>>,
    ) -> Result<Vec<(String, String)>> {
        let mut rules = Vec::new();
        for (prefix, base) in map.into_iter().flatten() {
            let key = format!("routing.base_models.{prefix:?}");
            let Some(base) = text(base)
                .map(|b| b.trim().to_owned())
                .filter(|b| !b.is_empty())
            else {
                return Err(self.err(&key, "the base model name is empty".to_owned()));
            };
            rules.push((prefix.clone(), base));
        }
        rules.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(rules)
    }

    fn vllm(&self, f: &FileConfig, cfg: &mut Config) -> Result<()> {
        let v = f.vllm.clone().unwrap_or_default();
        let d = &mut cfg.vllm;
        d.model_name = text(&v.model_name);
        let small = |key: &str, n: u64| {
            u32::try_from(n).map_err(|_| self.err(key, format!("{n} is too large")))
        };
        let n = self.uint("vllm.max_loras", &v.max_loras, u64::from(d.max_loras), true)?;
        d.max_loras = small("vllm.max_loras", n)?;
        let n = self.uint(
            "vllm.max_lora_rank",
            &v.max_lora_rank,
            u64::from(d.max_lora_rank),
            true,
        )?;
        d.max_lora_rank = small("vllm.max_lora_rank", n)?;
        d.health_check_interval = self.positive_duration(
            "vllm.health_check_interval",
            &v.health_check_interval,
            d.health_check_interval,
        )?;
        d.metrics_interval = self.positive_duration(
            "vllm.metrics_interval",
            &v.metrics_interval,
            d.metrics_interval,
        )?;
        Ok(())
    }

    fn server(&self, f: &FileConfig, cfg: &mut Config) -> Result<()> {
        let s = f.server.clone().unwrap_or_default();
        let d = &mut cfg.server;
        let workers = self.uint("server.workers", &s.workers, d.workers as u64, true)?;
        if workers > MAX_WORKERS {
            return Err(self.err(
                "server.workers",
                format!("{workers} is more than {MAX_WORKERS}"),
            ));
        }
        d.workers = workers as usize;
        d.driver = self.choice(
            "server.driver",
            &s.driver,
            "driver",
            &[
                ("auto", Driver::Auto),
                ("io_uring", Driver::IoUring),
                ("epoll", Driver::Epoll),
            ],
            d.driver,
        )?;
        let body = self.size(
            "server.max_body_size",
            &s.max_body_size,
            d.max_body_size as u64,
        )?;
        if body == 0 {
            return Err(self.err("server.max_body_size", "must be more than 0"));
        }
        d.max_body_size = usize::try_from(body)
            .map_err(|_| self.err("server.max_body_size", "too large for this machine"))?;
        let head = self.size(
            "server.max_header_size",
            &s.max_header_size,
            d.max_header_size as u64,
        )?;
        if head < MIN_HEADER_SIZE {
            return Err(self.err(
                "server.max_header_size",
                format!("{head} bytes is less than the minimum, 1KB"),
            ));
        }
        d.max_header_size = usize::try_from(head)
            .map_err(|_| self.err("server.max_header_size", "too large for this machine"))?;
        d.header_read_timeout = self.positive_duration(
            "server.header_read_timeout",
            &s.header_read_timeout,
            d.header_read_timeout,
        )?;
        d.body_read_timeout = self.positive_duration(
            "server.body_read_timeout",
            &s.body_read_timeout,
            d.body_read_timeout,
        )?;
        d.idle_timeout =
            self.positive_duration("server.idle_timeout", &s.idle_timeout, d.idle_timeout)?;
        d.upstream_connect_timeout = self.positive_duration(
            "server.upstream_connect_timeout",
            &s.upstream_connect_timeout,
            d.upstream_connect_timeout,
        )?;
        d.upstream_idle_timeout = self.positive_duration(
            "server.upstream_idle_timeout",
            &s.upstream_idle_timeout,
            d.upstream_idle_timeout,
        )?;
        d.shutdown_grace =
            self.duration("server.shutdown_grace", &s.shutdown_grace, d.shutdown_grace)?;
        d.log_format = self.choice(
            "server.log_format",
            &s.log_format,
            "log format",
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            d.log_format,
        )?;
        Ok(())
    }
}

/// `host:port`, `:port` or `[v6]:port`, as Go's `net.Listen` and the peer lists take them.
pub(super) fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty() && port.len() <= 5 && port.parse::<u16>().is_ok();
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        host.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    };
    port_ok && host_ok
}

/// Go's `validateHashOn`, into [`HashOn`]. Header names must be HTTP tokens (a name that
/// can never match a header would silently send every request to one node).
pub(super) fn parse_hash_on(s: &str) -> std::result::Result<HashOn, String> {
    match s {
        "model" => return Ok(HashOn::Model),
        "tenant" => return Ok(HashOn::Tenant),
        "tenant/model" => return Ok(HashOn::TenantModel),
        _ => {}
    }
    let Some(spec) = s.strip_prefix("header:") else {
        return Err(format!(
            "invalid hash_on {s:?} (model, tenant, tenant/model, header:<name>, header:<name>/model)"
        ));
    };
    let (name, with_model) = match spec.strip_suffix("/model") {
        Some(name) => (name, true),
        None => (spec, false),
    };
    if name.is_empty() {
        return Err(format!("header name is empty in hash_on {s:?}"));
    }
    let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(is_token) {
        return Err(format!("invalid header name {name:?} in hash_on {s:?}"));
    }
    Ok(if with_model {
        HashOn::HeaderModel(name.to_owned())
    } else {
        HashOn::Header(name.to_owned())
    })
}
