//! Eviction policy: S3-FIFO (Yang et al., SOSP '23), counted in bytes.
//!
//! Why S3-FIFO: a hit only bumps a 2-bit frequency counter that lives in the index entry
//! (an atomic, no lock, no list splice), so the hit path stays lock-free; the queues are touched
//! only on the miss path, under the store's mutex. Why it beats LRU on adapter traffic: most
//! adapters requested once (a one-off eval, a typo'd name) are evicted from the small FIFO
//! before they push out popular ones, and a popular adapter survives in the main FIFO.
//!
//! Sizes: both FIFOs and the ghost list are bounded in bytes, so one 1 GB adapter weighs as
//! much as a hundred 10 MB ones. New adapters enter the small FIFO (10 % of the budget); one
//! hit while there promotes it to the main FIFO; an adapter evicted from the small FIFO leaves
//! a ghost (its name's hash) and comes back straight into the main FIFO if requested again
//! soon. The main FIFO gives each adapter as many second chances as its counter (0-3).
//!
//! Pins: [`S3Fifo::evict`] asks a `claim` callback before taking a victim; an entry that
//! cannot go (a request is in flight) is rotated to the back and the next one is tried. When
//! nothing can be claimed it returns `None` and the caller refuses the new fetch (507).

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, Hash, RandomState},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
};

/// Largest frequency count (2 bits, as in the paper).
const MAX_FREQ: u8 = 3;

/// Something with a frequency counter the hit path bumps without the policy's lock.
pub trait Tracked {
    fn freq(&self) -> &AtomicU8;
}

impl Tracked for AtomicU8 {
    fn freq(&self) -> &AtomicU8 {
        self
    }
}

impl<T: Tracked + ?Sized> Tracked for Arc<T> {
    fn freq(&self) -> &AtomicU8 {
        (**self).freq()
    }
}

/// Record one access (the hit path; lock-free, races only lose a count).
#[inline]
pub fn touch(freq: &AtomicU8) {
    let f = freq.load(Ordering::Relaxed);
    if f < MAX_FREQ {
        freq.store(f + 1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

struct Slot<V> {
    /// Matches the queue node; a node with another id is stale (removed, then re-inserted).
    id: u64,
    size: u64,
    queue: Queue,
    value: V,
}

/// Size-aware S3-FIFO over keys `K` with values `V`.
pub struct S3Fifo<K, V> {
    capacity: u64,
    small_target: u64,
    slots: HashMap<K, Slot<V>>,
    small: VecDeque<(K, u64)>,
    main: VecDeque<(K, u64)>,
    small_bytes: u64,
    main_bytes: u64,
    ghost: VecDeque<(u64, u64)>,
    ghost_set: HashMap<u64, u32>,
    ghost_bytes: u64,
    hasher: RandomState,
    next_id: u64,
}

impl<K: Hash + Eq + Clone, V: Tracked> S3Fifo<K, V> {
    /// A policy for `capacity` bytes (the small FIFO gets a tenth).
    pub fn new(capacity: u64) -> Self {
        S3Fifo {
            capacity,
            small_target: capacity / 10,
            slots: HashMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_bytes: 0,
            main_bytes: 0,
            ghost: VecDeque::new(),
            ghost_set: HashMap::new(),
            ghost_bytes: 0,
            hasher: RandomState::new(),
            next_id: 0,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of all entries.
    pub fn bytes(&self) -> u64 {
        self.small_bytes + self.main_bytes
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.slots.get(key).map(|s| &s.value)
    }

    /// Admit a newly fetched entry: into the main FIFO if its ghost is remembered, else the
    /// small FIFO. Replaces an entry with the same key.
    pub fn insert(&mut self, key: K, size: u64, value: V) {
        let h = self.hasher.hash_one(&key);
        let queue = if self.forget_ghost(h) {
            Queue::Main
        } else {
            Queue::Small
        };
        self.place(key, size, value, queue);
    }

    /// Admit an entry known to be worth keeping (found on disk at startup): main FIFO.
    pub fn insert_main(&mut self, key: K, size: u64, value: V) {
        self.place(key, size, value, Queue::Main);
    }

    fn place(&mut self, key: K, size: u64, value: V, queue: Queue) {
        self.remove(&key);
        self.next_id += 1;
        let id = self.next_id;
        value.freq().store(0, Ordering::Relaxed);
        match queue {
            Queue::Small => {
                self.small.push_back((key.clone(), id));
                self.small_bytes += size;
            }
            Queue::Main => {
                self.main.push_back((key.clone(), id));
                self.main_bytes += size;
            }
        }
        self.slots.insert(
            key,
            Slot {
                id,
                size,
                queue,
                value,
            },
        );
    }

    /// Remove an entry (admin evict, corrupt entry); its queue node goes stale.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.slots.remove(key)?;
        match slot.queue {
            Queue::Small => self.small_bytes -= slot.size,
            Queue::Main => self.main_bytes -= slot.size,
        }
        Some(slot.value)
    }

    /// Change the size of an entry in place (its queue and position stay). `false`: absent.
    pub fn resize(&mut self, key: &K, size: u64) -> bool {
        let Some(slot) = self.slots.get_mut(key) else {
            return false;
        };
        let bytes = match slot.queue {
            Queue::Small => &mut self.small_bytes,
            Queue::Main => &mut self.main_bytes,
        };
        *bytes = *bytes - slot.size + size;
        slot.size = size;
        true
    }

    /// Pick and remove the next victim that `claim` accepts. `None`: nothing can go.
    pub fn evict(&mut self, mut claim: impl FnMut(&K, &V) -> bool) -> Option<(K, V, u64)> {
        let prefer_small = self.small_bytes >= self.small_target || self.main_bytes == 0;
        let order = if prefer_small {
            [Queue::Small, Queue::Main]
        } else {
            [Queue::Main, Queue::Small]
        };
        order.into_iter().find_map(|q| match q {
            Queue::Small => self.evict_small(&mut claim),
            Queue::Main => self.evict_main(&mut claim),
        })
    }

    /// Is the queue node current (not removed or replaced since)?
    fn live(&self, key: &K, id: u64) -> bool {
        self.slots.get(key).is_some_and(|s| s.id == id)
    }

    fn evict_small(&mut self, claim: &mut impl FnMut(&K, &V) -> bool) -> Option<(K, V, u64)> {
        // Each live node is looked at once; promotions and pinned rotations don't loop.
        let mut budget = self.small.len();
        while budget > 0 {
            budget -= 1;
            let (key, id) = self.small.pop_front()?;
            if !self.live(&key, id) {
                continue;
            }
            let slot = self.slots.get_mut(&key).expect("live");
            if slot.value.freq().load(Ordering::Relaxed) > 0 {
                // Requested again while on probation: keep it for real.
                slot.value.freq().store(0, Ordering::Relaxed);
                slot.queue = Queue::Main;
                self.small_bytes -= slot.size;
                self.main_bytes += slot.size;
                self.main.push_back((key, id));
            } else if claim(&key, &slot.value) {
                let slot = self.slots.remove(&key).expect("live");
                self.small_bytes -= slot.size;
                self.remember_ghost(self.hasher.hash_one(&key), slot.size);
                return Some((key, slot.value, slot.size));
            } else {
                self.small.push_back((key, id));
            }
        }
        None
    }

    fn evict_main(&mut self, claim: &mut impl FnMut(&K, &V) -> bool) -> Option<(K, V, u64)> {
        // Up to MAX_FREQ second chances per node, plus one look to claim it.
        let mut budget = self.main.len() * (MAX_FREQ as usize + 1);
        while budget > 0 {
            budget -= 1;
            let (key, id) = self.main.pop_front()?;
            if !self.live(&key, id) {
                continue;
            }
            let slot = self.slots.get(&key).expect("live");
            let f = slot.value.freq().load(Ordering::Relaxed);
            if f > 0 {
                slot.value.freq().store(f - 1, Ordering::Relaxed);
                self.main.push_back((key, id));
            } else if claim(&key, &slot.value) {
                let slot = self.slots.remove(&key).expect("live");
                self.main_bytes -= slot.size;
                return Some((key, slot.value, slot.size));
            } else {
                self.main.push_back((key, id));
            }
        }
        None
    }

    fn remember_ghost(&mut self, h: u64, size: u64) {
        self.ghost.push_back((h, size));
        *self.ghost_set.entry(h).or_default() += 1;
        self.ghost_bytes += size;
        // Ghosts cover about what the main FIFO holds.
        let limit = self.capacity - self.small_target;
        while self.ghost_bytes > limit {
            let Some((old, sz)) = self.ghost.pop_front() else {
                break;
            };
            self.ghost_bytes -= sz;
            self.drop_ghost_ref(old);
        }
    }

    fn drop_ghost_ref(&mut self, h: u64) {
        if let Some(n) = self.ghost_set.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                self.ghost_set.remove(&h);
            }
        }
    }

    /// Was `h` a recent ghost? Forgets it (its FIFO node expires by itself).
    fn forget_ghost(&mut self, h: u64) -> bool {
        self.ghost_set.remove(&h).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell() -> Arc<AtomicU8> {
        Arc::new(AtomicU8::new(0))
    }

    fn fill(p: &mut S3Fifo<u32, Arc<AtomicU8>>, keys: impl Iterator<Item = u32>, size: u64) {
        for k in keys {
            p.insert(k, size, cell());
        }
    }

    #[test]
    fn one_hit_wonders_go_first() {
        let mut p = S3Fifo::new(100);
        fill(&mut p, 0..5, 10);
        // 0 and 1 are requested again while on probation.
        touch(p.get(&0).unwrap().freq());
        touch(p.get(&1).unwrap().freq());
        let mut victims = Vec::new();
        while let Some((k, _, _)) = p.evict(|_, _| true) {
            victims.push(k);
            if victims.len() == 3 {
                break;
            }
        }
        assert_eq!(victims, vec![2, 3, 4]);
        assert_eq!(p.bytes(), 20);
        assert!(p.get(&0).is_some() && p.get(&1).is_some());
    }

    #[test]
    fn ghost_hit_enters_main() {
        let mut p = S3Fifo::new(100);
        fill(&mut p, 0..2, 10);
        assert_eq!(p.evict(|_, _| true).map(|v| v.0), Some(0));
        p.insert(0, 10, cell());
        // 1 (small, unrequested) goes before 0 (back from the ghost list, main).
        assert_eq!(p.evict(|_, _| true).map(|v| v.0), Some(1));
        assert_eq!(p.evict(|_, _| true).map(|v| v.0), Some(0));
        assert!(p.is_empty());
    }

    #[test]
    fn pinned_entries_are_skipped_and_all_pinned_gives_none() {
        let mut p = S3Fifo::new(100);
        fill(&mut p, 0..3, 10);
        let v = p.evict(|k, _| *k != 0).unwrap();
        assert_eq!(v.0, 1);
        assert!(p.evict(|_, _| false).is_none());
        assert_eq!(p.len(), 2);
        assert_eq!(p.evict(|k, _| *k == 0).map(|v| v.0), Some(0));
    }

    #[test]
    fn remove_and_reinsert_leaves_no_stale_victim() {
        let mut p = S3Fifo::new(100);
        fill(&mut p, 0..2, 10);
        assert!(p.remove(&0).is_some());
        p.insert(0, 30, cell());
        assert_eq!(p.bytes(), 40);
        assert_eq!(p.evict(|_, _| true).map(|v| (v.0, v.2)), Some((1, 10)));
        assert_eq!(p.evict(|_, _| true).map(|v| (v.0, v.2)), Some((0, 30)));
        assert_eq!(p.bytes(), 0);
        assert!(p.evict(|_, _| true).is_none());
    }

    #[test]
    fn resize_keeps_the_byte_counts() {
        let mut p = S3Fifo::new(100);
        p.insert(0, 10, cell());
        p.insert_main(1, 20, cell());
        assert!(p.resize(&0, 12) && p.resize(&1, 19));
        assert!(!p.resize(&2, 5));
        assert_eq!(p.bytes(), 31);
        assert_eq!(p.evict(|_, _| true).map(|v| (v.0, v.2)), Some((0, 12)));
        assert_eq!(p.evict(|_, _| true).map(|v| (v.0, v.2)), Some((1, 19)));
        assert_eq!(p.bytes(), 0);
    }

    #[test]
    fn main_gives_second_chances() {
        let mut p = S3Fifo::new(100);
        for k in 0..3 {
            p.insert_main(k, 10, cell());
        }
        touch(p.get(&0).unwrap().freq());
        assert_eq!(p.evict(|_, _| true).map(|v| v.0), Some(1));
        assert_eq!(p.evict(|_, _| true).map(|v| v.0), Some(2));
        assert_eq!(p.evict(|_, _| true).map(|v| v.0), Some(0));
    }
}
