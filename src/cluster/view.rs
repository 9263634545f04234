//! What the routing decision reads about every node, as one immutable snapshot: each node's vLLM
//! state (queue, KV use, slots, the adapters likely in its GPU slots, its disk set) and each hot
//! key's replica count.
//!
//! The control plane builds a new [`View`] whenever something it learnt changes (a scrape of the
//! local vLLM, a peer's state, a replica recount) and swaps it in; workers read it with one
//! lock-free load per request. Entries are by topology index and carry the topology generation
//! they were built for: a view older than the topology is ignored (routing by hash) until the
//! next one.
//!
//! Per backend: a node fronts one or more vLLMs ([`NodeState::backends`], by position in its
//! `vllm_urls`), each with its base-model names ([`BackendState::models`]) and scored on its
//! own.

use std::sync::Arc;

use super::disk_filter::DiskFilter;

/// One vLLM as last read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendState {
    /// Metrics are fresh (read within a few intervals). When false the figures below are not
    /// used: the node counts as neither busy nor idle.
    pub known: bool,
    pub healthy: bool,
    pub running: f32,
    pub waiting: f32,
    /// KV-cache use, 0..1.
    pub kv: f32,
    /// LoRA slots (`max_lora` from vLLM, else `vllm.max_loras`).
    pub max_lora: u16,
    /// Distinct adapters in its running batch.
    pub lora_busy: u16,
    /// Largest running batch seen while requests waited (0: not seen yet).
    pub batch: f32,
    /// Requests per second it completes when saturated (0: not learnt yet).
    pub capacity: f32,
    /// xxh3 of the adapters likely in its GPU slots, sorted.
    pub gpu: Arc<[u64]>,
    /// Changes with every new sample: requests sent since then are counted on top of it.
    pub seq: u64,
    /// [`pool_hash`](super::hashkey::pool_hash) of its base-model names, sorted; empty: not
    /// learnt yet.
    pub models: Arc<[u64]>,
}

impl BackendState {
    pub fn gpu_has(&self, adapter: u64) -> bool {
        self.gpu.binary_search(&adapter).is_ok()
    }

    /// Whether it serves base model `pool` (0: any).
    #[inline]
    pub fn serves(&self, pool: u64) -> bool {
        pool == 0 || self.models.binary_search(&pool).is_ok()
    }

    /// It can take requests: healthy, or nothing known of it (routed by hash).
    #[inline]
    pub fn up(&self) -> bool {
        !self.known || self.healthy
    }
}

/// One node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeState {
    /// Its vLLMs, by position in its `vllm_urls` (the backend id). Empty: nothing known yet
    /// (read as one unknown backend serving any pool, see [`NodeState::backends`]).
    pub backends: Vec<BackendState>,
    /// Its disk set; `None` until received.
    pub disk: Option<Arc<DiskFilter>>,
}

/// What a node without reported backends counts as: one backend, nothing known.
static UNKNOWN: std::sync::LazyLock<[BackendState; 1]> =
    std::sync::LazyLock::new(|| [BackendState::default()]);

impl NodeState {
    /// Its backends; one unknown backend when none was reported.
    #[inline]
    pub fn backends(&self) -> &[BackendState] {
        if self.backends.is_empty() {
            &UNKNOWN[..]
        } else {
            &self.backends
        }
    }

    /// Its backends serving `pool` (0: all), with their ids. A node that reported none counts
    /// as serving every pool (an unknown node is routed by hash, as before backends were
    /// reported).
    #[inline]
    pub fn serving(&self, pool: u64) -> impl Iterator<Item = (usize, &BackendState)> + Clone {
        let unknown = self.backends.is_empty();
        self.backends()
            .iter()
            .enumerate()
            .filter(move |(_, b)| unknown || b.serves(pool))
    }

    /// Some backend serving `pool` can take requests.
    #[inline]
    pub fn up_for(&self, pool: u64) -> bool {
        self.serving(pool).any(|(_, b)| b.up())
    }

    /// Changes whenever any backend has a new sample (requests sent since are counted on top).
    #[inline]
    pub fn seq(&self) -> u64 {
        self.backends
            .iter()
            .fold(0u64, |s, b| s.wrapping_mul(31).wrapping_add(b.seq))
    }
}

/// Hot keys and their replica counts: a fixed open-addressing table, read without locks. Keys
/// not in it have one replica.
#[derive(Debug, Clone)]
pub struct ReplicaTable {
    slots: Box<[(u64, u8)]>,
}

/// Entries of the replica table (at most half are used).
pub const REPLICA_SLOTS: usize = 256;

impl Default for ReplicaTable {
    fn default() -> Self {
        ReplicaTable {
            slots: vec![(0, 0); REPLICA_SLOTS].into_boxed_slice(),
        }
    }
}

impl ReplicaTable {
    /// A table of `(key hash, replicas)`; keys beyond [`REPLICA_SLOTS`]` / 2` and counts of 1
    /// are left out.
    pub fn build(entries: impl IntoIterator<Item = (u64, u8)>) -> ReplicaTable {
        let mut t = ReplicaTable::default();
        let mut used = 0;
        for (hash, k) in entries {
            if k <= 1 || used >= REPLICA_SLOTS / 2 {
                continue;
            }
            let hash = hash.max(1);
            let mut i = hash as usize % REPLICA_SLOTS;
            while t.slots[i].0 != 0 && t.slots[i].0 != hash {
                i = (i + 1) % REPLICA_SLOTS;
            }
            used += usize::from(t.slots[i].0 == 0);
            t.slots[i] = (hash, k);
        }
        t
    }

    /// Replicas of `hash` (1 unless it is hot).
    #[inline]
    pub fn get(&self, hash: u64) -> usize {
        let hash = hash.max(1);
        let mut i = hash as usize % REPLICA_SLOTS;
        loop {
            match self.slots[i] {
                (0, _) => return 1,
                (h, k) if h == hash => return usize::from(k),
                _ => i = (i + 1) % REPLICA_SLOTS,
            }
        }
    }

    /// The hot keys and their counts.
    pub fn iter(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.slots
            .iter()
            .filter(|(h, _)| *h != 0)
            .map(|&(h, k)| (h, usize::from(k)))
    }
}

/// Everything the decision reads besides the topology.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The topology generation the entries are indexed for.
    pub generation: u64,
    /// By topology index.
    pub nodes: Vec<NodeState>,
    pub replicas: ReplicaTable,
    /// The cluster's base models (pools).
    pub pools: Arc<super::pools::Pools>,
}

impl View {
    /// Whether a backend of some node (by its learnt names) serves base model `pool`.
    pub fn serves(&self, pool: u64) -> bool {
        self.nodes.iter().any(|n| {
            n.backends
                .iter()
                .any(|b| b.models.binary_search(&pool).is_ok())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_table_finds_hot_keys_and_defaults_to_one() {
        let t = ReplicaTable::build((1..=100u64).map(|i| (i * 256, (i % 5) as u8)));
        for i in 1..=100u64 {
            let k = (i % 5) as usize;
            assert_eq!(t.get(i * 256), k.max(1), "{i}");
        }
        assert_eq!(t.get(7), 1);
        assert_eq!(t.get(0), 1);
        let full = ReplicaTable::build((1..=1000u64).map(|i| (i, 3)));
        assert_eq!(full.iter().count(), REPLICA_SLOTS / 2);
        assert_eq!(full.get(5000), 1, "a probe in a half-full table ends");
    }
}
