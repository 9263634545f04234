//! Replays every committed fuzz input (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`)
//! through the same checks the fuzz targets run, under plain `cargo test`: a fixed crash stays
//! fixed without cargo-fuzz or a nightly toolchain.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use loraplex::fuzz_checks::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn corpus_and_regressions_pass_every_check() {
    let mut failures = Vec::new();
    for (target, check) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        // A target without seeds would pass here by checking nothing.
        assert!(corpus.len() >= 5, "{target}: only {} seeds", corpus.len());
        let regressions = files(&fuzz_dir().join("regressions").join(target));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap();
            match catch_unwind(AssertUnwindSafe(|| check(&data))) {
                Ok(Ok(())) => {}
                Ok(Err(broken)) => failures.push(format!("{}: {broken}", path.display())),
                Err(_) => failures.push(format!("{}: panicked", path.display())),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Every corpus directory belongs to a known target, so none is skipped unseen.
#[test]
fn every_corpus_directory_has_a_check() {
    for sub in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(sub)) else {
            continue;
        };
        for e in entries {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                TARGETS.iter().any(|(t, _)| *t == name),
                "fuzz/{sub}/{name} has no check in loraplex::fuzz_checks::TARGETS"
            );
        }
    }
}

/// The checks do find what they look for (so the replay above can fail).
#[test]
fn checks_detect_breakage() {
    use loraplex::fuzz_checks::{chunked, config_load, model_extract, request_head};
    // Inputs that are refused are fine: the properties hold vacuously.
    assert_eq!(model_extract(b"{"), Ok(()));
    assert_eq!(request_head(b"\0\0"), Ok(()));
    assert_eq!(config_load(b"{{{"), Ok(()));
    assert_eq!(chunked(b""), Ok(()));
    // Inputs that are accepted go through the whole property.
    assert_eq!(
        model_extract(br#"{"model":"a","x":[1,{"model":2}]}"#),
        Ok(())
    );
    assert_eq!(
        request_head(b"POST /v1/x?y HTTP/1.0\r\nContent-Length: 3\r\n\r\n"),
        Ok(())
    );
    assert_eq!(chunked(b"\x01\x35\r\nhello\r\n0\r\n\r\n"), Ok(()));
    assert_eq!(config_load(b"listen: \":1\"\n"), Ok(()));
}
