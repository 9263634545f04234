//! The listener's side: a connection's first byte tells whether it speaks TLS (every TLS
//! connection opens with a handshake record, type 22); then the handshake, or plain HTTP when
//! `server.tls.allow_plain` lets it in, or a refusal the caller answers in plain text.

use std::{io, sync::Arc};

use monoio::{buf::IoBufMut, io::AsyncReadRent, net::TcpStream};

use super::stream::{Stream, TlsStream};

/// The first byte of a TLS record carrying a handshake message.
const HANDSHAKE_RECORD: u8 = 0x16;

/// What a worker needs to accept TLS (cheap to clone).
#[derive(Clone)]
pub struct Acceptor {
    config: Arc<rustls::ServerConfig>,
    allow_plain: bool,
}

/// What a new connection turned out to be.
pub enum Accepted {
    /// TLS, handshake done.
    Tls(Stream),
    /// Plain HTTP, allowed: `read` holds its first bytes.
    Plain { stream: Stream, read: Vec<u8> },
    /// Plain HTTP where only TLS is served: `read` holds its first bytes.
    Refused { stream: Stream, read: Vec<u8> },
    /// Closed before its first byte.
    Closed,
}

impl Acceptor {
    pub fn new(config: Arc<rustls::ServerConfig>, allow_plain: bool) -> Acceptor {
        Acceptor {
            config,
            allow_plain,
        }
    }

    /// Read the connection's first bytes (at most `limit`), then handshake or not. Bound it
    /// with a timeout: a client may send nothing, or stall mid-handshake.
    pub async fn accept(&self, io: TcpStream, limit: usize) -> io::Result<Accepted> {
        let mut io = io;
        let buf = Vec::with_capacity(limit.clamp(1, 16 * 1024 + 512));
        let cap = buf.capacity();
        let (res, buf) = io.read(buf.slice_mut(0..cap)).await;
        let buf = buf.into_inner();
        if res? == 0 {
            return Ok(Accepted::Closed);
        }
        if buf[0] != HANDSHAKE_RECORD {
            let stream = Stream::Plain(io);
            return Ok(if self.allow_plain {
                Accepted::Plain { stream, read: buf }
            } else {
                Accepted::Refused { stream, read: buf }
            });
        }
        let conn = rustls::ServerConnection::new(self.config.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut tls = TlsStream::new(io, conn.into(), buf);
        tls.handshake().await?;
        Ok(Accepted::Tls(Stream::Tls(Box::new(tls))))
    }
}
