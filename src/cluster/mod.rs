//! The cluster: peer discovery and this node's identity (placement, hash keys and forwarding join here).
pub mod discovery;
pub mod identity;
