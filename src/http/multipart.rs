//! The `model` field of a `multipart/form-data` body (vLLM's `/v1/audio/transcriptions` and
//! `/v1/audio/translations`), and rewriting it.
//!
//! vLLM reads forms with Starlette and python-multipart. A proxy that read a form otherwise
//! could be shown one `model` while vLLM serves another, so the body (already read whole) is
//! parsed here by a strict subset of RFC 7578 on which the two readings agree; whatever falls
//! outside it is a 400, never a guess:
//! - the request is a form when the media type of its (first) `Content-Type`, the text before
//!   the first `;`, is `multipart/form-data` (Starlette's test); its `boundary` has 1 to 70
//!   characters of RFC 2046's set, a `charset` other than UTF-8 is refused;
//! - the body starts with its first delimiter (no preamble). A part ends at CRLF `--boundary`
//!   followed by CRLF (the next part) or `--` (the end; the epilogue is ignored, as by
//!   Starlette); followed by anything else it is part data, as for Starlette. Transport padding
//!   and a form without its close delimiter are refused;
//! - a part's headers are `name: value` lines ending in CRLF (a token name, no control
//!   character but tab in the value), at most 8 (python-multipart's limit), `Content-Disposition`
//!   once: `type; key=value...` with token or quoted values (no backslash in a quoted one, which
//!   the two readers unescape differently), keys case-insensitive and each once, `key*` ignored
//!   (RFC 7578 §4.2, as python-multipart does), `name` required (as Starlette requires it);
//! - `model` is at most one part, a text field (no `filename`), UTF-8.
//!
//! An empty body, no `model` part, or an empty one: a base-model request, as for vLLM.

use std::ops::Range;

use memchr::memmem;

use crate::{error::Error, http::RequestHead};

/// Headers a part may have (python-multipart's `max_header_count`).
const MAX_PART_HEADERS: usize = 8;
/// RFC 2046 §5.1.1: a boundary has 1 to 70 characters.
const MAX_BOUNDARY: usize = 70;

/// A form's delimiter: CRLF `--` boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary(Vec<u8>);

impl Boundary {
    /// The boundary of a `multipart/form-data` content type; `None` for any other type.
    pub fn of_content_type(content_type: &[u8]) -> Result<Option<Boundary>, Error> {
        let media = content_type
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default();
        if !trim(media).eq_ignore_ascii_case(b"multipart/form-data") {
            return Ok(None);
        }
        let params = params(content_type)?;
        if let Some(charset) = param(&params, "charset")
            && !(charset.eq_ignore_ascii_case(b"utf-8") || charset.eq_ignore_ascii_case(b"utf8"))
        {
            return Err(bad("only UTF-8 forms are accepted"));
        }
        let boundary = param(&params, "boundary")
            .ok_or_else(|| bad("multipart/form-data without a boundary"))?;
        let valid = (1..=MAX_BOUNDARY).contains(&boundary.len())
            && boundary.last() != Some(&b' ')
            && boundary.iter().all(|&b| is_bchar(b));
        if !valid {
            return Err(bad(
                "the multipart boundary must be 1 to 70 characters of RFC 2046",
            ));
        }
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary);
        Ok(Some(Boundary(delimiter)))
    }

    /// The boundary of `head`'s body, when it is a form.
    pub fn of(head: &RequestHead) -> Result<Option<Boundary>, Error> {
        match head.header("content-type") {
            Some(ct) => Boundary::of_content_type(ct),
            None => Ok(None),
        }
    }

    /// CRLF `--boundary`: what ends a part when CRLF or `--` follows.
    pub fn delimiter(&self) -> &[u8] {
        &self.0
    }

    /// `--boundary`: the first line of a form.
    fn dash(&self) -> &[u8] {
        &self.0[2..]
    }
}

/// The `model` of a form; `Ok(None)` when it has none.
pub fn extract_model<'a>(body: &'a [u8], boundary: &Boundary) -> Result<Option<&'a str>, Error> {
    let Some(range) = model_range(body, boundary)? else {
        return Ok(None);
    };
    let model = std::str::from_utf8(&body[range])
        .map_err(|_| bad("the form's model field is not UTF-8"))?;
    Ok(Some(model))
}

/// The same form with its `model` field set to `model`: every other byte is kept (a form
/// without one gets a `model` part first).
pub fn rewrite_model(body: &[u8], boundary: &Boundary, model: &str) -> Result<Vec<u8>, Error> {
    if model.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(Error::internal(
            "a model name with a line break cannot go in a form",
        ));
    }
    let mut out = Vec::with_capacity(body.len() + model.len() + 64);
    match model_range(body, boundary)? {
        Some(range) => {
            out.extend_from_slice(&body[..range.start]);
            out.extend_from_slice(model.as_bytes());
            out.extend_from_slice(&body[range.end..]);
        }
        None if body.is_empty() => {
            out.extend_from_slice(boundary.dash());
            out.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
            out.extend_from_slice(model.as_bytes());
            out.extend_from_slice(&boundary.0);
            out.extend_from_slice(b"--\r\n");
        }
        None => {
            out.extend_from_slice(boundary.dash());
            out.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
            out.extend_from_slice(model.as_bytes());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(body);
        }
    }
    Ok(out)
}

/// Where the `model` field's value is in `body`, after checking the whole form.
pub fn model_range(body: &[u8], boundary: &Boundary) -> Result<Option<Range<usize>>, Error> {
    if body.is_empty() {
        return Ok(None);
    }
    let delimiter = &boundary.0[..];
    if !body.starts_with(boundary.dash()) {
        return Err(bad("the form does not start with its boundary"));
    }
    let finder = memmem::Finder::new(delimiter);
    let mut pos = boundary.dash().len();
    let mut model = None;
    loop {
        // After a delimiter: `--` closes the form, CRLF opens a part.
        match body.get(pos..pos + 2) {
            Some(b"--") => return Ok(model),
            Some(b"\r\n") => pos += 2,
            _ => return Err(bad("a form boundary is followed by neither CRLF nor --")),
        }
        let (data_start, disposition) = part_headers(body, pos)?;
        let disposition =
            disposition.ok_or_else(|| bad("a form part has no Content-Disposition with a name"))?;
        let data_end = data_end(body, data_start, &finder, delimiter.len())?;
        let params = params(disposition)?;
        let name = param(&params, "name")
            .ok_or_else(|| bad("a form part has no Content-Disposition with a name"))?;
        if name == b"model" {
            if param(&params, "filename").is_some() {
                return Err(bad("the form's model field must be text, not a file"));
            }
            if model.replace(data_start..data_end).is_some() {
                return Err(bad("the form has two model fields"));
            }
        }
        pos = data_end + delimiter.len();
    }
}

/// A part's headers from `pos`: where its data starts, and its `Content-Disposition`.
fn part_headers(body: &[u8], mut pos: usize) -> Result<(usize, Option<&[u8]>), Error> {
    let mut disposition = None;
    for _ in 0..=MAX_PART_HEADERS {
        let rest = &body[pos..];
        let end = memmem::find(rest, b"\r\n").ok_or_else(|| bad("a form part's head is cut"))?;
        let line = &rest[..end];
        pos += end + 2;
        if line.is_empty() {
            return Ok((pos, disposition));
        }
        let colon =
            memchr::memchr(b':', line).ok_or_else(|| bad("a form part header has no ':'"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value_ok = value
            .iter()
            .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t');
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) || !value_ok {
            return Err(bad("a form part header is malformed"));
        }
        if name.eq_ignore_ascii_case(b"content-disposition") && disposition.replace(value).is_some()
        {
            return Err(bad("a form part has two Content-Disposition headers"));
        }
    }
    Err(bad("a form part has more than 8 headers"))
}

/// Where the data of a part starting at `start` ends: at the first delimiter followed by CRLF
/// or `--` (followed by anything else, the delimiter's bytes are data, as for Starlette).
fn data_end(
    body: &[u8],
    start: usize,
    finder: &memmem::Finder<'_>,
    len: usize,
) -> Result<usize, Error> {
    let mut from = start;
    loop {
        let at = from
            + finder
                .find(&body[from..])
                .ok_or_else(|| bad("the form has no closing boundary"))?;
        match body.get(at + len..at + len + 2) {
            Some(b"\r\n" | b"--") => return Ok(at),
            Some([b' ' | b'\t', _]) => return Err(bad("padding after a form boundary")),
            Some(_) => from = at + len,
            None => return Err(bad("the form has no closing boundary")),
        }
    }
}

/// A header parameter: its key and its value (unquoted).
type Param<'a> = (&'a [u8], &'a [u8]);

/// The parameters of a header value `type; key=value; ...` (keys compared case-insensitively
/// by [`param`]; `key*` left out; each key once).
fn params(value: &[u8]) -> Result<Vec<Param<'_>>, Error> {
    let malformed = || bad("a multipart header's parameters are malformed");
    let mut c = Cursor { s: value, i: 0 };
    c.ows();
    c.token(b"/").ok_or_else(malformed)?;
    let mut out: Vec<Param<'_>> = Vec::new();
    loop {
        c.ows();
        match c.next() {
            None => return Ok(out),
            Some(b';') => {}
            Some(_) => return Err(malformed()),
        }
        c.ows();
        let key = c.token(b"").ok_or_else(malformed)?;
        c.ows();
        if c.next() != Some(b'=') {
            return Err(malformed());
        }
        c.ows();
        let value = if c.peek() == Some(b'"') {
            c.i += 1;
            let start = c.i;
            let len = memchr::memchr2(b'"', b'\\', &c.s[start..]).ok_or_else(malformed)?;
            if c.s[start + len] != b'"' {
                return Err(bad("a backslash in a quoted multipart parameter"));
            }
            c.i = start + len + 1;
            &c.s[start..start + len]
        } else {
            c.token(b"").ok_or_else(malformed)?
        };
        if key.contains(&b'*') {
            continue;
        }
        if out.iter().any(|(k, _)| k.eq_ignore_ascii_case(key)) {
            return Err(bad("a multipart header repeats a parameter"));
        }
        out.push((key, value));
    }
}

fn param<'a>(params: &[Param<'a>], key: &str) -> Option<&'a [u8]> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key.as_bytes()))
        .map(|(_, v)| *v)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    fn ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// One or more token characters (or `extra` ones).
    fn token(&mut self, extra: &[u8]) -> Option<&'a [u8]> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|b| is_tchar(b) || extra.contains(&b))
        {
            self.i += 1;
        }
        (self.i > start).then(|| &self.s[start..self.i])
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !ws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !ws(b)).map_or(start, |e| e + 1);
    &s[start..end]
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 2046 `bchars`.
fn is_bchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b)
}

fn bad(message: &'static str) -> Error {
    Error::bad_request(message)
}

#[cfg(test)]
#[path = "multipart_tests.rs"]
mod tests;
