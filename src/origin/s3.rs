//! The S3 origin (`type: s3`): an adapter is every object under `{prefix}{name}/`.
//!
//! `aws-sdk-s3` with the standard credential chain (env, profile, IMDS, web identity/IRSA, via
//! `aws-config` defaults; built on first use, since loading it is async); `endpoint` selects an
//! S3-compatible store (path-style addressing, checksums only when the operation requires them,
//! as such stores often lack the newer default checksums). The prefix is normalised once: `""`
//! stays empty (keys never start with `/`, unlike the Go original), `models` and `models/`
//! both become `models/`.
//!
//! The manifest lists `{prefix}{name}/` with ListObjectsV2 (every page, continuation tokens)
//! and refuses the whole adapter if one key would escape its directory ([`relative_path`]);
//! files stream with GetObject (`ByteStream::try_next()`), from an offset with `Range`.
//!
//! Verification: sizes always (listing and answers must agree; the transfer counts the bytes);
//! the object's full-object checksum when it has one: `x-amz-checksum-sha256`, or else a CRC
//! (`crc64nvme`, S3's default for new objects, `crc32c`, `crc32`; computed with the SDK's own
//! `aws-smithy-checksums`, at a fraction of SHA-256's CPU). It is read with a `HeadObject` in
//! checksum mode at manifest time (S3 omits checksums on ranged GETs, so the value must be
//! known before a resume) for the weights files and any object the listing flags with a
//! checksum. Composite (multipart, per-part) checksums are not verified. The ETag is not used as an MD5:
//! it is one only for single-part uploads without SSE-KMS/SSE-C, and a false mismatch would
//! reject good adapters. The content id is the ETag of `adapter_config.json` joined with that
//! of the weights (as the HTTP origin does), so new weights under an unchanged config (a
//! retraining with the same hyperparameters) are noticed on revalidation.
//!
//! The SDK's own retries and stalled-stream protection are off: the store retries (with the
//! same schedule and idle timeout for every origin) and resumes with `Range`.

use aws_sdk_s3::{
    Client,
    config::{
        BehaviorVersion, Credentials, Region, RequestChecksumCalculation,
        ResponseChecksumValidation, StalledStreamProtectionConfig, http::HttpResponse,
        retry::RetryConfig, timeout::TimeoutConfig,
    },
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    primitives::ByteStream,
    types::{ChecksumAlgorithm, ChecksumMode, ChecksumType},
};
use futures_util::{FutureExt, StreamExt, future::BoxFuture};
use tokio::sync::OnceCell;

use super::{
    Crc, CrcAlgorithm, FileSpec, FileStream, Manifest, Origin, OriginError, OriginErrorKind,
    remote::{ContentRange, content_id, parse_content_range},
};
use crate::{
    adapter::{AdapterName, BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE},
    config::TransferConfig,
};

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
pub fn relative_path(dir: &str, key: &str) -> Result<Option<String>, OriginError> {
    let hostile = || {
        OriginError::invalid(format!(
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
    /// The listing says the object carries a checksum (SHA-256 or a CRC).
    pub checksum_listed: bool,
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
}

impl S3Client {
    /// Build the client. `credentials`: `None` uses the standard chain; tests pass static ones.
    pub async fn connect(
        settings: &S3Settings,
        transfer: &TransferConfig,
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
            .connect_timeout(transfer.connect_timeout)
            .read_timeout(transfer.idle_timeout)
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
    pub async fn list(&self, prefix: &str) -> Result<Vec<S3Object>, OriginError> {
        let what = self.what(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify(e, &what))?;
            for o in page.contents() {
                out.push(S3Object {
                    key: o.key().unwrap_or_default().to_owned(),
                    size: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    etag: o.e_tag().unwrap_or_default().to_owned(),
                    checksum_listed: o.checksum_algorithm().iter().any(|a| {
                        matches!(
                            a,
                            ChecksumAlgorithm::Sha256
                                | ChecksumAlgorithm::Crc64Nvme
                                | ChecksumAlgorithm::Crc32C
                                | ChecksumAlgorithm::Crc32
                        )
                    }),
                });
            }
            token = page.next_continuation_token().map(str::to_owned);
            if !page.is_truncated().unwrap_or(false) || token.is_none() {
                return Ok(out);
            }
        }
    }

    /// The ETag of `{dir}{file}` as listed, or from `HeadObject` when the listing has none
    /// (some S3-compatible stores list no ETags).
    async fn listed_etag(
        &self,
        dir: &str,
        file: &str,
        listed: String,
    ) -> Result<String, OriginError> {
        match listed.is_empty() {
            true => self.etag(&format!("{dir}{file}")).await,
            false => Ok(listed),
        }
    }

    /// The ETag of `key` now (`HeadObject`).
    pub async fn etag(&self, key: &str) -> Result<String, OriginError> {
        let what = self.what(key);
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        let head = head.map_err(|e| classify(e, &what))?;
        Ok(head.e_tag().unwrap_or_default().to_owned())
    }

    /// The full-object checksum of `key`, if it has one (`HeadObject` in checksum mode): its
    /// SHA-256, or else its CRC. Composite (multipart, per-part) checksums are skipped.
    pub async fn checksum(&self, key: &str) -> Result<Checksum, OriginError> {
        let what = self.what(key);
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| classify(e, &what))?;
        if head.checksum_type() == Some(&ChecksumType::Composite) {
            return Ok(Checksum::default());
        }
        if let Some(b64) = head.checksum_sha256() {
            let sha = decode_sha256_b64(b64).ok_or_else(|| {
                OriginError::invalid(format!("{what}: bad x-amz-checksum-sha256 {b64:?}"))
            })?;
            return Ok(Checksum {
                sha256: Some(sha),
                crc: None,
            });
        }
        let crcs = [
            (CrcAlgorithm::Crc64Nvme, head.checksum_crc64_nvme()),
            (CrcAlgorithm::Crc32c, head.checksum_crc32_c()),
            (CrcAlgorithm::Crc32, head.checksum_crc32()),
        ];
        let Some((algorithm, b64)) = crcs.into_iter().find_map(|(a, v)| Some((a, v?))) else {
            return Ok(Checksum::default());
        };
        let value = decode_b64(b64)
            .filter(|v| v.len() == algorithm.bytes())
            .ok_or_else(|| {
                OriginError::invalid(format!(
                    "{what}: bad x-amz-checksum-{} {b64:?}",
                    algorithm.name()
                ))
            })?;
        Ok(Checksum {
            sha256: None,
            crc: Some(Crc { algorithm, value }),
        })
    }

    /// Open `key` from `offset`.
    pub async fn get(&self, key: &str, offset: u64) -> Result<FileStream, OriginError> {
        let what = self.what(key);
        let mut req = self.client.get_object().bucket(&self.bucket).key(key);
        if offset > 0 {
            req = req.range(format!("bytes={offset}-"));
        }
        let out = req.send().await.map_err(|e| classify(e, &what))?;
        let ContentRange { start, total } = match out.content_range().and_then(parse_content_range)
        {
            Some(range) => range,
            None => ContentRange {
                start: 0,
                total: out.content_length().and_then(|n| u64::try_from(n).ok()),
            },
        };
        Ok(FileStream {
            offset: start,
            total,
            sha256: None,
            body: byte_stream(out.body, what),
        })
    }
}

fn byte_stream(
    body: ByteStream,
    what: String,
) -> futures_util::stream::BoxStream<'static, Result<bytes::Bytes, OriginError>> {
    futures_util::stream::unfold((body, what), |(mut body, what)| async move {
        match body.try_next().await {
            Ok(Some(chunk)) => Some((Ok(chunk), (body, what))),
            Ok(None) => None,
            Err(e) => {
                let msg = format!("{what}: reading the body: {}", DisplayErrorContext(&e));
                Some((Err(OriginError::transient(msg)), (body, what)))
            }
        }
    })
    .boxed()
}

/// Classify an SDK error: not found, authentication, retryable, or unusable.
fn classify<E>(e: SdkError<E, HttpResponse>, what: &str) -> OriginError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let message = format!("{what}: {}", DisplayErrorContext(&e));
    let kind = match &e {
        SdkError::TimeoutError(_) => OriginErrorKind::Transient,
        SdkError::DispatchFailure(d) if d.is_user() => OriginErrorKind::Invalid,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => OriginErrorKind::Transient,
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            match e.code() {
                Some("NoSuchKey" | "NotFound") => OriginErrorKind::NotFound,
                // A misconfigured origin, not a missing adapter: say so loudly.
                Some("NoSuchBucket") => OriginErrorKind::Invalid,
                Some(
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken"
                    | "InvalidToken",
                ) => OriginErrorKind::Auth,
                _ => OriginError::from_status(status, "").kind,
            }
        }
        // Construction failures: no credentials, no region, a bad endpoint.
        _ => OriginErrorKind::Invalid,
    };
    let message = match kind {
        OriginErrorKind::Auth => {
            format!("{message} (authentication: check the AWS credentials)")
        }
        _ => message,
    };
    OriginError::new(kind, message)
}

/// A base64 checksum value (how S3 sends checksums).
fn decode_b64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

/// Base64 of 32 bytes.
fn decode_sha256_b64(s: &str) -> Option<[u8; 32]> {
    decode_b64(s)?.try_into().ok()
}

/// What [`S3Client::checksum`] found for an object.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub sha256: Option<[u8; 32]>,
    pub crc: Option<Crc>,
}

/// The `s3` origin. The SDK client is built on first use (loading credentials is async).
pub struct S3 {
    settings: S3Settings,
    transfer: TransferConfig,
    credentials: Option<Credentials>,
    client: OnceCell<S3Client>,
}

impl S3 {
    /// An origin using the standard credential chain.
    pub fn new(settings: S3Settings, transfer: TransferConfig) -> S3 {
        S3::with_credentials(settings, transfer, None)
    }

    /// An origin with fixed credentials (tests, tools).
    pub fn with_credentials(
        settings: S3Settings,
        transfer: TransferConfig,
        credentials: Option<Credentials>,
    ) -> S3 {
        S3 {
            settings,
            transfer,
            credentials,
            client: OnceCell::new(),
        }
    }

    pub async fn client(&self) -> &S3Client {
        self.client
            .get_or_init(|| {
                S3Client::connect(&self.settings, &self.transfer, self.credentials.clone())
            })
            .await
    }

    /// List `name` and describe its files.
    pub async fn list_manifest(&self, name: &AdapterName) -> Result<Manifest, OriginError> {
        let client = self.client().await;
        let dir = client.adapter_dir(name);
        let mut files = Vec::new();
        let (mut config_etag, mut safetensors_etag, mut bin_etag) = (None, None, None);
        for o in client.list(&dir).await? {
            let Some(path) = relative_path(&dir, &o.key)? else {
                continue;
            };
            match path.as_str() {
                CONFIG_FILE => config_etag = Some(o.etag.clone()),
                SAFETENSORS_FILE => safetensors_etag = Some(o.etag.clone()),
                BIN_FILE => bin_etag = Some(o.etag.clone()),
                _ => {}
            }
            let weights = path == SAFETENSORS_FILE || path == BIN_FILE;
            let checksum = match o.checksum_listed || weights {
                true => client.checksum(&o.key).await?,
                false => Checksum::default(),
            };
            files.push(FileSpec {
                path,
                size: Some(o.size),
                sha256: checksum.sha256,
                crc: checksum.crc,
                validator: None,
            });
        }
        let Some(config_etag) = config_etag else {
            let at = client.what(&dir);
            return Err(OriginError::not_found(format!("{at}: no {CONFIG_FILE}")));
        };
        let config_etag = client.listed_etag(&dir, CONFIG_FILE, config_etag).await?;
        // The same weights file `head` looks at: safetensors first.
        let weights = match (safetensors_etag, bin_etag) {
            (Some(e), _) => Some(client.listed_etag(&dir, SAFETENSORS_FILE, e).await?),
            (None, Some(e)) => Some(client.listed_etag(&dir, BIN_FILE, e).await?),
            (None, None) => None,
        };
        let etag = content_id(config_etag, weights);
        // The config first: vLLM-facing checks can run before the weights arrive.
        files.sort_by_key(|f| f.path != CONFIG_FILE);
        Ok(Manifest {
            files,
            etag: Some(etag),
            ..Default::default()
        })
    }
}

impl Origin for S3 {
    fn kind(&self) -> &'static str {
        ORIGIN
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        let at = s
            .endpoint
            .as_deref()
            .map(|e| format!(" at {e}"))
            .unwrap_or_default();
        format!("s3 s3://{}/{}{at}", s.bucket, normalize_prefix(&s.prefix))
    }

    fn transfer(&self) -> TransferConfig {
        self.transfer.clone()
    }

    /// The content id now: the ETags of `adapter_config.json` and of the weights.
    fn head<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        async move {
            let client = self.client().await;
            let dir = client.adapter_dir(name);
            let config_etag = client.etag(&format!("{dir}{CONFIG_FILE}")).await?;
            let mut weights = None;
            for file in [SAFETENSORS_FILE, BIN_FILE] {
                match client.etag(&format!("{dir}{file}")).await {
                    Ok(e) => {
                        weights = Some(e);
                        break;
                    }
                    Err(e) if e.kind == OriginErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Some(content_id(config_etag, weights)))
        }
        .boxed()
    }

    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        self.list_manifest(name).boxed()
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
        async move {
            let client = self.client().await;
            let key = format!("{}{}", client.adapter_dir(name), file.path);
            client.get(&key, offset).await
        }
        .boxed()
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
            assert_eq!(e.kind, OriginErrorKind::Invalid, "{bad}");
            assert!(e.message.contains("escape"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn new_weights_under_the_same_config_change_the_content_id() {
        let id = |w: &str| content_id("\"cfg\"".into(), Some(w.into()));
        assert_eq!(id("\"w1\""), "\"cfg\"+\"w1\"");
        assert_ne!(id("\"w1\""), id("\"w2\""));
        assert_eq!(content_id("\"cfg\"".into(), None), "\"cfg\"");
        assert_eq!(id(""), "\"cfg\"", "an empty ETag is no ETag");
    }

    #[test]
    fn decodes_s3_checksums() {
        // sha256("") in base64, as S3 sends it.
        let v = decode_sha256_b64("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap();
        assert_eq!(
            crate::origin::transfer::hex(&v),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(decode_sha256_b64("not base64!").is_none());
        assert!(decode_sha256_b64("AAAA").is_none(), "wrong length");
    }
}
