//! The cluster: which node serves a request.
//!
//! - [`hashkey`]: a request's hash key (`routing.hash_on`).
//! - [`placement`]: a key onto the peer set (owner, then fallbacks).
//! - [`identity`]: this node's address, and whether a peer entry is this node.
//! - [`discovery`]: the peer set (static, shared directory, Kubernetes).

pub mod discovery;
pub mod hashkey;
pub mod identity;
pub mod placement;
