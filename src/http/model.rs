//! The top-level `"model"` of an OpenAI request body.
//!
//! Read with serde into a struct that has only a `model` field, so the whole body is validated
//! as JSON but nothing else is kept: nested `"model"` keys (inside `tools`, `messages`, ...)
//! are never mistaken for it, escapes (`"mod\u0065l"`) and whitespace are handled by the JSON
//! parser, and no input can panic.
//!
//! Choices, documented because a proxy and the server behind it must not disagree:
//! - empty body, or no `model` key, or `"model": null`: no model (a base-model request);
//! - a `model` that is not a string: 400;
//! - `model` twice: 400 (Python's `json` keeps the last one and a streaming parser the first;
//!   refusing the ambiguity means loraplex and vLLM can never route on different names);
//! - invalid JSON, or a top level that is not an object: 400.

use std::borrow::Cow;

use serde::Deserialize;

use crate::error::Error;

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// The `model` of a JSON body; `Ok(None)` when there is none.
pub fn extract_model(body: &[u8]) -> Result<Option<Cow<'_, str>>, Error> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Ok(None),
        // serde's derived struct visitor would also accept a JSON array.
        Some(b'{') => {}
        Some(_) => return Err(Error::bad_request("the request body must be a JSON object")),
    }
    match serde_json::from_slice::<Peek<'_>>(body) {
        Ok(peek) => Ok(peek.model),
        Err(e) => Err(Error::bad_request(format!("invalid JSON body: {e}"))),
    }
}

/// The same body with its top-level `model` set to `model`; other keys keep their order.
/// Used by `fallback_to_base_model`, a rare path, so a full parse is fine here.
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Vec<u8>, Error> {
    let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| Error::bad_request(format!("invalid JSON body: {e}")))?;
    map.insert("model".into(), serde_json::Value::String(model.into()));
    serde_json::to_vec(&map).map_err(|e| Error::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(s: &str) -> Result<Option<String>, u16> {
        extract_model(s.as_bytes())
            .map(|m| m.map(Cow::into_owned))
            .map_err(|e| e.status())
    }

    #[test]
    fn top_level_only() {
        let body = r#"{"tools":[{"type":"function","function":{"name":"f","model":"nested"}}],
            "messages":[{"role":"user","content":"{\"model\":\"fake\"}","model":"m2"}],
            "model" : "acme/real-lora"}"#;
        assert_eq!(model(body), Ok(Some("acme/real-lora".into())));
    }

    #[test]
    fn escapes_and_whitespace() {
        assert_eq!(
            model(r#" { "mod\u0065l" : "a\/b" } "#),
            Ok(Some("a/b".into()))
        );
    }

    #[test]
    fn absent_null_empty() {
        assert_eq!(model(r#"{"prompt":"x"}"#), Ok(None));
        assert_eq!(model(r#"{"model":null}"#), Ok(None));
        assert_eq!(model(""), Ok(None));
        assert_eq!(model(r#"{"model":""}"#), Ok(Some(String::new())));
    }

    #[test]
    fn refused() {
        assert_eq!(model(r#"{"model":1}"#), Err(400));
        assert_eq!(model(r#"{"model":"a","model":"b"}"#), Err(400));
        assert_eq!(model(r#"{"model":"a""#), Err(400));
        assert_eq!(model(r#"["model"]"#), Err(400));
        assert_eq!(model("{\"model\":\"\u{0}\"}"), Err(400));
    }

    #[test]
    fn rewrite_keeps_other_keys_in_order() {
        let out = rewrite_model(br#"{"a":1,"model":"x","b":{"model":"y"}}"#, "base").unwrap();
        assert_eq!(out, br#"{"a":1,"model":"base","b":{"model":"y"}}"#);
    }
}
