//! The admin API under `/admin/*` (the Go project's paths and JSON shapes).
//!
//! When `admin.token` is set every admin request needs `Authorization: Bearer <token>`.

use std::rc::Rc;

use crate::{
    error::{Error, ErrorKind},
    http::RequestHead,
    server::worker::Worker,
};

/// Answer an admin request into `out`; returns the status written.
pub async fn serve(
    w: &Rc<Worker>,
    head: &RequestHead,
    _body: &[u8],
    _out: &mut Vec<u8>,
) -> Result<u16, Error> {
    authorize(w.shared.config.admin.token.as_deref(), head)?;
    Err(Error::new(
        ErrorKind::NotFound,
        format!("no admin endpoint {} {}", head.method(), head.path()),
    ))
}

/// Check the Bearer token when one is configured.
pub fn authorize(token: Option<&str>, head: &RequestHead) -> Result<(), Error> {
    let Some(token) = token else { return Ok(()) };
    let given = head
        .header("authorization")
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if constant_time_eq(given, token.as_bytes()) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unauthorized,
            "admin endpoints need Authorization: Bearer <admin.token>",
        ))
    }
}

/// Compare secrets without an early exit that would leak the matching prefix length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(auth: Option<&str>) -> RequestHead {
        let h = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let raw = format!("GET /admin/cache/stats HTTP/1.1\r\n{h}\r\n");
        RequestHead::parse(raw.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn token_is_required_when_set() {
        assert!(authorize(None, &head(None)).is_ok());
        assert!(authorize(Some("s3cret"), &head(Some("Bearer s3cret"))).is_ok());
        assert_eq!(
            authorize(Some("s3cret"), &head(None)).unwrap_err().status(),
            401
        );
        assert_eq!(
            authorize(Some("s3cret"), &head(Some("Bearer s3cre")))
                .unwrap_err()
                .status(),
            401
        );
        assert_eq!(
            authorize(Some("s3cret"), &head(Some("s3cret")))
                .unwrap_err()
                .status(),
            401
        );
    }
}
