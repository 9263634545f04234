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

/// The checks do find what they look for (so the replay above can fail): each accepts the
/// real implementation and refuses a broken one on the same input.
#[test]
fn checks_detect_breakage() {
    use loraplex::{
        config::{Config, Redact},
        error::Error,
        fuzz_checks::{
            Decoder, chunked, chunked_with, config_load, config_load_with, model_extract,
            model_extract_with, multipart_model, multipart_model_with, parse_samples, prom_text,
            prom_text_with, request_head, request_head_with,
        },
        http::{
            RequestHead,
            chunked::ChunkedDecoder,
            model::rewrite_model,
            multipart::{self, Boundary},
        },
    };

    // model_extract: a rewrite that leaves the body as it was, that writes the new name
    // beside the old one (a duplicate key), or that fails.
    let body = br#"{"model":"a","x":[1,{"model":2}]}"#;
    assert_eq!(model_extract(body), Ok(()));
    let unchanged = |b: &[u8], _: &str| -> Result<Vec<u8>, Error> { Ok(b.to_vec()) };
    let err = model_extract_with(body, unchanged).unwrap_err();
    assert!(err.contains("not \"fuzz/renamed\""), "{err}");
    let prepended = |b: &[u8], m: &str| -> Result<Vec<u8>, Error> {
        let mut out = format!("{{\"model\":{m:?},").into_bytes();
        out.extend_from_slice(&rewrite_model(b, "stale").unwrap()[1..]);
        Ok(out)
    };
    assert!(model_extract_with(body, prepended).is_err());
    let failing = |_: &[u8], _: &str| -> Result<Vec<u8>, Error> { Err(Error::internal("no")) };
    assert!(
        model_extract_with(body, failing)
            .unwrap_err()
            .contains("rewriting failed")
    );

    // request_head: a forward that downgrades to HTTP/1.0, or drops the body's length.
    let head = b"POST /v1/x?y HTTP/1.0\r\nContent-Length: 3\r\n\r\n";
    assert_eq!(request_head(head), Ok(()));
    let real = |h: &RequestHead, out: &mut Vec<u8>, extra: &[(&str, &[u8])], n: usize| {
        h.write_forward(out, extra, n)
    };
    let http10 = |h: &RequestHead, out: &mut Vec<u8>, extra: &[(&str, &[u8])], n: usize| {
        real(h, out, extra, n);
        let text = String::from_utf8(std::mem::take(out)).unwrap();
        *out = text.replacen("HTTP/1.1", "HTTP/1.0", 1).into_bytes();
    };
    assert!(
        request_head_with(head, http10)
            .unwrap_err()
            .contains("differs")
    );
    let no_length = |h: &RequestHead, out: &mut Vec<u8>, extra: &[(&str, &[u8])], n: usize| {
        real(h, out, extra, n);
        let text = String::from_utf8(std::mem::take(out)).unwrap();
        let kept: Vec<&str> = text
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("content-length"))
            .collect();
        *out = kept.join("\r\n").into_bytes();
    };
    assert!(request_head_with(head, no_length).is_err());

    // chunked: a decoder that loses the last payload byte of every piece it is fed, which
    // only shows when the input comes in several pieces (seed 1: pieces of 1-2 bytes).
    struct Lossy(ChunkedDecoder);
    impl Decoder for Lossy {
        fn feed(&mut self, input: &[u8], out: Option<&mut Vec<u8>>) -> Result<usize, Error> {
            let mut mine = Vec::new();
            let n = self.0.feed(input, Some(&mut mine))?;
            mine.pop();
            if let Some(out) = out {
                out.extend_from_slice(&mine);
            }
            Ok(n)
        }
        fn is_done(&self) -> bool {
            self.0.is_done()
        }
    }
    let body = b"\x01\x35\r\nhello\r\n0\r\n\r\n";
    assert_eq!(chunked(body), Ok(()));
    let err = chunked_with(body, || Lossy(ChunkedDecoder::new())).unwrap_err();
    assert!(err.starts_with("whole:"), "{err}");

    // config_load: a printer that forgets a key, or prints what does not load.
    let text = b"storage:\n  max_size: 5GB\n";
    assert_eq!(config_load(text), Ok(()));
    let forgetful = |c: &Config| {
        let yaml = c.to_yaml(Redact::Nothing);
        yaml.lines()
            .filter(|l| !l.contains("max_size"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        config_load_with(text, forgetful)
            .unwrap_err()
            .contains("loads differently")
    );
    let broken = |_: &Config| "storage: [".to_owned();
    assert!(
        config_load_with(text, broken)
            .unwrap_err()
            .contains("does not load")
    );

    // prom_text: a parser that leaves label values escaped, or that drops a sample.
    let text = b"m{a=\"q\\\"x\"} 1\nn 2\n";
    assert_eq!(prom_text(text), Ok(()));
    let escaped = |t: &str| {
        parse_samples(t).map(|v| {
            v.into_iter()
                .map(|(n, l, b)| {
                    let l = l
                        .into_iter()
                        .map(|(k, v)| (k, v.replace('"', "\\\"")))
                        .collect();
                    (n, l, b)
                })
                .collect()
        })
    };
    assert!(
        prom_text_with(text, escaped)
            .unwrap_err()
            .contains("round trip")
    );
    let dropping = |t: &str| {
        parse_samples(t).map(|mut v| {
            v.pop();
            v
        })
    };
    assert!(prom_text_with(text, dropping).is_err());
    assert_eq!(prom_text(b"m{a=x} 1"), Ok(()), "refused text: vacuous");

    // multipart_model: a rewrite that leaves the form as it was, or that sets the model but
    // also touches another part.
    let form = b"multipart/form-data; boundary=B\n--B\r\nContent-Disposition: form-data; \
        name=file; filename=a\r\n\r\nAUDIO\r\n--B\r\nContent-Disposition: form-data; \
        name=model\r\n\r\nacme/x\r\n--B--\r\n";
    assert_eq!(multipart_model(form), Ok(()));
    let unchanged = |b: &[u8], _: &Boundary, _: &str| -> Result<Vec<u8>, Error> { Ok(b.to_vec()) };
    let err = multipart_model_with(form, unchanged).unwrap_err();
    assert!(err.contains("reads as"), "{err}");
    let meddling = |b: &[u8], bd: &Boundary, m: &str| -> Result<Vec<u8>, Error> {
        let out = multipart::rewrite_model(b, bd, m)?;
        Ok(String::from_utf8(out)
            .unwrap()
            .replace("AUDIO", "audio")
            .into_bytes())
    };
    let err = multipart_model_with(form, meddling).unwrap_err();
    assert!(err.contains("changed more than the model"), "{err}");

    // Inputs that are refused are fine: the properties hold vacuously.
    assert_eq!(model_extract(b"{"), Ok(()));
    assert_eq!(request_head(b"\0\0"), Ok(()));
    assert_eq!(config_load(b"{{{"), Ok(()));
    assert_eq!(chunked(b""), Ok(()));
    assert_eq!(
        multipart_model(b"multipart/form-data; boundary=B\n--B\r\n"),
        Ok(())
    );
}
