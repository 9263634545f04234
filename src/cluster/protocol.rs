//! The peer protocol: everything one loraplex node says to another, in one place.
//!
//! - Forwarding: a request routed to its owner carries [`FORWARDED_HEADER`] (and
//!   [`TOKEN_HEADER`] with `cluster.token` when one is set); the receiving node acknowledges it
//!   with `100 Continue` as soon as it has read it (held back to leave with the answer's head
//!   when that comes at once: `Conn::acknowledge`), and serves it itself.
//! - Trust ([`is_trusted_peer`]): a request is a peer's when it carries `cluster.token` (when one
//!   is set), else when it comes from a peer's address. An untrusted mark is ignored.
//! - `GET /healthz` ([`Healthz`], the Go project's shape): every node polls every peer for
//!   health and load ([`load`]).
//! - Adapter copies ([`PeerPath`], under [`PREFIX`]): `GET {PREFIX}{name}/manifest`
//!   ([`PeerManifest`]) and `GET {PREFIX}{name}/files/{path}` (`Range: bytes=N-`).
//! - Evict broadcast: `POST /admin/cache/evict {"adapter": name}`, marked forwarded so it is
//!   not broadcast again.
//! - `GET {MODELS_PATH}`: a node's own part of the merged `/v1/models`; peers only.
//! - `GET {BASE_PREFIX}{name}` ([`PeerBase`]): an adapter's base model, asked of the node that
//!   learns it once for the cluster; peers only.
//! - `GET {STATE_PATH}?since=V&instance=I` ([`PeerState`]): a node's vLLM state per backend,
//!   its hot keys and the changed segments of its disk filter; polled every
//!   `vllm.metrics_interval`, peers only.
//!
//! [`PeerClient`] is the one HTTP client (control plane) a node uses for all of it, built at
//! start, connecting from this node's own address; over HTTPS with `cluster.tls` (peers'
//! certificates checked against the cluster CA, `crate::tls::PeerVerifier`).

use std::{borrow::Cow, net::IpAddr, sync::Arc, time::Duration};

use reqwest::{StatusCode, header::RANGE};
use serde::{Deserialize, Serialize};

use crate::{
    adapter::AdapterName,
    cluster::{disk_filter::WireSegment, router::Router},
    error::Error,
    http::RequestHead,
    telemetry,
};

/// Marks a request as forwarded by a peer (value `1`).
pub const FORWARDED_HEADER: &str = "x-loraplex-forwarded";
/// Carries `cluster.token` on every peer request when one is set.
pub const TOKEN_HEADER: &str = "x-loraplex-token";
/// Path prefix of the adapter-copy endpoints.
pub const PREFIX: &str = "/_loraplex/adapters/";

/// The peer-state endpoint.
pub const STATE_PATH: &str = "/_loraplex/state";

/// The model-list endpoint: `GET {MODELS_PATH}`, a node's own part of the merged `/v1/models`
/// (its backends' base models, the adapters it stores), peers only.
pub const MODELS_PATH: &str = "/_loraplex/models";

/// Path prefix of the base-model endpoint: `GET {BASE_PREFIX}{adapter}` ([`PeerBase`]).
pub const BASE_PREFIX: &str = "/_loraplex/base/";

/// Requests in flight that count as full load (the Go project's `Load(200)`).
pub const FULL_LOAD: i64 = 200;

/// A peer gets this long to answer a health check, whatever the poll interval: a busy node is
/// slow, not dead (the Go project uses 3 s too).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a peer gets to answer a manifest request, and to accept any connection.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a peer gets to evict an adapter.
const EVICT_TIMEOUT: Duration = Duration::from_secs(10);

/// A node's load in 0..=1 from its requests in flight, as peers see it in `/healthz`.
pub fn load(pending: i64) -> f64 {
    (pending.max(0) as f64 / FULL_LOAD as f64).min(1.0)
}

/// The `/healthz` answer (the Go project's JSON). Fields a Go node leaves out read as a
/// healthy, idle node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Healthz {
    /// `ok`, or `degraded` while vLLM is unhealthy.
    #[serde(default)]
    pub status: Cow<'static, str>,
    #[serde(default)]
    pub load: f64,
    /// Requests in flight, the asking one not counted.
    #[serde(default)]
    pub pending: i64,
    #[serde(default = "yes")]
    pub vllm_healthy: bool,
}

fn yes() -> bool {
    true
}

impl Healthz {
    pub fn new(pending: i64, vllm_healthy: bool) -> Healthz {
        Healthz {
            status: Cow::Borrowed(if vllm_healthy { "ok" } else { "degraded" }),
            load: load(pending),
            pending,
            vllm_healthy,
        }
    }
}

/// One backend (vLLM) of a node, as it publishes it to its peers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendReport {
    /// Its metrics were read (false: unknown load; peers route by hash).
    pub known: bool,
    pub healthy: bool,
    pub running: f32,
    pub waiting: f32,
    /// KV-cache use, 0..1.
    pub kv: f32,
    /// LoRA slots.
    pub max_lora: u16,
    /// Distinct adapters in its running batch.
    pub lora_busy: u16,
    /// Largest running batch seen while requests waited (learnt; 0: not yet).
    pub batch: f32,
    /// Requests per second it completes when saturated (learnt; 0: not yet).
    pub capacity: f32,
    /// `process_start_time_seconds`.
    pub started: f64,
    /// Age of the sample when sent, in milliseconds.
    pub age_ms: u64,
    /// Sample number (changes with every sample).
    pub seq: u64,
    /// xxh3 of the adapters likely in its GPU slots.
    pub gpu: Vec<u64>,
    /// Its base-model names: vLLM's `root` (`--model`) first, then every served name,
    /// deduplicated; empty: not learnt yet (or a peer of an earlier version).
    #[serde(default)]
    pub models: Vec<String>,
    /// Its URL as the node has it configured (for `/admin/peers`).
    #[serde(default)]
    pub url: String,
}

/// A key entering a node from clients, its rate there (requests/s) and the pool its requests
/// need (`p`: the base model's `pool_hash`; 0, or absent from a node of an earlier version:
/// any).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HotKey {
    pub h: u64,
    pub r: f32,
    #[serde(default)]
    pub p: u64,
}

/// `GET {STATE_PATH}`: what a node tells its peers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerState {
    /// Changes when the node restarts (its filter versions start over).
    pub instance: u64,
    /// One per vLLM of the node.
    pub backends: Vec<BackendReport>,
    /// Its hottest keys.
    pub hot: Vec<HotKey>,
    /// The poller has the disk filter up to this version once it applied `disk`.
    pub disk_version: u64,
    /// Changed segments of the disk filter.
    pub disk: Vec<WireSegment>,
}

/// A stored adapter as a peer describes it, files relative to its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerManifest {
    #[serde(default)]
    pub adapter: String,
    pub content_id: Option<String>,
    pub files: Vec<PeerFile>,
    /// When the peer's copy last heard from the origin (`fetched_at`), in ms since the Unix
    /// epoch; the copy keeps it. `None` from a peer of an earlier version.
    #[serde(default)]
    pub fetched_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerFile {
    pub path: String,
    pub size: u64,
}

/// `GET {BASE_PREFIX}{adapter}`: an adapter's base model as the asked node learnt it (its disk,
/// else its origins), peers only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerBase {
    pub adapter: String,
    /// `base_model_name_or_path`; `None`: not learnt (or missing).
    pub base_model: Option<String>,
    /// No origin has the adapter.
    #[serde(default)]
    pub missing: bool,
}

/// An adapter-copy request, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath<'a> {
    /// `{PREFIX}{adapter}/manifest`
    Manifest { adapter: &'a str },
    /// `{PREFIX}{adapter}/files/{file}`
    File { adapter: &'a str, file: &'a str },
}

impl<'a> PeerPath<'a> {
    /// Parse a request path under [`PREFIX`]; `None` when it is no peer endpoint. The adapter
    /// name and file path are not validated here.
    pub fn parse(path: &'a str) -> Option<PeerPath<'a>> {
        let rest = path.strip_prefix(PREFIX)?;
        if let Some(adapter) = rest.strip_suffix("/manifest") {
            Some(PeerPath::Manifest { adapter })
        } else {
            let (adapter, file) = rest.split_once("/files/")?;
            Some(PeerPath::File { adapter, file })
        }
    }
}

/// Whether `head` carries a forwarded mark (trusted or not).
pub fn is_marked(head: &RequestHead) -> bool {
    head.header(FORWARDED_HEADER).is_some()
}

/// Whether `head` carries a forwarded mark this node trusts.
pub fn is_trusted_forward(router: &Router, head: &RequestHead, from: IpAddr) -> bool {
    is_marked(head) && is_trusted_peer(router, head, from)
}

/// Whether a request comes from a peer: it carries `cluster.token` when one is set, else it
/// comes from a peer's address (`from`: the client connection's address).
pub fn is_trusted_peer(router: &Router, head: &RequestHead, from: IpAddr) -> bool {
    match &router.token {
        Some(token) => head
            .header(TOKEN_HEADER)
            .is_some_and(|given| crate::http::constant_time_eq(given, token.as_bytes())),
        None => router.topology().is_peer_ip(from),
    }
}

/// The HTTP client for every control-plane call to a peer (health polls, adapter copies, evict
/// broadcasts): one connection pool, connecting from this node's own address, no proxy, a
/// connect timeout of 2 s and a time limit per kind of call (3 s for a health check, 2 s for a
/// manifest, 10 s for an evict, none for a file: the transfer layer watches for stalls).
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    token: Option<String>,
    /// `https` with `cluster.tls`, else `http`.
    scheme: &'static str,
}

impl PeerClient {
    /// `source`: the local address to connect from (peers recognise the connection as a
    /// peer's even on a host with several addresses); `token`: `cluster.token`; `tls`: the
    /// client config of `cluster.tls` (`None`: plain HTTP).
    pub fn new(
        source: Option<IpAddr>,
        token: Option<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<PeerClient, Error> {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .local_address(source)
            .connect_timeout(MANIFEST_TIMEOUT);
        let scheme = match tls {
            Some(cfg) => {
                // The same config as the data plane's forwards (reqwest runs on this rustls).
                builder = builder.tls_backend_preconfigured((*cfg).clone());
                "https"
            }
            None => "http",
        };
        let http = builder
            .build()
            .map_err(|e| Error::internal(format!("peer http client: {e}")))?;
        Ok(PeerClient {
            http,
            token,
            scheme,
        })
    }

    /// `GET http(s)://{peer}/healthz`.
    pub async fn healthz(&self, peer: &str) -> reqwest::Result<Healthz> {
        self.http
            .get(format!("{}://{peer}/healthz", self.scheme))
            .timeout(HEALTH_TIMEOUT)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }

    /// `GET http(s)://{peer}{STATE_PATH}`, for a poller that has the disk filter up to `since` of
    /// `instance`.
    pub async fn state(&self, peer: &str, since: u64, instance: u64) -> reqwest::Result<PeerState> {
        let url = format!(
            "{}://{peer}{STATE_PATH}?since={since}&instance={instance}",
            self.scheme
        );
        self.with_token(self.http.get(url))
            .timeout(HEALTH_TIMEOUT)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }

    /// The manifest of `name` stored on `peer`; `None` when it has none (or does not answer in
    /// time).
    pub async fn manifest(&self, peer: &str, name: &AdapterName) -> Option<PeerManifest> {
        let url = format!("{}://{peer}{PREFIX}{name}/manifest", self.scheme);
        self.get_json(url, MANIFEST_TIMEOUT).await
    }

    /// The base model of `name` as `peer` learns it; `None` when it does not answer (within
    /// `timeout`) or answers something else.
    pub async fn base_model(
        &self,
        peer: &str,
        name: &AdapterName,
        timeout: Duration,
    ) -> Option<PeerBase> {
        let url = format!("{}://{peer}{BASE_PREFIX}{name}", self.scheme);
        self.get_json::<PeerBase>(url, timeout)
            .await
            .filter(|b| b.adapter == name.as_str())
    }

    /// `peer`'s own part of the model list (`GET {MODELS_PATH}`, vLLM's `/v1/models` shape);
    /// `None` when it does not answer in time.
    pub async fn models(&self, peer: &str) -> Option<serde_json::Value> {
        let url = format!("{}://{peer}{MODELS_PATH}", self.scheme);
        self.get_json(url, HEALTH_TIMEOUT).await
    }

    /// `GET url` (with the token) answered 200 with JSON of type `T` within `timeout`; `None`
    /// otherwise.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: String,
        timeout: Duration,
    ) -> Option<T> {
        let resp = self
            .with_token(self.http.get(url))
            .timeout(timeout)
            .send()
            .await
            .ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        resp.json().await.ok()
    }

    /// The URL of `file` of adapter `name` on `peer`.
    pub fn file_url(&self, peer: &str, name: &AdapterName, file: &str) -> String {
        format!("{}://{peer}{PREFIX}{name}/files/{file}", self.scheme)
    }

    /// Start streaming the file at `url` ([`PeerClient::file_url`]) from byte `offset` (no time
    /// limit but the connect timeout: the transfer layer watches for stalls).
    pub async fn file(&self, url: &str, offset: u64) -> reqwest::Result<reqwest::Response> {
        let mut req = self.with_token(self.http.get(url));
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
        }
        req.send().await
    }

    /// Ask `peer` to evict `adapter` (marked forwarded: it is not broadcast again); whether it
    /// answered with a success.
    pub async fn evict(&self, peer: &str, adapter: &str, admin_token: Option<&str>) -> bool {
        let body = serde_json::json!({ "adapter": adapter });
        let req = self.admin_post(
            peer,
            "/admin/cache/evict",
            &body,
            admin_token,
            EVICT_TIMEOUT,
        );
        matches!(req.send().await, Ok(r) if r.status().is_success())
    }

    /// Ask `peer` to warm `adapters` up and load them into its vLLMs (marked forwarded: it
    /// sends none of them on again): the `results` of its answer, or why there are none.
    pub async fn warmup(
        &self,
        peer: &str,
        adapters: &[String],
        admin_token: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>, String> {
        let body = serde_json::json!({ "adapters": adapters, "load": true });
        let req = self.admin_post(peer, "/admin/cache/warmup", &body, admin_token, timeout);
        let answer = req.send().await.map_err(|e| e.to_string())?;
        let status = answer.status();
        let body: serde_json::Value = answer.json().await.map_err(|e| e.to_string())?;
        match body["results"].as_array() {
            Some(results) if status.is_success() => Ok(results.clone()),
            _ => Err(body["error"]["message"]
                .as_str()
                .map_or_else(|| format!("it answered {status}"), str::to_string)),
        }
    }

    /// An admin call to `peer`, marked as forwarded (the peer passes it on to nobody), with the
    /// cluster token and `admin_token` (`admin.token`: every node has the same).
    fn admin_post(
        &self,
        peer: &str,
        path: &str,
        body: &serde_json::Value,
        admin_token: Option<&str>,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let req = self
            .http
            .post(format!("{}://{peer}{path}", self.scheme))
            .timeout(timeout)
            .header(FORWARDED_HEADER, "1")
            .json(body);
        let req = self.with_token(req);
        match admin_token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// The cluster token, and the `traceparent` of the fetch this call is part of (a traced
    /// peer copy continues the trace on the peer).
    fn with_token(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = match telemetry::outgoing() {
            Some(tp) => req.header(telemetry::TRACEPARENT, tp.as_str()),
            None => req,
        };
        match &self.token {
            Some(t) => req.header(TOKEN_HEADER, t),
            None => req,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_paths() {
        assert_eq!(
            PeerPath::parse("/_loraplex/adapters/acme/x/manifest"),
            Some(PeerPath::Manifest { adapter: "acme/x" })
        );
        assert_eq!(
            PeerPath::parse("/_loraplex/adapters/acme/x/files/tok/vocab.json"),
            Some(PeerPath::File {
                adapter: "acme/x",
                file: "tok/vocab.json"
            })
        );
        assert_eq!(PeerPath::parse("/_loraplex/adapters/acme/x"), None);
        assert_eq!(PeerPath::parse("/v1/models"), None);
    }

    #[test]
    fn healthz_shape_and_go_defaults() {
        let h = Healthz::new(50, false);
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"status":"degraded","load":0.25,"pending":50,"vllm_healthy":false}"#
        );
        assert_eq!(Healthz::new(400, true).load, 1.0);
        assert_eq!(Healthz::new(-1, true).load, 0.0);
        let go: Healthz = serde_json::from_str(r#"{"status":"ok"}"#).unwrap();
        assert_eq!((go.load, go.vllm_healthy), (0.0, true));
    }
}
