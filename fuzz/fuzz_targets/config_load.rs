//! Config text: loading never panics, and what `check-config` prints loads back the same.
//! The property lives in `loraplex::fuzz_checks`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = loraplex::fuzz_checks::config_load(data) {
        panic!("{broken}");
    }
});
