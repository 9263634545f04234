//! One client connection: read a request head, hand it to the worker's [`Handler`] (which reads
//! the body and answers), repeat.
//!
//! Requests on a connection are handled one after the other, so pipelined requests are answered
//! in order. Every wait is bounded:
//! - the first head must arrive whole within `server.header_read_timeout` of the accept; a
//!   keep-alive connection idle for `server.idle_timeout` between requests is closed, and once
//!   a later request's first byte has arrived its whole head must follow within
//!   `header_read_timeout` (slowloris). A connection that sent nothing is closed quietly; one
//!   cut short mid-head gets a 408.
//! - a body must arrive whole within `server.body_read_timeout` of the end of its head, however
//!   it trickles: 408 and close.
//! - a head longer than `server.max_header_size` is a 431: never more than one byte past the
//!   limit is read while a head is incomplete, and a complete head is measured exactly.
//! - with `server.tls`, the TLS handshake counts against the first head's
//!   `header_read_timeout`; plain HTTP on a TLS listener (unless `server.tls.allow_plain`) gets
//!   a 400 in plain text and is closed.

use std::{cell::Cell, net::SocketAddr, os::fd::AsRawFd, rc::Rc, time::Duration};

use bytes::{Bytes, BytesMut};
use monoio::{
    buf::IoBufMut,
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
    net::TcpStream,
    time::Instant,
};

use super::{Handler, Worker};
use crate::{
    error::{Error, ErrorKind},
    http::{BodyKind, RequestHead, chunked::ChunkedDecoder, response},
    metrics::{Metrics, ResultLabel},
    tls::{Accepted, Stream},
};

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 * 1024;

/// How long a connection the server closes keeps reading (and dropping) what the client still
/// sends: closing with unread bytes makes the kernel send a reset, which discards whatever of
/// the answer is not sent yet (a 413 or 431 answered before the whole request was read;
/// RFC 9112 §9.6).
const LINGER: Duration = Duration::from_secs(2);

/// A client connection and the bytes read from it but not yet used.
pub struct Conn {
    /// Plain TCP, or TLS (`server.tls`).
    pub stream: Stream,
    pub peer: SocketAddr,
    buf: BytesMut,
    /// Requests served so far on this connection.
    pub requests: u64,
    /// When the connection was accepted.
    opened: Instant,
    /// The head being read is a HEAD request's, as far as its first bytes tell: an answer
    /// refusing it has no body. (A read cut short by a timeout takes its buffer with it.)
    head_request: bool,
    /// A peer's acknowledgement the kernel holds back (`MSG_MORE`) to send with the answer's
    /// first bytes ([`Conn::acknowledge`]).
    held_ack: Cell<bool>,
}

/// What reading the next head gave.
// The head holds its header spans inline; boxing it would cost the allocation that saves.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(RequestHead),
    /// The client closed (or went idle, or shutdown began) between requests.
    Closed,
}

/// Serve a connection until it closes.
pub async fn serve<H: Handler>(worker: Rc<Worker<H>>, tcp: TcpStream, peer: SocketAddr) {
    let _guard = worker.conn_guard();
    let opened = Instant::now();
    let (stream, read) = match &worker.common.tls {
        None => (Stream::Plain(tcp), Vec::new()),
        Some(acceptor) => match accept_tls(&worker, acceptor, tcp, peer, opened).await {
            Some(accepted) => accepted,
            None => return,
        },
    };
    let mut buf = BytesMut::with_capacity(READ_CHUNK.max(read.len()));
    buf.extend_from_slice(&read);
    let mut conn = Conn {
        stream,
        peer,
        buf,
        requests: 0,
        opened,
        head_request: false,
        held_ack: Cell::new(false),
    };
    // Whether the server ends the connection while the client may still be sending.
    let mut linger = true;
    loop {
        let head = match conn.next_head(&worker).await {
            Ok(Next::Head(head)) => head,
            Ok(Next::Closed) => {
                linger = false;
                break;
            }
            Err(err) => {
                conn.write_last_error(&err, &worker.common.metrics).await;
                break;
            }
        };
        conn.requests += 1;
        let keep_alive = worker.handler.handle(&mut conn, head).await;
        if !keep_alive || worker.common.shutdown.is_triggered() {
            break;
        }
    }
    let _ = conn.stream.shutdown().await;
    if linger {
        conn.linger().await;
    }
}

/// The TLS handshake of a new connection on a `server.tls` listener, within the first head's
/// `header_read_timeout` (or until shutdown). The stream and the bytes already read from it
/// (plain HTTP, when allowed); `None` when the connection is done with (closed, failed, refused
/// and answered).
async fn accept_tls<H>(
    worker: &Worker<H>,
    acceptor: &crate::tls::Acceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    opened: Instant,
) -> Option<(Stream, Vec<u8>)> {
    let cfg = &worker.common.config;
    let count = |result| {
        worker
            .common
            .metrics
            .tls_connections
            .get_or_create(&ResultLabel { result })
            .inc();
    };
    let deadline = opened + cfg.header_read_timeout;
    let accepted = monoio::select! {
        a = monoio::time::timeout_at(deadline, acceptor.accept(tcp, cfg.max_header_size + 1)) => a,
        _ = worker.closing.wait() => return None,
    };
    match accepted {
        Ok(Ok(Accepted::Tls(stream))) => {
            count("tls");
            Some((stream, Vec::new()))
        }
        Ok(Ok(Accepted::Plain { stream, read })) => {
            count("plain");
            Some((stream, read))
        }
        Ok(Ok(Accepted::Refused { stream, read })) => {
            count("plain_refused");
            let mut conn = Conn {
                stream,
                peer,
                buf: BytesMut::new(),
                requests: 0,
                opened,
                head_request: read.starts_with(b"HEAD "),
                held_ack: Cell::new(false),
            };
            let err = Error::bad_request(
                "this port speaks HTTPS (server.tls): plain HTTP is refused \
                 (server.tls.allow_plain is off)",
            );
            conn.write_last_error(&err, &worker.common.metrics).await;
            let _ = conn.stream.shutdown().await;
            conn.linger().await;
            None
        }
        Ok(Ok(Accepted::Closed)) => None,
        Ok(Err(e)) => {
            count("failed");
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            count("failed");
            tracing::debug!(%peer, "TLS handshake not done within server.header_read_timeout");
            None
        }
    }
}

impl Conn {
    /// Answer `err` on a connection about to close (no body for a HEAD request), and count it.
    async fn write_last_error(&mut self, err: &Error, metrics: &Metrics) {
        let mut out = Vec::new();
        response::error(&mut out, err, false);
        if self.head_request {
            response::strip_body(&mut out);
        }
        metrics.count_error(err.kind.as_str());
        let _ = self.write_all(out).await;
    }

    async fn next_head<H>(&mut self, worker: &Worker<H>) -> Result<Next, Error> {
        let cfg = &worker.common.config;
        let max = cfg.max_header_size;
        // The first head counts from the accept; a later one from its first byte (already here
        // when pipelined), which may take up to the idle timeout to come.
        let mut deadline = if self.requests == 0 {
            self.opened + cfg.header_read_timeout
        } else {
            Instant::now() + cfg.header_read_timeout
        };
        if self.buf.is_empty() {
            let wait = if self.requests == 0 {
                deadline
            } else {
                Instant::now() + cfg.idle_timeout
            };
            monoio::select! {
                read = monoio::time::timeout_at(wait, self.fill(max + 1)) => match read {
                    Ok(Ok(n)) if n > 0 => {}
                    // EOF, a reset, or idle too long: close quietly.
                    _ => return Ok(Next::Closed),
                },
                _ = worker.closing.wait() => return Ok(Next::Closed),
            }
            if self.requests > 0 {
                deadline = Instant::now() + cfg.header_read_timeout;
            }
        }
        loop {
            self.head_request = self.buf.starts_with(b"HEAD ");
            if let Some((head, len)) = RequestHead::split_from(&mut self.buf)? {
                if len > max {
                    return Err(head_too_large(max));
                }
                return Ok(Next::Head(head));
            }
            // Incomplete: every byte so far is head.
            if self.buf.len() > max {
                return Err(head_too_large(max));
            }
            match monoio::time::timeout_at(deadline, self.fill(max + 1 - self.buf.len())).await {
                Ok(Ok(0)) => return Ok(Next::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Ok(Next::Closed),
                Err(_) => {
                    return Err(timeout_408(
                        "request head",
                        "server.header_read_timeout",
                        cfg.header_read_timeout,
                    ));
                }
            }
        }
    }

    /// After the server's last answer: drop what the client still sends until it closes, at
    /// most [`LINGER`].
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER;
        loop {
            self.buf.clear();
            match monoio::time::timeout_at(deadline, self.fill(READ_CHUNK)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    }

    /// Read more bytes into the buffer, at most `limit`; `Ok(0)` on EOF.
    async fn fill(&mut self, limit: usize) -> std::io::Result<usize> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.reserve(READ_CHUNK.min(limit));
        let len = buf.len();
        let end = buf.capacity().min(len.saturating_add(limit));
        let (res, slice) = self.stream.read(buf.slice_mut(len..end)).await;
        self.buf = slice.into_inner();
        res
    }

    /// Read the whole body of `head`, at most `max` bytes (413 above) within `timeout` (408),
    /// answering `Expect: 100-continue` first when the client waits for it.
    pub async fn read_body(
        &mut self,
        head: &RequestHead,
        max: usize,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let deadline = Instant::now() + timeout;
        let too_large = || {
            Error::new(
                ErrorKind::PayloadTooLarge,
                format!("request body larger than server.max_body_size ({max} bytes)"),
            )
        };
        match head.body {
            BodyKind::None | BodyKind::UntilClose => Ok(Bytes::new()),
            BodyKind::Length(n) => {
                let n = usize::try_from(n).map_err(|_| too_large())?;
                if n > max {
                    return Err(too_large());
                }
                self.send_continue(head).await?;
                while self.buf.len() < n {
                    self.fill_body(deadline, timeout).await?;
                }
                Ok(self.buf.split_to(n).freeze())
            }
            BodyKind::Chunked => {
                self.send_continue(head).await?;
                let mut decoder = ChunkedDecoder::new();
                let mut body = Vec::new();
                loop {
                    let used = decoder.feed(&self.buf, Some(&mut body))?;
                    let _ = self.buf.split_to(used);
                    if body.len() > max {
                        return Err(too_large());
                    }
                    if decoder.is_done() {
                        return Ok(body.into());
                    }
                    self.fill_body(deadline, timeout).await?;
                }
            }
        }
    }

    async fn send_continue(&mut self, head: &RequestHead) -> Result<(), Error> {
        if head.expect_continue && self.buf.is_empty() {
            self.write_continue(head)
                .await
                .map_err(|e| Error::bad_request(format!("client went away: {e}")))?;
        }
        Ok(())
    }

    /// Send `100 Continue` for `head`, unless its client speaks HTTP/1.0, which knows no 1xx
    /// answer (RFC 9110 §15.2: never sent to an HTTP/1.0 client).
    async fn write_continue(&mut self, head: &RequestHead) -> std::io::Result<()> {
        if head.minor == 0 {
            return Ok(());
        }
        let (res, _) = self.stream.write_all(response::CONTINUE).await;
        res.map(drop)
    }

    async fn fill_body(&mut self, deadline: Instant, timeout: Duration) -> Result<(), Error> {
        match monoio::time::timeout_at(deadline, self.fill(usize::MAX)).await {
            Ok(Ok(0)) => Err(Error::bad_request("client closed the connection mid-body")),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::bad_request(format!("reading the body: {e}"))),
            Err(_) => Err(timeout_408(
                "request body",
                "server.body_read_timeout",
                timeout,
            )),
        }
    }

    /// Acknowledge a forwarded request with `100 Continue` (to a peer: HTTP/1.1 always).
    ///
    /// Over plain TCP the acknowledgement is queued with `MSG_MORE`: the kernel holds it and it
    /// leaves in one segment with the answer's first bytes, which usually follow within tens
    /// of microseconds; the peer wakes once for both, and this side makes one write fewer.
    /// Every step that can take longer sends it first ([`Conn::release_ack`]: an answer not
    /// there after 5 ms, a fresh upstream connection, a large body, an adapter not on disk),
    /// so it always ends the peer's `routing.forward_timeout` soon after the request arrived;
    /// one step missed would still see it sent by the kernel's own timer for held data (about
    /// 200 ms). Over TLS it is written at once, as is one the kernel can't queue right away.
    pub async fn acknowledge(&mut self, head: &RequestHead) -> std::io::Result<()> {
        if head.minor == 0 {
            return Ok(());
        }
        let mut sent = 0;
        if let Stream::Plain(tcp) = &self.stream {
            let ack = response::CONTINUE;
            // SAFETY: a send from a static buffer on an fd this stream owns.
            let n = unsafe {
                libc::send(
                    tcp.as_raw_fd(),
                    ack.as_ptr().cast(),
                    ack.len(),
                    libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            sent = usize::try_from(n).unwrap_or(0);
            if sent == ack.len() {
                self.held_ack.set(true);
                return Ok(());
            }
        }
        let (res, _) = self.stream.write_all(&response::CONTINUE[sent..]).await;
        res.map(drop)
    }

    /// Send a held acknowledgement now (setting `TCP_NODELAY` again pushes what the kernel
    /// holds). Called before any step that may keep the answer's first bytes waiting.
    pub fn release_ack(&self) {
        if self.held_ack.replace(false) {
            let _ = self.stream.tcp().set_nodelay(true);
        }
    }

    /// Write all of `buf` to the client; hands the buffer back for reuse.
    pub async fn write_all(&mut self, buf: Vec<u8>) -> std::io::Result<Vec<u8>> {
        // Whatever the kernel held leaves with these bytes.
        self.held_ack.set(false);
        let (res, buf) = self.stream.write_all(buf).await;
        res.map(|_| buf)
    }

    /// Bytes already read beyond the current request (pipelined requests).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }
}

fn timeout_408(what: &str, key: &str, limit: Duration) -> Error {
    Error::new(
        ErrorKind::RequestTimeout,
        format!("the {what} did not arrive within {key} ({limit:?})"),
    )
}

fn head_too_large(max: usize) -> Error {
    Error::new(
        ErrorKind::HeaderTooLarge,
        format!("request head larger than server.max_header_size ({max} bytes)"),
    )
}
