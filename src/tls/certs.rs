//! Reading the PEM files of `server.tls` and `cluster.tls`, and the rustls configs built on
//! them (aws-lc-rs, TLS 1.2 and 1.3, ALPN `http/1.1`).

use std::{
    path::Path,
    sync::{Arc, OnceLock},
};

use crate::config::ConfigError;
use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

/// aws-lc-rs: the provider reqwest, kube and the AWS SDK already run on.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The only protocol either side speaks.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The error for the file of config key `key`.
fn bad(key: &str, path: &Path, why: impl std::fmt::Display) -> ConfigError {
    ConfigError::invalid(key, format!("{}: {why}", path.display()))
}

/// The bytes of the file of config key `key`.
pub fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| bad(key, path, e))
}

/// A certificate chain (leaf first) and its private key, checked to belong together.
pub fn certified_key(
    cert_path: &Path,
    cert: &[u8],
    key_path: &Path,
    key: &[u8],
) -> Result<CertifiedKey, ConfigError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("server.tls.cert", cert_path, e))?;
    if chain.is_empty() {
        return Err(bad(
            "server.tls.cert",
            cert_path,
            "no PEM certificate in it",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("server.tls.key", key_path, e))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        let why = format!(
            "does not go with server.tls.cert {}: {e}",
            cert_path.display()
        );
        bad("server.tls.key", key_path, why)
    })
}

/// The CA certificates of `cluster.tls.ca`.
pub fn roots(ca_path: &Path, ca: &[u8]) -> Result<RootCertStore, ConfigError> {
    let key = "cluster.tls.ca";
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        let cert = cert.map_err(|e| bad(key, ca_path, e))?;
        roots.add(cert).map_err(|e| bad(key, ca_path, e))?;
    }
    if roots.is_empty() {
        return Err(bad(key, ca_path, "no PEM certificate in it"));
    }
    Ok(roots)
}

/// The listener's config: the certificate `resolver` gives at each handshake, session tickets
/// for resumption.
pub fn server_config(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(cfg)
}

/// The config for dialling peers: their certificates checked by `verifier`.
pub fn client_config(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(cfg)
}
