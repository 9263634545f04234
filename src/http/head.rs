//! Request and response heads.
//!
//! A head is parsed with `httparse` into spans over the raw bytes, then its framing is decided
//! once: how long the body is, whether the connection stays open,
//! whether the client waits for `100 Continue`. Ambiguous framing that enables request smuggling
//! (both `Transfer-Encoding` and `Content-Length`, conflicting lengths, a transfer coding other
//! than a final `chunked`) is refused with 400 instead of guessed; a request whose body has
//! another coding under `chunked` (`gzip, chunked`) gets 501 (RFC 9112 §6.1). A request needs
//! exactly one `Host` (none is fine for HTTP/1.0), else 400 (RFC 9112 §3.2).
//!
//! Nothing is allocated per head on the proxy's path: a request head keeps the bytes it was
//! read into (split off the connection's buffer, [`RequestHead::split_from`]), a response head
//! keeps the buffer it was read into ([`ResponseHead::parse`]), and up to [`INLINE_HEADERS`]
//! header spans are held inline.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use crate::error::{Error, ErrorKind};

/// Most headers accepted in one head; more is 431.
pub const MAX_HEADERS: usize = 128;

/// Room for headers the count leaves out, on top of [`MAX_HEADERS`]: a forward carries up to
/// this many (the forward mark and token, `content-length`, `host`), and the peer must not
/// refuse a request its entry node accepted.
pub const INTERNAL_SLACK: usize = 4;

/// Headers whose spans a head holds without allocating; a head with more spills them to the
/// heap (one allocation). Clients such as OpenAI's SDKs send 15-20.
pub const INLINE_HEADERS: usize = 32;

/// Header name prefix of loraplex's own headers (forward mark, fallback notice).
pub const INTERNAL_PREFIX: &[u8] = b"x-loraplex-";

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyKind {
    #[default]
    None,
    Length(u64),
    Chunked,
    /// Response only: the body runs until the upstream closes.
    UntilClose,
}

/// The request methods the proxy cares to tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Other,
}

impl Method {
    fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }
}

type Span = Range<u32>;

#[derive(Debug, Clone)]
struct HeaderSpan {
    name: Span,
    value: Span,
    /// Dropped when the head is forwarded (hop-by-hop or re-framed by us).
    hop: bool,
}

/// What both heads share: the raw bytes (`B`: a request's split-off `Bytes`, a response's read
/// buffer) and the header spans into them.
#[derive(Debug, Clone)]
struct Fields<B> {
    raw: B,
    headers: SmallVec<[HeaderSpan; INLINE_HEADERS]>,
}

impl<B: AsRef<[u8]>> Fields<B> {
    /// Spans of `parsed` (headers httparse found in `buf`), with `raw` to keep (`buf` itself, a
    /// copy, or an empty placeholder until the bytes are attached).
    fn new(buf: &[u8], parsed: &[httparse::Header<'_>], raw: B) -> Fields<B> {
        let base = buf.as_ptr() as usize;
        let span = |s: &[u8]| {
            let start = (s.as_ptr() as usize - base) as u32;
            start..start + s.len() as u32
        };
        let headers = parsed
            .iter()
            .map(|h| HeaderSpan {
                name: span(h.name.as_bytes()),
                value: span(h.value),
                hop: false,
            })
            .collect();
        Fields { raw, headers }
    }

    fn bytes(&self, s: &Span) -> &[u8] {
        &self.raw.as_ref()[s.start as usize..s.end as usize]
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|h| (self.bytes(&h.name), self.bytes(&h.value)))
    }

    /// Append the end-to-end headers (hop-by-hop and internal ones left out), but those named
    /// in `replaced` (their new values follow).
    fn write_end_to_end(&self, out: &mut Vec<u8>, replaced: &[(&str, &[u8])]) {
        for h in self.headers.iter().filter(|h| !h.hop) {
            let name = self.bytes(&h.name);
            if !replaced.is_empty()
                && replaced
                    .iter()
                    .any(|(r, _)| r.as_bytes().eq_ignore_ascii_case(name))
            {
                continue;
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(self.bytes(&h.value));
            out.extend_from_slice(b"\r\n");
        }
    }
}

impl<B> Fields<B> {
    /// Decide framing and mark hop-by-hop headers; `raw` holds the bytes the spans point into.
    /// `request`: refuse non-chunked codings.
    fn frame(&mut self, raw: &[u8], minor: u8, request: bool) -> Result<Framing, Error> {
        let bytes = |s: &Span| &raw[s.start as usize..s.end as usize];
        let mut framing = Framing {
            keep_alive: minor == 1,
            ..Framing::default()
        };
        let mut connection_tokens: SmallVec<[&[u8]; 8]> = SmallVec::new();
        let mut te: Option<Span> = None;
        let mut length: Option<u64> = None;
        for h in &mut self.headers {
            let (name, value) = (bytes(&h.name), bytes(&h.value));
            let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
            let hop = if is(b"connection") || is(b"proxy-connection") {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        framing.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        framing.keep_alive_token = true;
                    } else if !token.is_empty() {
                        connection_tokens.push(token);
                    }
                }
                true
            } else if is(b"transfer-encoding") {
                if te.is_some() {
                    return Err(Error::bad_request("repeated Transfer-Encoding header"));
                }
                te = Some(h.value.clone());
                true
            } else if is(b"content-length") {
                let n = parse_content_length(value)?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::bad_request("conflicting Content-Length headers"));
                }
                length = Some(n);
                true
            } else if is(b"expect") {
                framing.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
                true
            } else {
                is(b"keep-alive")
                    || is(b"te")
                    || is(b"trailer")
                    || is(b"upgrade")
                    || name
                        .get(..INTERNAL_PREFIX.len())
                        .is_some_and(|p| p.eq_ignore_ascii_case(INTERNAL_PREFIX))
            };
            h.hop = hop;
        }
        if !connection_tokens.is_empty() {
            for h in &mut self.headers {
                let name = bytes(&h.name);
                if connection_tokens
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(name))
                {
                    h.hop = true;
                }
            }
        }
        framing.keep_alive = if minor == 1 {
            !framing.close
        } else {
            framing.keep_alive_token
        };
        framing.body = match (te, length) {
            (Some(_), Some(_)) if request => {
                return Err(Error::bad_request(
                    "both Transfer-Encoding and Content-Length: refused (request smuggling)",
                ));
            }
            (Some(te), _) => {
                // A list: empty elements don't count (RFC 9110 §5.6.1).
                let value = bytes(&te);
                let mut codings = value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|c| !c.is_empty());
                let last = codings.next_back().unwrap_or(b"");
                if last.eq_ignore_ascii_case(b"chunked") {
                    if request && minor == 0 {
                        return Err(Error::bad_request(
                            "Transfer-Encoding in an HTTP/1.0 request",
                        ));
                    }
                    if request && codings.next().is_some() {
                        let shown = String::from_utf8_lossy(value);
                        return Err(Error::new(
                            ErrorKind::NotImplemented,
                            format!(
                                "Transfer-Encoding {:?}: only chunked is supported",
                                shown.chars().take(100).collect::<String>()
                            ),
                        ));
                    }
                    BodyKind::Chunked
                } else if request {
                    // The body's end can't be known: refused, never guessed (RFC 9112 §6.3).
                    return Err(Error::bad_request(
                        "Transfer-Encoding without chunked last: unsupported",
                    ));
                } else {
                    BodyKind::UntilClose
                }
            }
            (None, Some(n)) => BodyKind::Length(n),
            (None, None) if request => BodyKind::None,
            (None, None) => BodyKind::UntilClose,
        };
        Ok(framing)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Framing {
    body: BodyKind,
    keep_alive: bool,
    keep_alive_token: bool,
    close: bool,
    expect_continue: bool,
}

fn parse_content_length(v: &[u8]) -> Result<u64, Error> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(Error::bad_request("invalid Content-Length"));
    }
    // 19 digits always fit in a u64.
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn parse_error(e: httparse::Error) -> Error {
    match e {
        httparse::Error::TooManyHeaders => {
            Error::new(ErrorKind::HeaderTooLarge, "too many request headers")
        }
        e => Error::bad_request(format!("malformed request head: {e}")),
    }
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    fields: Fields<Bytes>,
    method: Span,
    target: Span,
    pub kind: Method,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub body: BodyKind,
    /// The client connection may stay open after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    /// Parse a head at the start of `buf`. `Ok(None)`: more bytes are needed.
    /// Returns the head (with a copy of its bytes) and its length in bytes.
    pub fn parse(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, Error> {
        let Some((mut head, len)) = RequestHead::parse_spans(buf)? else {
            return Ok(None);
        };
        head.fields.raw = Bytes::copy_from_slice(&buf[..len]);
        Ok(Some((head, len)))
    }

    /// [`parse`](Self::parse) the head at the start of `buf` and, when it is complete, split it
    /// off `buf`: the head keeps those bytes without copying them. `Ok(None)`: more bytes are
    /// needed (`buf` is left as it is).
    pub fn split_from(buf: &mut BytesMut) -> Result<Option<(RequestHead, usize)>, Error> {
        let Some((mut head, len)) = RequestHead::parse_spans(buf)? else {
            return Ok(None);
        };
        head.fields.raw = buf.split_to(len).freeze();
        Ok(Some((head, len)))
    }

    /// The head at the start of `buf`, its bytes not attached yet (an empty `raw`).
    fn parse_spans(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, Error> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS + INTERNAL_SLACK];
        let mut req = httparse::Request::new(&mut storage);
        let len = match req.parse(buf).map_err(parse_error)? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let base = buf.as_ptr() as usize;
        let span = |s: &str| {
            let start = (s.as_ptr() as usize - base) as u32;
            start..start + s.len() as u32
        };
        let (method_str, path) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
        let (method, target, minor) = (span(method_str), span(path), req.version.unwrap_or(1));
        let kind = Method::parse(method_str);
        let is_internal = |h: &httparse::Header<'_>| {
            h.name.len() >= INTERNAL_PREFIX.len()
                && h.name.as_bytes()[..INTERNAL_PREFIX.len()].eq_ignore_ascii_case(INTERNAL_PREFIX)
        };
        let is_host = |h: &httparse::Header<'_>| h.name.eq_ignore_ascii_case("host");
        // The limit counts what a client controls: not loraplex's own headers, nor the one
        // `Content-Length` and `Host` a forward always writes.
        let counted = |h: &&httparse::Header<'_>| {
            !is_internal(h) && !is_host(h) && !h.name.eq_ignore_ascii_case("content-length")
        };
        if req.headers.iter().filter(counted).count() > MAX_HEADERS {
            return Err(parse_error(httparse::Error::TooManyHeaders));
        }
        match req.headers.iter().filter(|h| is_host(h)).count() {
            0 if minor == 1 => {
                return Err(Error::bad_request("HTTP/1.1 request without a Host header"));
            }
            0 | 1 => {}
            _ => return Err(Error::bad_request("more than one Host header")),
        }
        let mut fields = Fields::new(buf, req.headers, Bytes::new());
        let framing = fields.frame(buf, minor, true)?;
        let head = RequestHead {
            fields,
            method,
            target,
            kind,
            minor,
            body: framing.body,
            keep_alive: framing.keep_alive,
            expect_continue: framing.expect_continue && minor == 1,
        };
        Ok(Some((head, len)))
    }

    pub fn method(&self) -> &str {
        // httparse only accepts token characters, which are ASCII.
        std::str::from_utf8(self.fields.bytes(&self.method)).unwrap_or("")
    }

    /// The request target as sent: path and query string.
    pub fn target(&self) -> &str {
        std::str::from_utf8(self.fields.bytes(&self.target)).unwrap_or("")
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map_or(t, |(p, _)| p)
    }

    /// First value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields.get(name)
    }

    /// A header's value as trimmed UTF-8, when present and valid.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter()
    }

    /// Whether `body` should be read for a `model`: JSON content types always (a body that
    /// isn't a JSON object is then a 400), multipart never, anything else (curl's `-d` sends
    /// `application/x-www-form-urlencoded`) when it looks like a JSON object.
    pub fn carries_model(&self, body: &[u8]) -> bool {
        let ct = self.header("content-type").unwrap_or_default();
        let has = |needle: &[u8]| {
            ct.windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle))
        };
        if has(b"json") {
            true
        } else if has(b"multipart/") {
            false
        } else {
            body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        }
    }

    /// Serialise this head for the next hop: same method and target, end-to-end headers only,
    /// then `extra` headers (which replace the client's headers of the same name: a rewritten
    /// `traceparent`), then the framing of a body of `body_len` bytes (the proxy always
    /// sends bodies with a length, having read them whole). The next hop gets HTTP/1.1, so an
    /// HTTP/1.0 request without `Host` gets an empty one (RFC 9112 §3.2: the target has no
    /// authority of its own).
    pub fn write_forward(&self, out: &mut Vec<u8>, extra: &[(&str, &[u8])], body_len: usize) {
        out.extend_from_slice(self.method().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target().as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        if self.header("host").is_none() {
            out.extend_from_slice(b"host: \r\n");
        }
        self.fields.write_end_to_end(out, extra);
        for (name, value) in extra {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if body_len > 0 || matches!(self.kind, Method::Post | Method::Put | Method::Patch) {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa_buf(body_len as u64).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// A parsed response head from an upstream (vLLM or a peer). It keeps the buffer it was read
/// into: the head, then whatever body bytes came with it ([`ResponseHead::into_buf`]).
#[derive(Debug, Clone)]
pub struct ResponseHead {
    fields: Fields<Vec<u8>>,
    pub status: u16,
    reason: Span,
    pub minor: u8,
    pub body: BodyKind,
    /// The upstream connection may be reused after this response.
    pub keep_alive: bool,
}

impl ResponseHead {
    /// Parse the response head at the start of `buf`, which the head keeps (no copy). `request`
    /// is the method it answers (HEAD has no body). [`ParsedResponse::Partial`] hands `buf` back when
    /// more bytes are needed.
    pub fn parse(buf: Vec<u8>, request: Method) -> Result<ParsedResponse, Error> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut storage);
        let len = match res.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(ParsedResponse::Partial(buf)),
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::BadGateway,
                    format!("bad upstream head: {e}"),
                ));
            }
        };
        let base = buf.as_ptr() as usize;
        let reason = res.reason.unwrap_or("");
        let start = (reason.as_ptr() as usize).saturating_sub(base) as u32;
        let reason = if reason.is_empty() {
            0..0
        } else {
            start..start + reason.len() as u32
        };
        let (status, minor) = (res.code.unwrap_or(502), res.version.unwrap_or(1));
        let mut fields = Fields::new(&buf, res.headers, Vec::new());
        let framing = fields
            .frame(&buf, minor, false)
            .map_err(|e| Error::new(ErrorKind::BadGateway, format!("upstream: {}", e.message)))?;
        let mut body = framing.body;
        if request == Method::Head || status == 204 || status == 304 || (100..200).contains(&status)
        {
            body = BodyKind::None;
        }
        let keep_alive = framing.keep_alive && body != BodyKind::UntilClose;
        fields.raw = buf;
        Ok(ParsedResponse::Head(
            ResponseHead {
                fields,
                status,
                reason,
                minor,
                body,
                keep_alive,
            },
            len,
        ))
    }

    /// The buffer the head was read into (the head's bytes, then any body bytes after them).
    pub fn buf(&self) -> &[u8] {
        &self.fields.raw
    }

    /// Give the buffer back, for the body (the head is done with).
    pub fn into_buf(self) -> Vec<u8> {
        self.fields.raw
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields.get(name)
    }

    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter()
    }

    pub fn reason(&self) -> &[u8] {
        self.fields.bytes(&self.reason)
    }

    /// Serialise for the client. `body` is the framing the client will see (the proxy passes
    /// chunked through to HTTP/1.1 clients and decodes it for HTTP/1.0 ones); `keep_alive`
    /// whether the client connection stays open; `extra` headers are appended.
    pub fn write_client(
        &self,
        out: &mut Vec<u8>,
        body: BodyKind,
        keep_alive: bool,
        client_minor: u8,
        extra: &[(&str, &[u8])],
    ) {
        out.extend_from_slice(if client_minor == 0 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        out.extend_from_slice(itoa_buf(u64::from(self.status)).as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.reason());
        out.extend_from_slice(b"\r\n");
        self.fields.write_end_to_end(out, &[]);
        for (name, value) in extra {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        match body {
            BodyKind::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa_buf(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            BodyKind::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            BodyKind::None | BodyKind::UntilClose => {
                // A response to HEAD keeps the length it would have had.
                if let Some(n) = self
                    .header("content-length")
                    .filter(|_| self.body_none_by_rule())
                {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(n);
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if client_minor == 0 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// No body although the head may describe one (HEAD, 204, 304).
    fn body_none_by_rule(&self) -> bool {
        self.body == BodyKind::None && self.status != 204 && !(100..200).contains(&self.status)
    }
}

/// What [`ResponseHead::parse`] found.
// The head holds its header spans inline; boxing it would cost the allocation that saves.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ParsedResponse {
    /// A whole head, and its length in bytes.
    Head(ResponseHead, usize),
    /// Not a whole head yet: the buffer back.
    Partial(Vec<u8>),
}

impl ParsedResponse {
    /// The head, when whole (tests).
    pub fn head(self) -> Option<(ResponseHead, usize)> {
        match self {
            ParsedResponse::Head(head, len) => Some((head, len)),
            ParsedResponse::Partial(_) => None,
        }
    }
}

/// Decimal formatting without allocation.
pub fn itoa_buf(n: u64) -> ItoaBuf {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    ItoaBuf {
        buf,
        start: i as u8,
    }
}

pub struct ItoaBuf {
    buf: [u8; 20],
    start: u8,
}

impl ItoaBuf {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start as usize..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> RequestHead {
        RequestHead::parse(s.as_bytes()).unwrap().unwrap().0
    }

    fn forwarded(h: &RequestHead, body_len: usize) -> String {
        let mut out = Vec::new();
        h.write_forward(&mut out, &[], body_len);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn partial_head_needs_more() {
        assert!(
            RequestHead::parse(b"GET / HTTP/1.1\r\nHost: a\r\n")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn framing_and_keep_alive() {
        let h = req("POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(12));
        assert!(h.keep_alive);
        assert_eq!(h.path(), "/v1/completions");
        assert_eq!(h.target(), "/v1/completions?x=1");
        let h = req("GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive);
        let h = req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.keep_alive);
        let h = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert!(!h.keep_alive);
        // Empty list elements don't count.
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: , chunked,\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);
    }

    #[test]
    fn codings_under_chunked_are_501() {
        for te in [
            "gzip, chunked",
            "chunked, chunked",
            "identity,chunked",
            "x , ,chunked",
        ] {
            let s = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n");
            let e = RequestHead::parse(s.as_bytes()).unwrap_err();
            assert_eq!(e.status(), 501, "{te}");
            assert_eq!(e.kind.openai_type(), "NotImplementedError");
        }
        // An upstream may send them: passed through as they are.
        let (r, _) = ResponseHead::parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec(),
            Method::Get,
        )
        .unwrap()
        .head()
        .unwrap();
        assert_eq!(r.body, BodyKind::Chunked);
    }

    #[test]
    fn one_host_for_http_1_1() {
        let bad = |s: &str| RequestHead::parse(s.as_bytes()).unwrap_err().message;
        assert!(bad("GET / HTTP/1.1\r\n\r\n").contains("without a Host"));
        assert!(bad("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n").contains("more than one"));
        assert!(bad("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n").contains("more than one"));
        // HTTP/1.0 may leave it out; the next hop gets HTTP/1.1 with an empty one.
        let h = req("GET /x HTTP/1.0\r\n\r\n");
        assert_eq!(forwarded(&h, 0), "GET /x HTTP/1.1\r\nhost: \r\n\r\n");
        let h = req("GET /x HTTP/1.1\r\nHost:\r\n\r\n");
        assert_eq!(forwarded(&h, 0), "GET /x HTTP/1.1\r\nHost: \r\n\r\n");
    }

    #[test]
    fn extra_headers_replace_the_clients_of_the_same_name() {
        let h = req("POST /v1/x HTTP/1.1\r\nHost: a\r\nTraceParent: 00-old\r\n\
             tracestate: k=v\r\ntraceparent: 00-again\r\n\r\n");
        let mut out = Vec::new();
        h.write_forward(&mut out, &[("traceparent", b"00-new")], 2);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/x HTTP/1.1\r\nHost: a\r\ntracestate: k=v\r\ntraceparent: 00-new\r\n\
             content-length: 2\r\n\r\n"
        );
        // Without extras every end-to-end header passes as it came.
        assert!(forwarded(&h, 0).contains("TraceParent: 00-old\r\n"));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let e = RequestHead::parse(bad.as_bytes()).unwrap_err();
            assert_eq!(e.status(), 400, "{bad:?}");
            assert!(!e.message.contains("Host"), "{bad:?}: {}", e.message);
        }
        // The same length twice is fine.
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(2));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let h = req(
            "POST /v1/x?q=1 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\n\
             X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\n\
             X-Loraplex-Forwarded: 1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\
             Authorization: Bearer t\r\n\r\n",
        );
        assert!(h.expect_continue);
        let out = forwarded(&h, 5);
        assert_eq!(
            out,
            "POST /v1/x?q=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\
             content-length: 5\r\n\r\n"
        );
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut s = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..MAX_HEADERS + 1 {
            s.push_str(&format!("X-{i}: v\r\n"));
        }
        s.push_str("\r\n");
        assert_eq!(RequestHead::parse(s.as_bytes()).unwrap_err().status(), 431);
    }

    #[test]
    fn response_framing() {
        let p = |s: &str, m| ResponseHead::parse(s.into(), m).unwrap().head().unwrap().0;
        let r = p("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::Get);
        assert_eq!((r.body, r.keep_alive), (BodyKind::Length(3), true));
        let r = p(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Post,
        );
        assert_eq!(r.body, BodyKind::Chunked);
        let r = p("HTTP/1.1 200 OK\r\n\r\n", Method::Get);
        assert_eq!((r.body, r.keep_alive), (BodyKind::UntilClose, false));
        let r = p("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::Head);
        assert_eq!(r.body, BodyKind::None);
        let r = p("HTTP/1.1 204 No Content\r\n\r\n", Method::Get);
        assert_eq!((r.body, r.keep_alive), (BodyKind::None, true));
    }

    #[test]
    fn response_is_rewritten_for_the_client() {
        let (r, _) = ResponseHead::parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n\
              Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n\r\n"
                .to_vec(),
            Method::Post,
        )
        .unwrap()
        .head()
        .unwrap();
        let mut out = Vec::new();
        r.write_client(&mut out, BodyKind::Chunked, true, 1, &[]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn itoa() {
        assert_eq!(itoa_buf(0).as_bytes(), b"0");
        assert_eq!(
            itoa_buf(u64::MAX).as_bytes(),
            u64::MAX.to_string().as_bytes()
        );
    }
}
