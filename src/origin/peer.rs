//! The `peer` origin: copy an adapter from another loraplex node of the cluster.
//!
//! When a node becomes the owner of an adapter another node already holds (a node joined, or
//! the ring changed), it copies the files from that node over the cluster connection instead of
//! going back to Hugging Face or S3. It is always first in the chain of a clustered node and
//! answers "not found" quickly when no peer has the adapter, so the configured origins follow.
//!
//! Which peers are asked: the ones after this node in the adapter name's placement order, which
//! is where the adapter lived before this node took it over (rendezvous: a joining node takes
//! keys from exactly those), at most [`ASK`] of them, each with a short timeout. What they send
//! is verified like any origin's (sizes, then the store's safetensors and config checks).
//! `head` always answers "not found": revalidation asks the real origins.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{FutureExt, StreamExt, TryStreamExt, future::BoxFuture};
use reqwest::{StatusCode, header::RANGE};
use serde::Deserialize;

use super::{FileSpec, FileStream, Manifest, Origin, OriginError};
use crate::{
    adapter::AdapterName,
    cluster::{
        peering::TOKEN_HEADER,
        router::{Router, Topology},
    },
    config::TransferConfig,
    proxy::peer_files::PREFIX,
};

/// Peers asked for an adapter.
pub const ASK: usize = 3;
/// Time a peer gets to answer a manifest request.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(2);

pub struct PeerOrigin {
    router: Arc<Router>,
    client: reqwest::Client,
    /// Which peer gave the manifest of an adapter being fetched (files come from the same one).
    sources: Mutex<HashMap<AdapterName, String>>,
}

#[derive(Deserialize)]
struct PeerManifest {
    content_id: Option<String>,
    files: Vec<PeerFile>,
}

#[derive(Deserialize)]
struct PeerFile {
    path: String,
    size: u64,
}

impl PeerOrigin {
    pub fn new(router: Arc<Router>) -> Result<PeerOrigin, crate::Error> {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(MANIFEST_TIMEOUT);
        if let Some(ip) = router.source_ip {
            builder = builder.local_address(ip);
        }
        let client = builder
            .build()
            .map_err(|e| crate::Error::internal(e.to_string()))?;
        Ok(PeerOrigin {
            router,
            client,
            sources: Mutex::new(HashMap::new()),
        })
    }

    /// The peers to ask, in the adapter name's order, usable ones only, this node excluded.
    fn candidates(topo: &Topology, name: &AdapterName) -> Vec<String> {
        if topo.is_single() {
            return Vec::new();
        }
        topo.placement
            .order(name.as_str().as_bytes())
            .filter(|&i| i != topo.me && topo.peers[i].health.usable())
            .take(ASK)
            .map(|i| topo.peers[i].addr.clone())
            .collect()
    }

    fn get(&self, url: String) -> reqwest::RequestBuilder {
        let req = self.client.get(url);
        match &self.router.token {
            Some(t) => req.header(TOKEN_HEADER, t),
            None => req,
        }
    }

    async fn ask(&self, peer: &str, name: &AdapterName) -> Option<PeerManifest> {
        let url = format!("http://{peer}{PREFIX}{name}/manifest");
        let resp = self.get(url).timeout(MANIFEST_TIMEOUT).send().await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        resp.json().await.ok()
    }
}

impl Origin for PeerOrigin {
    fn kind(&self) -> &'static str {
        "peer"
    }

    fn describe(&self) -> String {
        "cluster peers".into()
    }

    fn transfer(&self) -> TransferConfig {
        TransferConfig {
            retries: 1,
            ..TransferConfig::default()
        }
    }

    fn head<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        async move {
            Err(OriginError::not_found(format!(
                "peers are not asked to revalidate {name}"
            )))
        }
        .boxed()
    }

    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        async move {
            let topo = self.router.topology();
            for peer in Self::candidates(&topo, name) {
                let Some(m) = self.ask(&peer, name).await else {
                    continue;
                };
                tracing::info!(adapter = %name, peer = %peer, "copying the adapter from a peer");
                self.sources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone(), peer);
                let files = m
                    .files
                    .into_iter()
                    .map(|f| FileSpec::new(f.path, Some(f.size)))
                    .collect();
                return Ok(Manifest {
                    files,
                    etag: m.content_id,
                    revision: None,
                });
            }
            Err(OriginError::not_found(format!("no peer holds {name}")))
        }
        .boxed()
    }

    fn open<'a>(
        &'a self,
        name: &'a AdapterName,
        _manifest: &'a Manifest,
        file: &'a FileSpec,
        offset: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        async move {
            let peer = self
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .cloned();
            let peer =
                peer.ok_or_else(|| OriginError::transient(format!("no peer chosen for {name}")))?;
            let url = format!("http://{peer}{PREFIX}{name}/files/{}", file.path);
            let mut req = self.get(url.clone());
            if offset > 0 {
                req = req.header(RANGE, format!("bytes={offset}-"));
            }
            let resp = req
                .send()
                .await
                .map_err(|e| OriginError::transient(format!("GET {url}: {e}")))?;
            let start = match resp.status() {
                StatusCode::OK => 0,
                StatusCode::PARTIAL_CONTENT => offset,
                s => return Err(OriginError::from_status(s.as_u16(), &format!("GET {url}"))),
            };
            let body = resp
                .bytes_stream()
                .map_err(move |e| OriginError::transient(format!("reading {url}: {e}")))
                .boxed();
            Ok(FileStream {
                offset: start,
                total: file.size,
                body,
            })
        }
        .boxed()
    }
}
