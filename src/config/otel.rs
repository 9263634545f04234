//! The `tracing` section: where OpenTelemetry spans go (the telemetry module exports them). Its
//! file form, typed form, conversion and printing, together in one place.

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    convert::{Convert, text},
    file::Scalar,
};

type Leaf = Option<Scalar>;

/// OpenTelemetry tracing (`tracing.*`); off unless an endpoint is set.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// Where spans go: an OTLP/HTTP (protobuf) traces URL. A URL with no path gets the
    /// standard `/v1/traces`. `None`: tracing is off.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the spans.
    pub service_name: String,
    /// Share of new traces recorded (0..=1), by trace id; a request that comes with a parent
    /// follows its parent's decision.
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: "loraplex".into(),
            sample_ratio: 1.0,
        }
    }
}

/// `tracing` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FileTracing {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Leaf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_ratio: Leaf,
}

impl Convert<'_> {
    pub(super) fn tracing(&self, t: Option<&FileTracing>) -> Result<TracingConfig, ConfigError> {
        let mut d = TracingConfig::default();
        let Some(t) = t else { return Ok(d) };
        if let Some(s) = text(&t.otlp_endpoint) {
            d.otlp_endpoint = Some(self.otlp_endpoint("tracing.otlp_endpoint", &s)?);
        }
        if let Some(s) = text(&t.service_name) {
            d.service_name = s;
        }
        if let Some(s) = text(&t.sample_ratio) {
            let key = "tracing.sample_ratio";
            let r: f64 =
                (s.trim().parse()).map_err(|_| self.err(key, format!("invalid number {s:?}")))?;
            if !(0.0..=1.0).contains(&r) {
                return Err(self.err(key, format!("{s} is not between 0 and 1")));
            }
            d.sample_ratio = r;
        }
        Ok(d)
    }

    /// An OTLP/HTTP traces URL: `http(s)://host[:port][/path]`; no path means the standard
    /// `/v1/traces` (as `OTEL_EXPORTER_OTLP_ENDPOINT` does), a path is taken as it is.
    fn otlp_endpoint(&self, key: &str, s: &str) -> Result<String, ConfigError> {
        let bad = |why: &str| self.err(key, format!("invalid URL {s:?}: {why}"));
        let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(self.err(
                key,
                format!("URL {s:?} must start with http:// or https://"),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) || url.query().is_some() {
            return Err(bad("expected scheme://host[:port][/path]"));
        }
        Ok(match url.path() {
            "" | "/" => format!("{}/v1/traces", s.trim_end_matches('/')),
            _ => s.to_owned(),
        })
    }
}

/// The section as `check-config` prints it.
pub(super) fn render(t: &TracingConfig) -> FileTracing {
    FileTracing {
        otlp_endpoint: Some(Scalar::Str(t.otlp_endpoint.clone().unwrap_or_default())),
        service_name: Some(Scalar::Str(t.service_name.clone())),
        sample_ratio: Some(Scalar::Float(t.sample_ratio)),
    }
}
