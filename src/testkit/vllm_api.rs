//! The OpenAI-shaped answers of the stand-in vLLM: completions (whole or SSE), the model list,
//! and error bodies in vLLM's `ErrorResponse` shape (`{"error":{"message","type","param","code"}}`,
//! keys in that order, as pydantic writes them).
//!
//! The generated text tells which weights answered: its first token is
//! `adapter=<name> weights=<xxh3 of the weights file, 16 hex> prompt_tokens=<n>` (`adapter=none
//! weights=base` for the base model), then ` t1`, ` t2`, ... up to `max_tokens` tokens. A stream
//! sends one token per event, so the deltas concatenate to the non-streaming text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{
    adapters::hash16,
    server::{Framing, Piece, Response},
    vllm_resolve::LoadedAdapter,
};

/// Which endpoint is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// vLLM's 404 for an unknown model, byte for byte.
pub fn model_not_found(name: &str) -> Response {
    error(
        404,
        "NotFoundError",
        &format!("The model `{name}` does not exist."),
        Some("model"),
    )
}

/// An `ErrorResponse`.
pub fn error(status: u16, kind: &str, message: &str, param: Option<&str>) -> Response {
    Response::json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": status}}),
    )
}

/// The tokens of an answer; their concatenation is the text.
pub fn completion_tokens(
    adapter: Option<(&str, u64)>,
    prompt_tokens: u64,
    max_tokens: u64,
) -> Vec<String> {
    let first = match adapter {
        Some((name, hash)) => {
            format!(
                "adapter={name} weights={} prompt_tokens={prompt_tokens}",
                hash16(hash)
            )
        }
        None => format!("adapter=none weights=base prompt_tokens={prompt_tokens}"),
    };
    std::iter::once(first)
        .chain((1..max_tokens.max(1)).map(|i| format!(" t{i}")))
        .collect()
}

/// The text an answer carries (what a test expects to read back).
pub fn completion_text(
    adapter: Option<(&str, u64)>,
    prompt_tokens: u64,
    max_tokens: u64,
) -> String {
    completion_tokens(adapter, prompt_tokens, max_tokens).concat()
}

/// Whitespace-separated words of the prompt: `messages[].content` (string or text parts) for
/// chat, `prompt` (string or list of strings) for completions.
pub fn prompt_tokens(endpoint: Endpoint, body: &Value) -> u64 {
    fn words(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.split_whitespace().count() as u64,
            Value::Array(items) => items.iter().map(words).sum(),
            Value::Object(part) => part.get("text").map_or(0, words),
            _ => 0,
        }
    }
    match endpoint {
        Endpoint::Chat => body["messages"]
            .as_array()
            .map_or(0, |m| m.iter().map(|msg| words(&msg["content"])).sum()),
        Endpoint::Completions => words(&body["prompt"]),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A whole (non-streaming) answer.
pub fn whole(endpoint: Endpoint, id: u64, model: &str, tokens: &[String], prompt: u64) -> Response {
    let text = tokens.concat();
    let usage = json!({
        "prompt_tokens": prompt,
        "total_tokens": prompt + tokens.len() as u64,
        "completion_tokens": tokens.len(),
    });
    let body = match endpoint {
        Endpoint::Chat => json!({
            "id": format!("chatcmpl-{id}"),
            "object": "chat.completion",
            "created": now(),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": "length",
            }],
            "usage": usage,
        }),
        Endpoint::Completions => json!({
            "id": format!("cmpl-{id}"),
            "object": "text_completion",
            "created": now(),
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length"}],
            "usage": usage,
        }),
    };
    Response::json(200, &body)
}

/// An SSE answer: one `data: {json}\n\n` event per token, `gap` apart, then `data: [DONE]\n\n`,
/// each event its own chunk.
pub fn stream(
    endpoint: Endpoint,
    id: u64,
    model: &str,
    tokens: &[String],
    gap: Duration,
) -> Response {
    let created = now();
    let last = tokens.len().saturating_sub(1);
    let mut pieces = Vec::with_capacity(tokens.len() + 1);
    for (i, token) in tokens.iter().enumerate() {
        let finish = if i == last {
            json!("length")
        } else {
            Value::Null
        };
        let event = match endpoint {
            Endpoint::Chat => {
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": token})
                } else {
                    json!({"content": token})
                };
                json!({
                    "id": format!("chatcmpl-{id}"),
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
            Endpoint::Completions => json!({
                "id": format!("cmpl-{id}"),
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": token, "logprobs": null, "finish_reason": finish}],
            }),
        };
        let delay = if i == 0 { Duration::ZERO } else { gap };
        pieces.push(Piece::new(delay, format!("data: {event}\n\n")));
    }
    pieces.push(Piece::new(gap, "data: [DONE]\n\n"));
    Response::new(200)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .pieces(Framing::Chunked, pieces)
}

/// `GET /v1/models`: one entry per served name of the base model (`root` the `--model`
/// string), then the adapters in load order (`parent` the first served name).
pub fn models(
    served: &[&str],
    root: &str,
    max_model_len: u64,
    loaded: &[LoadedAdapter],
) -> Response {
    let created = now();
    let card = |id: &str, root: &str, parent: Option<&str>, max_len: Option<u64>| {
        json!({
            "id": id,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": max_len,
            "permission": [{
                "id": format!("modelperm-{id}"),
                "object": "model_permission",
                "created": created,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false,
            }],
        })
    };
    let mut data: Vec<Value> = served
        .iter()
        .map(|name| card(name, root, None, Some(max_model_len)))
        .collect();
    for adapter in loaded {
        let path = adapter.path.to_string_lossy();
        data.push(card(&adapter.name, &path, served.first().copied(), None));
    }
    Response::json(200, &json!({"object": "list", "data": data}))
}
