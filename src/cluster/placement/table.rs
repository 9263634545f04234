//! The slot table's memory layout, tuned for [`Placement::owner`](super::Placement::owner).
//!
//! Each slot has a fixed-width record of `width` peer indices: its candidates, ascending,
//! padded with copies of the last one. A lookup then reads one record and scores exactly
//! `width` entries in an unrolled, branch-free loop (a copy scores the same as its original,
//! so padding never changes the maximum); with variable-length lists, the unpredictable loop
//! exit cost more than the scoring. `width` is the smallest of [`WIDTHS`] that holds the
//! candidates of all but [`MAX_SPILL_PER_MILLE`]‰ of the slots; the longer lists are spilled
//! to a side array, marked by [`SPILLED`] in the record's first entry.

/// Record marker: the slot's candidates are in the spill array.
const SPILLED: u16 = u16::MAX;
/// Largest record width; beyond it (more than ~600 peers) more slots spill.
const MAX_WIDTH: usize = 32;
/// Slots allowed to spill when choosing the width, per thousand.
const MAX_SPILL_PER_MILLE: usize = 80;
/// Record widths, each with its own unrolled scoring loop.
const WIDTHS: [usize; 10] = [1, 2, 3, 4, 6, 8, 12, 16, 24, MAX_WIDTH];

#[derive(Debug, Clone, Default)]
pub(super) struct SlotTable {
    width: usize,
    records: Vec<u16>,
    /// `(slot, start, end)` into `spill`, sorted by slot.
    spilled: Vec<(u32, u32, u32)>,
    spill: Vec<u16>,
}

/// A score in the high 48 bits and the peer index, complemented, in the low 16 bits: comparing
/// packed values is a total order, and exact score ties go to the peer first in address order
/// (an order that does not depend on which other peers exist).
#[inline]
pub(super) fn pack(score: u64, index: usize) -> u64 {
    (score & !0xffff) | (0xffff - index as u64)
}

/// The peer index of a packed rank.
#[inline]
pub(super) fn unpack(packed: u64) -> usize {
    0xffff - (packed & 0xffff) as usize
}

/// Maximum of `rank` over exactly `W` entries: unrolled, no data-dependent branch.
#[inline]
fn max_rank<const W: usize>(record: &[u16], rank: impl Fn(u16) -> u64) -> u64 {
    record
        .first_chunk::<W>()
        .map_or(0, |r| r.iter().fold(0, |best, &i| best.max(rank(i))))
}

impl SlotTable {
    /// Lay out the per-slot candidate lists given in CSR form
    /// (`candidates[offsets[s]..offsets[s + 1]]`, each non-empty, ascending, below `SPILLED`).
    pub(super) fn new(offsets: &[u32], candidates: &[u16]) -> SlotTable {
        let slots = offsets.len() - 1;
        let len = |s: usize| (offsets[s + 1] - offsets[s]) as usize;
        let mut histogram = vec![0usize; MAX_WIDTH + 2];
        (0..slots).for_each(|s| histogram[len(s).min(MAX_WIDTH + 1)] += 1);
        let spilled_at = |w: usize| histogram[w + 1..].iter().sum::<usize>();
        let width = WIDTHS
            .into_iter()
            .find(|&w| spilled_at(w) * 1000 <= slots * MAX_SPILL_PER_MILLE)
            .unwrap_or(MAX_WIDTH);
        let mut table = SlotTable {
            width,
            records: vec![0; slots * width],
            spilled: Vec::new(),
            spill: Vec::new(),
        };
        for slot in 0..slots {
            let list = &candidates[offsets[slot] as usize..offsets[slot + 1] as usize];
            let record = &mut table.records[slot * width..(slot + 1) * width];
            if list.len() <= width {
                record[..list.len()].copy_from_slice(list);
                let last = list[list.len() - 1];
                record[list.len()..].fill(last);
            } else {
                record[0] = SPILLED;
                let start = table.spill.len() as u32;
                table.spill.extend_from_slice(list);
                table
                    .spilled
                    .push((slot as u32, start, table.spill.len() as u32));
            }
        }
        table
    }

    fn spilled_list(&self, slot: usize) -> &[u16] {
        match self.spilled.binary_search_by_key(&(slot as u32), |e| e.0) {
            Ok(at) => {
                let (_, start, end) = self.spilled[at];
                &self.spill[start as usize..end as usize]
            }
            Err(_) => &[],
        }
    }

    /// The slot's candidates, ascending, without padding.
    pub(super) fn candidates(&self, slot: usize) -> &[u16] {
        let record = &self.records[slot * self.width..(slot + 1) * self.width];
        if record.first() == Some(&SPILLED) {
            return self.spilled_list(slot);
        }
        let real = (1..record.len())
            .find(|&j| record[j] == record[j - 1])
            .unwrap_or(record.len());
        &record[..real]
    }

    /// The candidate of `slot` with the highest [`pack`]ed `rank`; `None` for an empty table.
    #[inline]
    pub(super) fn best(&self, slot: usize, rank: impl Fn(u16) -> u64) -> Option<usize> {
        let record = self
            .records
            .get(slot * self.width..(slot + 1) * self.width)?;
        let first = *record.first()?;
        if first == SPILLED {
            return self
                .spilled_list(slot)
                .iter()
                .map(|&i| rank(i))
                .max()
                .map(unpack);
        }
        let best = match self.width {
            1 => return Some(usize::from(first)),
            2 => max_rank::<2>(record, rank),
            3 => max_rank::<3>(record, rank),
            4 => max_rank::<4>(record, rank),
            6 => max_rank::<6>(record, rank),
            8 => max_rank::<8>(record, rank),
            12 => max_rank::<12>(record, rank),
            16 => max_rank::<16>(record, rank),
            24 => max_rank::<24>(record, rank),
            _ => max_rank::<MAX_WIDTH>(record, rank),
        };
        Some(unpack(best))
    }

    /// Heap bytes held.
    /// The slot's record when records are 8 wide and this one is not spilled (the AVX-512
    /// path's input).
    #[inline]
    pub(super) fn record8(&self, slot: usize) -> Option<&[u16; 8]> {
        if self.width != 8 {
            return None;
        }
        let record = self
            .records
            .get(slot * 8..slot * 8 + 8)?
            .first_chunk::<8>()?;
        (record[0] != SPILLED).then_some(record)
    }

    pub(super) fn bytes(&self) -> usize {
        (self.records.len() + self.spill.len()) * 2 + self.spilled.len() * 12
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CSR form of `lists`.
    fn csr(lists: &[Vec<u16>]) -> (Vec<u32>, Vec<u16>) {
        let mut offsets = vec![0];
        let mut candidates = Vec::new();
        for l in lists {
            candidates.extend_from_slice(l);
            offsets.push(candidates.len() as u32);
        }
        (offsets, candidates)
    }

    #[test]
    fn records_pad_and_long_lists_spill() {
        // 1000 slots of 1-3 candidates and 5 long ones: width 3, the long ones spill.
        let mut lists: Vec<Vec<u16>> = (0..1000u16).map(|s| (0..s % 3 + 1).collect()).collect();
        for s in [3, 400, 401, 998, 999] {
            lists[s] = (10..10 + 7 + s as u16 % 5).collect();
        }
        let (offsets, candidates) = csr(&lists);
        let table = SlotTable::new(&offsets, &candidates);
        assert_eq!(table.width, 3);
        assert_eq!(table.spilled.len(), 5);
        for (slot, list) in lists.iter().enumerate() {
            assert_eq!(table.candidates(slot), &list[..], "slot {slot}");
            // The best by a rank that prefers the highest index, and by one that prefers the
            // lowest: both ends of every list, padding or spill notwithstanding.
            assert_eq!(
                table.best(slot, |i| pack(u64::from(i) << 16, usize::from(i))),
                Some(usize::from(*list.last().unwrap()))
            );
            assert_eq!(
                table.best(slot, |i| pack(0, usize::from(i))),
                Some(usize::from(list[0]))
            );
        }
    }

    #[test]
    fn width_grows_with_list_length() {
        for (len, width) in [(1, 1), (2, 2), (3, 3), (5, 6), (9, 12), (40, 32)] {
            let lists: Vec<Vec<u16>> = (0..64).map(|_| (0..len).collect()).collect();
            let (offsets, candidates) = csr(&lists);
            let table = SlotTable::new(&offsets, &candidates);
            assert_eq!(table.width, width, "lists of {len}");
            assert_eq!(table.candidates(63).len(), usize::from(len));
            assert_eq!(table.best(5, |i| pack(0, usize::from(i))), Some(0));
        }
        assert_eq!(SlotTable::default().best(0, |_| 1), None);
    }
}
