//! `type: file`: a local or NFS directory with the adapter layout, `{path}/{name}/{file}`
//! (training pipelines drop adapters there).
//!
//! The manifest lists the regular, non-hidden files at the top of the adapter's directory;
//! the content id is a fingerprint of their names, sizes and modification times, so a file
//! rewritten in place is seen as a new version. Reads are 1 MiB `pread`s on tokio's blocking
//! pool (NFS can block for a long time; the control plane's threads must not).

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt, future::BoxFuture, stream};

use super::{FileSpec, FileStream, Manifest, Origin, OriginError};
use crate::adapter::{AdapterName, CONFIG_FILE};

/// Bytes per read.
const CHUNK: usize = 1 << 20;

pub struct FileOrigin {
    root: PathBuf,
}

impl FileOrigin {
    pub fn new(root: PathBuf) -> Self {
        FileOrigin { root }
    }

    fn dir(&self, name: &AdapterName) -> PathBuf {
        self.root.join(name.rel_path())
    }
}

fn io_error(what: &Path, e: io::Error) -> OriginError {
    match e.kind() {
        io::ErrorKind::NotFound => OriginError::not_found(format!("{}: not found", what.display())),
        io::ErrorKind::PermissionDenied => {
            OriginError::auth(format!("{}: permission denied", what.display()))
        }
        _ => OriginError::transient(format!("{}: {e}", what.display())),
    }
}

/// The files of an adapter directory, config first, and their fingerprint.
fn scan(dir: &Path) -> Result<(Vec<FileSpec>, String), OriginError> {
    let config = dir.join(CONFIG_FILE);
    fs::metadata(&config).map_err(|e| io_error(&config, e))?;
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks: pipelines often link the latest checkpoint in.
        let meta = fs::metadata(entry.path()).map_err(|e| io_error(&entry.path(), e))?;
        if meta.is_file() {
            files.push((name, meta));
        }
    }
    files.sort_by(|a, b| (a.0 != CONFIG_FILE, &a.0).cmp(&(b.0 != CONFIG_FILE, &b.0)));
    let mut print = String::new();
    for (name, meta) in &files {
        print.push_str(&format!(
            "{name}:{}:{}.{};",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        ));
    }
    let id = format!("file-{:016x}", xxhash_rust::xxh3::xxh3_64(print.as_bytes()));
    let specs = files
        .into_iter()
        .map(|(name, meta)| FileSpec::new(name, Some(meta.len())))
        .collect();
    Ok((specs, id))
}

/// `pread` up to `n` bytes at `pos` into a fresh buffer, without zeroing it first (a 1 GB
/// adapter would otherwise be memset once more on its way through).
fn read_at(f: &fs::File, n: usize, pos: u64) -> io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(n);
    loop {
        // SAFETY: the kernel writes at most `n` bytes into the buffer's capacity; only the
        // bytes it reports written are then marked initialised.
        let got = unsafe {
            libc::pread(
                std::os::fd::AsRawFd::as_raw_fd(f),
                buf.as_mut_ptr().cast(),
                n,
                pos as libc::off_t,
            )
        };
        if got >= 0 {
            // SAFETY: `got` <= n bytes were just written by pread.
            unsafe { buf.set_len(got as usize) };
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OriginError> + Send + 'static,
) -> Result<T, OriginError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(OriginError::transient(format!(
            "file read task failed: {e}"
        )))
    })
}

impl Origin for FileOrigin {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        format!("file {}", self.root.display())
    }

    fn head<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        let dir = self.dir(name);
        blocking(move || scan(&dir).map(|(_, id)| Some(id))).boxed()
    }

    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        let dir = self.dir(name);
        async move {
            let (files, id) = blocking(move || scan(&dir)).await?;
            Ok(Manifest {
                files,
                etag: Some(id),
                ..Default::default()
            })
        }
        .boxed()
    }

    fn config<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        super::config_by_path(self, name)
    }

    fn open<'a>(
        &'a self,
        name: &'a AdapterName,
        _manifest: &'a Manifest,
        file: &'a FileSpec,
        offset: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        let path = self.dir(name).join(&file.path);
        async move {
            let p = path.clone();
            let (f, len) = blocking(move || {
                let f = fs::File::open(&p).map_err(|e| io_error(&p, e))?;
                let len = f.metadata().map_err(|e| io_error(&p, e))?.len();
                Ok((Arc::new(f), len))
            })
            .await?;
            let body = stream::try_unfold((f, offset), move |(f, pos)| {
                let path = path.clone();
                async move {
                    if pos >= len {
                        return Ok(None);
                    }
                    let want = CHUNK.min((len - pos) as usize);
                    let f2 = f.clone();
                    let chunk = blocking(move || {
                        read_at(&f2, want, pos)
                            .map(BytesMut::freeze)
                            .map_err(|e| io_error(&path, e))
                    })
                    .await?;
                    if chunk.is_empty() {
                        // Shrunk under us: the transfer's size check reports it.
                        return Ok::<Option<(Bytes, _)>, OriginError>(None);
                    }
                    let next = pos + chunk.len() as u64;
                    Ok(Some((chunk, (f, next))))
                }
            })
            .boxed();
            Ok(FileStream {
                offset,
                total: Some(len),
                sha256: None,
                body,
            })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{adapter::SAFETENSORS_FILE, origin::check_manifest};

    #[tokio::test]
    async fn lists_and_streams_from_offset() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("org/a");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(CONFIG_FILE), b"{}").unwrap();
        let weights: Vec<u8> = (0..3 * CHUNK as u32 / 2).map(|i| i as u8).collect();
        fs::write(dir.join(SAFETENSORS_FILE), &weights).unwrap();
        fs::write(dir.join(".hidden"), b"x").unwrap();
        let o = FileOrigin::new(root.path().into());
        let name = AdapterName::parse("org/a").unwrap();
        let m = o.manifest(&name).await.unwrap();
        check_manifest(&m).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.files[0].path, CONFIG_FILE);
        assert_eq!(m.files[1].size, Some(weights.len() as u64));
        assert_eq!(o.head(&name).await.unwrap().as_deref(), m.content_id());

        let s = o.open(&name, &m, &m.files[1], 1000).await.unwrap();
        let got: Vec<Bytes> = s.body.map(|c| c.unwrap()).collect().await;
        assert_eq!(got.concat(), weights[1000..]);

        let missing = AdapterName::parse("org/none").unwrap();
        assert_eq!(
            o.manifest(&missing).await.unwrap_err().kind,
            crate::origin::OriginErrorKind::NotFound
        );
    }
}
