//! A node's disk set as its peers see it: a Bloom filter over the xxh3 of the adapter names it
//! stores, split into [`SEGMENTS`] segments by the hash's top bits.
//!
//! Segments are sized to their own key count ([`BITS_PER_KEY`], about 1% false positives), so
//! 10,000 adapters cost about 12.5 KiB in all; each segment carries the version at which it last
//! changed, and a poll sends only the segments newer than what the poller has, at most
//! [`SEGMENT_BUDGET`] bytes of them (the rest follow on the next polls). An adapter fetched or
//! evicted therefore costs a peer one segment (under 1 KiB at 10,000 adapters), not the filter.
//!
//! The wire format is ours (words of the bit array, base64, little-endian) so that nodes of
//! different builds agree; probe positions come from the key hash by double hashing.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};

/// Segments of a filter (by the top 4 bits of the key hash).
pub const SEGMENTS: usize = 16;
/// Bits per stored key.
pub const BITS_PER_KEY: usize = 10;
/// Probes per key.
const PROBES: u64 = 5;
/// Bytes of segments (before base64) sent in one poll at most.
pub const SEGMENT_BUDGET: usize = 4096;

/// One segment of a filter; no words: no key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segment {
    /// When it last changed (the sender's counter).
    pub version: u64,
    pub words: Vec<u64>,
}

/// A segmented Bloom filter over 64-bit key hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFilter {
    segments: Vec<Segment>,
}

impl Default for DiskFilter {
    fn default() -> Self {
        DiskFilter {
            segments: vec![Segment::default(); SEGMENTS],
        }
    }
}

fn segment_of(hash: u64) -> usize {
    (hash >> 60) as usize
}

/// The probe positions of `hash` in a segment of `bits` bits.
fn probes(hash: u64, bits: u64) -> impl Iterator<Item = u64> {
    let h1 = hash.rotate_left(17);
    let h2 = hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bits)
}

impl DiskFilter {
    /// A filter holding `hashes` (versions 0).
    pub fn build(hashes: impl IntoIterator<Item = u64>) -> DiskFilter {
        let mut by_segment: Vec<Vec<u64>> = vec![Vec::new(); SEGMENTS];
        for h in hashes {
            by_segment[segment_of(h)].push(h);
        }
        DiskFilter {
            segments: by_segment
                .iter()
                .map(|keys| Segment {
                    version: 0,
                    words: build_segment(keys),
                })
                .collect(),
        }
    }

    /// Whether `hash` may be in the set (false positives about 1%, no false negatives).
    #[inline]
    pub fn contains(&self, hash: u64) -> bool {
        let words = &self.segments[segment_of(hash)].words;
        if words.is_empty() {
            return false;
        }
        let bits = words.len() as u64 * 64;
        probes(hash, bits).all(|p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Bytes of all segments.
    pub fn bytes(&self) -> usize {
        self.segments.iter().map(|s| s.words.len() * 8).sum()
    }

    /// Take `next`'s segments; each whose content changed gets the next value of `counter` as
    /// its version (versions are unique, so a poll can stop between any two). Returns whether
    /// any changed.
    pub fn update_from(&mut self, next: DiskFilter, counter: &mut u64) -> bool {
        let mut changed = false;
        for (mine, new) in self.segments.iter_mut().zip(next.segments) {
            if mine.words != new.words {
                *counter += 1;
                *mine = Segment {
                    version: *counter,
                    words: new.words,
                };
                changed = true;
            }
        }
        changed
    }

    /// The segments a poller that has everything up to version `since` lacks, oldest change
    /// first, up to [`SEGMENT_BUDGET`] bytes (always at least one), and the version the poller
    /// has everything up to once it applied them.
    pub fn delta(&self, since: u64, current: u64) -> (Vec<WireSegment>, u64) {
        let mut newer: Vec<(usize, &Segment)> = self
            .segments
            .iter()
            .enumerate()
            .filter(|(_, s)| s.version > since)
            .collect();
        newer.sort_by_key(|(i, s)| (s.version, *i));
        let (mut out, mut bytes) = (Vec::new(), 0);
        for (n, (i, seg)) in newer.iter().enumerate() {
            let size = seg.words.len() * 8;
            if n > 0 && bytes + size > SEGMENT_BUDGET {
                // Complete up to just below the first one left out.
                return (out, seg.version - 1);
            }
            bytes += size;
            out.push(WireSegment::encode(*i, seg));
        }
        (out, current)
    }

    /// Apply segments received from a peer.
    pub fn apply(&mut self, segments: &[WireSegment]) -> Result<(), String> {
        for w in segments {
            let seg = w.decode()?;
            let slot = self
                .segments
                .get_mut(w.i)
                .ok_or_else(|| format!("segment {} out of range", w.i))?;
            *slot = seg;
        }
        Ok(())
    }
}

fn build_segment(keys: &[u64]) -> Vec<u64> {
    if keys.is_empty() {
        return Vec::new();
    }
    let words = (keys.len() * BITS_PER_KEY).div_ceil(64);
    let mut out = vec![0u64; words];
    let bits = words as u64 * 64;
    for &h in keys {
        for p in probes(h, bits) {
            out[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    out
}

/// A segment on the wire: its index, version and words (little-endian bytes, base64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSegment {
    pub i: usize,
    pub v: u64,
    pub bits: String,
}

impl WireSegment {
    fn encode(i: usize, seg: &Segment) -> WireSegment {
        let bytes: Vec<u8> = seg.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        WireSegment {
            i,
            v: seg.version,
            bits: STANDARD.encode(bytes),
        }
    }

    fn decode(&self) -> Result<Segment, String> {
        let bytes = STANDARD
            .decode(&self.bits)
            .map_err(|e| format!("segment {}: {e}", self.i))?;
        if bytes.len() % 8 != 0 {
            return Err(format!("segment {}: {} bytes", self.i, bytes.len()));
        }
        Ok(Segment {
            version: self.v,
            words: bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use xxhash_rust::xxh3::xxh3_64;

    use super::*;

    fn names(n: usize, prefix: &str) -> Vec<u64> {
        (0..n)
            .map(|i| xxh3_64(format!("{prefix}/adapter-{i}").as_bytes()))
            .collect()
    }

    #[test]
    fn no_false_negatives_and_about_one_percent_false_positives() {
        let stored = names(10_000, "in");
        let f = DiskFilter::build(stored.iter().copied());
        assert!(stored.iter().all(|&h| f.contains(h)));
        let fp = names(100_000, "out")
            .iter()
            .filter(|&&h| f.contains(h))
            .count();
        assert!(fp < 1_500, "{fp} false positives in 100,000");
        // 10 bits per key: 12.5 KB in all for 10,000 adapters.
        assert!(
            f.bytes() <= 10_000 * BITS_PER_KEY / 8 + SEGMENTS * 8,
            "{}",
            f.bytes()
        );
        assert!(!DiskFilter::default().contains(stored[0]));
    }

    #[test]
    fn a_change_resends_one_segment_and_a_new_poller_gets_all_in_budgeted_polls() {
        let mut stored = names(10_000, "in");
        let (mut sender, mut counter) = (DiskFilter::default(), 0);
        assert!(sender.update_from(DiskFilter::build(stored.iter().copied()), &mut counter));
        // A new poller: several polls, each within the budget, until it has it all.
        let (mut since, mut copy, mut polls) = (0, DiskFilter::default(), 0);
        loop {
            let (segs, upto) = sender.delta(since, counter);
            if segs.is_empty() {
                break;
            }
            let bytes: usize = segs.iter().map(|s| s.bits.len()).sum();
            let padding = 4 * segs.len();
            assert!(
                bytes <= SEGMENT_BUDGET * 4 / 3 + padding,
                "{bytes} base64 bytes in one poll"
            );
            copy.apply(&segs).unwrap();
            polls += 1;
            assert!(polls < 20);
            since = upto;
        }
        assert_eq!(copy, sender);
        assert!(polls <= 6, "{polls} polls");
        // One more adapter: one segment changes, and only it is sent.
        stored.push(xxh3_64(b"new/adapter"));
        assert!(sender.update_from(DiskFilter::build(stored.iter().copied()), &mut counter));
        let (segs, upto) = sender.delta(since, counter);
        assert_eq!((segs.len(), upto), (1, counter));
        copy.apply(&segs).unwrap();
        assert!(copy.contains(xxh3_64(b"new/adapter")));
        assert_eq!(sender.delta(counter, counter), (vec![], counter));
        // Nothing changed: no new version.
        assert!(!sender.update_from(DiskFilter::build(stored.iter().copied()), &mut counter));
    }

    #[test]
    fn bad_segments_are_refused() {
        let mut f = DiskFilter::default();
        let bad = |i, bits: &str| WireSegment {
            i,
            v: 1,
            bits: bits.into(),
        };
        assert!(f.apply(&[bad(99, "")]).is_err());
        assert!(f.apply(&[bad(0, "!!")]).is_err());
        assert!(f.apply(&[bad(0, "AAAA")]).is_err(), "3 bytes");
    }
}
