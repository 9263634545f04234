//! Test servers shared by the integration tests and the benchmarks.

pub mod s3;
