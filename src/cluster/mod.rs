//! The cluster: which node serves a request.
//!
//! - [`hashkey`]: a request's hash key (`routing.hash_on`).
//! - [`placement`]: a key onto the peer set (owner, then fallbacks).
//! - [`pools`]: which base models the cluster serves (base-model pools), for the view.
//! - [`identity`]: this node's address, and whether a peer entry is this node.
//! - [`discovery`]: the peer set (static, shared directory, Kubernetes).
//! - [`topology`]: the current peers, their placement and health.
//! - [`view`]: what the decision reads of every node's vLLM, and the replica counts of hot keys.
//! - [`score`]: the cost model (residency + queue, in milliseconds to the first token).
//! - [`router`]: the routing decision under `routing.policy`.
//! - [`disk_filter`]: a node's disk set as a segmented Bloom filter for its peers.
//! - [`demand`]: requests per key entering this node, counted per worker, as rates.
//! - [`state`]: the local vLLM's samples, the peers' states and the demand merged into the
//!   view; replica counts of hot keys; this node's state for its peers.
//! - [`protocol`]: what nodes say to each other (headers, trust, `/healthz`, adapter copies) and
//!   the one peer HTTP client.
//! - [`peering`]: control-plane work: rebuilds on membership changes, peer health, evict broadcast.

pub mod demand;
pub mod discovery;
pub mod disk_filter;
pub mod hashkey;
pub mod identity;
pub mod peering;
pub mod placement;
pub mod pools;
pub mod protocol;
pub mod router;
pub mod score;
pub mod state;
pub mod topology;
pub mod view;
