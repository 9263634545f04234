//! vLLM's `/metrics` text: what parses, written back in canonical form, parses to the same
//! samples and figures. The property lives in `loraplex::fuzz_checks`, shared with
//! `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = loraplex::fuzz_checks::prom_text(data) {
        panic!("{broken}");
    }
});
