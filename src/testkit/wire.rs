//! Reading one HTTP/1.1 request off a connection, as the stand-ins see it: the raw target, the
//! headers in wire order (names lowercased, repeats kept apart), the whole body, and how that
//! body was framed (chunked or not, how many chunks).
//!
//! Deliberately independent of `crate::http` (the proxy's own codec): a stand-in that parsed
//! with the code under test could not catch its bugs.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
};

/// Largest request head accepted (431 above).
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a head.
const MAX_HEADERS: usize = 128;
/// Largest request body accepted (413 above).
const MAX_BODY: u64 = 256 << 20;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 8 * 1024;

/// A request line and headers, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target exactly as sent: path and query string.
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// In wire order; names lowercased; values as text (non-UTF-8 bytes replaced).
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path, without the query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The raw value of query parameter `key` (no percent-decoding).
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query()?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// A numeric query parameter, or `default` when absent or not a number.
    pub fn query_u64(&self, key: &str, default: u64) -> u64 {
        self.query_param(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Whether the client asked to close the connection after this exchange.
    pub fn wants_close(&self) -> bool {
        let has_token = |token: &str| {
            self.headers
                .iter()
                .filter(|(n, _)| n == "connection")
                .flat_map(|(_, v)| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        if self.version == 0 {
            !has_token("keep-alive")
        } else {
            has_token("close")
        }
    }
}

/// A whole request.
#[derive(Debug, Clone)]
pub struct Request {
    pub head: RequestHead,
    pub body: Bytes,
    /// The body came with `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// Number of non-empty chunks the body came in (0 when not chunked).
    pub body_chunks: usize,
}

pub(crate) enum ReadOutcome {
    Request(Request),
    /// The peer closed between requests.
    Closed,
    /// Malformed: answer this status and close.
    Bad(u16, &'static str),
}

enum Framing {
    Length(u64),
    Chunked,
}

/// Read the next request. `buf` holds bytes already read (pipelining) and keeps the excess.
/// The body is read `body_delay` after the head.
pub(crate) async fn read_request(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    body_delay: Duration,
) -> std::io::Result<ReadOutcome> {
    let (head, head_len) = loop {
        match parse_head(buf) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) if buf.len() > MAX_HEAD => {
                return Ok(ReadOutcome::Bad(431, "request head too large"));
            }
            Ok(None) => {}
            Err(why) => return Ok(ReadOutcome::Bad(400, why)),
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(ReadOutcome::Closed);
        }
    };
    buf.advance(head_len);

    let framing = match framing(&head) {
        Ok(f) => f,
        Err((status, why)) => return Ok(ReadOutcome::Bad(status, why)),
    };
    let expects_body = !matches!(framing, Framing::Length(0));
    let continue_asked = head
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_body && continue_asked && head.version == 1 {
        wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }

    if expects_body && !body_delay.is_zero() {
        tokio::time::sleep(body_delay).await;
    }
    let (body, chunked, body_chunks) = match framing {
        Framing::Length(len) => {
            let len = len as usize;
            fill(rd, buf, len).await?;
            (buf.split_to(len).freeze(), false, 0)
        }
        Framing::Chunked => match read_chunked(rd, buf).await? {
            Ok((body, chunks)) => (body, true, chunks),
            Err(why) => return Ok(ReadOutcome::Bad(400, why)),
        },
    };
    Ok(ReadOutcome::Request(Request {
        head,
        body,
        chunked,
        body_chunks,
    }))
}

fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let head = RequestHead {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                version: req.version.unwrap_or(1),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
            };
            Ok(Some((head, len)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err("too many headers"),
        Err(_) => Err("malformed request head"),
    }
}

fn framing(head: &RequestHead) -> Result<Framing, (u16, &'static str)> {
    let te: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .collect();
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.trim())
        .collect();
    if !te.is_empty() {
        if !lengths.is_empty() {
            return Err((400, "both transfer-encoding and content-length"));
        }
        return match te.last() {
            Some(last) if last.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
            _ => Err((400, "transfer-encoding without a final chunked")),
        };
    }
    let Some(first) = lengths.first() else {
        return Ok(Framing::Length(0));
    };
    if lengths.iter().any(|l| l != first) {
        return Err((400, "conflicting content-length"));
    }
    let len: u64 = first.parse().map_err(|_| (400, "bad content-length"))?;
    if len > MAX_BODY {
        return Err((413, "request body too large"));
    }
    Ok(Framing::Length(len))
}

/// Read until `buf` holds at least `n` bytes.
async fn fill(rd: &mut OwnedReadHalf, buf: &mut BytesMut, n: usize) -> std::io::Result<()> {
    while buf.len() < n {
        buf.reserve(n - buf.len());
        if rd.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Read one CRLF-terminated line (without the CRLF).
async fn read_line(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
) -> std::io::Result<Result<Bytes, &'static str>> {
    loop {
        if let Some(pos) = memchr::memmem::find(buf, b"\r\n") {
            let line = buf.split_to(pos).freeze();
            buf.advance(2);
            return Ok(Ok(line));
        }
        if buf.len() > MAX_LINE {
            return Ok(Err("chunk line too long"));
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Decode a chunked body: returns the body and how many chunks it came in.
async fn read_chunked(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
) -> std::io::Result<Result<(Bytes, usize), &'static str>> {
    let mut body = BytesMut::new();
    let mut chunks = 0;
    loop {
        let line = match read_line(rd, buf).await? {
            Ok(line) => line,
            Err(why) => return Ok(Err(why)),
        };
        let size_text = std::str::from_utf8(&line).unwrap_or("");
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = u64::from_str_radix(size_text, 16) else {
            return Ok(Err("bad chunk size"));
        };
        if size == 0 {
            // Trailers until the empty line.
            loop {
                match read_line(rd, buf).await? {
                    Ok(line) if line.is_empty() => return Ok(Ok((body.freeze(), chunks))),
                    Ok(_) => {}
                    Err(why) => return Ok(Err(why)),
                }
            }
        }
        if body.len() as u64 + size > MAX_BODY {
            return Ok(Err("request body too large"));
        }
        let size = size as usize;
        fill(rd, buf, size + 2).await?;
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Ok(Err("chunk not followed by CRLF"));
        }
        buf.advance(size + 2);
        chunks += 1;
    }
}
