//! TLS with rustls on aws-lc-rs: the listener's (`server.tls`: clients, and peers dialling this
//! node) and the dialling side of peer links (`cluster.tls`: forwards on the data plane,
//! adapter copies, health polls and evict broadcasts on the control plane).
//!
//! - `certs.rs`: PEM files to a certificate, key and CA; the rustls configs.
//! - `stream.rs`: [`Stream`], plain or TLS, and [`TlsStream`], rustls over a monoio socket.
//! - `accept.rs`: [`Acceptor`]: the first byte sniffed, then the handshake, or plain HTTP
//!   allowed (`server.tls.allow_plain`) or refused.
//! - `verify.rs`: how a peer's certificate is checked (the cluster CA; the dialled IP, or
//!   `cluster.tls.server_name`).
//! - `reload.rs`: the files read again on SIGHUP or when they change.

mod accept;
pub mod certs;
pub mod reload;
mod stream;
#[cfg(test)]
mod tests;
mod verify;

use std::{io, net::IpAddr, sync::Arc};

use monoio::net::TcpStream;

use self::reload::{PeerFiles, ServerFiles};
pub use self::{
    accept::{Accepted, Acceptor},
    reload::{Outcome, Reloader},
    stream::{Stream, TlsStream},
    verify::PeerVerifier,
};
use crate::{
    config::{Config, ConfigError},
    control::Control,
    metrics::Metrics,
    shutdown::Shutdown,
};

/// A node's TLS, built once at start from `server.tls` and `cluster.tls`.
#[derive(Clone, Default)]
pub struct Tls {
    /// The listener's side; `None`: plain HTTP only.
    pub acceptor: Option<Acceptor>,
    /// The client config for dialling peers; `None`: peers are dialled in plain HTTP.
    pub peers: Option<Arc<rustls::ClientConfig>>,
    reloader: Option<Arc<Reloader>>,
}

impl Tls {
    /// Read the files the config names (refused with the key at fault when they do not load).
    pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> Result<Tls, ConfigError> {
        let server = match &config.server.tls {
            Some(t) => Some(ServerFiles::load(t.cert.clone(), t.key.clone())?),
            None => None,
        };
        let peers = match &config.cluster.tls {
            Some(t) => Some(PeerFiles::load(t.ca.clone(), t.server_name.as_deref())?),
            None => None,
        };
        let internal = |e: rustls::Error| ConfigError::invalid("server.tls", e.to_string());
        let acceptor = match (&server, &config.server.tls) {
            (Some(files), Some(t)) => {
                let cfg = certs::server_config(files.resolver.clone()).map_err(internal)?;
                Some(Acceptor::new(Arc::new(cfg), t.allow_plain))
            }
            _ => None,
        };
        let client = match &peers {
            Some(files) => Some(Arc::new(
                certs::client_config(files.verifier.clone()).map_err(internal)?,
            )),
            None => None,
        };
        let reloader = (server.is_some() || peers.is_some())
            .then(|| Arc::new(Reloader::new(server, peers, metrics)));
        Ok(Tls {
            acceptor,
            peers: client,
            reloader,
        })
    }

    /// What reloads the files (`None` when TLS is off).
    pub fn reloader(&self) -> Option<&Arc<Reloader>> {
        self.reloader.as_ref()
    }

    /// Reload the files on SIGHUP and when they change, until shutdown (nothing when TLS is
    /// off: SIGHUP then keeps its default action).
    pub fn watch(&self, control: &Control, shutdown: Shutdown) {
        if let Some(r) = &self.reloader {
            r.clone().watch(control, shutdown);
        }
    }
}

/// Dial TLS over `io`, a connection to a peer at `ip` (the name its certificate is checked
/// against, unless `cluster.tls.server_name` says otherwise). Bound it with a timeout.
pub async fn connect(
    config: &Arc<rustls::ClientConfig>,
    io: TcpStream,
    ip: IpAddr,
) -> io::Result<Stream> {
    let name = rustls::pki_types::ServerName::IpAddress(ip.into());
    let conn = rustls::ClientConnection::new(config.clone(), name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut tls = TlsStream::new(io, conn.into(), Vec::new());
    tls.handshake().await?;
    Ok(Stream::Tls(Box::new(tls)))
}
