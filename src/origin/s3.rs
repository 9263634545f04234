//! The S3 origin (`type: s3`): an adapter is every object under `{prefix}{name}/`.
//!
//! `aws-sdk-s3` with the standard credential chain (env, profile, IMDS, web identity/IRSA, via
//! `aws-config` defaults); `endpoint` selects an S3-compatible store (path-style addressing,
//! checksums only when the operation requires them, as such stores often lack the newer
//! default checksums). The prefix is normalised once: `""` stays empty (keys never start with
//! `/`, unlike the Go original), `models` and `models/` both become `models/`.
//!
//! A download lists `{prefix}{name}/` with ListObjectsV2 (every page, continuation tokens),
//! refuses the whole adapter if one key would escape its directory ([`relative_path`]), and
//! streams each object with GetObject. Every request of a file carries `If-Match: {ETag from
//! the listing}`, so an object rewritten during the download, or between a failure and its
//! `Range` resume, is refused instead of being stitched from two versions.
//!
//! Verification: sizes always (listing, HEAD and bytes must agree); SHA-256 when the object
//! has a full-object `x-amz-checksum-sha256` (read with a `HeadObject` in checksum mode before
//! the first byte, because S3 omits checksums on ranged GETs, and hashed in the same pass as
//! the bytes stream). CRC checksums and composite (multipart) checksums are not verified. The
//! ETag is not used as an MD5: it is one only for single-part uploads without SSE-KMS/SSE-C,
//! and a false mismatch would reject good adapters; it serves as the content id (the ETag of
//! `adapter_config.json`) and as the `If-Match` guard.
//!
//! Retries are ours (the SDK's are off), with the same schedule and stall timeout as the
//! other origins; the SDK's stalled-stream protection is off for the same reason.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use aws_sdk_s3::{
    Client,
    config::{
        BehaviorVersion, Credentials, Region, RequestChecksumCalculation,
        ResponseChecksumValidation, StalledStreamProtectionConfig, http::HttpResponse,
        retry::RetryConfig, timeout::TimeoutConfig,
    },
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    primitives::ByteStream,
    types::{ChecksumMode, ChecksumType},
};
use futures_util::{StreamExt, future::BoxFuture};

use super::{
    download::{Download, Manifest, Opened, Opener, RemoteFile, record_miss},
    huggingface::parse_content_range,
    transfer::{FailClass, FetchError, RetryPolicy},
};
use crate::{metrics::Metrics, store::AdapterName};

/// The metric label and config `type`.
pub const ORIGIN: &str = "s3";

/// `""` → `""`; `models`, `models/` → `models/`.
pub fn normalize_prefix(prefix: &str) -> String {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}

/// The path of `key` inside the adapter directory `dir` (a prefix ending in `/`).
///
/// `Ok(None)` for folder markers (`dir/`, `dir/sub/`), which hold no file. An error (the
/// adapter is refused) for a key outside `dir`, or one with an empty, `.` or `..` segment, a
/// backslash or a control character: such a key could write outside the adapter directory.
pub fn relative_path(dir: &str, key: &str) -> Result<Option<String>, FetchError> {
    let hostile = || {
        FetchError::invalid(format!(
            "refusing key {key:?}: it would escape the adapter directory {dir:?}"
        ))
    };
    let rel = key.strip_prefix(dir).ok_or_else(hostile)?;
    if rel.is_empty() {
        return Ok(None); // the directory's own marker
    }
    let rel = match rel.strip_suffix('/') {
        Some(folder) if folder.is_empty() || check_segments(folder) => return Ok(None),
        Some(_) => return Err(hostile()),
        None => rel,
    };
    if check_segments(rel) {
        Ok(Some(rel.to_owned()))
    } else {
        Err(hostile())
    }
}

fn check_segments(rel: &str) -> bool {
    !rel.is_empty()
        && rel.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && !s.chars().any(|c| c == '\\' || c.is_control())
        })
}

/// An object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    pub key: String,
    pub size: u64,
    pub etag: String,
}

/// Where an S3 origin reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// `None`: the region chain (env, profile, IMDS).
    pub region: Option<String>,
    pub prefix: String,
    /// An S3-compatible endpoint (path-style).
    pub endpoint: Option<String>,
}

/// Thin layer over `aws-sdk-s3`: paginated list, head, ranged get, classified errors.
#[derive(Debug, Clone)]
pub struct S3Client {
    client: Client,
    bucket: String,
    prefix: String,
    policy: RetryPolicy,
}

impl S3Client {
    /// Build the client. `credentials`: `None` uses the standard chain; tests pass static ones.
    pub async fn connect(
        settings: &S3Settings,
        policy: RetryPolicy,
        credentials: Option<Credentials>,
    ) -> S3Client {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(c) = credentials {
            loader = loader.credentials_provider(c);
        }
        let sdk = loader.load().await;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(policy.connect_timeout)
            .read_timeout(policy.idle_timeout)
            .build();
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &settings.endpoint {
            conf = conf.endpoint_url(endpoint).force_path_style(true);
        }
        S3Client {
            client: Client::from_conf(conf.build()),
            bucket: settings.bucket.clone(),
            prefix: normalize_prefix(&settings.prefix),
            policy,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The SDK client (tests use it to upload objects with checksums).
    pub fn sdk(&self) -> &Client {
        &self.client
    }

    /// `{prefix}{name}/`.
    pub fn adapter_dir(&self, name: &AdapterName) -> String {
        format!("{}{}/", self.prefix, name.as_str())
    }

    fn what(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Every object under `prefix`, all pages.
    pub async fn list(&self, prefix: &str) -> Result<Vec<S3Object>, FetchError> {
        let what = self.what(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .policy
                .run(|| async {
                    let r = self
                        .client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(prefix)
                        .set_continuation_token(token.clone())
                        .send()
                        .await;
                    r.map_err(|e| classify(e, &what))
                })
                .await?;
            for o in page.contents() {
                let key = o.key().unwrap_or_default().to_owned();
                let size = o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0);
                let etag = o.e_tag().unwrap_or_default().to_owned();
                out.push(S3Object { key, size, etag });
            }
            token = page.next_continuation_token().map(str::to_owned);
            if !page.is_truncated().unwrap_or(false) || token.is_none() {
                return Ok(out);
            }
        }
    }

    /// The ETag of `key` now (`HeadObject`).
    pub async fn etag(&self, key: &str) -> Result<String, FetchError> {
        let what = self.what(key);
        let head = self
            .policy
            .run(|| async {
                let r = self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await;
                r.map_err(|e| classify(e, &what))
            })
            .await?;
        Ok(head.e_tag().unwrap_or_default().to_owned())
    }

    /// Open `key` from `offset`, only if its ETag is still `etag` (`""`: unguarded). At offset
    /// 0 a `HeadObject` in checksum mode first reads the object's full SHA-256, if it has one,
    /// and its ETag, returned to guard later resumes.
    pub async fn get(
        &self,
        key: &str,
        etag: &str,
        offset: u64,
    ) -> Result<(Opened, Option<String>), FetchError> {
        let what = self.what(key);
        // Some S3-compatible stores list no ETag; then there is nothing to guard with.
        let guard = (!etag.is_empty()).then(|| etag.to_owned());
        let mut sha256 = None;
        let mut size = None;
        let mut seen_etag = None;
        if offset == 0 {
            let head = self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .set_if_match(guard.clone())
                .checksum_mode(ChecksumMode::Enabled)
                .send()
                .await
                .map_err(|e| classify(e, &what))?;
            size = head.content_length().and_then(|n| u64::try_from(n).ok());
            seen_etag = head.e_tag().map(str::to_owned);
            let full = head.checksum_type() != Some(&ChecksumType::Composite);
            if let Some(b64) = head.checksum_sha256().filter(|_| full) {
                sha256 = Some(decode_sha256_b64(b64).ok_or_else(|| {
                    FetchError::invalid(format!("{what}: bad x-amz-checksum-sha256 {b64:?}"))
                })?);
            }
        }
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .if_match(etag);
        if offset > 0 {
            req = req.range(format!("bytes={offset}-"));
        }
        let out = req.send().await.map_err(|e| classify(e, &what))?;
        let (start, total) = match out.content_range().and_then(parse_content_range) {
            Some((start, total)) => (start, total),
            None => (0, out.content_length().and_then(|n| u64::try_from(n).ok())),
        };
        let opened = Opened {
            body: byte_stream(out.body, what),
            start,
            size: size.or(total),
            sha256,
        };
        Ok((opened, seen_etag))
    }
}

fn byte_stream(body: ByteStream, what: String) -> super::download::ChunkStream {
    futures_util::stream::unfold((body, what), |(mut body, what)| async move {
        match body.try_next().await {
            Ok(Some(chunk)) => Some((Ok(chunk), (body, what))),
            Ok(None) => None,
            Err(e) => {
                let msg = format!("{what}: reading the body: {}", DisplayErrorContext(&e));
                Some((Err(FetchError::transient(msg)), (body, what)))
            }
        }
    })
    .boxed()
}

/// Classify an SDK error: not found, authentication, retryable, or unusable.
fn classify<E>(e: SdkError<E, HttpResponse>, what: &str) -> FetchError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let message = format!("{what}: {}", DisplayErrorContext(&e));
    let class = match &e {
        SdkError::TimeoutError(_) => FailClass::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => FailClass::Timeout,
        SdkError::DispatchFailure(d) if d.is_user() => FailClass::Invalid,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => FailClass::Transient,
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            match e.code() {
                Some("NoSuchKey" | "NotFound") => FailClass::NotFound,
                Some("NoSuchBucket") => FailClass::Invalid,
                Some(
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken"
                    | "InvalidToken",
                ) => FailClass::Auth,
                // If-Match failed: the object changed since it was listed.
                Some("PreconditionFailed") => FailClass::Invalid,
                _ if status == 412 => FailClass::Invalid,
                _ => FetchError::from_status(status, "").class,
            }
        }
        // Construction failures: no credentials, no region, a bad endpoint.
        _ => FailClass::Invalid,
    };
    let message = match class {
        FailClass::Auth => format!("{message} (authentication: check the AWS credentials)"),
        _ => message,
    };
    FetchError::new(class, message)
}

/// Base64 of 32 bytes (how S3 sends checksums).
fn decode_sha256_b64(s: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let v = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()?;
    v.try_into().ok()
}

/// Opens the objects of one listing, guarded by their ETags (from the listing, else from
/// the first `HeadObject`, for stores whose listings carry none).
struct ListingOpener {
    client: S3Client,
    etags: Arc<Mutex<HashMap<String, String>>>,
}

fn lock(m: &Mutex<HashMap<String, String>>) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Opener for ListingOpener {
    fn open(
        &self,
        file: &RemoteFile,
        offset: u64,
    ) -> BoxFuture<'static, Result<Opened, FetchError>> {
        let client = self.client.clone();
        let key = file.locator.clone();
        let etags = self.etags.clone();
        let etag = lock(&etags).get(&key).cloned().unwrap_or_default();
        Box::pin(async move {
            let (opened, seen) = client.get(&key, &etag, offset).await?;
            if let Some(seen) = seen.filter(|_| etag.is_empty()) {
                lock(&etags).insert(key, seen);
            }
            Ok(opened)
        })
    }
}

/// The `s3` origin.
#[derive(Clone)]
pub struct S3 {
    client: S3Client,
    metrics: Option<Arc<Metrics>>,
}

impl S3 {
    pub fn new(client: S3Client, metrics: Option<Arc<Metrics>>) -> Self {
        S3 { client, metrics }
    }

    pub fn client(&self) -> &S3Client {
        &self.client
    }

    /// The content id of `name` now: the ETag of its `adapter_config.json`.
    pub async fn head(&self, name: &AdapterName) -> Result<String, FetchError> {
        let key = format!("{}adapter_config.json", self.client.adapter_dir(name));
        self.client.etag(&key).await
    }

    /// List `name` and plan its download. Nothing is transferred until the bodies are read.
    pub async fn download(&self, name: &AdapterName) -> Result<Download, FetchError> {
        let planned = self.plan(name).await;
        if let Err(e) = &planned {
            record_miss(self.metrics.as_deref(), ORIGIN, e);
        }
        planned
    }

    async fn plan(&self, name: &AdapterName) -> Result<Download, FetchError> {
        let dir = self.client.adapter_dir(name);
        let objects = self.client.list(&dir).await?;
        let mut files = Vec::with_capacity(objects.len());
        let mut etags = HashMap::with_capacity(objects.len());
        let mut content_id = None;
        for o in objects {
            let Some(path) = relative_path(&dir, &o.key)? else {
                continue;
            };
            if path == "adapter_config.json" {
                content_id = Some(o.etag.clone());
            }
            files.push(RemoteFile {
                path,
                locator: o.key.clone(),
                size: Some(o.size),
                sha256: None,
            });
            if !o.etag.is_empty() {
                etags.insert(o.key, o.etag);
            }
        }
        let content_id = match content_id {
            None => {
                return Err(FetchError::not_found(format!(
                    "{}: no adapter_config.json",
                    self.client.what(&dir)
                )));
            }
            // Some S3-compatible stores list no ETags: ask the object itself.
            Some(etag) if etag.is_empty() => {
                self.client
                    .etag(&format!("{dir}adapter_config.json"))
                    .await?
            }
            Some(etag) => etag,
        };
        // adapter_config.json first: a reader can check it before the weights arrive.
        files.sort_by_key(|f| f.path != "adapter_config.json");
        let opener = ListingOpener {
            client: self.client.clone(),
            etags: Arc::new(Mutex::new(etags)),
        };
        let manifest = Manifest { content_id, files };
        Ok(Download::new(
            ORIGIN,
            manifest,
            Arc::new(opener),
            self.client.policy,
            self.metrics.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_never_start_keys_with_a_slash() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("models"), "models/");
        assert_eq!(normalize_prefix("models/"), "models/");
        assert_eq!(normalize_prefix("a/b//"), "a/b/");
    }

    #[test]
    fn keys_stay_inside_the_adapter_directory() {
        let dir = "p/org/x/";
        let ok = |k: &str| relative_path(dir, k).unwrap();
        assert_eq!(
            ok("p/org/x/adapter_config.json").as_deref(),
            Some("adapter_config.json")
        );
        assert_eq!(ok("p/org/x/sub/tok.json").as_deref(), Some("sub/tok.json"));
        assert_eq!(ok("p/org/x/"), None);
        assert_eq!(ok("p/org/x/sub/"), None);
        for bad in [
            "p/org/x/../y/adapter_config.json",
            "p/org/x/..",
            "p/org/x/a/../../b",
            "p/org/x//etc/passwd",
            "p/org/x/./a",
            "p/org/x/a\\..\\b",
            "p/org/x/a\nb",
            "p/org/x/../",
            "q/other",
        ] {
            let e = relative_path(dir, bad).unwrap_err();
            assert_eq!(e.class, FailClass::Invalid, "{bad}");
            assert!(e.message.contains("escape"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn decodes_s3_checksums() {
        // sha256("") in base64, as S3 sends it.
        let v = decode_sha256_b64("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap();
        assert_eq!(
            super::super::download::hex(&v),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(decode_sha256_b64("not base64!").is_none());
        assert!(decode_sha256_b64("AAAA").is_none(), "wrong length");
    }
}
