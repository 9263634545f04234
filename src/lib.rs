//! loraplex: an L7 proxy in front of vLLM for clusters serving many LoRA adapters.
//!
//! It proxies every OpenAI endpoint unchanged, makes sure a requested adapter's files are on
//! local disk in the directory vLLM's `lora_filesystem_resolver` reads (fetching them on demand,
//! once, bounded by a disk budget), and routes each request to the node of the cluster that owns
//! its hash key.
//!
//! # Layout
//!
//! Threads: one data-plane worker per core, each with its own monoio runtime (io_uring, epoll
//! fallback) and its own `SO_REUSEPORT` listener; one small tokio runtime, the *control plane*,
//! for the libraries that need tokio (origin clients, discovery, health polling); one storage
//! thread (monoio) that writes fetched adapters with O_DIRECT.
//!
//! Modules, lowest first. The rule: **a module only imports modules listed above it**
//! (`tests/layout.rs` checks it), so the import graph is a DAG that reads top to bottom; a
//! helper a lower module needs moves down, never the other way.
//!
//! - [`error`]: the one error type; knows its HTTP status and OpenAI error `type`.
//! - [`config`]: the YAML file (Go-compatible keys), sizes and durations, the typed
//!   [`config::Config`].
//! - [`metrics`]: the `loraplex_*` Prometheus metrics.
//! - [`shutdown`]: the process-wide graceful-shutdown signal.
//! - [`control`]: the control-plane runtime and the bridge from workers to it.
//! - [`telemetry`]: OpenTelemetry spans (OTLP/HTTP export on the control plane; off unless
//!   `tracing.otlp_endpoint` is set).
//! - [`tls`]: rustls for clients and peer links: certificates and their reload, the TLS
//!   stream over monoio, the listener's sniff-and-handshake, how peers' certificates are
//!   checked.
//! - [`http`]: HTTP/1.1 codec: request/response heads (httparse), body framing, the `model`
//!   field.
//! - [`adapter`]: an adapter's validated name and the files of its directory.
//! - [`server`]: the listeners, worker threads, connection loop and graceful shutdown; runs the
//!   [`server::Handler`] it is given for each request.
//! - [`cluster`]: hash keys, placement, routing decisions, discovery, the peer protocol.
//! - [`origin`]: where adapters come from (HTTP, file, Hugging Face, S3, peers).
//! - [`store`]: the adapter store: index, eviction, single-flight fetch, O_DIRECT writer,
//!   publish.
//! - [`vllm`]: talking to vLLM: the node's backends (`vllm_urls`), each one's health,
//!   base-model names, metrics scrape; loading and unloading adapters.
//! - [`proxy`]: the request pipeline (`process_request`, the server's handler), the upstream
//!   connection pool, the proxy's own endpoints (`/healthz`, `/readyz`, `/metrics`, `/admin/*`,
//!   adapter files for peers).
//! - [`node`]: a running node: builds the parts above in order and serves the proxy.
//! - [`cli`]: command line (Go-compatible flags), subcommands `demo` and `check-config`.
//! - `testkit`: stand-in vLLM and origins, used by the demo and the tests (feature `demo`).
//! - `demo`: the built-in demo (`loraplex demo`; feature `demo`, on by default).
//! - `fuzz_checks`: the properties the fuzz targets check (doc-hidden).

pub mod adapter;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod http;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(feature = "demo")]
pub mod testkit;
pub mod tls;
pub mod vllm;

pub use error::{Error, ErrorKind, Result};
