//! The `model` field of a multipart form (input: a Content-Type line, then the body): when
//! one is read, or none is there, setting it gives a form that reads as the new name with
//! every other byte kept.
//! The property lives in `loraplex::fuzz_checks`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = loraplex::fuzz_checks::multipart_model(data) {
        panic!("{broken}");
    }
});
