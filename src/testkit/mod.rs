//! Stand-ins for what loraplex talks to, used by the built-in demo (`loraplex demo`) and by
//! every integration test. Each one is a real server on a real socket (`127.0.0.1:0` by
//! default) running on tokio, with counters for assertions; dropping its handle stops it.
//!
//! - [`adapters`]: generates PEFT LoRA adapters like a fine-tuning job leaves them
//!   (`adapter_config.json` as PEFT writes it, `adapter_model.safetensors` written by the
//!   reference `safetensors` crate with deterministic data from a seed), plus broken variants
//!   ([`adapters::Defect`]) and an independent wholeness check ([`adapters::check_safetensors`]).
//! - [`vllm`]: a stand-in vLLM. Resolves adapters from a directory exactly as vLLM 0.32's
//!   `lora_filesystem_resolver` does (config checks, `--model` match, 404/400/500 with vLLM's
//!   bodies, a name cached until `POST /v1/unload_lora_adapter`), checks the weights are whole
//!   and prints their hash in every answer, so a test can tell new weights from old ones.
//!   Streams SSE like vLLM, paced per server or per request. Serves several names for the base
//!   model apart from `--model`, reads weights pushed out of its CPU LoRA cache again, closes
//!   idle keep-alive connections after 5 s, and answers multipart speech-to-text forms
//!   ([`vllm_audio`]). Its engine ([`vllm_engine`]) models the batch, the queue and the LoRA
//!   slots, and exports vLLM's `/metrics`. Carries the transparency probes of [`probes`] (echo,
//!   framing, status, slow) for proxy tests.
//! - [`origin`]: a stand-in HTTP origin serving `{prefix}/{name}/{file}` like nginx (ETag,
//!   Range, HEAD, 404), with GET counts per path, runtime content replacement, a bearer token,
//!   throttling and injected faults (error status, cut after K bytes, stall, per-request
//!   throttle).
//! - [`hub`]: a stand-in Hugging Face Hub (revision API, `/resolve/` redirects to a CDN on the
//!   same or another origin, `X-Linked-*` headers, Range, token check, faults).
//! - [`server`], [`wire`] and [`response`]: the small HTTP/1.1 server under both, written on tokio rather
//!   than hyper so a stand-in controls framing byte by byte and sees requests exactly as sent.
//!
//! Starting: `VllmStandIn::start(config)` / `OriginStandIn::start(config)` inside a tokio
//! runtime (`#[tokio::test]`), or `start_on(&handle, config)` from any thread with a
//! `tokio::runtime::Handle` (the demo uses the control plane's). Both return `io::Result`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use loraplex::testkit::{adapters::{AdapterSpec, write_adapter}, vllm::{VllmConfig, VllmStandIn}};
//! let dir = tempfile::tempdir()?;
//! write_adapter(dir.path(), "acme/sum", &AdapterSpec::new("base", 64 * 1024, 1))?;
//! let vllm = VllmStandIn::start(VllmConfig::new("base").lora_dir(dir.path()))?;
//! // POST {vllm.url()}/v1/chat/completions {"model":"acme/sum",...} → 200, resolved once.
//! # Ok(()) }
//! ```

pub mod adapters;
pub mod hub;
pub mod origin;
pub mod origin_faults;
pub mod probes;
pub mod range;
pub mod response;
pub mod server;
pub mod vllm;
pub mod vllm_api;
pub mod vllm_audio;
pub mod vllm_engine;
pub mod vllm_resolve;
mod vllm_routes;
pub mod wire;

pub use adapters::{AdapterSpec, Defect, ModelDims, Weights, check_safetensors, write_adapter};
pub use origin::{Fault, FaultKind, OriginConfig, OriginStandIn};
pub use vllm::{Refusal, VllmConfig, VllmFault, VllmStandIn};
