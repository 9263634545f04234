//! The effective settings, printed back as a config file: every key with its value, under
//! the file's own key names (`check-config` prints it, the server logs it at start). Built by
//! filling the on-disk shape and letting serde_yaml_ng quote the values, so the output is
//! always valid YAML and loads back to the same [`Config`].

use super::{
    Config, DirectIo, DiscoveryConfig, Driver, HashOn, LogFormat, OriginConfig, TransferConfig,
    file::{
        FileAdmin, FileCluster, FileClusterTls, FileConfig, FileDiscovery, FileFileDiscovery,
        FileInvalidation, FileK8s, FileOrigin, FileRouting, FileServer, FileServerTls, FileStatic,
        FileStorage, FileVllm, Scalar,
    },
    units::{format_duration, format_size},
};

/// Whether secrets are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redact {
    /// Tokens print as `<redacted>` (for logs and terminals).
    Secrets,
    /// Everything as it is (for round-trip tests).
    Nothing,
}

fn s(v: impl Into<String>) -> Option<Scalar> {
    Some(Scalar::Str(v.into()))
}

fn n(v: u64) -> Option<Scalar> {
    Some(Scalar::UInt(v))
}

fn dur(d: std::time::Duration) -> Option<Scalar> {
    s(format_duration(d))
}

pub(super) fn render(cfg: &Config, redact: Redact) -> String {
    let secret = |t: &Option<String>| match (t, redact) {
        (None, _) => s(""),
        (Some(_), Redact::Secrets) => s("<redacted>"),
        (Some(t), Redact::Nothing) => s(t.as_str()),
    };
    let r = &cfg.routing;
    let sv = &cfg.server;
    let file = FileConfig {
        listen: s(cfg.listen.as_str()),
        self_addr: s(cfg.self_addr.clone().unwrap_or_default()),
        // One backend as `vllm_url`, several as `vllm_urls`.
        vllm_url: match cfg.vllm_urls.as_slice() {
            [one] => s(one.as_str()),
            _ => None,
        },
        vllm_urls: (cfg.vllm_urls.len() > 1)
            .then(|| cfg.vllm_urls.iter().map(|u| s(u.as_str())).collect()),
        storage: Some(FileStorage {
            dir: s(cfg.storage.dir.to_string_lossy()),
            max_size: s(format_size(cfg.storage.max_size)),
            rewrite_base_model: Some(Scalar::Bool(cfg.storage.rewrite_base_model)),
            direct_io: s(match cfg.storage.direct_io {
                DirectIo::Auto => "auto",
                DirectIo::Off => "off",
            }),
            preload: Some(cfg.storage.preload.iter().map(|n| s(n.as_str())).collect()),
            fetch_wait_timeout: s(cfg
                .storage
                .fetch_wait_timeout
                .map_or("0".into(), format_duration)),
        }),
        origins: Some(cfg.origins.iter().map(|o| origin(o, &secret)).collect()),
        invalidation: Some(FileInvalidation {
            ttl: s(cfg.invalidation.ttl.map_or("0".into(), format_duration)),
        }),
        discovery: Some(discovery(&cfg.discovery)),
        routing: Some(FileRouting {
            hash_on: s(match &r.hash_on {
                HashOn::Model => "model".to_owned(),
                HashOn::Tenant => "tenant".to_owned(),
                HashOn::TenantModel => "tenant/model".to_owned(),
                HashOn::Header(h) => format!("header:{h}"),
                HashOn::HeaderModel(h) => format!("header:{h}/model"),
            }),
            policy: s(r.policy.as_str()),
            vnodes_per_peer: n(u64::from(r.vnodes_per_peer)),
            forward_timeout: dur(r.forward_timeout),
            overflow_threshold: Some(Scalar::Float(r.overflow_threshold)),
            fallback_to_base_model: Some(Scalar::Bool(r.fallback_to_base_model)),
            base_models: Some(
                r.base_models
                    .iter()
                    .map(|(prefix, base)| (prefix.clone(), s(base.as_str())))
                    .collect(),
            ),
        }),
        vllm: Some(FileVllm {
            model_name: s(cfg.vllm.model_name.clone().unwrap_or_default()),
            max_loras: n(u64::from(cfg.vllm.max_loras)),
            max_lora_rank: n(u64::from(cfg.vllm.max_lora_rank)),
            health_check_interval: dur(cfg.vllm.health_check_interval),
            metrics_interval: dur(cfg.vllm.metrics_interval),
        }),
        server: Some(FileServer {
            workers: n(sv.workers as u64),
            driver: s(match sv.driver {
                Driver::Auto => "auto",
                Driver::IoUring => "io_uring",
                Driver::Epoll => "epoll",
            }),
            max_body_size: s(format_size(sv.max_body_size as u64)),
            max_header_size: s(format_size(sv.max_header_size as u64)),
            header_read_timeout: dur(sv.header_read_timeout),
            body_read_timeout: dur(sv.body_read_timeout),
            idle_timeout: dur(sv.idle_timeout),
            upstream_connect_timeout: dur(sv.upstream_connect_timeout),
            upstream_idle_timeout: dur(sv.upstream_idle_timeout),
            shutdown_grace: dur(sv.shutdown_grace),
            log_format: s(match sv.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }),
            tls: Some(match &sv.tls {
                Some(t) => FileServerTls {
                    cert: s(t.cert.to_string_lossy()),
                    key: s(t.key.to_string_lossy()),
                    allow_plain: Some(Scalar::Bool(t.allow_plain)),
                },
                None => FileServerTls {
                    cert: s(""),
                    key: s(""),
                    allow_plain: Some(Scalar::Bool(false)),
                },
            }),
        }),
        admin: Some(FileAdmin {
            token: secret(&cfg.admin.token),
            open: Some(Scalar::Bool(cfg.admin.open)),
        }),
        cluster: Some(FileCluster {
            token: secret(&cfg.cluster.token),
            tls: Some(FileClusterTls {
                ca: s(cfg
                    .cluster
                    .tls
                    .as_ref()
                    .map_or(String::new(), |t| t.ca.to_string_lossy().into_owned())),
                server_name: s(cfg
                    .cluster
                    .tls
                    .as_ref()
                    .and_then(|t| t.server_name.clone())
                    .unwrap_or_default()),
            }),
        }),
        tracing: Some(super::otel::render(&cfg.tracing)),
    };
    serde_yaml_ng::to_string(&file).expect("plain scalars, strings and lists always serialize")
}

fn origin(o: &OriginConfig, secret: &dyn Fn(&Option<String>) -> Option<Scalar>) -> FileOrigin {
    let with_transfer = |f: FileOrigin, t: &TransferConfig| FileOrigin {
        connect_timeout: dur(t.connect_timeout),
        idle_timeout: dur(t.idle_timeout),
        retries: n(u64::from(t.retries)),
        min_rate: s(t.min_rate.map_or("0".into(), format_size)),
        // Hidden (a test knob): printed only when it is not the default.
        min_rate_window: (t.rate_window != TransferConfig::default().rate_window)
            .then(|| Scalar::Str(format_duration(t.rate_window))),
        ..f
    };
    let kind = s(o.type_name());
    match o {
        OriginConfig::HuggingFace {
            endpoint,
            token,
            transfer,
        } => with_transfer(
            FileOrigin {
                kind,
                endpoint: s(endpoint.as_str()),
                token: secret(token),
                ..FileOrigin::default()
            },
            transfer,
        ),
        OriginConfig::S3 {
            bucket,
            region,
            prefix,
            endpoint,
            transfer,
        } => with_transfer(
            FileOrigin {
                kind,
                bucket: s(bucket.as_str()),
                region: s(region.clone().unwrap_or_default()),
                prefix: s(prefix.as_str()),
                endpoint: s(endpoint.clone().unwrap_or_default()),
                ..FileOrigin::default()
            },
            transfer,
        ),
        OriginConfig::Http {
            base_url,
            token,
            transfer,
        } => with_transfer(
            FileOrigin {
                kind,
                base_url: s(base_url.as_str()),
                token: secret(token),
                ..FileOrigin::default()
            },
            transfer,
        ),
        OriginConfig::File { path } => FileOrigin {
            kind,
            path: s(path.to_string_lossy()),
            ..FileOrigin::default()
        },
    }
}

fn discovery(d: &DiscoveryConfig) -> FileDiscovery {
    let mode = s(d.mode());
    match d {
        DiscoveryConfig::Static { peers } => FileDiscovery {
            mode,
            static_: Some(FileStatic {
                peers: Some(peers.iter().map(|p| s(p.as_str())).collect()),
            }),
            ..FileDiscovery::default()
        },
        DiscoveryConfig::File {
            dir,
            heartbeat_interval,
            stale_threshold,
        } => FileDiscovery {
            mode,
            file: Some(FileFileDiscovery {
                dir: s(dir.to_string_lossy()),
                heartbeat_interval: dur(*heartbeat_interval),
                stale_threshold: dur(*stale_threshold),
            }),
            ..FileDiscovery::default()
        },
        DiscoveryConfig::K8s { service, namespace } => FileDiscovery {
            mode,
            k8s: Some(FileK8s {
                service: s(service.as_str()),
                namespace: s(namespace.as_str()),
            }),
            ..FileDiscovery::default()
        },
    }
}
