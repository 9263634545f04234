//! The config file as it is on disk: the Go loraplex's YAML keys plus ours, every leaf kept as
//! written ([`Scalar`]) so that `convert.rs` can check each value once and name its key in any
//! error. Also the reading side: `${VAR}` expansion, YAML parsing, unknown keys.
//!
//! Every field is optional: a missing key, a null (`token:`) and, where Go says so, an empty
//! string all mean "the default". Leaves accept any YAML scalar (`ttl: 0`, `max_size: 1048576`,
//! `vnodes_per_peer: "150"`), as Go's yaml.v3 does for its string fields; the type is decided
//! when the value is converted.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::{ConfigError, env};

/// A YAML scalar as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Str(String),
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    /// The value as text, the way it would read in the file.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Scalar::Str(s) => Cow::Borrowed(s),
            Scalar::Int(n) => Cow::Owned(n.to_string()),
            Scalar::UInt(n) => Cow::Owned(n.to_string()),
            Scalar::Float(f) => Cow::Owned(f.to_string()),
            Scalar::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        }
    }
}

impl From<&str> for Scalar {
    fn from(s: &str) -> Self {
        Scalar::Str(s.to_owned())
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::UInt(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Scalar {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scalar::Str(v) => s.serialize_str(v),
            Scalar::Int(v) => s.serialize_i64(*v),
            Scalar::UInt(v) => s.serialize_u64(*v),
            Scalar::Float(v) => s.serialize_f64(*v),
            Scalar::Bool(v) => s.serialize_bool(*v),
        }
    }
}

type Leaf = Option<Scalar>;

/// The whole file. Field order is the order `check-config` prints keys in.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_addr: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vllm_url: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vllm_urls: Option<Vec<Leaf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<FileStorage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origins: Option<Vec<FileOrigin>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalidation: Option<FileInvalidation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<FileDiscovery>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<FileRouting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vllm: Option<FileVllm>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<FileServer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<FileAdmin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<FileCluster>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<super::otel::FileTracing>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileStorage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite_base_model: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_io: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preload: Option<Vec<Leaf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_wait_timeout: Leaf,
}

/// One origin; which keys apply depends on `type`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileOrigin {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_rate: Leaf,
    /// A test knob: the window of `min_rate` (30 s; the README mentions it under `min_rate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_rate_window: Leaf,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileInvalidation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Leaf,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileDiscovery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Leaf,
    #[serde(rename = "static", skip_serializing_if = "Option::is_none")]
    pub static_: Option<FileStatic>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<FileFileDiscovery>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s: Option<FileK8s>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileStatic {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<Leaf>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileFileDiscovery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_threshold: Leaf,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileK8s {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Leaf,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileRouting {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_on: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vnodes_per_peer: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_timeout: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overflow_threshold: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_to_base_model: Leaf,
    /// Adapter-name prefix → base model (`routing.base_models`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_models: Option<std::collections::BTreeMap<String, Leaf>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileVllm {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_name: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_loras: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lora_rank: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_interval: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_interval: Leaf,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileServer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_size: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_size: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_read_timeout: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_connect_timeout: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_idle_timeout: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<FileServerTls>,
}

/// `server.tls`: the listener's certificate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileServerTls {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_plain: Leaf,
}

/// `cluster`: a shared secret, and TLS for peer links.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileCluster {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<FileClusterTls>,
}

/// `cluster.tls`: how peers' certificates are checked.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileClusterTls {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Leaf,
}

/// `admin`: its token, and whether it is open without one.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileAdmin {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open: Leaf,
}

/// Expand `${VAR}`s with `env`, then parse. Returns the file and the keys it has that
/// loraplex does not know (as `routing.hash_onn`, `origins[1].bukket`).
///
/// `env` is a trait object, not a generic: the deserializers below are instantiated for the
/// closures defined here, so a generic `env` compiled every struct's YAML reader once per caller
/// (a sixth of the crate's LLVM code; docs/build.md).
pub fn parse(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let text = env::expand(text, env);
    // An empty file (or one of comments only) is an empty config, as in Go.
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok((FileConfig::default(), Vec::new()));
    }
    let mut unknown = Vec::new();
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(key_of(&path));
    let ignored = serde_ignored::Deserializer::new(de, &mut on_unknown);
    match serde_path_to_error::deserialize::<_, Option<FileConfig>>(ignored) {
        Ok(file) => Ok((file.unwrap_or_default(), unknown)),
        Err(e) => {
            let key = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde_yaml_ng names the key itself too; say it once.
            let message = inner.strip_prefix(&format!("{key}: ")).unwrap_or(&inner);
            // "." is the root, "?" a key that is not a string (`{[a]: b}`).
            Err(if key == "." || key.contains('?') {
                ConfigError::Syntax(message.to_owned())
            } else {
                ConfigError::invalid(key, message)
            })
        }
    }
}

/// `origins[1].bukket` for a path of serde_ignored (whose own `Display` prints `origins.?.1`).
fn key_of(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_of(parent)),
        Path::Map { parent, key } => match key_of(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_of(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn scalars_of_any_type_are_kept_as_written() {
        let (f, unknown) = parse(
            "listen: \":9090\"\ninvalidation: {ttl: 0}\nrouting:\n  overflow_threshold: 0.8\n  \
             fallback_to_base_model: true\n  vnodes_per_peer: \"150\"\n",
            &no_env,
        )
        .unwrap();
        assert!(unknown.is_empty());
        assert_eq!(f.listen, Some(Scalar::from(":9090")));
        assert_eq!(f.invalidation.unwrap().ttl.unwrap().text(), "0");
        let r = f.routing.unwrap();
        assert_eq!(r.overflow_threshold, Some(Scalar::Float(0.8)));
        assert_eq!(r.fallback_to_base_model, Some(Scalar::Bool(true)));
        assert_eq!(r.vnodes_per_peer.unwrap().text(), "150");
    }

    #[test]
    fn nulls_and_empty_files_are_defaults() {
        for text in [
            "",
            "\n  \n",
            "# only a comment\n",
            "~\n",
            "storage:\norigins:\n",
        ] {
            let (f, unknown) = parse(text, &no_env).unwrap();
            assert!(unknown.is_empty(), "{text:?}");
            assert_eq!(f.storage.unwrap_or_default(), FileStorage::default());
            assert!(f.origins.unwrap_or_default().is_empty());
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let (_, mut unknown) = parse(
            "listn: x\nrouting:\n  hash_onn: model\norigins:\n  - type: s3\n  - bukket: b\n    \
             type: s3\ndiscovery:\n  static:\n    peers: []\n    extra: {a: 1}\n",
            &no_env,
        )
        .unwrap();
        unknown.sort();
        assert_eq!(
            unknown,
            [
                "discovery.static.extra",
                "listn",
                "origins[1].bukket",
                "routing.hash_onn"
            ]
        );
    }

    #[test]
    fn wrong_shapes_name_the_key() {
        let e = parse("routing: [1, 2]\n", &no_env).unwrap_err().to_string();
        assert!(e.starts_with("routing: invalid type: sequence"), "{e}");
        let e = parse("origins:\n  - type: [s3]\n", &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("origins[0].type: invalid type: sequence"),
            "{e}"
        );
        let e = parse("discovery:\n  static:\n    peers: a\n", &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("discovery.static.peers: invalid type"), "{e}");
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = parse("{{{invalid", &no_env).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax(_)), "{e}");
        let e = parse("a: b\n c: d\n:", &no_env).unwrap_err().to_string();
        assert!(e.contains("line"), "{e}");
        let e = parse("- 1\n- 2\n", &no_env).unwrap_err().to_string();
        assert!(e.contains("sequence"), "{e}");
    }

    #[test]
    fn env_is_expanded_before_parsing() {
        let env = |k: &str| (k == "PORT").then(|| "7070".to_string());
        let (f, _) = parse("listen: \":${PORT}\"\nvllm_url: $UNSET\n", &env).unwrap();
        assert_eq!(f.listen, Some(Scalar::from(":7070")));
        assert_eq!(f.vllm_url, None);
    }
}
