//! Serving stored adapters to peers (`/_loraplex/adapters/...`), so a node that becomes an
//! adapter's owner (scale-up, ring change) copies it from the node that has it instead of going
//! back to Hugging Face or S3.
//!
//! - `GET /_loraplex/adapters/{name}/manifest`: `{"content_id", "files": [{"path","size"}],
//!   "fetched_at_ms"}`
//!   for a stored adapter (404 when not stored here; this never starts a fetch).
//! - `GET /_loraplex/adapters/{name}/files/{path}`: the file's bytes, `Range: bytes=N-` honoured.
//!
//! Only peers may ask (the same trust as the forwarded mark: `cluster.token`, else a peer's
//! address). Only files listed in the manifest are served, so a path can never leave the
//! adapter's directory; the adapter is pinned while its files stream. The manifest is the
//! store's record of what it published (no filesystem call on the worker); a file is opened
//! and read with monoio's file operations.

use monoio::fs::File;

use crate::{
    adapter::AdapterName,
    cluster::protocol::{PeerFile, PeerManifest, PeerPath, is_trusted_peer},
    error::{Error, ErrorKind},
    http::{Method, RequestHead, head::itoa_buf, response},
    proxy::{Proxy, Reply},
    server::conn::Conn,
};

const CHUNK: usize = 256 * 1024;

/// Answer a peer endpoint request.
pub async fn serve(w: &Proxy, conn: &mut Conn, head: &RequestHead) -> Result<Reply, Error> {
    if !is_trusted_peer(&w.shared.router, head, conn.peer.ip()) {
        return Err(Error::new(
            ErrorKind::Unauthorized,
            "peer endpoints are for cluster peers",
        ));
    }
    let (name, what) = match PeerPath::parse(head.path()) {
        Some(PeerPath::Manifest { adapter }) => (adapter, None),
        Some(PeerPath::File { adapter, file }) => (adapter, Some(file)),
        None => return Err(Error::new(ErrorKind::NotFound, "no such peer endpoint")),
    };
    let name = AdapterName::parse(name)?;
    let not_here = || Error::model_not_found(name.as_str());
    let (dir, pin) = w.shared.store.adapter_dir(&name).ok_or_else(not_here)?;
    let keep_alive = head.keep_alive;
    let Some(wanted) = what else {
        let files = pin.files().iter().map(|f| PeerFile {
            path: f.path.clone(),
            size: f.size,
        });
        let body = PeerManifest {
            adapter: name.to_string(),
            content_id: pin.content_id().map(str::to_owned),
            files: files.collect(),
            fetched_at_ms: Some(pin.fetched_at_ms()),
        };
        let mut out = Vec::new();
        response::json(&mut out, 200, &body, keep_alive);
        if head.kind == Method::Head {
            response::strip_body(&mut out);
        }
        let written = conn.write_all(out).await.is_ok();
        return Ok(Reply {
            status: 200,
            keep_alive: keep_alive && written,
        });
    };
    let size = pin
        .files()
        .iter()
        .find(|f| f.path == wanted)
        .map(|f| f.size)
        .ok_or_else(not_here)?;
    let offset = range_start(head).unwrap_or(0).min(size);
    let status = if offset > 0 { 206 } else { 200 };
    let file = File::open(dir.join(wanted)).await?;
    let head_only = head.kind == Method::Head;
    let whole = send_file(conn, &file, offset, size, status, keep_alive, head_only).await;
    drop(pin);
    if let Err(e) = &whole {
        tracing::debug!(adapter = %name, file = wanted, error = %e, "peer file transfer cut short");
    }
    // After the head, a failure can only be told by closing the connection.
    Ok(Reply {
        status,
        keep_alive: keep_alive && whole.is_ok(),
    })
}

/// `Range: bytes=N-` (the only form a peer sends).
fn range_start(head: &RequestHead) -> Option<u64> {
    head.header_str("range")?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

async fn send_file(
    conn: &mut Conn,
    file: &File,
    offset: u64,
    size: u64,
    status: u16,
    keep_alive: bool,
    head_only: bool,
) -> std::io::Result<()> {
    let len = size - offset;
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(if status == 206 {
        b"HTTP/1.1 206 Partial Content\r\n"
    } else {
        b"HTTP/1.1 200 OK\r\n"
    });
    head.extend_from_slice(b"content-type: application/octet-stream\r\ncontent-length: ");
    head.extend_from_slice(itoa_buf(len).as_bytes());
    if status == 206 {
        let range = format!("\r\ncontent-range: bytes {offset}-{}/{size}", size - 1);
        head.extend_from_slice(range.as_bytes());
    }
    if !keep_alive {
        head.extend_from_slice(b"\r\nconnection: close");
    }
    head.extend_from_slice(b"\r\n\r\n");
    conn.write_all(head).await?;
    if head_only {
        return Ok(());
    }
    let mut pos = offset;
    let mut buf = Vec::with_capacity(CHUNK);
    while pos < size {
        buf.clear();
        let (res, back) = file.read_at(buf, pos).await;
        let n = res?;
        if n == 0 {
            // The file shrank under us: the peer sees a short body and retries elsewhere.
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut chunk = back;
        chunk.truncate(n.min((size - pos) as usize));
        pos += chunk.len() as u64;
        buf = conn.write_all(chunk).await?;
    }
    Ok(())
}
