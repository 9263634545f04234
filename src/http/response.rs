//! Small complete answers of the proxy's own: errors in OpenAI's shape, JSON, plain text.

use crate::{error::Error, http::head::itoa_buf};

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// A whole response: status, content type, extra headers, body.
pub fn write(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra: &[(&str, &[u8])],
    body: &[u8],
    keep_alive: bool,
) {
    write_head(out, status, content_type, extra, body.len(), keep_alive);
    out.extend_from_slice(body);
}

/// The head of a whole response whose body is `body_len` bytes.
fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra: &[(&str, &[u8])],
    body_len: usize,
    keep_alive: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa_buf(u64::from(status)).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(itoa_buf(body_len as u64).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in extra {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// An error as an OpenAI-shaped JSON response.
pub fn error(out: &mut Vec<u8>, err: &Error, keep_alive: bool) {
    write(
        out,
        err.status(),
        "application/json",
        &[],
        &err.to_json(),
        keep_alive,
    );
}

/// A JSON response. The body is written into `out` first and the head moved in front of it,
/// so nothing is allocated when `out` has the room.
pub fn json<T: serde::Serialize + ?Sized>(
    out: &mut Vec<u8>,
    status: u16,
    value: &T,
    keep_alive: bool,
) {
    let start = out.len();
    serde_json::to_writer(&mut *out, value).expect("our answers always serialize");
    let body_len = out.len() - start;
    write_head(out, status, "application/json", &[], body_len, keep_alive);
    let head_len = out.len() - start - body_len;
    out[start..].rotate_right(head_len);
}

/// Make `out`, a whole answer, the answer to HEAD: the same head (its `content-length` kept),
/// no body (RFC 9110 §9.3.2). A client reads no body after a HEAD answer whatever its head
/// says, so body bytes would be taken for the next answer on the connection.
pub fn strip_body(out: &mut Vec<u8>) {
    if let Some(end) = out.windows(4).position(|p| p == b"\r\n\r\n") {
        out.truncate(end + 4);
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response() {
        let mut out = Vec::new();
        error(&mut out, &Error::model_not_found("x"), false);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"));
        assert!(s.contains("connection: close\r\n\r\n{\"error\":"));
    }

    #[test]
    fn json_response_after_what_is_there() {
        let mut out = b"earlier".to_vec();
        json(&mut out, 200, &serde_json::json!({"a": 1}), true);
        let mut whole = b"earlier".to_vec();
        write(
            &mut whole,
            200,
            "application/json",
            &[],
            br#"{"a":1}"#,
            true,
        );
        assert_eq!(String::from_utf8(out), String::from_utf8(whole));
    }

    #[test]
    fn head_answer_keeps_the_head_only() {
        let mut out = Vec::new();
        error(&mut out, &Error::model_not_found("x"), true);
        let whole = out.clone();
        strip_body(&mut out);
        let end = whole.windows(4).position(|p| p == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(out, whole[..end]);
        assert!(String::from_utf8(out).unwrap().contains("content-length: "));
    }
}
