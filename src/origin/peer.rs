//! The `peer` origin: copy an adapter from another loraplex node of the cluster.
//!
//! When a node becomes the owner of an adapter another node already holds (a node joined, or
//! the ring changed), it copies the files from that node over the cluster connection instead of
//! going back to Hugging Face or S3. It is always first in the chain of a clustered node and
//! answers "not found" quickly when no peer has the adapter, so the configured origins follow.
//!
//! Which peers are asked: the ones after this node in the adapter name's placement order, which
//! is where the adapter lived before this node took it over (rendezvous: a joining node takes
//! keys from exactly those), at most [`ASK`] of them, each with a short timeout. With base-model
//! pools (`crate::cluster::pools`), the order is over the nodes of the adapter's pool: that is
//! where it was placed. What they send
//! is verified like any origin's (sizes, then the store's safetensors and config checks).
//! `head` always answers "not found", and a revalidation downloads the new version from the
//! configured origins only (the store skips this one): revalidation asks the real origins.

use std::sync::Arc;

use futures_util::{FutureExt, StreamExt, TryStreamExt, future::BoxFuture};
use reqwest::StatusCode;

use super::{
    FileSpec, FileStream, Manifest, Origin, OriginError,
    base::{Base, BaseModels},
};
use crate::{
    adapter::AdapterName,
    cluster::{
        hashkey::pool_hash,
        protocol::PeerClient,
        router::{Router, Topology},
    },
    config::TransferConfig,
};

/// Peers asked for an adapter.
pub const ASK: usize = 3;

pub struct PeerOrigin {
    router: Arc<Router>,
    client: PeerClient,
    /// Adapters' base models (their pools).
    bases: Arc<BaseModels>,
}

impl PeerOrigin {
    pub fn new(router: Arc<Router>, client: PeerClient, bases: Arc<BaseModels>) -> PeerOrigin {
        PeerOrigin {
            router,
            client,
            bases,
        }
    }

    /// The peers to ask, in the adapter name's order, usable ones only, this node excluded;
    /// only nodes of its pool when the cluster has pools and its base model is known.
    fn candidates(&self, topo: &Topology, name: &AdapterName) -> Vec<String> {
        if topo.is_single() {
            return Vec::new();
        }
        let view = self.router.view();
        let view = (view.generation == topo.generation && view.nodes.len() == topo.peers.len())
            .then_some(&**view);
        let pool = match (view, self.bases.known(name.as_str())) {
            (Some(v), Some(Base::Known(base))) if v.pools.multi() => pool_hash(&base),
            _ => 0,
        };
        let in_pool =
            |i: usize| pool == 0 || view.is_some_and(|v| v.nodes[i].serving(pool).next().is_some());
        topo.placement
            .order(name.as_str().as_bytes())
            .filter(|&i| i != topo.me && topo.peers[i].health.usable() && in_pool(i))
            .take(ASK)
            .map(|i| topo.peers[i].addr.clone())
            .collect()
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
            for peer in self.candidates(&topo, name) {
                let Some(m) = self.client.manifest(&peer, name).await else {
                    continue;
                };
                tracing::info!(adapter = %name, peer = %peer, "copying the adapter from a peer");
                let files = m
                    .files
                    .into_iter()
                    .map(|f| FileSpec::new(f.path, Some(f.size)))
                    .collect();
                // The files come from the peer that gave the manifest.
                return Ok(Manifest {
                    files,
                    etag: m.content_id,
                    revision: None,
                    source: Some(peer),
                    fetched_at_ms: m.fetched_at_ms,
                });
            }
            Err(OriginError::not_found(format!("no peer holds {name}")))
        }
        .boxed()
    }

    fn open<'a>(
        &'a self,
        name: &'a AdapterName,
        manifest: &'a Manifest,
        file: &'a FileSpec,
        offset: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        async move {
            let peer = manifest
                .source
                .as_deref()
                .ok_or_else(|| OriginError::transient(format!("no peer chosen for {name}")))?;
            let url = self.client.file_url(peer, name, &file.path);
            let resp = self
                .client
                .file(&url, offset)
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
                sha256: None,
                body,
            })
        }
        .boxed()
    }
}
