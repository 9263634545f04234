//! The one error type of loraplex. An [`Error`] knows the HTTP status it becomes, the OpenAI
//! error `type` it carries, and renders itself in OpenAI's JSON shape:
//! `{"error":{"message":"...","type":"...","param":null,"code":404}}`.
//!
//! The `type` strings follow vLLM's own (`NotFoundError`, `BadRequestError`, ...), so a client
//! sees the same shape whether an error came from loraplex or from vLLM behind it.

use std::{borrow::Cow, fmt};

/// What went wrong, coarse enough to pick a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Malformed request: bad JSON, bad framing, a bad adapter name. 400.
    BadRequest,
    /// Missing or wrong admin/cluster token. 401.
    Unauthorized,
    /// An admin call this client may not make (not loopback, not a peer, no token set). 403.
    Forbidden,
    /// The adapter (or admin path) does not exist. 404.
    NotFound,
    /// Method not allowed on a proxy-owned endpoint. 405.
    MethodNotAllowed,
    /// The client was too slow to send its request head or body. 408.
    RequestTimeout,
    /// The request conflicts with what is stored: the adapter's directory would nest inside
    /// another stored adapter's, or hold one; or it evicts a preloaded adapter. 409.
    Conflict,
    /// Body above `server.max_body_size`. 413.
    PayloadTooLarge,
    /// Request head above the header buffer. 431.
    HeaderTooLarge,
    /// A bug or an unexpected local failure. 500.
    Internal,
    /// A request feature loraplex does not support (a transfer coding other than chunked). 501.
    NotImplemented,
    /// vLLM, a peer or an origin answered something unusable, or the adapter is invalid. 502.
    BadGateway,
    /// vLLM or every peer is unreachable, or the proxy is shutting down. 503.
    Unavailable,
    /// An upstream or origin took too long. 504.
    Timeout,
    /// No room on disk for the adapter (budget or ENOSPC). 507.
    InsufficientStorage,
}

impl ErrorKind {
    /// The HTTP status code.
    pub const fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::HeaderTooLarge => 431,
            ErrorKind::Internal => 500,
            ErrorKind::NotImplemented => 501,
            ErrorKind::BadGateway => 502,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::InsufficientStorage => 507,
        }
    }

    /// The OpenAI/vLLM error `type` string.
    pub const fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "BadRequestError",
            ErrorKind::Unauthorized => "AuthenticationError",
            ErrorKind::Forbidden => "PermissionDeniedError",
            ErrorKind::NotFound => "NotFoundError",
            ErrorKind::MethodNotAllowed => "MethodNotAllowedError",
            ErrorKind::RequestTimeout => "RequestTimeoutError",
            ErrorKind::Conflict => "ConflictError",
            ErrorKind::PayloadTooLarge => "RequestTooLargeError",
            ErrorKind::HeaderTooLarge => "RequestHeaderFieldsTooLargeError",
            ErrorKind::Internal => "InternalServerError",
            ErrorKind::NotImplemented => "NotImplementedError",
            ErrorKind::BadGateway => "BadGatewayError",
            ErrorKind::Unavailable => "ServiceUnavailableError",
            ErrorKind::Timeout => "GatewayTimeoutError",
            ErrorKind::InsufficientStorage => "InsufficientStorageError",
        }
    }

    /// Short label for logs and metric label values.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::Conflict => "conflict",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::HeaderTooLarge => "header_too_large",
            ErrorKind::Internal => "internal",
            ErrorKind::NotImplemented => "not_implemented",
            ErrorKind::BadGateway => "bad_gateway",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::InsufficientStorage => "insufficient_storage",
        }
    }
}

/// An error on its way to becoming an HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: Cow<'static, str>,
    /// The request field at fault (`"model"` for adapter errors), as in OpenAI's shape.
    pub param: Option<&'static str>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// Attach the request field at fault.
    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Prefix the message with context: `"fetch acme/x: " + message`.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message).into();
        self
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::BadRequest, message)
    }

    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::Internal, message)
    }

    /// vLLM's own wording for an unknown model, so clients can't tell the difference.
    pub fn model_not_found(name: &str) -> Self {
        Error::new(
            ErrorKind::NotFound,
            format!("The model `{}` does not exist.", Clipped(name)),
        )
        .with_param("model")
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn to_json(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "param": self.param,
                "code": self.status(),
            }
        });
        serde_json::to_vec(&body).expect("a json! value always serializes")
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind.as_str(),
            self.status(),
            self.message
        )
    }
}

impl std::error::Error for Error {}

/// Most bytes of a client's string (a model name) an error message repeats: a 4 MB `model`
/// must not come back as a 4 MB error.
pub const CLIP: usize = 200;

/// A client's string as an error message quotes it: at most [`CLIP`] bytes (cut at a character
/// boundary), then `…` when cut. `{:?}` quotes and escapes it, and says the full length.
pub struct Clipped<'a>(pub &'a str);

impl Clipped<'_> {
    fn parts(&self) -> (&str, bool) {
        if self.0.len() <= CLIP {
            return (self.0, false);
        }
        let mut end = CLIP;
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        (&self.0[..end], true)
    }
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (shown, cut) = self.parts();
        f.write_str(shown)?;
        if cut {
            f.write_str("…")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (shown, cut) = self.parts();
        fmt::Debug::fmt(shown, f)?;
        if cut {
            write!(f, "… ({} bytes in all)", self.0.len())?;
        }
        Ok(())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::InsufficientStorage,
            _ => match e.kind() {
                std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
                _ => ErrorKind::Internal,
            },
        };
        Error::new(kind, e.to_string())
    }
}

/// An error and its sources, so the message names the real cause (refused, reset, a
/// certificate refused, ...).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openai_shape() {
        let e = Error::model_not_found("acme/x");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "NotFoundError");
        assert_eq!(v["error"]["code"], 404);
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["message"], "The model `acme/x` does not exist.");
    }

    #[test]
    fn null_param_when_absent() {
        let v: serde_json::Value =
            serde_json::from_slice(&Error::bad_request("bad").to_json()).unwrap();
        assert!(v["error"]["param"].is_null());
        assert_eq!(v["error"]["code"], 400);
    }

    #[test]
    fn long_strings_are_clipped() {
        let long = "é".repeat(1000); // 2 bytes each: the cut falls inside one
        let shown = Clipped(&long).to_string();
        assert!(shown.len() <= CLIP + "…".len(), "{}", shown.len());
        assert!(shown.ends_with('…') && shown.starts_with("éé"));
        let quoted = format!("{:?}", Clipped(&long));
        assert!(quoted.ends_with("… (2000 bytes in all)"), "{quoted}");
        assert_eq!(format!("{:?}", Clipped("a\"b")), r#""a\"b""#);
        assert_eq!(Clipped("short").to_string(), "short");
        let e = Error::model_not_found(&"m".repeat(1 << 20));
        assert!(e.to_json().len() < 400);
    }

    #[test]
    fn enospc_is_507() {
        let e: Error = std::io::Error::from_raw_os_error(libc::ENOSPC).into();
        assert_eq!(e.status(), 507);
    }
}
