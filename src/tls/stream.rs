//! rustls over a monoio `TcpStream`, and [`Stream`]: a connection that is plain or TLS.
//!
//! [`TlsStream`] is a thin adapter over a `rustls::Connection`: ciphertext read from the socket
//! waits in a buffer of its own until rustls takes it; what rustls encrypts is written out
//! before a write returns (an SSE event leaves at once). Unlike `monoio-rustls` 0.4 it survives
//! a cancelled read (the connection loop drops reads on timeouts and at shutdown, then still
//! writes an answer and drains): the buffer the cancelled read took is replaced, and whatever
//! it may have carried is caught by rustls as a broken record, an error, never a panic.

use std::{
    io::{self, BufRead, Write},
    os::fd::{AsRawFd, RawFd},
};

use monoio::{
    BufResult,
    buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf},
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
    net::TcpStream,
};

/// Ciphertext asked of the kernel per read: one whole TLS record.
const READ_SIZE: usize = 16 * 1024 + 512;

/// A connection, plain or TLS. The plain case is the `TcpStream` itself: one branch per I/O.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    /// The TCP socket underneath (for readiness and `MSG_PEEK`).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.io,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Bytes received but not yet read by the caller (TLS: ciphertext or plaintext rustls
    /// holds). A socket check with `MSG_PEEK` cannot see them.
    pub fn has_buffered_input(&mut self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => s.has_buffered_input(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl AsyncReadRent for Stream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.readv(buf).await,
            Stream::Tls(s) => s.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for Stream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.write(buf).await,
            Stream::Tls(s) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.writev(buf).await,
            Stream::Tls(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush().await,
            Stream::Tls(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
        }
    }
}

/// A TLS connection over a monoio `TcpStream`.
pub struct TlsStream {
    io: TcpStream,
    conn: rustls::Connection,
    /// Ciphertext from the socket rustls has not taken yet: `rbuf[rpos..]`.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Encrypted bytes on their way to the socket (kept for reuse).
    wbuf: Vec<u8>,
    /// The socket said EOF (rustls has been told).
    eof: bool,
}

impl TlsStream {
    /// A connection whose first bytes (`read`, possibly empty) were already taken from the
    /// socket. The handshake is not done yet: see [`TlsStream::handshake`].
    pub fn new(io: TcpStream, mut conn: rustls::Connection, read: Vec<u8>) -> TlsStream {
        // Writes are bounded by their callers (a head, a body chunk): encrypt each whole.
        conn.set_buffer_limit(None);
        TlsStream {
            io,
            conn,
            rbuf: read,
            rpos: 0,
            wbuf: Vec::new(),
            eof: false,
        }
    }

    /// Run the handshake to its end (bound it with a timeout: a peer may stall).
    pub async fn handshake(&mut self) -> io::Result<()> {
        while self.conn.is_handshaking() {
            if self.conn.wants_write() {
                self.flush_tls().await?;
            } else if self.conn.wants_read() {
                self.read_tls().await?;
            } else {
                return Err(io::Error::other("TLS handshake stuck"));
            }
        }
        // The last flight (a client's Finished, a server's session tickets).
        self.flush_tls().await
    }

    /// The rustls connection (negotiated version, peer certificates, ...).
    pub fn connection(&self) -> &rustls::Connection {
        &self.conn
    }

    fn has_buffered_input(&mut self) -> bool {
        self.rpos < self.rbuf.len()
            || self
                .conn
                .reader()
                .fill_buf()
                .is_ok_and(|chunk| !chunk.is_empty())
    }

    /// Give rustls more ciphertext (buffered, else from the socket) and process it.
    async fn read_tls(&mut self) -> io::Result<()> {
        if self.rpos == self.rbuf.len() {
            if self.eof {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut buf = std::mem::take(&mut self.rbuf);
            buf.clear();
            self.rpos = 0;
            buf.reserve(READ_SIZE);
            let (res, back) = self.io.read(buf.slice_mut(0..READ_SIZE)).await;
            self.rbuf = back.into_inner();
            if res? == 0 {
                self.eof = true;
                // Tells rustls the transport ended (`Ok(0)` after a close_notify, else an
                // unexpected EOF).
                self.conn.read_tls(&mut io::empty())?;
                return self.process().await;
            }
        }
        let mut rd = &self.rbuf[self.rpos..];
        let n = self.conn.read_tls(&mut rd)?;
        self.rpos += n;
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        }
        self.process().await
    }

    async fn process(&mut self) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(_) => Ok(()),
            Err(e) => {
                // rustls queued an alert saying why: send it, best effort.
                let _ = self.flush_tls().await;
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    /// Write out everything rustls has encrypted.
    async fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut out = std::mem::take(&mut self.wbuf);
            out.clear();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut out)?;
            }
            let (res, back) = self.io.write_all(out).await;
            self.wbuf = back;
            res?;
        }
        Ok(())
    }

    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        let room = buf.bytes_total();
        if room == 0 {
            return (Ok(0), buf);
        }
        loop {
            let mut reader = self.conn.reader();
            match reader.fill_buf() {
                Ok([]) => return (Ok(0), buf),
                Ok(chunk) => {
                    let n = chunk.len().min(room);
                    // SAFETY: `buf` has room for `room` bytes at `write_ptr`; `n` of them are
                    // written, then marked initialised.
                    unsafe {
                        buf.write_ptr().copy_from_nonoverlapping(chunk.as_ptr(), n);
                        buf.set_init(n);
                    }
                    reader.consume(n);
                    return (Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without a close_notify: an EOF like any other (HTTP frames
                // its own messages; a cut one is seen as cut).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
            }
            if let Err(e) = self.read_tls().await {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    return (Ok(0), buf);
                }
                return (Err(e), buf);
            }
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer points into `buf`, which outlives the read.
        let res = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read(raw).await.0,
            None => Ok(0),
        };
        if let Ok(n) = res {
            // SAFETY: `n` bytes were written into the first iovec.
            unsafe { buf.set_init(n) };
        }
        (res, buf)
    }

    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: the first `bytes_init` bytes at `read_ptr` are initialised and `buf` is held
        // for the whole call.
        let src = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let n = match self.conn.writer().write(src) {
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        match self.flush_tls().await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer points into `buf`, which outlives the write.
        let res = match unsafe { RawBuf::new_from_iovec(&buf) } {
            Some(raw) => self.write(raw).await.0,
            None => Ok(0),
        };
        (res, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.flush_tls().await?;
        self.io.flush().await
    }

    /// Send a close_notify, then shut the socket's write side.
    async fn shutdown(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        let _ = self.flush_tls().await;
        self.io.shutdown().await
    }
}
