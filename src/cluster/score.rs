//! The cost model of the routing decision: how long a request would wait for its first token on
//! a node, in milliseconds, from what the node's vLLM reported and what this worker sent it since.
//!
//! cost = residency + queue:
//! - residency: 0 when the adapter is likely in a GPU slot; a slot load ([`SLOT_LOAD_MS`]) when
//!   it is on the node's disk, plus the wait for a slot when every slot serves a running
//!   request; plus a copy from a peer ([`COPY_MS`]) when only another node has it on disk, or a
//!   fetch from the origin ([`FETCH_MS`]) when none has;
//! - queue: the requests ahead of it beyond the running batch (running + waiting + sent since
//!   the sample, counted for every entry node, minus the batch), each taking `1 / capacity`;
//!   plus a penalty as the KV cache fills past 90%.
//!
//! A node whose metrics are unknown or stale has no cost ([`None`]): the caller gives it the
//! mean of the others (neutral, never "idle"). The figures are estimates that only need to order
//! nodes the way the real waits would; `docs/routing.md` says how they were chosen.

use super::view::BackendState;

/// A forward hop (measured ~1 ms p50 on loopback; kept above it so near-ties stay local).
pub const HOP_MS: f32 = 2.0;
/// An adapter entering a GPU slot (vLLM stalls its engine meanwhile).
pub const SLOT_LOAD_MS: f32 = 150.0;
/// Copying an adapter from a peer's disk over the LAN.
pub const COPY_MS: f32 = 300.0;
/// Fetching an adapter from its origin.
pub const FETCH_MS: f32 = 2000.0;
/// Service time assumed while a node's capacity is not learnt yet.
pub const DEFAULT_SERVICE_MS: f32 = 1000.0;
/// KV-cache use above which the cache counts as filling.
pub const KV_FULL: f32 = 0.9;

/// Where an adapter is, seen from one candidate node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Likely in one of its GPU slots.
    Gpu,
    /// On its disk.
    Disk,
    /// On another node's disk only.
    PeerDisk,
    /// Nowhere in the cluster.
    Origin,
}

/// Milliseconds one request takes off the queue on this backend (its service time over its
/// batch), from what is learnt.
fn per_request_ms(b: &BackendState) -> f32 {
    if b.capacity > 0.0 {
        1000.0 / b.capacity
    } else {
        DEFAULT_SERVICE_MS / b.batch.max(1.0)
    }
}

/// Mean service time of one request on this backend.
fn service_ms(b: &BackendState) -> f32 {
    if b.capacity > 0.0 && b.batch > 0.0 {
        1000.0 * b.batch / b.capacity
    } else {
        DEFAULT_SERVICE_MS
    }
}

/// Waiting time behind the queue, `ahead`: requests sent there since its sample (all entry
/// nodes). `None` when the metrics are unknown.
pub fn queue_ms(b: &BackendState, ahead: f32) -> Option<f32> {
    if !b.known {
        return None;
    }
    let batch = if b.batch > 0.0 {
        b.batch
    } else if b.waiting > 0.0 {
        b.running.max(1.0)
    } else {
        f32::INFINITY
    };
    let excess = (b.running + b.waiting + ahead + 1.0 - batch).max(0.0);
    let kv = if b.kv > KV_FULL {
        (b.kv - KV_FULL) / (1.0 - KV_FULL) * service_ms(b)
    } else {
        0.0
    };
    Some(excess * per_request_ms(b) + kv)
}

/// Cost of getting the adapter servable on this backend. Unknown metrics count the adapter as
/// on disk without a slot wait.
pub fn residency_ms(b: &BackendState, residency: Residency) -> f32 {
    let slot_wait = if b.known && b.max_lora > 0 && b.lora_busy >= b.max_lora {
        service_ms(b)
    } else {
        0.0
    };
    match residency {
        Residency::Gpu => 0.0,
        Residency::Disk => SLOT_LOAD_MS + slot_wait,
        Residency::PeerDisk => COPY_MS + SLOT_LOAD_MS + slot_wait,
        Residency::Origin => FETCH_MS + SLOT_LOAD_MS + slot_wait,
    }
}

/// The load of a node in 0..=1 for the hard shed limit (`routing.overflow_threshold`), for a
/// request for `adapter` (xxh3; `None`: the base model): the highest of loraplex's own requests
/// in flight over 200 (`proxy_load`), vLLM's waiting queue over its running batch, and 1 when
/// the adapter would wait for a LoRA slot there (not in one, every slot serving running
/// requests, requests already waiting).
pub fn shed_load(b: &BackendState, proxy_load: f64, adapter: Option<u64>) -> f64 {
    if !b.known {
        return proxy_load;
    }
    let queue = f64::from(b.waiting) / f64::from(b.running.max(1.0));
    // The slot lookup last: a rare key's decision mostly stops at the cheap compares.
    let no_slot = adapter.is_some_and(|a| {
        b.max_lora > 0 && b.lora_busy >= b.max_lora && b.waiting > 0.0 && !b.gpu_has(a)
    });
    proxy_load
        .max(queue.min(1.0))
        .max(if no_slot { 1.0 } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(running: f32, waiting: f32) -> BackendState {
        BackendState {
            known: true,
            healthy: true,
            running,
            waiting,
            batch: 8.0,
            capacity: 16.0,
            max_lora: 4,
            ..BackendState::default()
        }
    }

    #[test]
    fn queue_cost_grows_past_the_batch_and_with_what_was_sent() {
        let idle = backend(2.0, 0.0);
        assert_eq!(queue_ms(&idle, 0.0), Some(0.0));
        let full = backend(8.0, 4.0);
        // 5 ahead beyond the batch, 62.5 ms each.
        assert_eq!(queue_ms(&full, 0.0), Some(5.0 * 62.5));
        assert_eq!(queue_ms(&idle, 10.0), Some(5.0 * 62.5));
        let unknown = BackendState::default();
        assert_eq!(queue_ms(&unknown, 0.0), None);
        let mut kv = backend(2.0, 0.0);
        kv.kv = 0.95;
        assert!(queue_ms(&kv, 0.0).unwrap() > 200.0);
    }

    #[test]
    fn residency_orders_gpu_disk_peer_origin_and_full_slots_cost_more() {
        let b = backend(2.0, 0.0);
        let costs: Vec<f32> = [
            Residency::Gpu,
            Residency::Disk,
            Residency::PeerDisk,
            Residency::Origin,
        ]
        .iter()
        .map(|&r| residency_ms(&b, r))
        .collect();
        assert!(costs.windows(2).all(|w| w[0] < w[1]), "{costs:?}");
        let mut busy = b.clone();
        busy.lora_busy = 4;
        assert!(residency_ms(&busy, Residency::Disk) > residency_ms(&b, Residency::Disk));
        assert_eq!(residency_ms(&busy, Residency::Gpu), 0.0);
    }

    #[test]
    fn shed_load_reads_the_queue_and_the_slots() {
        assert_eq!(shed_load(&backend(8.0, 0.0), 0.1, None), 0.1);
        assert_eq!(shed_load(&backend(8.0, 8.0), 0.1, None), 1.0);
        assert_eq!(shed_load(&backend(8.0, 2.0), 0.0, None), 0.25);
        assert_eq!(shed_load(&BackendState::default(), 0.3, Some(1)), 0.3);
        // Every slot busy and a queue: an adapter not in a slot would wait for one.
        let mut full = backend(8.0, 1.0);
        full.lora_busy = 4;
        full.gpu = std::sync::Arc::from([7]);
        assert_eq!(shed_load(&full, 0.0, Some(9)), 1.0);
        assert_eq!(shed_load(&full, 0.0, Some(7)), 0.125, "in a slot already");
        assert_eq!(
            shed_load(&full, 0.0, None),
            0.125,
            "the base model needs no slot"
        );
    }
}
