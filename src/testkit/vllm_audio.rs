//! The stand-in vLLM's speech-to-text routes, `POST /v1/audio/transcriptions` and
//! `/v1/audio/translations`: a `multipart/form-data` form read as FastAPI reads a `Form()`
//! model (vLLM's `TranscriptionRequest`), the `model` resolved like an inference request's.
//!
//! The form is read with `multer`, a reader independent of loraplex's own, so a test sees what
//! vLLM would receive (on forms clients write: multer refuses a delimiter followed by other
//! bytes, which Starlette reads as data). As FastAPI: a field given twice counts by its last
//! value, an empty
//! `model` is none (the base model), no `file` part is a 400 validation error, and a body that
//! is not a form is a 400. The answer is vLLM's `TranscriptionResponse` (`text`, `usage`), its
//! text telling which weights answered and what audio arrived:
//! `adapter=<name> weights=<hash16> audio=<xxh3 of the file, 16 hex> bytes=<file size>`
//! (`adapter=none weights=base` for the base model).

use std::sync::{Arc, atomic::Ordering};

use bytes::Bytes;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

use super::{
    adapters::hash16,
    server::{Request, Response, lock},
    vllm::{State, bump},
    vllm_api::error,
    vllm_routes::model_weights,
};

/// The fields of a transcription form this stand-in reads.
#[derive(Default)]
struct Form {
    model: Option<String>,
    file: Option<Bytes>,
}

async fn read_form(req: &Request) -> Result<Form, String> {
    let content_type = req.head.header("content-type").unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|e| e.to_string())?;
    let body = req.body.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut form = Form::default();
    while let Some(field) = multipart.next_field().await.map_err(|e| e.to_string())? {
        let name = field.name().unwrap_or_default().to_owned();
        let is_file = field.file_name().is_some();
        let data = field.bytes().await.map_err(|e| e.to_string())?;
        match name.as_str() {
            "model" if is_file => return Err("model: a string is required".into()),
            "model" => {
                let text = String::from_utf8(data.to_vec()).map_err(|e| e.to_string())?;
                form.model = Some(text).filter(|m| !m.is_empty());
            }
            "file" => form.file = Some(data),
            _ => {}
        }
    }
    Ok(form)
}

/// The text of an answer for `audio` from `adapter` (name, weights hash) or the base model.
pub fn transcription_text(adapter: Option<(&str, u64)>, audio: &[u8]) -> String {
    let (name, weights) = match adapter {
        Some((name, hash)) => (name.to_owned(), hash16(hash)),
        None => ("none".to_owned(), "base".to_owned()),
    };
    format!(
        "adapter={name} weights={weights} audio={} bytes={}",
        hash16(xxh3_64(audio)),
        audio.len()
    )
}

pub(super) async fn transcription(state: &Arc<State>, req: &Request) -> Response {
    let form = match read_form(req).await {
        Ok(form) => form,
        Err(why) => {
            let msg = format!("There was an error parsing the body: {why}");
            return error(400, "Bad Request", &msg, None);
        }
    };
    let Some(audio) = form.file else {
        let msg = "1 validation error:\n  {'type': 'missing', 'loc': 'body.file', 'msg': 'Field \
                   required'}";
        return error(400, "Bad Request", msg, Some("body.file"));
    };
    let base = state.config.served_names()[0];
    let model = form.model.as_deref().unwrap_or(base);
    bump(&mut lock(&state.inner).requests, model);
    let adapter = match model_weights(state, model).await {
        Ok(adapter) => adapter,
        Err(resp) => return resp,
    };
    state.next_id.fetch_add(1, Ordering::SeqCst);
    let text = transcription_text(adapter, &audio);
    Response::json(
        200,
        &json!({"text": text, "usage": {"type": "duration", "seconds": 1}}),
    )
}
