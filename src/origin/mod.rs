//! Origins: where adapters come from.
//!
//! (Provisional on the `origins` branch: the origin interface, `OriginChain` and the `http` and
//! `file` origins come from the store branch; this file only declares the remote origins.)
//!
//! - [`transfer`]: failure classes and the retry schedule shared by remote origins.
//! - [`digest`]: SHA-256 computed on another thread, beside the transfer.
//! - [`download`]: one adapter download: manifest, resumable and verified file bodies, metrics.
//! - [`huggingface`]: the Hugging Face Hub (`type: huggingface`).
//! - [`s3`]: S3 and S3-compatible stores (`type: s3`).

pub mod digest;
pub mod download;
pub mod huggingface;
pub mod s3;
pub mod transfer;
