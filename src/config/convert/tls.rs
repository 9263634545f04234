//! `server.tls` and `cluster.tls`: which files, checked for consistency (the files themselves
//! are read when the node starts, and by `check-config`).

use std::path::PathBuf;

use super::{Convert, Result, text};
use crate::config::{ClusterTlsConfig, Config, ServerTlsConfig, file::FileConfig};

impl Convert<'_> {
    pub(super) fn tls(&mut self, f: &FileConfig, cfg: &mut Config) -> Result<()> {
        let s = f
            .server
            .as_ref()
            .and_then(|s| s.tls.clone())
            .unwrap_or_default();
        let allow_plain = self.boolean("server.tls.allow_plain", &s.allow_plain, false)?;
        cfg.server.tls = match (text(&s.cert), text(&s.key)) {
            (Some(cert), Some(key)) => Some(ServerTlsConfig {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
                allow_plain,
            }),
            (Some(_), None) => {
                return Err(self.err("server.tls.key", "missing (server.tls.cert is set)"));
            }
            (None, Some(_)) => {
                return Err(self.err("server.tls.cert", "missing (server.tls.key is set)"));
            }
            (None, None) => {
                if allow_plain {
                    self.warnings.push(
                        "server.tls.allow_plain has no effect without server.tls.cert and key"
                            .into(),
                    );
                }
                None
            }
        };

        let c = f
            .cluster
            .as_ref()
            .and_then(|c| c.tls.clone())
            .unwrap_or_default();
        let server_name = text(&c.server_name);
        if let Some(name) = &server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(self.err(
                "cluster.tls.server_name",
                format!("{name:?} is neither a DNS name nor an IP address"),
            ));
        }
        cfg.cluster.tls = match text(&c.ca) {
            Some(ca) => {
                if cfg.server.tls.is_none() {
                    return Err(self.err(
                        "cluster.tls.ca",
                        "peers are dialled over TLS, so every node serves TLS: \
                         set server.tls.cert and server.tls.key too",
                    ));
                }
                Some(ClusterTlsConfig {
                    ca: PathBuf::from(ca),
                    server_name,
                })
            }
            None if server_name.is_some() => {
                return Err(self.err(
                    "cluster.tls.server_name",
                    "set without cluster.tls.ca (the CA peers' certificates are checked against)",
                ));
            }
            None => None,
        };
        Ok(())
    }
}
