//! `type: http`: a plain HTTP server with the adapter layout, `{base_url}/{name}/{file}`.
//!
//! The manifest comes from `HEAD` requests: the config (its ETag is the content id; a 404
//! means this origin does not have the adapter), then `adapter_model.safetensors`, else
//! `adapter_model.bin`. Files stream with `GET`, from an offset with `Range` when resuming,
//! and `If-Range` with the ETag the manifest saw: a file replaced since (nginx's ETag is its
//! mtime and size) comes back whole (200), and the download is refused rather than stitched
//! from two versions; the next request fetches the new one.
//! Timeouts: connect, and per read (reqwest's `read_timeout` restarts after every read), so a
//! slow but moving 2 GB transfer finishes.

use futures_util::{FutureExt, StreamExt, TryStreamExt, future::BoxFuture};
use reqwest::{
    Client, Method, RequestBuilder, Response, StatusCode,
    header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_RANGE, RANGE},
};

use super::{
    FileSpec, FileStream, Manifest, Origin, OriginError,
    remote::{ContentRange, chain, parse_content_range},
};
use crate::{
    adapter::{AdapterName, BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE},
    config::TransferConfig,
    error::Error,
};

pub struct HttpOrigin {
    base_url: String,
    token: Option<String>,
    transfer: TransferConfig,
    client: Client,
}

impl HttpOrigin {
    pub fn new(
        base_url: &str,
        token: Option<String>,
        transfer: TransferConfig,
    ) -> Result<Self, Error> {
        let client = Client::builder()
            .connect_timeout(transfer.connect_timeout)
            .read_timeout(transfer.idle_timeout)
            .no_proxy()
            .build()
            .map_err(|e| Error::internal(format!("http origin {base_url}: {e}")))?;
        Ok(HttpOrigin {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            transfer,
            client,
        })
    }

    fn url(&self, name: &AdapterName, file: &str) -> String {
        format!("{}/{}/{}", self.base_url, name, file)
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let req = self.client.request(method, url);
        match &self.token {
            Some(t) => req.header(AUTHORIZATION, format!("Bearer {t}")),
            None => req,
        }
    }

    async fn send(&self, req: RequestBuilder, what: &str) -> Result<Response, OriginError> {
        req.send()
            .await
            .map_err(|e| OriginError::transient(format!("{what}: {}", chain(&e))))
    }

    /// HEAD one file: `Ok(Some(size))`, `Ok(None)` when absent, or an error.
    async fn probe(&self, name: &AdapterName, file: &str) -> Result<Option<Response>, OriginError> {
        let url = self.url(name, file);
        let resp = self.send(self.request(Method::HEAD, &url), &url).await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(resp)),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(None),
            s => Err(OriginError::from_status(s.as_u16(), &format!("HEAD {url}"))),
        }
    }
}

/// The `Content-Length` header (reqwest's `content_length()` is the body's, 0 for HEAD).
fn header_len(resp: &Response) -> Option<u64> {
    resp.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn etag(resp: &Response) -> Option<String> {
    Some(resp.headers().get(ETAG)?.to_str().ok()?.to_owned())
}

/// The content id of an adapter from the config's and the weights' answers
/// ([`super::remote::content_id`]); `None` when the config has no ETag.
fn content_id(config: &Response, weights: Option<&Response>) -> Option<String> {
    Some(super::remote::content_id(
        etag(config)?,
        weights.and_then(etag),
    ))
}

/// The `Content-Range` of a 206 answer.
fn content_range(resp: &Response) -> Option<ContentRange> {
    parse_content_range(resp.headers().get(CONTENT_RANGE)?.to_str().ok()?)
}

impl Origin for HttpOrigin {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn describe(&self) -> String {
        format!("http {}", self.base_url)
    }

    fn transfer(&self) -> TransferConfig {
        self.transfer.clone()
    }

    fn head<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        async move {
            let Some(cfg) = self.probe(name, CONFIG_FILE).await? else {
                return Err(OriginError::not_found(self.url(name, CONFIG_FILE)));
            };
            let mut weights = None;
            for file in [SAFETENSORS_FILE, BIN_FILE] {
                if let Some(resp) = self.probe(name, file).await? {
                    weights = Some(resp);
                    break;
                }
            }
            Ok(content_id(&cfg, weights.as_ref()))
        }
        .boxed()
    }

    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        async move {
            let Some(cfg) = self.probe(name, CONFIG_FILE).await? else {
                return Err(OriginError::not_found(self.url(name, CONFIG_FILE)));
            };
            let spec = |path: &str, resp: &Response| FileSpec {
                validator: etag(resp).filter(|e| !e.starts_with("W/")),
                ..FileSpec::new(path, header_len(resp))
            };
            let mut files = vec![spec(CONFIG_FILE, &cfg)];
            let mut weights_resp = None;
            for weights in [SAFETENSORS_FILE, BIN_FILE] {
                if let Some(resp) = self.probe(name, weights).await? {
                    files.push(spec(weights, &resp));
                    weights_resp = Some(resp);
                    break;
                }
            }
            let etag = content_id(&cfg, weights_resp.as_ref());
            Ok(Manifest {
                files,
                etag,
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
        async move {
            let url = self.url(name, &file.path);
            let mut req = self.request(Method::GET, &url);
            // Only the rest of the version already begun (If-Range takes a strong ETag).
            let validator = file.validator.as_deref().filter(|_| offset > 0);
            if offset > 0 {
                req = req.header(RANGE, format!("bytes={offset}-"));
            }
            if let Some(v) = validator {
                req = req.header(IF_RANGE, v);
            }
            let resp = self.send(req, &url).await?;
            if let Some(v) = validator
                && resp.status() == StatusCode::OK
                && etag(&resp).as_deref() != Some(v)
            {
                return Err(OriginError::invalid(format!(
                    "GET {url}: the file changed at the origin during the download (ETag {v} \
                     became {})",
                    etag(&resp).unwrap_or_else(|| "none".into())
                )));
            }
            let ContentRange { start, total } = match resp.status() {
                StatusCode::PARTIAL_CONTENT => match content_range(&resp) {
                    Some(range) => range,
                    None => {
                        return Err(OriginError::invalid(format!(
                            "GET {url}: 206 without a usable Content-Range"
                        )));
                    }
                },
                StatusCode::OK => ContentRange {
                    start: 0,
                    total: header_len(&resp),
                },
                s => return Err(OriginError::from_status(s.as_u16(), &format!("GET {url}"))),
            };
            let body = resp
                .bytes_stream()
                .map_err(move |e| OriginError::transient(format!("reading {url}: {}", chain(&e))))
                .boxed();
            Ok(FileStream {
                offset: start,
                total,
                sha256: None,
                body,
            })
        }
        .boxed()
    }
}
