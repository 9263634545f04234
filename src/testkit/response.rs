//! Responses of the stand-ins: what a handler returns ([`Response`]: status, headers, framing,
//! body pieces with delays, an optional cut) and how it goes on the wire, watching for the peer
//! leaving between pieces.

use std::{io, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
};

/// Bytes of pipelined input buffered while a request is in progress before reading pauses.
const MAX_PIPELINED: usize = 1 << 20;

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` (the sum of the pieces unless [`Response::announced_len`] says more).
    Length,
    /// `Transfer-Encoding: chunked`, one chunk per non-empty piece.
    Chunked,
    /// No length: the body ends when the server closes the connection.
    CloseDelimited,
}

/// Part of a body, written after `delay`.
#[derive(Debug, Clone)]
pub struct Piece {
    pub delay: Duration,
    pub data: Bytes,
}

impl Piece {
    pub fn new(delay: Duration, data: impl Into<Bytes>) -> Piece {
        Piece {
            delay,
            data: data.into(),
        }
    }
}

/// A scripted answer. HEAD requests and 1xx/204/304 statuses get the head only.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Written in order, as given. Framing headers are added by the server.
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    pub pieces: Vec<Piece>,
    /// `Content-Length` to announce when it differs from the bytes sent (a cut body).
    pub announced_len: Option<u64>,
    /// Close the connection right after the last piece, without finishing the framing.
    pub abort: bool,
    /// Close the connection without writing anything, not even the head.
    pub hang_up: bool,
}

impl Response {
    /// An empty `Content-Length: 0` answer.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            framing: Framing::Length,
            pieces: Vec::new(),
            announced_len: None,
            abort: false,
            hang_up: false,
        }
    }

    /// No answer: the connection closes once the request is read.
    pub fn hang_up() -> Response {
        Response {
            hang_up: true,
            ..Response::new(500)
        }
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A whole body in one piece with `Content-Length`.
    pub fn body(self, content_type: &str, data: impl Into<Bytes>) -> Response {
        self.header("content-type", content_type)
            .pieces(Framing::Length, vec![Piece::new(Duration::ZERO, data)])
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let body = serde_json::to_vec(value).expect("a Value always serializes");
        Response::new(status).body("application/json", body)
    }

    pub fn text(status: u16, text: impl Into<String>) -> Response {
        Response::new(status).body("text/plain; charset=utf-8", text.into())
    }

    pub fn pieces(mut self, framing: Framing, pieces: Vec<Piece>) -> Response {
        self.framing = framing;
        self.pieces = pieces;
        self
    }

    /// Announce `len` bytes in `Content-Length` whatever the pieces hold.
    pub fn announce_len(mut self, len: u64) -> Response {
        self.announced_len = Some(len);
        self
    }

    /// Close the connection after the pieces, leaving the body unfinished.
    pub fn abort_after_pieces(mut self) -> Response {
        self.abort = true;
        self
    }

    /// Bytes of body the pieces hold.
    pub fn body_len(&self) -> u64 {
        self.pieces.iter().map(|p| p.data.len() as u64).sum()
    }
}

/// Wait for input from the peer; `true` when it closed (or errored), `false` when bytes arrived
/// (pipelined requests, kept in `buf`).
pub(crate) async fn peer_gone(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> bool {
    if buf.len() >= MAX_PIPELINED {
        return std::future::pending().await;
    }
    !matches!(rd.read_buf(buf).await, Ok(n) if n > 0)
}

/// Sleep `delay`, unless the peer goes away first (`false`).
async fn pause(rd: &mut OwnedReadHalf, buf: &mut BytesMut, delay: Duration) -> bool {
    if delay.is_zero() {
        return true;
    }
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            gone = peer_gone(rd, buf) => if gone { return false },
        }
    }
}

pub(crate) enum Written {
    KeepAlive,
    Close,
    PeerGone,
}

fn no_body_status(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

pub(crate) async fn write_response(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    mut resp: Response,
    head_only: bool,
    client_close: bool,
    http10: bool,
) -> Written {
    // An HTTP/1.0 client cannot read chunks: fall back to ending the body by closing.
    if http10 && resp.framing == Framing::Chunked {
        resp.framing = Framing::CloseDelimited;
    }
    if resp.hang_up {
        return Written::Close;
    }
    let close = client_close || http10 || resp.abort || resp.framing == Framing::CloseDelimited;
    let announced = resp.announced_len.unwrap_or_else(|| resp.body_len());
    if write_head(wr, &resp, announced, close).await.is_err() {
        return Written::PeerGone;
    }
    if head_only || no_body_status(resp.status) {
        return if close {
            Written::Close
        } else {
            Written::KeepAlive
        };
    }
    for piece in &resp.pieces {
        if !pause(rd, buf, piece.delay).await {
            return Written::PeerGone;
        }
        if piece.data.is_empty() {
            continue;
        }
        let sent = match resp.framing {
            Framing::Chunked => {
                let mut framed = format!("{:x}\r\n", piece.data.len()).into_bytes();
                framed.extend_from_slice(&piece.data);
                framed.extend_from_slice(b"\r\n");
                wr.write_all(&framed).await
            }
            Framing::Length | Framing::CloseDelimited => wr.write_all(&piece.data).await,
        };
        if sent.is_err() {
            return Written::PeerGone;
        }
    }
    if resp.abort {
        return Written::Close;
    }
    if resp.framing == Framing::Chunked && wr.write_all(b"0\r\n\r\n").await.is_err() {
        return Written::PeerGone;
    }
    if close {
        Written::Close
    } else {
        Written::KeepAlive
    }
}

pub(crate) async fn write_head(
    wr: &mut OwnedWriteHalf,
    resp: &Response,
    announced: u64,
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (name, value) in &resp.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !no_body_status(resp.status) {
        match resp.framing {
            Framing::Length => head.push_str(&format!("content-length: {announced}\r\n")),
            Framing::Chunked => head.push_str("transfer-encoding: chunked\r\n"),
            Framing::CloseDelimited => {}
        }
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    wr.write_all(head.as_bytes()).await
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}
