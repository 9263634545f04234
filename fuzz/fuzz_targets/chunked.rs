//! The chunked decoder; the first byte picks how the rest is split, and every split must decode alike.
//! The property lives in `loraplex::fuzz_checks::chunked`, shared with the corpus replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = loraplex::fuzz_checks::chunked(data) {
        panic!("{broken}");
    }
});
