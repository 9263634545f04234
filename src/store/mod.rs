//! The adapter store (being built): adapter names so far.

pub mod name;

pub use name::AdapterName;
