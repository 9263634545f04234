//! One client connection: read a request head, hand it to the worker's [`Handler`] (which reads
//! the body and answers), repeat.
//!
//! Requests on a connection are handled one after the other, so pipelined requests are answered
//! in order. Timeouts: a keep-alive connection idle for `server.idle_timeout` is closed; once a
//! request's first byte has arrived its whole head must arrive within
//! `server.header_read_timeout` (slowloris); a body that stalls for `idle_timeout` is a 408.

use std::{net::SocketAddr, rc::Rc, time::Duration};

use bytes::{Bytes, BytesMut};
use monoio::{
    buf::IoBufMut,
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
    net::TcpStream,
};

use super::{Handler, Worker};
use crate::{
    error::{Error, ErrorKind},
    http::{BodyKind, RequestHead, chunked::ChunkedDecoder, response},
};

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 * 1024;

/// A client connection and the bytes read from it but not yet used.
pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    buf: BytesMut,
    /// Requests served so far on this connection.
    pub requests: u64,
}

/// What reading the next head gave.
enum Next {
    Head(RequestHead),
    /// The client closed (or went idle, or shutdown began) between requests.
    Closed,
}

/// Serve a connection until it closes.
pub async fn serve<H: Handler>(worker: Rc<Worker<H>>, stream: TcpStream, peer: SocketAddr) {
    let _guard = worker.conn_guard();
    let mut conn = Conn {
        stream,
        peer,
        buf: BytesMut::with_capacity(READ_CHUNK),
        requests: 0,
    };
    loop {
        let head = match conn.next_head(&worker).await {
            Ok(Next::Head(head)) => head,
            Ok(Next::Closed) => break,
            Err(err) => {
                let mut out = Vec::new();
                response::error(&mut out, &err, false);
                // The head did not parse, but its method may have.
                if conn.buf.starts_with(b"HEAD ") {
                    response::strip_body(&mut out);
                }
                worker.common.metrics.count_error(err.kind.as_str());
                let _ = conn.write_all(out).await;
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
}

impl Conn {
    async fn next_head<H>(&mut self, worker: &Worker<H>) -> Result<Next, Error> {
        let cfg = &worker.common.config;
        // Between requests: wait for the first byte, at most the idle timeout, or shutdown.
        if self.buf.is_empty() {
            let wait = if self.requests == 0 {
                cfg.header_read_timeout
            } else {
                cfg.idle_timeout
            };
            monoio::select! {
                read = monoio::time::timeout(wait, self.fill()) => match read {
                    Ok(Ok(n)) if n > 0 => {}
                    // EOF, a reset, or idle too long: close quietly.
                    _ => return Ok(Next::Closed),
                },
                _ = worker.closing.wait() => return Ok(Next::Closed),
            }
        }
        let deadline = monoio::time::Instant::now() + cfg.header_read_timeout;
        loop {
            if let Some((head, len)) = RequestHead::parse(&self.buf)? {
                let _ = self.buf.split_to(len);
                return Ok(Next::Head(head));
            }
            if self.buf.len() > cfg.max_header_size {
                return Err(Error::new(
                    ErrorKind::HeaderTooLarge,
                    "request head too large",
                ));
            }
            match monoio::time::timeout_at(deadline, self.fill()).await {
                Ok(Ok(0)) => return Ok(Next::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Ok(Next::Closed),
                Err(_) => return Err(timeout_408("request head")),
            }
        }
    }

    /// Read more bytes into the buffer; `Ok(0)` on EOF.
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.reserve(READ_CHUNK);
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = self.stream.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        res
    }

    /// Read the whole body of `head`, at most `max` bytes (413 above), answering
    /// `Expect: 100-continue` first when the client waits for it.
    pub async fn read_body(
        &mut self,
        head: &RequestHead,
        max: usize,
        idle: Duration,
    ) -> Result<Bytes, Error> {
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
                    self.fill_body(idle).await?;
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
                    self.fill_body(idle).await?;
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
    pub async fn write_continue(&mut self, head: &RequestHead) -> std::io::Result<()> {
        if head.minor == 0 {
            return Ok(());
        }
        self.write_all(response::CONTINUE.to_vec()).await.map(drop)
    }

    async fn fill_body(&mut self, idle: Duration) -> Result<(), Error> {
        match monoio::time::timeout(idle, self.fill()).await {
            Ok(Ok(0)) => Err(Error::bad_request("client closed the connection mid-body")),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::bad_request(format!("reading the body: {e}"))),
            Err(_) => Err(timeout_408("request body")),
        }
    }

    /// Write all of `buf` to the client; hands the buffer back for reuse.
    pub async fn write_all(&mut self, buf: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let (res, buf) = self.stream.write_all(buf).await;
        res.map(|_| buf)
    }

    /// Bytes already read beyond the current request (pipelined requests).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }
}

fn timeout_408(what: &str) -> Error {
    // 408 is not an Error kind of its own: a client too slow to send is a bad request.
    Error::bad_request(format!("timed out waiting for the {what}"))
}
