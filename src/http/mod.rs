//! HTTP/1.1 codec: what the proxy needs and nothing more.
//!
//! - [`head`]: request and response heads (parsed by `httparse`), framing (RFC 9112 §6),
//!   hop-by-hop headers (RFC 9110 §7.6.1), serialising a head for the next hop.
//! - [`chunked`]: a streaming chunked-transfer decoder (decode or just find the end).
//! - [`model`]: the top-level `"model"` of an OpenAI JSON body, and rewriting it.
//! - [`multipart`]: the `model` field of a `multipart/form-data` body, and rewriting it.
//! - [`response`]: small answers of the proxy's own (errors, JSON, text).
//! - [`constant_time_eq`]: comparing a token a request carries with the configured secret.
//!
//! Heads are parsed once into spans over an immutable `Bytes`; nothing on the hot path copies a
//! header.

pub mod chunked;
pub mod head;
pub mod model;
pub mod multipart;
pub mod response;

pub use head::{BodyKind, Method, ParsedResponse, RequestHead, ResponseHead};

/// Compare secrets without an early exit that would leak the matching prefix length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
