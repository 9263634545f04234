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
//! - invalid JSON, a body that is not UTF-8, or a top level that is not an object: 400.
//!
//! Two readings, so that a request allocates nothing here: the fast one walks the values it
//! does not keep with `deserialize_any` (serde_json's skipping keeps a heap stack of the arrays
//! and objects it is inside) and borrows `model` from the body unless it has escapes. It
//! refuses some JSON that the full reading (serde's derived struct) accepts: a lone surrogate
//! escape or a number beyond `f64` in a skipped value, nesting deeper than 128. Whatever the
//! fast reading refuses goes through the full one, which decides (and words the error).

use std::borrow::Cow;

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, SeqAccess, Visitor},
};
use serde_json::value::RawValue;

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
    // JSON is UTF-8 (RFC 8259 §8.1). serde_json skips strings it ignores without checking
    // them, so check the whole body here: a body vLLM would refuse is refused here too.
    let text = std::str::from_utf8(body)
        .map_err(|e| Error::bad_request(format!("the request body is not UTF-8: {e}")))?;
    match extract_fast(text) {
        Some(model) => Ok(model),
        None => extract_full(text),
    }
}

/// The full reading of the module doc, which decides what the fast one refuses.
#[doc(hidden)]
pub fn extract_full(text: &str) -> Result<Option<Cow<'_, str>>, Error> {
    match serde_json::from_str::<Peek<'_>>(text) {
        Ok(peek) => Ok(peek.model),
        Err(e) => Err(Error::bad_request(format!("invalid JSON body: {e}"))),
    }
}

/// The fast reading of the module doc: `None` when it refuses `text` (the full reading
/// decides then). Allocates only for strings with escapes.
#[doc(hidden)]
pub fn extract_fast(text: &str) -> Option<Option<Cow<'_, str>>> {
    serde_json::from_str::<Fast<'_>>(text)
        .ok()
        .map(|fast| fast.0)
}

/// The top-level `model` of an object, every other value walked without being kept.
struct Fast<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for Fast<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fast<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut model: Option<Option<Model<'de>>> = None;
                while let Some(IsModel(is_model)) = map.next_key()? {
                    if !is_model {
                        map.next_value::<Skip>()?;
                    } else if model.is_some() {
                        return Err(de::Error::duplicate_field("model"));
                    } else {
                        model = Some(map.next_value()?);
                    }
                }
                Ok(Fast(model.flatten().map(|m| m.0)))
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether a key (escapes decoded) is `model`.
struct IsModel(bool);

impl<'de> Deserialize<'de> for IsModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IsModel;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IsModel, E> {
                Ok(IsModel(v == "model"))
            }
        }
        d.deserialize_identifier(V)
    }
}

/// A `model` string, borrowed from the body unless it has escapes.
struct Model<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Model<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Model<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Model<'de>, E> {
                Ok(Model(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Model<'de>, E> {
                Ok(Model(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Any JSON value, walked and dropped (recursion bounded by serde_json's depth limit).
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// The top-level members of an object, values kept as their raw JSON text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// The same body with its top-level `model` set to `model`; other members keep their order and
/// their exact text. Values are copied raw, not re-parsed: a body that [`extract_model`] reads
/// (a lone `\ud800` escape in a prompt, a number like `1e400`) is never refused here, and
/// nothing else in it changes.
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Vec<u8>, Error> {
    let Members(members) = serde_json::from_slice(body)
        .map_err(|e| Error::bad_request(format!("invalid JSON body: {e}")))?;
    let new_value = serde_json::to_string(model).map_err(|e| Error::internal(e.to_string()))?;
    let mut out = Vec::with_capacity(body.len() + model.len());
    out.push(b'{');
    let mut replaced = false;
    for (key, value) in &members {
        if out.len() > 1 {
            out.push(b',');
        }
        let key_json = serde_json::to_string(key).map_err(|e| Error::internal(e.to_string()))?;
        out.extend_from_slice(key_json.as_bytes());
        out.push(b':');
        if key == "model" && !replaced {
            out.extend_from_slice(new_value.as_bytes());
            replaced = true;
        } else {
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    if !replaced {
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(b"\"model\":");
        out.extend_from_slice(new_value.as_bytes());
    }
    out.push(b'}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(s: &str) -> Result<Option<String>, u16> {
        extract_model(s.as_bytes())
            .map(|m| m.map(Cow::into_owned))
            .map_err(|e| e.status())
    }

    /// What the full reading alone gives.
    fn full(s: &str) -> Result<Option<String>, u16> {
        extract_full(s)
            .map(|m| m.map(Cow::into_owned))
            .map_err(|e| e.status())
    }

    #[test]
    fn the_fast_reading_agrees_with_the_full_one_or_steps_aside() {
        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}1{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        for body in [
            r#"{"model":"acme/x","messages":[{"role":"user","content":"hi"}],"n":1,"t":0.5}"#,
            r#"{"messages":[{"content":"line\none"}],"model":"a\/b","stop":null,"s":true}"#,
            r#"{"mod\u0065l":"x","tools":[{"model":"nested"}]}"#,
            r#"{"model":null,"a":{}}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":1}"#,
            r#"{"model":"acme/x","prompt":"\ud800"}"#,
            r#"{"model":"acme/x","temperature":1e400}"#,
            r#"{"model":"x","a":[1,]}"#,
            r#"{"model":"x"} trailing"#,
            &deep,
        ] {
            let fast = extract_fast(body).map(|m| m.map(Cow::into_owned));
            if let Some(fast) = fast {
                assert_eq!(Ok(fast), full(body), "{body}");
            }
            assert_eq!(model(body), full(body), "{body}");
        }
        // Stepped aside for what serde_json's skipping accepts and a walk does not.
        for body in [
            r#"{"model":"acme/x","prompt":"\ud800"}"#,
            r#"{"model":"acme/x","temperature":1e400}"#,
            &deep,
        ] {
            assert!(extract_fast(body).is_none(), "{body}");
            assert_eq!(
                model(body),
                Ok(Some(if body == deep { "m" } else { "acme/x" }.into()))
            );
        }
        // Borrowed from the body when there is nothing to unescape.
        let borrowed = extract_fast(r#"{"messages":[{"a":[1]}],"model":"acme/x"}"#);
        assert!(matches!(borrowed, Some(Some(Cow::Borrowed("acme/x")))));
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
        // Found by the model_extract fuzz target: invalid UTF-8 in a value that is skipped.
        let bad_utf8 = b"{\"model\":\"m\",\"prompt\":\"\xff\"}";
        assert_eq!(extract_model(bad_utf8).unwrap_err().status(), 400);
    }

    #[test]
    fn rewrite_keeps_other_keys_in_order() {
        let out = rewrite_model(br#"{"a":1,"model":"x","b":{"model":"y"}}"#, "base").unwrap();
        assert_eq!(out, br#"{"a":1,"model":"base","b":{"model":"y"}}"#);
        let out = rewrite_model(br#" { "prompt" : "p" } "#, "base").unwrap();
        assert_eq!(out, br#"{"prompt":"p","model":"base"}"#);
        assert_eq!(
            rewrite_model(b"{}", "b\"q").unwrap(),
            br#"{"model":"b\"q"}"#
        );
    }

    /// Found by the `model_extract` fuzz target: values the extraction skips without decoding
    /// must be copied, not re-parsed (serde_json refuses to decode both).
    #[test]
    fn rewrite_accepts_what_extraction_accepts() {
        for body in [
            &br#"{"model":"acme/x","prompt":"\ud800"}"#[..],
            br#"{"model":"acme/x","temperature":1e400}"#,
        ] {
            assert!(model(std::str::from_utf8(body).unwrap()).is_ok());
            let out = rewrite_model(body, "base").unwrap();
            assert_eq!(extract_model(&out).unwrap().as_deref(), Some("base"));
            let tail = &body[body.iter().position(|&b| b == b',').unwrap()..];
            assert!(out.ends_with(tail), "{}", String::from_utf8_lossy(&out));
        }
        assert_eq!(rewrite_model(b"[1]", "b").unwrap_err().status(), 400);
        assert_eq!(rewrite_model(b"{\"a\":}", "b").unwrap_err().status(), 400);
    }
}
