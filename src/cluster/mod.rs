//! The cluster: which node serves a request. [`hashkey`] turns a request into its hash key
//! (`routing.hash_on`); [`placement`] maps a key onto the peer set (owner and fallbacks).

pub mod hashkey;
pub mod placement;
