//! Reading vLLM's `/metrics`: a strict parser of the Prometheus text format (0.0.4) that borrows
//! from the input, and the figures routing needs ([`VllmMetrics`]).
//!
//! Why not a crate: the maintained ones parse into owned maps of every series (a vLLM exports
//! ~600 lines, and its `vllm:lora_requests_info` keeps every label set it ever saw), and some
//! split label values on commas, which vLLM's adapter lists contain. This one walks the text
//! once, allocates nothing per line, and refuses anything malformed with the line number (a
//! fuzz target, `fuzz/fuzz_targets/prom_text.rs`, checks it never panics and round-trips).
//!
//! Figures (summed over `engine`/`model_name` series where there are several):
//! `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (or the
//! older `vllm:gpu_cache_usage_perc`; the mean over engines), `vllm:request_success_total`,
//! `process_start_time_seconds`, and from `vllm:lora_requests_info` the series with the largest
//! value (the current one): `max_lora` and the adapters of `running_lora_adapters` and
//! `waiting_lora_adapters` (comma-separated names).

use std::borrow::Cow;

/// One sample line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// The text between the braces, checked (`a="x",b="y"`); empty when there are none.
    pub labels: &'a str,
    pub value: f64,
}

/// A malformed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_char(b: u8) -> bool {
    is_name_start(b) || b.is_ascii_digit()
}

fn is_label_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_label_char(b: u8) -> bool {
    is_label_start(b) || b.is_ascii_digit()
}

/// A float as the format writes it: Go's `ParseFloat` syntax, `NaN`, `+Inf`, `-Inf`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => return Some(f64::NAN),
        "+Inf" | "Inf" => return Some(f64::INFINITY),
        "-Inf" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if ok { s.parse().ok() } else { None }
}

/// Walk the labels of `text` (what is between the braces): `(name, raw value)`, the value still
/// escaped. `Err` at the first malformed byte.
fn walk_labels<'a>(
    text: &'a str,
    mut each: impl FnMut(&'a str, &'a str),
) -> Result<(), &'static str> {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        if !is_label_start(b[i]) {
            return Err("bad label name");
        }
        while i < b.len() && is_label_char(b[i]) {
            i += 1;
        }
        let name = &text[start..i];
        if b.get(i) != Some(&b'=') || b.get(i + 1) != Some(&b'"') {
            return Err("expected =\" after a label name");
        }
        i += 2;
        let vstart = i;
        loop {
            match b.get(i) {
                None => return Err("unterminated label value"),
                Some(b'"') => break,
                Some(b'\\') => match b.get(i + 1) {
                    Some(b'\\' | b'"' | b'n') => i += 2,
                    _ => return Err("bad escape in a label value"),
                },
                Some(b'\n') => return Err("newline in a label value"),
                Some(_) => i += 1,
            }
        }
        each(name, &text[vstart..i]);
        i += 1;
        match b.get(i) {
            None => {}
            Some(b',') => i += 1,
            Some(_) => return Err("expected , between labels"),
        }
    }
    Ok(())
}

/// Undo the escapes of a label value.
pub fn unescape(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

impl<'a> Sample<'a> {
    /// Every label, in order, values unescaped.
    pub fn label_pairs(&self) -> Vec<(&'a str, Cow<'a, str>)> {
        let mut out = Vec::new();
        let _ = walk_labels(self.labels, |n, v| out.push((n, unescape(v))));
        out
    }

    /// A label's value, unescaped.
    pub fn label(&self, name: &str) -> Option<Cow<'a, str>> {
        let mut found = None;
        // The labels were checked when the line was parsed.
        let _ = walk_labels(self.labels, |n, v| {
            if n == name && found.is_none() {
                found = Some(v);
            }
        });
        found.map(unescape)
    }
}

/// Parse one sample line (not a comment, not empty).
fn parse_line(line: &str) -> Result<Sample<'_>, &'static str> {
    let b = line.as_bytes();
    if !is_name_start(b[0]) {
        return Err("bad metric name");
    }
    let mut i = 1;
    while i < b.len() && is_name_char(b[i]) {
        i += 1;
    }
    let name = &line[..i];
    let mut labels = "";
    if b.get(i) == Some(&b'{') {
        // The closing brace is the first `}` outside a quoted value.
        let start = i + 1;
        let mut j = start;
        let mut quoted = false;
        loop {
            match b.get(j) {
                None => return Err("unterminated label set"),
                Some(b'\\') if quoted => j += 2,
                Some(b'"') => {
                    quoted = !quoted;
                    j += 1;
                }
                Some(b'}') if !quoted => break,
                Some(_) => j += 1,
            }
        }
        labels = &line[start..j];
        walk_labels(labels, |_, _| {})?;
        i = j + 1;
    }
    let rest = line.get(i..).ok_or("cut line")?;
    if !rest.starts_with([' ', '\t']) {
        return Err("expected a space before the value");
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields
        .next()
        .and_then(parse_value)
        .ok_or("bad sample value")?;
    if let Some(ts) = fields.next()
        && ts.parse::<i64>().is_err()
    {
        return Err("bad timestamp");
    }
    if fields.next().is_some() {
        return Err("text after the timestamp");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// The samples of a text exposition, in order; `Err` at the first malformed line. `# HELP`,
/// `# TYPE` and other comments are checked for a name and skipped.
pub fn samples(text: &str) -> impl Iterator<Item = Result<Sample<'_>, ParseError>> {
    text.split('\n').enumerate().filter_map(|(n, line)| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let err = |message: &str| {
            Some(Err(ParseError {
                line: n + 1,
                message: message.to_owned(),
            }))
        };
        if line.trim().is_empty() {
            return None;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_ascii_whitespace();
            return match words.next() {
                Some("HELP" | "TYPE") => match words.next() {
                    Some(name)
                        if name.bytes().all(is_name_char) && is_name_start(name.as_bytes()[0]) =>
                    {
                        None
                    }
                    _ => err("# HELP or # TYPE without a metric name"),
                },
                _ => None,
            };
        }
        Some(parse_line(line).map_err(|m| ParseError {
            line: n + 1,
            message: m.to_owned(),
        }))
    })
}

/// What routing reads from one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VllmMetrics {
    /// Any `vllm:` series at all (an old or foreign server exports none).
    pub is_vllm: bool,
    pub running: f64,
    pub waiting: f64,
    /// 0..1; `None` when neither KV metric is there.
    pub kv: Option<f64>,
    pub success_total: f64,
    pub started: Option<f64>,
    /// From the current `vllm:lora_requests_info`; `None` before the first LoRA request.
    pub max_lora: Option<u32>,
    /// Adapters running or waiting, each once, in order.
    pub adapters: Vec<String>,
}

impl VllmMetrics {
    /// Read the figures from a whole `/metrics` answer.
    pub fn parse(text: &str) -> Result<VllmMetrics, ParseError> {
        let mut m = VllmMetrics::default();
        let (mut kv_sum, mut kv_n, mut old_kv_sum, mut old_kv_n) = (0.0, 0, 0.0, 0);
        let mut lora: Option<Sample<'_>> = None;
        for s in samples(text) {
            let s = s?;
            if s.name.starts_with("vllm:") {
                m.is_vllm = true;
            }
            match s.name {
                "vllm:num_requests_running" => m.running += s.value,
                "vllm:num_requests_waiting" => m.waiting += s.value,
                "vllm:kv_cache_usage_perc" => (kv_sum, kv_n) = (kv_sum + s.value, kv_n + 1),
                "vllm:gpu_cache_usage_perc" => {
                    (old_kv_sum, old_kv_n) = (old_kv_sum + s.value, old_kv_n + 1)
                }
                "vllm:request_success_total" => m.success_total += s.value,
                "process_start_time_seconds" => m.started = Some(s.value),
                "vllm:lora_requests_info" if lora.is_none_or(|l| s.value > l.value) => {
                    lora = Some(s)
                }
                _ => {}
            }
        }
        m.kv = match (kv_n, old_kv_n) {
            (0, 0) => None,
            (0, n) => Some(old_kv_sum / f64::from(n)),
            (n, _) => Some(kv_sum / f64::from(n)),
        };
        if let Some(l) = lora {
            m.max_lora = l.label("max_lora").and_then(|v| v.trim().parse().ok());
            for key in ["running_lora_adapters", "waiting_lora_adapters"] {
                if let Some(list) = l.label(key) {
                    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                        if !m.adapters.iter().any(|a| a == name) {
                            m.adapters.push(name.to_owned());
                        }
                    }
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests;
