//! How this node checks a peer's certificate: it must chain to the cluster CA
//! (`cluster.tls.ca`) and name the peer, by the IP address it was dialled at (an IP SAN) or,
//! when `cluster.tls.server_name` is set, by that name (one certificate shared by all nodes).
//! The CA can be swapped while running (certificate reload); a handshake uses the CA of the
//! moment.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::{
    DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::certs::provider;
use crate::config::ConfigError;

#[derive(Debug)]
pub struct PeerVerifier {
    inner: ArcSwap<WebPkiServerVerifier>,
    /// The name checked instead of the dialled address.
    name: Option<ServerName<'static>>,
}

fn webpki(roots: RootCertStore) -> Result<Arc<WebPkiServerVerifier>, ConfigError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| ConfigError::invalid("cluster.tls.ca", e.to_string()))
}

impl PeerVerifier {
    pub fn new(roots: RootCertStore, name: Option<&str>) -> Result<PeerVerifier, ConfigError> {
        let name = name
            .map(|n| {
                ServerName::try_from(n.to_owned()).map_err(|e| {
                    ConfigError::invalid("cluster.tls.server_name", format!("{n:?}: {e}"))
                })
            })
            .transpose()?;
        Ok(PeerVerifier {
            inner: ArcSwap::new(webpki(roots)?),
            name,
        })
    }

    /// Check peers against `roots` from now on.
    pub fn set_roots(&self, roots: RootCertStore) -> Result<(), ConfigError> {
        self.inner.store(webpki(roots)?);
        Ok(())
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let name = self.name.as_ref().unwrap_or(server_name);
        self.inner
            .load()
            .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().supported_verify_schemes()
    }
}
