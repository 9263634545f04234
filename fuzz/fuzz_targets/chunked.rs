//! The chunked decoder: the first byte picks how the rest is split; decoding whole and
//! in pieces must agree.
//! The property lives in `loraplex::fuzz_checks`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = loraplex::fuzz_checks::chunked(data) {
        panic!("{broken}");
    }
});
