//! [`Placement::owner`](super::Placement::owner) for records of 8 candidates (what 256 peers
//! need) with AVX-512: the 8 candidates' seeds are gathered and scored in one register, and
//! the maximum is a horizontal reduction, instead of 8 dependent scalar rounds.
//!
//! It computes exactly what the portable path computes (`key_rank`: the low 64 bits of
//! `(key_hash ^ mask) * mul`, packed with the index), so nodes with and without AVX-512
//! agree on every owner; `tests::avx512_agrees_with_the_portable_path` checks it.

use std::arch::x86_64::*;

/// Whether this CPU runs [`best8`].
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

/// The packed maximum of `key_rank` over the 8 candidates of `record`.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512DQ ([`available`]), and every index in `record` must
/// be below `key_seeds.len()`.
#[target_feature(enable = "avx512f,avx512dq")]
pub(super) unsafe fn best8(record: &[u16; 8], key_hash: u64, key_seeds: &[[u64; 2]]) -> u64 {
    let seeds = key_seeds.as_ptr().cast::<i64>();
    // SAFETY: 16 bytes read from an `[u16; 8]`; the gathers read `key_seeds[i][0]` and
    // `key_seeds[i][1]` for indices the caller promises are in bounds.
    unsafe {
        let index = _mm512_cvtepu16_epi64(_mm_loadu_si128(record.as_ptr().cast()));
        let word = _mm512_slli_epi64::<1>(index);
        let mask = _mm512_i64gather_epi64::<8>(word, seeds);
        let mul = _mm512_i64gather_epi64::<8>(word, seeds.add(1));
        let score = _mm512_mullo_epi64(
            _mm512_xor_si512(_mm512_set1_epi64(key_hash as i64), mask),
            mul,
        );
        let packed = _mm512_or_si512(
            _mm512_and_si512(score, _mm512_set1_epi64(!0xffff)),
            _mm512_sub_epi64(_mm512_set1_epi64(0xffff), index),
        );
        _mm512_reduce_max_epu64(packed)
    }
}
