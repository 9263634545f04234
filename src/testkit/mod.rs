//! Stand-ins for the systems around loraplex (vLLM, origins), on real sockets, used by the
//! demo, the tests and the benchmarks.
//!
//! - [`hub`]: a stand-in Hugging Face Hub (API, `/resolve/` redirects to a CDN, faults).

pub mod hub;
