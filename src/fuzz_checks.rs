//! The properties the fuzz targets check, one function per target. The targets in `fuzz/`
//! panic when one returns an error; `tests/fuzz_corpus.rs` replays every committed corpus file
//! through the same functions under plain `cargo test`. Each property is written over the
//! implementation it checks (`*_with`), so the replay's own test can hand it a broken one
//! and see it fail.
//!
//! Why a public (doc-hidden) module rather than `#[cfg(fuzzing)]` or `#[cfg(test)]`: the fuzz
//! crate and the integration test are both *other crates*, which never see the library built
//! with `cfg(test)`, and a cargo feature would let `cargo test` skip the replay silently when
//! the feature is off. These functions are small and only read their input, so compiling them
//! always costs nothing at run time.

use crate::{
    config::{Config, Overrides, Redact},
    error::Error,
    http::{
        BodyKind, Method, RequestHead,
        chunked::ChunkedDecoder,
        model::{extract_fast, extract_full, extract_model, rewrite_model},
        multipart::{self, Boundary},
    },
};

/// A check: `Err` describes a broken property.
pub type Check = fn(&[u8]) -> Result<(), String>;

/// Every target, by the name of its directory under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("model_extract", model_extract),
    ("request_head", request_head),
    ("chunked", chunked),
    ("config_load", config_load),
    ("prom_text", prom_text),
    ("multipart_model", multipart_model),
];

/// A body whose `model` can be read can have it rewritten, and the result reads as the new
/// name (what `fallback_to_base_model` relies on).
pub fn model_extract(data: &[u8]) -> Result<(), String> {
    model_extract_with(data, rewrite_model)
}

/// [`model_extract`] over a `rewrite` implementation.
pub fn model_extract_with(
    data: &[u8],
    rewrite: impl Fn(&[u8], &str) -> Result<Vec<u8>, Error>,
) -> Result<(), String> {
    // The fast reading, where it reads a body at all, reads what the full one does.
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(fast) = extract_fast(text)
    {
        let full = extract_full(text).map_err(|e| e.message.clone());
        if full.as_ref().map(Option::as_deref) != Ok(fast.as_deref()) {
            return Err(format!("fast reading {fast:?}, full reading {full:?}"));
        }
    }
    let Ok(Some(model)) = extract_model(data) else {
        return Ok(());
    };
    let new = if model == "fuzz/renamed" {
        "fuzz/other"
    } else {
        "fuzz/renamed"
    };
    let body =
        rewrite(data, new).map_err(|e| format!("extracted {model:?} but rewriting failed: {e}"))?;
    match extract_model(&body) {
        Ok(Some(m)) if m == new => Ok(()),
        other => Err(format!(
            "rewritten body reads as {other:?}, not {new:?}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// The input is a `Content-Type` value, a newline, then a body. A form whose `model` field
/// can be read (or that has none) can have it set, and then reads as the new name with every
/// other byte kept; a value read never holds a delimiter that would have ended its part.
pub fn multipart_model(data: &[u8]) -> Result<(), String> {
    multipart_model_with(data, multipart::rewrite_model)
}

/// [`multipart_model`] over a `rewrite` implementation.
pub fn multipart_model_with(
    data: &[u8],
    rewrite: impl Fn(&[u8], &Boundary, &str) -> Result<Vec<u8>, Error>,
) -> Result<(), String> {
    let (content_type, body) = match memchr::memchr(b'\n', data) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(Some(boundary)) = Boundary::of_content_type(content_type) else {
        return Ok(());
    };
    let Ok(range) = multipart::model_range(body, &boundary) else {
        return Ok(());
    };
    let delimiter = boundary.delimiter();
    if let Some(r) = &range {
        let value = &body[r.clone()];
        for end in [&b"\r\n"[..], b"--"] {
            let ending = [delimiter, end].concat();
            if memchr::memmem::find(value, &ending).is_some() {
                return Err(format!("the model value runs over a delimiter: {value:?}"));
            }
        }
    }
    let current = range.as_ref().map(|r| &body[r.clone()]);
    let new = if current == Some(b"fuzz/renamed") {
        "fuzz/other"
    } else {
        "fuzz/renamed"
    };
    let out = rewrite(body, &boundary, new)
        .map_err(|e| format!("read {current:?} but rewriting failed: {e}"))?;
    let shown = || String::from_utf8_lossy(&out).into_owned();
    let again = match multipart::model_range(&out, &boundary) {
        Ok(Some(r)) if &out[r.clone()] == new.as_bytes() => r,
        other => return Err(format!("rewritten form reads as {other:?}: {}", shown())),
    };
    let kept = match range {
        Some(r) => out[..again.start] == body[..r.start] && out[again.end..] == body[r.end..],
        None => out.ends_with(body),
    };
    if !kept {
        return Err(format!(
            "rewriting changed more than the model: {}",
            shown()
        ));
    }
    Ok(())
}

/// A head that parses, once forwarded, parses again to the same request with the framing the
/// proxy gave it (so with exactly one `Host`, which the next hop's HTTP/1.1 requires, even when
/// an HTTP/1.0 client sent none).
pub fn request_head(data: &[u8]) -> Result<(), String> {
    request_head_with(data, |head, out, extra, body_len| {
        head.write_forward(out, extra, body_len)
    })
}

/// [`request_head`] over a `forward` writer.
pub fn request_head_with(
    data: &[u8],
    forward: impl Fn(&RequestHead, &mut Vec<u8>, &[(&str, &[u8])], usize),
) -> Result<(), String> {
    let Ok(Some((head, len))) = RequestHead::parse(data) else {
        return Ok(());
    };
    if len == 0 || len > data.len() {
        return Err(format!("head length {len} of {} bytes", data.len()));
    }
    let body_len = match head.body {
        BodyKind::Length(n) => n.min(1 << 20) as usize,
        _ => 0,
    };
    let mut out = Vec::new();
    // What a forward to a peer adds.
    let extra: [(&str, &[u8]); 2] = [("x-loraplex-forwarded", b"1"), ("x-loraplex-token", b"t0k")];
    forward(&head, &mut out, &extra, body_len);
    let shown = || String::from_utf8_lossy(&out).into_owned();
    let again = match RequestHead::parse(&out) {
        Ok(Some((again, n))) if n == out.len() => again,
        other => {
            let other = other.map(|o| o.map(|(_, n)| n));
            return Err(format!(
                "forwarded head does not parse: {other:?}\n{}",
                shown()
            ));
        }
    };
    let framed = body_len > 0 || matches!(head.kind, Method::Post | Method::Put | Method::Patch);
    let want_body = if framed {
        BodyKind::Length(body_len as u64)
    } else {
        BodyKind::None
    };
    if again.method() != head.method()
        || again.target() != head.target()
        || again.kind != head.kind
        || again.minor != 1
        || !again.keep_alive
        || again.body != want_body
    {
        return Err(format!("forwarded head differs: {again:?}\n{}", shown()));
    }
    Ok(())
}

/// A chunked-body decoder as the codec's [`ChunkedDecoder`] is one.
pub trait Decoder {
    /// Consume what it can of `input`, appending the payload to `out` when given; the bytes
    /// consumed.
    fn feed(&mut self, input: &[u8], out: Option<&mut Vec<u8>>) -> Result<usize, Error>;
    fn is_done(&self) -> bool;
}

impl Decoder for ChunkedDecoder {
    fn feed(&mut self, input: &[u8], out: Option<&mut Vec<u8>>) -> Result<usize, Error> {
        ChunkedDecoder::feed(self, input, out)
    }
    fn is_done(&self) -> bool {
        ChunkedDecoder::is_done(self)
    }
}

#[derive(Debug, PartialEq)]
enum Decoded {
    Failed,
    Ok {
        payload: Vec<u8>,
        used: usize,
        done: bool,
    },
}

fn decode<D: Decoder>(mut d: D, input: &[u8], pieces: &[usize], copy: bool) -> Decoded {
    let mut payload = Vec::new();
    let mut used = 0;
    let mut at = 0;
    for &size in pieces {
        let piece = &input[at..(at + size).min(input.len())];
        at += piece.len();
        match d.feed(piece, copy.then_some(&mut payload)) {
            Ok(n) if n <= piece.len() => used += n,
            Ok(n) => panic!("feed took {n} bytes of {}", piece.len()),
            Err(_) => return Decoded::Failed,
        }
        if d.is_done() || at == input.len() {
            break;
        }
    }
    Decoded::Ok {
        payload,
        used,
        done: d.is_done(),
    }
}

/// The first byte seeds how the rest is split; decoding in one piece, in those pieces, and
/// without copying the payload out must agree.
pub fn chunked(data: &[u8]) -> Result<(), String> {
    chunked_with(data, ChunkedDecoder::new)
}

/// [`chunked`] over the decoders `new` makes.
pub fn chunked_with<D: Decoder>(data: &[u8], new: impl Fn() -> D) -> Result<(), String> {
    let Some((&seed, input)) = data.split_first() else {
        return Ok(());
    };
    // xorshift32: every split pattern is reachable from some seed, and replays are exact.
    let mut state = u32::from(seed) | 0x9e37_0000;
    let max = usize::from(seed % 32) + 1;
    let mut pieces = Vec::new();
    let mut total = 0;
    while total < input.len() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (state as usize % max) + 1;
        pieces.push(size);
        total += size;
    }
    let whole = decode(new(), input, &[input.len().max(1)], true);
    let split = decode(new(), input, &pieces, true);
    if whole != split {
        return Err(format!("whole: {whole:?}\nsplit {pieces:?}: {split:?}"));
    }
    let uncopied = decode(new(), input, &pieces, false);
    let same = match (&whole, &uncopied) {
        (Decoded::Failed, Decoded::Failed) => true,
        (
            Decoded::Ok { used, done, .. },
            Decoded::Ok {
                used: u, done: d, ..
            },
        ) => used == u && done == d,
        _ => false,
    };
    if !same {
        return Err(format!("copying: {whole:?}\nnot copying: {uncopied:?}"));
    }
    Ok(())
}

/// Any text: loading never panics, and a config that loads prints (as `check-config` does)
/// to YAML that loads back to the same config.
pub fn config_load(data: &[u8]) -> Result<(), String> {
    config_load_with(data, |c| c.to_yaml(Redact::Nothing))
}

/// [`config_load`] over a `print`er of configs.
pub fn config_load_with(data: &[u8], print: impl Fn(&Config) -> String) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let Ok(loaded) = Config::resolve(Some(text), &Overrides::default(), |_| None) else {
        return Ok(());
    };
    let printed = print(&loaded.config);
    // `$` has no escape in this format (Go expands the whole file), so a value holding one
    // cannot print back as itself.
    if printed.contains('$') {
        return Ok(());
    }
    match Config::resolve(Some(&printed), &Overrides::default(), |_| None) {
        Ok(again) if again.config == loaded.config => Ok(()),
        Ok(again) => Err(format!(
            "printed config loads differently:\n{printed}\nfirst: {:?}\nthen: {:?}",
            loaded.config, again.config
        )),
        Err(e) => Err(format!("printed config does not load: {e}\n{printed}")),
    }
}

/// A sample as the `prom_text` property compares it: name, labels (unescaped), value bits.
pub type OwnedSample = (String, Vec<(String, String)>, u64);

/// The samples of a text exposition with the library's parser (`vllm::metrics`).
pub fn parse_samples(text: &str) -> Result<Vec<OwnedSample>, String> {
    crate::vllm::metrics::samples(text)
        .map(|s| {
            let s = s.map_err(|e| e.to_string())?;
            let labels = s
                .label_pairs()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into_owned()))
                .collect();
            // NaN has many encodings: compare them as one.
            let bits = if s.value.is_nan() {
                f64::NAN.to_bits()
            } else {
                s.value.to_bits()
            };
            Ok((s.name.to_owned(), labels, bits))
        })
        .collect()
}

/// vLLM's `/metrics` text: what parses, written back in canonical form, parses to the same
/// samples, and the figures routing reads from it are the same (`VllmMetrics::parse` never
/// panics either way).
pub fn prom_text(data: &[u8]) -> Result<(), String> {
    prom_text_with(data, parse_samples)
}

/// [`prom_text`] over a `parse` implementation.
pub fn prom_text_with(
    data: &[u8],
    parse: impl Fn(&str) -> Result<Vec<OwnedSample>, String>,
) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let figures = crate::vllm::metrics::VllmMetrics::parse(text);
    let Ok(samples) = parse(text) else {
        return Ok(());
    };
    let mut canonical = String::new();
    for (name, labels, bits) in &samples {
        canonical.push_str(name);
        if !labels.is_empty() {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    format!("{k}=\"{v}\"")
                })
                .collect();
            canonical.push_str(&format!("{{{}}}", pairs.join(",")));
        }
        let v = f64::from_bits(*bits);
        let v = if v.is_nan() {
            "NaN".to_owned()
        } else if v.is_infinite() {
            if v > 0.0 {
                "+Inf".into()
            } else {
                "-Inf".into()
            }
        } else {
            format!("{v:e}")
        };
        canonical.push_str(&format!(" {v}\n"));
    }
    let again =
        parse(&canonical).map_err(|e| format!("canonical form refused: {e}\n{canonical}"))?;
    if again != samples {
        return Err(format!(
            "round trip changed the samples:\n{samples:?}\n{again:?}"
        ));
    }
    // Same samples, same figures (compared as printed: NaN equals NaN there).
    let refigured = crate::vllm::metrics::VllmMetrics::parse(&canonical);
    match (&figures, &refigured) {
        (Ok(a), Ok(b)) if format!("{a:?}") == format!("{b:?}") => Ok(()),
        _ => Err(format!("figures changed: {figures:?} vs {refigured:?}")),
    }
}
