//! Placement: which node of the cluster owns a hash key, and which nodes come next when the
//! owner is dead or overloaded.
//!
//! # Contract
//!
//! - Every node computes the same answer from the same peer *set*: input order and duplicates
//!   do not matter, and nothing depends on the history of joins and leaves.
//! - When any one peer leaves (first, middle or last), only the keys it owned move, and they
//!   spread over the others; when a peer joins, only the keys it now owns move, all to it.
//! - Load is as even as hashing allows.
//! - [`Placement::owner`] costs one xxh3 of the key, one table record read and a few
//!   multiplies; [`Placement::order`] (the fallback walk) is cheap for its first entries.
//!
//! # Scheme
//!
//! Rendezvous (highest random weight) hashing: a key goes to the peer with the highest
//! `score(key, peer)`, its fallback order is the peers by decreasing score. The key's xxh3
//! picks one of 2^[`SLOT_BITS`] slots; each peer is *hot* in one slot of every block of 64, and
//! the score ranks the hot peers of the key's slot first. The slot table (`table.rs`; 8 scores
//! at once with AVX-512 in `simd.rs`, equal to the portable ones) caches per slot the few peers
//! that can win. Why this scheme, the alternatives tried and the measured figures:
//! `docs/placement.md`.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use self::table::{SlotTable, pack, unpack};

#[cfg(target_arch = "x86_64")]
mod simd;
mod table;

#[cfg(target_arch = "x86_64")]
fn simd_available() -> bool {
    simd::available()
}

#[cfg(not(target_arch = "x86_64"))]
fn simd_available() -> bool {
    false
}

/// log2 of the slot count.
pub const SLOT_BITS: u32 = 18;
const SLOTS: usize = 1 << SLOT_BITS;
/// log2 of the block length; each peer is hot in exactly one slot per block.
const HOT_BLOCK_BITS: u32 = 6;
const HOT_BLOCK: usize = 1 << HOT_BLOCK_BITS;
const BLOCKS: usize = SLOTS / HOT_BLOCK;

/// Most distinct peers a placement holds (indices are stored as `u16`, one value is kept for
/// tie-breaking arithmetic). Beyond it the peers last in sort order are left out, the same
/// ones on every node, and a warning is logged.
pub const MAX_PEERS: usize = u16::MAX as usize;

// Independent hash families per use, derived from the peer's address hash.
const SALT_HOT: u64 = 0x6c6f_7261_706c_6578; // "loraplex"
const SALT_KEY: u64 = 0x9e37_79b9_7f4a_7c15;
const SALT_SLOT: u64 = 0xd6e8_feb8_6659_fd93;

/// Peers and the slot table, immutable once built; share it in an `Arc` and swap the `Arc`
/// when membership changes.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Sorted, deduplicated canonical addresses.
    peers: Vec<String>,
    /// `xxh3(address)`: seeds the slot-level score.
    slot_seeds: Vec<u64>,
    /// Seeds the hot-slot choice.
    hot_seeds: Vec<u64>,
    /// Seeds the key-level score: an xor mask and an odd multiplier.
    key_seeds: Vec<[u64; 2]>,
    /// The CPU scores 8 candidates at once (`simd.rs`).
    avx512: bool,
    /// Per slot: its hot peers (ascending), or its single slot-level winner when no peer is
    /// hot there. Empty when there are no peers.
    table: SlotTable,
    /// Per slot with fewer than [`TAIL_CACHE`] hot peers: the first [`TAIL_CACHE`] peers of its
    /// order past the hot ones (they depend on the slot only), [`NO_PEER`] past the last peer.
    /// [`Placement::top`] reads them instead of scoring every peer.
    tails: Box<[[u16; TAIL_CACHE]]>,
}

/// Order entries past a slot's hot peers cached per slot: the routing decision asks for a key's
/// first 3 nodes (a rare key) or its first k (a hot key over k replicas), and a slot has about
/// `peers / 64` hot peers, so at 64 peers most keys need 2-3 of them. 2 MiB per placement.
pub const TAIL_CACHE: usize = 4;
/// Padding of [`Placement::tails`].
const NO_PEER: u16 = u16::MAX;

/// The murmur3 64-bit finalizer: a full-avalanche mix, for seeds and slot-level scores.
#[inline]
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[inline]
fn slot_of(key_hash: u64) -> usize {
    (key_hash >> (64 - SLOT_BITS)) as usize
}

/// The one slot of `block` that the peer with `hot_seed` is hot in.
#[inline]
fn hot_slot(hot_seed: u64, block: usize) -> usize {
    let pick = xxh3_64_with_seed(&(block as u32).to_le_bytes(), hot_seed);
    block * HOT_BLOCK + (pick as usize & (HOT_BLOCK - 1))
}

impl Placement {
    /// Build the placement for a peer set (canonical address strings). Order and duplicates
    /// in `peers` do not matter.
    pub fn build(peers: &[String]) -> Placement {
        let mut peers = peers.to_vec();
        peers.sort_unstable();
        peers.dedup();
        if peers.len() > MAX_PEERS {
            tracing::warn!(
                peers = peers.len(),
                kept = MAX_PEERS,
                "too many peers for placement; the last ones in address order get no keys"
            );
            peers.truncate(MAX_PEERS);
        }
        let slot_seeds: Vec<u64> = peers.iter().map(|p| xxh3_64(p.as_bytes())).collect();
        let hot_seeds: Vec<u64> = slot_seeds.iter().map(|s| fmix64(s ^ SALT_HOT)).collect();
        let key_seeds: Vec<[u64; 2]> = slot_seeds
            .iter()
            .map(|s| [fmix64(s ^ SALT_KEY), fmix64(s ^ SALT_SLOT) | 1])
            .collect();
        let mut placement = Placement {
            peers,
            slot_seeds,
            hot_seeds,
            key_seeds,
            avx512: simd_available(),
            table: SlotTable::default(),
            tails: Box::default(),
        };
        if !placement.peers.is_empty() {
            placement.fill_table();
        }
        placement
    }

    /// Counting sort of every peer's hot slots into per-slot candidate lists; slots nobody is
    /// hot in get their slot-level winner.
    fn fill_table(&mut self) {
        let mut counts = vec![0u32; SLOTS];
        for &seed in &self.hot_seeds {
            for block in 0..BLOCKS {
                counts[hot_slot(seed, block)] += 1;
            }
        }
        let mut offsets = Vec::with_capacity(SLOTS + 1);
        let mut total = 0u32;
        offsets.push(0);
        for &c in &counts {
            total += c.max(1);
            offsets.push(total);
        }
        let mut candidates = vec![0u16; total as usize];
        let mut cursor: Vec<u32> = offsets[..SLOTS].to_vec();
        // Ascending peer index, so each list comes out sorted.
        for (index, &seed) in self.hot_seeds.iter().enumerate() {
            for block in 0..BLOCKS {
                let slot = hot_slot(seed, block);
                candidates[cursor[slot] as usize] = index as u16;
                cursor[slot] += 1;
            }
        }
        // The tail caches of the slots with few hot peers; a slot nobody is hot in gets its
        // tail's first as its slot-level winner.
        let mut tails = vec![[NO_PEER; TAIL_CACHE]; SLOTS].into_boxed_slice();
        for (slot, &count) in counts.iter().enumerate() {
            if count as usize >= TAIL_CACHE {
                continue;
            }
            let start = offsets[slot] as usize;
            let hot = &candidates[start..start + count as usize];
            let (mut top, mut len) = ([0u64; MAX_TOP], 0);
            let mut hot = hot.iter().map(|&i| usize::from(i)).peekable();
            for i in 0..self.peers.len() {
                if hot.next_if_eq(&i).is_none() {
                    insert_ranked(&mut top, &mut len, TAIL_CACHE, self.slot_rank(slot, i));
                }
            }
            for (t, r) in tails[slot].iter_mut().zip(&top[..len]) {
                *t = unpack(*r) as u16;
            }
            if count == 0 {
                candidates[start] = tails[slot][0];
            }
        }
        self.tails = tails;
        self.table = SlotTable::new(&offsets, &candidates);
    }

    /// Slot-level score of peer `index` for `slot`, packed. (The peer side is already an
    /// xxh3; one finalizer round over it and the slot number is a full-avalanche score, and
    /// three times cheaper than a seeded xxh3 call, which the fallback walk pays per peer.)
    #[inline]
    fn slot_rank(&self, slot: usize, index: usize) -> u64 {
        let score = fmix64(self.slot_seeds[index] ^ (slot as u64).wrapping_mul(SALT_SLOT));
        pack(score, index)
    }

    /// Key-level score of peer `index` for a key hash, packed.
    #[inline]
    fn key_rank(&self, key_hash: u64, index: usize) -> u64 {
        let [mask, mul] = self.key_seeds[index];
        // One 64-bit multiply: the key hash is already an xxh3, the per-peer mask and odd
        // multiplier make the candidates' scores independent, and `pack` keeps the product's
        // high bits, the well-mixed ones. AVX-512 computes the same 8 at once (`simd.rs`).
        pack((key_hash ^ mask).wrapping_mul(mul), index)
    }

    fn slot_candidates(&self, slot: usize) -> &[u16] {
        self.table.candidates(slot)
    }

    /// Whether the slot's candidate list holds hot peers (rather than one slot-level winner).
    fn slot_is_hot(&self, slot: usize) -> bool {
        match self.slot_candidates(slot) {
            [only] => hot_slot(self.hot_seeds[*only as usize], slot / HOT_BLOCK) == slot,
            _ => true,
        }
    }

    /// The peers, sorted and deduplicated; indices returned by [`owner`](Self::owner) and
    /// [`order`](Self::order) point into this.
    pub fn peers(&self) -> &[String] {
        &self.peers
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Index of `peer` (a canonical address), if it is a member.
    pub fn index_of(&self, peer: &str) -> Option<usize> {
        self.peers.binary_search_by(|p| p.as_str().cmp(peer)).ok()
    }

    /// The peer owning `key`; `None` when there are no peers.
    #[inline]
    pub fn owner(&self, key: &[u8]) -> Option<usize> {
        self.owner_of_hash(xxh3_64(key))
    }

    /// [`Placement::owner`] without SIMD.
    fn owner_portable(&self, key_hash: u64, slot: usize) -> Option<usize> {
        self.table
            .best(slot, |i| self.key_rank(key_hash, usize::from(i)))
    }

    /// Bytes held by the slot table (what a placement costs beyond its peer list).
    pub fn table_bytes(&self) -> usize {
        self.table.bytes() + self.tails.len() * TAIL_CACHE * 2
    }

    /// Every peer once, by decreasing score for `key`: the owner first, then the peer that
    /// would own the key if the owner left, and so on. The first entries are cheap; the walk
    /// past the slot's hot peers scores all remaining peers once.
    pub fn order(&self, key: &[u8]) -> Order<'_> {
        let key_hash = xxh3_64(key);
        let mut head = Vec::new();
        let mut slot = 0;
        if !self.peers.is_empty() {
            slot = slot_of(key_hash);
            if self.slot_is_hot(slot) {
                head = self
                    .slot_candidates(slot)
                    .iter()
                    .map(|&i| self.key_rank(key_hash, i as usize))
                    .collect();
                head.sort_unstable_by(|a, b| b.cmp(a));
            }
        }
        Order {
            placement: self,
            slot,
            head,
            tail_top: None,
            tail: None,
            pos: 0,
        }
    }
}

/// Most entries [`Placement::top`] gives.
pub const MAX_TOP: usize = 16;

/// Insert packed rank `v` into `top[..*len]`, kept in decreasing order and at most `cap` long.
#[inline]
fn insert_ranked(top: &mut [u64; MAX_TOP], len: &mut usize, cap: usize, v: u64) {
    if *len == cap && v <= top[cap - 1] {
        return;
    }
    let mut at = (*len).min(cap - 1);
    while at > 0 && top[at - 1] < v {
        top[at] = top[at - 1];
        at -= 1;
    }
    top[at] = v;
    *len = (*len + 1).min(cap);
}

impl Placement {
    /// The first `out.len()` (at most [`MAX_TOP`]) entries of [`order`](Self::order) for a
    /// key hashed with xxh3, written into `out`; returns how many. Allocates nothing: the routing
    /// decision calls it on every routed request with a key. [`top_where`](Self::top_where)
    /// keeping every peer.
    #[inline]
    pub fn top(&self, key_hash: u64, out: &mut [u16]) -> usize {
        self.top_where(key_hash, out, |_| true)
    }

    /// The first `out.len()` (at most [`MAX_TOP`]) entries of [`order`](Self::order) among the
    /// peers `keep` accepts (the nodes of a base-model pool), written into `out`; returns how
    /// many. The same peers in the same order as `order(key).filter(keep)`, so every node agrees
    /// on a key's owner within a pool, and a peer joining or leaving a pool moves only the keys
    /// it owns there. Allocates nothing: the slot's hot peers, then its cached tail when enough
    /// of it is kept, else one pass scoring the kept peers.
    pub fn top_where(&self, key_hash: u64, out: &mut [u16], keep: impl Fn(usize) -> bool) -> usize {
        let cap = out.len().min(MAX_TOP).min(self.peers.len());
        if cap == 0 {
            return 0;
        }
        let slot = slot_of(key_hash);
        let hot: &[u16] = if self.slot_is_hot(slot) {
            self.slot_candidates(slot)
        } else {
            &[]
        };
        let (mut ranks, mut len) = ([0u64; MAX_TOP], 0);
        for i in hot.iter().map(|&i| usize::from(i)).filter(|&i| keep(i)) {
            insert_ranked(&mut ranks, &mut len, cap, self.key_rank(key_hash, i));
        }
        for (o, r) in out.iter_mut().zip(&ranks[..len]) {
            *o = unpack(*r) as u16;
        }
        let mut n = len;
        if n == cap {
            return n;
        }
        // The cached tail is the order's next entries: enough when it holds the rest.
        if hot.len() < TAIL_CACHE
            && let Some(tail) = self.tails.get(slot)
        {
            let mut exhausted = false;
            for &t in tail {
                if t == NO_PEER {
                    exhausted = true;
                    break;
                }
                if keep(usize::from(t)) {
                    out[n] = t;
                    n += 1;
                    if n == cap {
                        return n;
                    }
                }
            }
            if exhausted {
                return n;
            }
            n = len;
        }
        // The rest by slot-level rank among the kept, skipping the hot ones (both ascending).
        let (mut tail, mut tlen) = ([0u64; MAX_TOP], 0);
        let mut hot = hot.iter().map(|&i| usize::from(i)).peekable();
        for i in 0..self.peers.len() {
            if hot.next_if_eq(&i).is_some() || !keep(i) {
                continue;
            }
            insert_ranked(&mut tail, &mut tlen, cap - n, self.slot_rank(slot, i));
        }
        for r in &tail[..tlen] {
            out[n] = unpack(*r) as u16;
            n += 1;
        }
        n
    }

    /// The owner of a key hashed with xxh3 (see [`owner`](Self::owner)).
    #[inline]
    pub fn owner_of_hash(&self, key_hash: u64) -> Option<usize> {
        if self.peers.is_empty() {
            return None;
        }
        let slot = slot_of(key_hash);
        #[cfg(target_arch = "x86_64")]
        if self.avx512
            && let Some(record) = self.table.record8(slot)
        {
            // SAFETY: AVX-512F/DQ were detected at build; the table only holds indices of
            // `peers`, which `key_seeds` matches one to one.
            return Some(unpack(unsafe {
                simd::best8(record, key_hash, &self.key_seeds)
            }));
        }
        self.owner_portable(key_hash, slot)
    }
}

/// Tail entries found by one selection pass on the first step past the slot's hot peers; a
/// walk going further sorts the whole tail.
const TAIL_CHUNK: usize = 8;

/// Iterator returned by [`Placement::order`]. Yields peer indices.
#[derive(Debug)]
pub struct Order<'a> {
    placement: &'a Placement,
    slot: usize,
    /// Packed key-level ranks of the slot's hot peers, best first.
    head: Vec<u64>,
    /// The best [`TAIL_CHUNK`] packed slot-level ranks of the other peers, best first.
    tail_top: Option<Vec<u64>>,
    /// All of them, best first: only for walks past `tail_top`.
    tail: Option<Vec<u64>>,
    /// Entries yielded so far.
    pos: usize,
}

impl Order<'_> {
    /// Packed slot-level ranks of the peers not in the head.
    fn tail_ranks(&self) -> impl Iterator<Item = u64> + '_ {
        let (placement, slot) = (self.placement, self.slot);
        let hot = if self.head.is_empty() {
            &[]
        } else {
            placement.slot_candidates(slot)
        };
        // Both ascending: skip the hot ones merge-style.
        let mut hot = hot.iter().map(|&i| usize::from(i)).peekable();
        (0..placement.peers.len())
            .filter(move |&i| hot.next_if_eq(&i).is_none())
            .map(move |i| placement.slot_rank(slot, i))
    }

    /// Tail entry `at`. Packed ranks are unique, so the selection and the sort agree.
    fn tail_entry(&mut self, at: usize) -> Option<u64> {
        if at < TAIL_CHUNK {
            if self.tail_top.is_none() {
                // One pass keeping the best few: after the first entries a new one rarely
                // qualifies, so the branch is predictable and nothing else is allocated.
                let (mut top, mut len) = ([0u64; TAIL_CHUNK], 0);
                for v in self.tail_ranks() {
                    if len < TAIL_CHUNK || v > top[TAIL_CHUNK - 1] {
                        // Insertion into the sorted prefix, dropping the last when full.
                        let mut at = len.min(TAIL_CHUNK - 1);
                        while at > 0 && top[at - 1] < v {
                            top[at] = top[at - 1];
                            at -= 1;
                        }
                        top[at] = v;
                        len = (len + 1).min(TAIL_CHUNK);
                    }
                }
                self.tail_top = Some(top[..len].to_vec());
            }
            return self.tail_top.as_ref()?.get(at).copied();
        }
        if self.tail.is_none() {
            let mut tail: Vec<u64> = self.tail_ranks().collect();
            tail.sort_unstable_by(|a, b| b.cmp(a));
            self.tail = Some(tail);
        }
        self.tail.as_ref()?.get(at).copied()
    }
}

impl Iterator for Order<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let packed = match self.head.get(self.pos) {
            Some(&p) => p,
            None => self.tail_entry(self.pos - self.head.len())?,
        };
        self.pos += 1;
        Some(unpack(packed))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.placement.peers.len() - self.pos;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Order<'_> {}

#[cfg(test)]
mod tests;
