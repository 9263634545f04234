//! The top-level `model` of a JSON body: when one is read, rewriting it gives a body
//! that reads as the new name.
//! The property lives in `loraplex::fuzz_checks`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = loraplex::fuzz_checks::model_extract(data) {
        panic!("{broken}");
    }
});
