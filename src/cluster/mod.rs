//! The cluster: which node serves a request.
//!
//! - [`hashkey`]: a request's hash key (`routing.hash_on`).
//! - [`placement`]: a key onto the peer set (owner, then fallbacks).
//! - [`identity`]: this node's address, and whether a peer entry is this node.
//! - [`discovery`]: the peer set (static, shared directory, Kubernetes).
//! - [`router`]: the topology snapshot and the routing decision (owner, overflow, dead peers).
//! - [`protocol`]: what nodes say to each other (headers, trust, `/healthz`, adapter copies) and
//!   the one peer HTTP client.
//! - [`peering`]: control-plane work: rebuilds on membership changes, peer health, evict broadcast.

pub mod discovery;
pub mod hashkey;
pub mod identity;
pub mod peering;
pub mod placement;
pub mod protocol;
pub mod router;
