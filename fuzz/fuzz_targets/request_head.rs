//! Request heads: one that parses, once forwarded, parses again to the same request.
//! The property lives in `loraplex::fuzz_checks`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = loraplex::fuzz_checks::request_head(data) {
        panic!("{broken}");
    }
});
