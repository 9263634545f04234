//! A real S3 wire-protocol server in-process: `s3s` (protocol, SigV4 auth) over `s3s-fs` (a
//! directory per bucket) on a 127.0.0.1 port, wrapped to inject what a filesystem cannot hold
//! (a hostile `..` key in listings) and transfer faults (a body cut after N bytes), and to
//! record every GetObject with its range start.
//!
//! The wrapper also makes it answer checksums as S3 does, where s3s-fs is more generous:
//! HeadObject and GetObject carry an object's `x-amz-checksum-*` (with
//! `x-amz-checksum-type: FULL_OBJECT`) only when the request asks with
//! `x-amz-checksum-mode: ENABLED`, and ListObjectsV2 names each object's checksum algorithm
//! (`ChecksumAlgorithm`, `ChecksumType`) as S3's listing does.
// Shared by the tests and the benchmark; each uses part of it.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use aws_sdk_s3::config::Credentials;
use bytes::Bytes;
use futures_util::Stream;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder as ConnBuilder,
};
use s3s::{
    S3, S3Request, S3Response, S3Result,
    auth::SimpleAuth,
    dto::{self, StreamingBlob},
    service::S3ServiceBuilder,
};
use s3s_fs::FileSystem;
use tokio::task::JoinHandle;

pub const ACCESS_KEY: &str = "AKIALORAPLEXTEST";
pub const SECRET_KEY: &str = "loraplex-test-secret";

pub fn credentials() -> Credentials {
    Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "loraplex-tests")
}

/// What the tests arm and observe.
#[derive(Default)]
pub struct Knobs {
    /// A key appended to every listing whose prefix it matches.
    pub hostile_key: Mutex<Option<String>>,
    /// Cut the body of the next GetObject of a key after this many bytes.
    pub cuts: Mutex<HashMap<String, u64>>,
    /// Every GetObject: (key, range start).
    pub gets: Mutex<Vec<(String, Option<u64>)>>,
    /// Every HeadObject: (key, whether it asked for checksums).
    pub heads: Mutex<Vec<(String, bool)>>,
}

struct Wrapped {
    fs: FileSystem,
    knobs: Arc<Knobs>,
}

#[async_trait::async_trait]
impl S3 for Wrapped {
    async fn create_bucket(
        &self,
        req: S3Request<dto::CreateBucketInput>,
    ) -> S3Result<S3Response<dto::CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<dto::PutObjectInput>,
    ) -> S3Result<S3Response<dto::PutObjectOutput>> {
        self.fs.put_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<dto::HeadObjectInput>,
    ) -> S3Result<S3Response<dto::HeadObjectOutput>> {
        let asks = checksum_mode(&req.input.checksum_mode);
        let key = req.input.key.clone();
        self.knobs.heads.lock().unwrap().push((key, asks));
        let mut resp = self.fs.head_object(req).await?;
        answer_checksums!(resp.output, asks);
        Ok(resp)
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<dto::ListObjectsV2Input>,
    ) -> S3Result<S3Response<dto::ListObjectsV2Output>> {
        let prefix = req.input.prefix.clone().unwrap_or_default();
        let bucket = req.input.bucket.clone();
        let (method, uri, headers) = (req.method.clone(), req.uri.clone(), req.headers.clone());
        let (credentials, region, service) = (
            req.credentials.clone(),
            req.region.clone(),
            req.service.clone(),
        );
        let head_req = |key: String| S3Request {
            input: dto::HeadObjectInput {
                bucket: bucket.clone(),
                key,
                checksum_mode: Some(dto::ChecksumMode::from_static(dto::ChecksumMode::ENABLED)),
                ..Default::default()
            },
            method: method.clone(),
            uri: uri.clone(),
            headers: headers.clone(),
            extensions: Default::default(),
            credentials: credentials.clone(),
            region: region.clone(),
            service: service.clone(),
            trailing_headers: None,
        };
        let mut resp = self.fs.list_objects_v2(req).await?;
        // S3 lists the algorithm of each object's checksum; s3s-fs lists none.
        for obj in resp.output.contents.iter_mut().flatten() {
            let Some(key) = obj.key.clone() else { continue };
            let Ok(head) = self.fs.head_object(head_req(key)).await else {
                continue;
            };
            let h = head.output;
            let algorithms: Vec<dto::ChecksumAlgorithm> = [
                (dto::ChecksumAlgorithm::CRC32, h.checksum_crc32.is_some()),
                (dto::ChecksumAlgorithm::CRC32C, h.checksum_crc32c.is_some()),
                (
                    dto::ChecksumAlgorithm::CRC64NVME,
                    h.checksum_crc64nvme.is_some(),
                ),
                (dto::ChecksumAlgorithm::SHA1, h.checksum_sha1.is_some()),
                (dto::ChecksumAlgorithm::SHA256, h.checksum_sha256.is_some()),
            ]
            .into_iter()
            .filter(|(_, has)| *has)
            .map(|(a, _)| dto::ChecksumAlgorithm::from_static(a))
            .collect();
            if !algorithms.is_empty() {
                obj.checksum_algorithm = Some(algorithms);
                obj.checksum_type = Some(dto::ChecksumType::from_static(
                    dto::ChecksumType::FULL_OBJECT,
                ));
            }
        }
        let hostile = self.knobs.hostile_key.lock().unwrap().clone();
        if let Some(key) = hostile.filter(|k| k.starts_with(&prefix)) {
            let obj = dto::Object {
                key: Some(key),
                size: Some(5),
                e_tag: Some(dto::ETag::Strong("0123456789abcdef".into())),
                ..Default::default()
            };
            resp.output.contents.get_or_insert_with(Vec::new).push(obj);
        }
        Ok(resp)
    }

    async fn get_object(
        &self,
        req: S3Request<dto::GetObjectInput>,
    ) -> S3Result<S3Response<dto::GetObjectOutput>> {
        let key = req.input.key.clone();
        let start = match req.input.range {
            Some(dto::Range::Int { first, .. }) => Some(first),
            _ => None,
        };
        self.knobs.gets.lock().unwrap().push((key.clone(), start));
        let cut = self.knobs.cuts.lock().unwrap().remove(&key);
        let asks = checksum_mode(&req.input.checksum_mode);
        let mut resp = self.fs.get_object(req).await?;
        answer_checksums!(resp.output, asks);
        if let Some(left) = cut {
            let inner = resp.output.body.take().expect("GetObject has a body");
            resp.output.body = Some(StreamingBlob::wrap(Cut { inner, left }));
        }
        Ok(resp)
    }
}

fn checksum_mode(mode: &Option<dto::ChecksumMode>) -> bool {
    mode.as_ref()
        .is_some_and(|m| m.as_str() == dto::ChecksumMode::ENABLED)
}

/// S3's rule for the checksum headers of HeadObject's and GetObject's output `$o`: only in
/// checksum mode, and then with the checksum's type.
macro_rules! answer_checksums {
    ($o:expr, $asks:expr) => {{
        let o = &mut $o;
        let sums = [
            &mut o.checksum_crc32,
            &mut o.checksum_crc32c,
            &mut o.checksum_crc64nvme,
            &mut o.checksum_sha1,
            &mut o.checksum_sha256,
        ];
        o.checksum_type = checksum_type(sums, $asks);
    }};
}
use answer_checksums;

/// Clear `sums` unless the request `asks`; the type of those answered (s3s-fs keeps the
/// full-object checksums of single PUTs only).
fn checksum_type(sums: [&mut Option<String>; 5], asks: bool) -> Option<dto::ChecksumType> {
    let mut any = false;
    for sum in sums {
        any |= sum.is_some();
        if !asks {
            *sum = None;
        }
    }
    (asks && any).then(|| dto::ChecksumType::from_static(dto::ChecksumType::FULL_OBJECT))
}

/// A body that ends in a reset after `left` bytes.
struct Cut {
    inner: StreamingBlob,
    left: u64,
}

impl Stream for Cut {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.left == 0 {
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "armed cut",
            ))));
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(mut chunk))) => {
                if chunk.len() as u64 > self.left {
                    chunk.truncate(self.left as usize);
                }
                self.left -= chunk.len() as u64;
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(io::Error::other(e.to_string())))),
            other => other.map(|o| o.map(|r| r.map_err(|e| io::Error::other(e.to_string())))),
        }
    }
}

/// A running S3 server over a temporary directory; stops when dropped.
pub struct S3Server {
    pub url: String,
    pub knobs: Arc<Knobs>,
    root: PathBuf,
    _dir: Option<tempfile::TempDir>,
    task: JoinHandle<()>,
}

impl S3Server {
    /// Start with `buckets` created, in a fresh temporary directory.
    pub async fn start(buckets: &[&str]) -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        let mut s = S3Server::start_in(dir.path(), buckets).await;
        s._dir = Some(dir);
        s
    }

    /// Start over the directory `root` (a bucket is a subdirectory).
    pub async fn start_in(root: &Path, buckets: &[&str]) -> S3Server {
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).unwrap();
        }
        let knobs = Arc::new(Knobs::default());
        let fs = FileSystem::new(root).unwrap();
        let mut builder = S3ServiceBuilder::new(Wrapped {
            fs,
            knobs: knobs.clone(),
        });
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3Server {
            url,
            knobs,
            root: root.to_owned(),
            _dir: None,
            task,
        }
    }

    /// Write an object straight into the bucket's directory (fast; no checksum recorded).
    pub fn put_file(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let path = self.root.join(bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// The file behind an object (to corrupt it behind the server's back).
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
