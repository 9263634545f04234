//! The routes of the stand-in vLLM: inference with on-demand resolution (speech-to-text in
//! `vllm_audio.rs`), the model list, load and unload, health. Decisions follow vLLM's `OpenAIServingModels` (see [`super::vllm`]).

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde_json::Value;

use super::{
    adapters::{CONFIG_FILE, checked_rel_path},
    probes,
    server::{Request, Response, lock},
    vllm::{Counters, Refusal, State, VllmFault, bump},
    vllm_api::{self, Endpoint, error, model_not_found},
    vllm_audio,
    vllm_resolve::{self, LoadError, Resolution},
};

pub(super) async fn route(state: Arc<State>, req: Request) -> Response {
    if let Some(resp) = probes::handle(&req).await {
        return resp;
    }
    // Starlette answers HEAD on every GET route (the server drops the body).
    let method = match req.head.method.as_str() {
        "HEAD" => "GET",
        other => other,
    };
    match (method, req.head.path()) {
        ("GET", "/health")
            if state
                .health_hang_ups
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok() =>
        {
            Response::hang_up()
        }
        ("GET", "/health") => Response::new(if state.healthy.load(Ordering::SeqCst) {
            200
        } else {
            503
        }),
        ("GET", "/v1/models") => {
            let loaded = lock(&state.inner).loaded.clone();
            let config = &state.config;
            let served = config.served_names();
            vllm_api::models(&served, &config.base_model, config.max_model_len, &loaded)
        }
        ("POST", "/v1/chat/completions") => inference(&state, &req, Endpoint::Chat).await,
        ("POST", "/v1/completions") => inference(&state, &req, Endpoint::Completions).await,
        ("POST", "/v1/audio/transcriptions" | "/v1/audio/translations") => {
            vllm_audio::transcription(&state, &req).await
        }
        ("POST", "/v1/load_lora_adapter") => load_adapter(&state, &req).await,
        ("POST", "/v1/unload_lora_adapter") => unload_adapter(&state, &req).await,
        ("GET", "/metrics") if !state.config.metrics => {
            Response::json(404, &serde_json::json!({"detail": "Not Found"}))
        }
        ("GET", "/metrics") => Response::new(200).body(
            "text/plain; version=0.0.4; charset=utf-8",
            state.engine.metrics_text(state.config.served_names()[0]),
        ),
        (
            _,
            "/health"
            | "/metrics"
            | "/v1/models"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/audio/transcriptions"
            | "/v1/audio/translations"
            | "/v1/load_lora_adapter"
            | "/v1/unload_lora_adapter",
        ) => Response::json(405, &serde_json::json!({"detail": "Method Not Allowed"})),
        _ => Response::json(404, &serde_json::json!({"detail": "Not Found"})),
    }
}

fn json_body(req: &Request) -> Result<Value, Response> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(error(
            400,
            "BadRequestError",
            "the body must be a JSON object",
            None,
        )),
        Err(e) => Err(error(
            400,
            "BadRequestError",
            &format!("invalid JSON: {e}"),
            None,
        )),
    }
}

fn header_ms(req: &Request, name: &str) -> Option<Duration> {
    req.head
        .header(name)
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_millis)
}

async fn inference(state: &Arc<State>, req: &Request, endpoint: Endpoint) -> Response {
    let body = match json_body(req) {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let base = state.config.served_names()[0];
    // vLLM serves the base model when `model` is absent or empty; a non-string fails
    // validation.
    let model = match body.get("model") {
        None | Some(Value::Null) => base,
        Some(Value::String(model)) if model.is_empty() => base,
        Some(Value::String(model)) => model.as_str(),
        Some(_) => return error(400, "BadRequestError", "`model` must be a string", None),
    };
    bump(&mut lock(&state.inner).requests, model);
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(state.config.max_tokens);
    if max_tokens == 0 {
        return error(
            400,
            "BadRequestError",
            "max_tokens must be at least 1, got 0.",
            None,
        );
    }
    let adapter = match model_weights(state, model).await {
        Ok(adapter) => adapter,
        Err(resp) => return resp,
    };
    // The engine: wait for a place in the batch (and a LoRA slot), then for the first token;
    // the request leaves the batch once its last token is out.
    let ticket = state.engine.admit(adapter.map(|(name, _)| name)).await;
    ticket.first_token().await;
    let per_token = state.engine.config().per_token;
    let decode = per_token * u32::try_from(max_tokens.saturating_sub(1)).unwrap_or(u32::MAX);
    tokio::spawn(ticket.finish(max_tokens.saturating_sub(1)));
    if let Some(ttft) = header_ms(req, "x-test-ttft-ms") {
        tokio::time::sleep(ttft).await;
    }
    let prompt = vllm_api::prompt_tokens(endpoint, &body);
    let tokens = vllm_api::completion_tokens(adapter, prompt, max_tokens);
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    // vLLM names the base model in its answers by its first served name, whichever was asked.
    let model = if adapter.is_some() { model } else { base };
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let gap = header_ms(req, "x-test-event-gap-ms").unwrap_or(Duration::from_millis(
            state.event_gap_ms.load(Ordering::SeqCst),
        ));
        // With a per-token time the engine paces the events; the first goes at once.
        let gap = if per_token.is_zero() { gap } else { per_token };
        vllm_api::stream(endpoint, id, model, &tokens, gap)
    } else {
        if !decode.is_zero() {
            tokio::time::sleep(decode).await;
        }
        vllm_api::whole(endpoint, id, model, &tokens, prompt)
    }
}

fn name_lock(state: &State, name: &str) -> Arc<tokio::sync::Mutex<()>> {
    lock(&state.name_locks)
        .entry(name.to_owned())
        .or_default()
        .clone()
}

/// Run blocking file work off the runtime threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(500, "InternalServerError", &e.to_string(), None))
}

/// Put `name` first in the CPU LoRA cache, pushing out the least recently used beyond
/// `max_cpu_loras`.
pub(super) fn keep_in_memory(inner: &mut Counters, name: &str, max_cpu_loras: usize) {
    inner.in_memory.retain(|n| n != name);
    if max_cpu_loras > 0 {
        inner.in_memory.push_front(name.to_owned());
        inner.in_memory.truncate(max_cpu_loras);
    }
}

/// The weights hash for a name vLLM knows: from memory while it is in the CPU LoRA cache, else
/// read from its directory again (as vLLM's worker does), noticing weights that vanished or
/// changed under the loaded name.
async fn cached(state: &State, name: &str) -> Result<Option<u64>, Response> {
    let max_cpu_loras = state.config.max_cpu_loras;
    let loaded = {
        let mut inner = lock(&state.inner);
        let Some(loaded) = inner.loaded.iter().find(|l| l.name == name).cloned() else {
            return Ok(None);
        };
        if inner.in_memory.iter().any(|n| n == name) {
            keep_in_memory(&mut inner, name, max_cpu_loras);
            // Served from memory. A weights file gone from under it is a fault all the same:
            // the next read, once the cache pushed it out, fails.
            if !loaded.weights_file.is_file() {
                inner.faults.push(VllmFault::WeightsGoneWhileLoaded {
                    name: name.to_owned(),
                    path: loaded.path,
                });
            }
            return Ok(Some(loaded.weights_hash));
        }
        loaded
    };
    let path = loaded.path.clone();
    let reread = blocking(move || vllm_resolve::read_weights(&path)).await?;
    let mut inner = lock(&state.inner);
    bump(&mut inner.rereads, name);
    match reread {
        Err(why) => {
            inner.faults.push(VllmFault::WeightsGoneWhileLoaded {
                name: name.to_owned(),
                path: loaded.path,
            });
            Err(error(500, "InternalServerError", &why, None))
        }
        Ok((_, hash)) => {
            if hash != loaded.weights_hash {
                inner.faults.push(VllmFault::WeightsChangedWhileLoaded {
                    name: name.to_owned(),
                    old: loaded.weights_hash,
                    new: hash,
                });
                if let Some(l) = inner.loaded.iter_mut().find(|l| l.name == name) {
                    l.weights_hash = hash;
                }
            }
            keep_in_memory(&mut inner, name, max_cpu_loras);
            Ok(Some(hash))
        }
    }
}

/// What answers a request for `model`: the base model (`None`), or an adapter and its
/// weights' hash (resolved on first use); counted as served once known.
pub(super) async fn model_weights<'m>(
    state: &Arc<State>,
    model: &'m str,
) -> Result<Option<(&'m str, u64)>, Response> {
    let adapter = if state.config.is_base(model) {
        None
    } else {
        Some((model, ensure_loaded(state, model).await?))
    };
    bump(&mut lock(&state.inner).served, model);
    Ok(adapter)
}

/// The loaded weights' hash for `name`, resolving it from the directory on first use.
async fn ensure_loaded(state: &Arc<State>, name: &str) -> Result<u64, Response> {
    if let Some(hash) = cached(state, name).await? {
        return Ok(hash);
    }
    let Some(dir) = state.config.lora_dir.clone() else {
        return Err(model_not_found(name));
    };
    let name_lock = name_lock(state, name);
    let _guard = name_lock.lock().await;
    if let Some(hash) = cached(state, name).await? {
        return Ok(hash);
    }
    bump(&mut lock(&state.inner).resolutions, name);
    let (owned, base) = (name.to_owned(), state.config.base_model.clone());
    let resolved = blocking(move || {
        let resolution = vllm_resolve::resolve(&dir, &owned, &base);
        // A directory without its config is a partial adapter too (vLLM just says 404).
        let bare_dir = resolution == Resolution::NotFound
            && checked_rel_path(&owned).is_ok_and(|rel| {
                let path = dir.join(rel);
                path.is_dir() && !path.join(CONFIG_FILE).exists() && !has_subdirs(&path)
            });
        (resolution, bare_dir)
    });
    let (resolution, bare_dir) = resolved.await?;
    let refuse = |status: u16, why: &str| {
        lock(&state.inner).refusals.push(Refusal {
            name: name.to_owned(),
            status,
            why: why.to_owned(),
        });
    };
    match resolution {
        Resolution::Loaded(loaded) => {
            let hash = loaded.weights_hash;
            let mut inner = lock(&state.inner);
            bump(&mut inner.loads, name);
            inner.loaded.push(loaded);
            keep_in_memory(&mut inner, name, state.config.max_cpu_loras);
            Ok(hash)
        }
        Resolution::NotFound => {
            if bare_dir {
                refuse(404, "a directory without adapter_config.json");
            }
            Err(model_not_found(name))
        }
        Resolution::Unloadable(why) => {
            refuse(400, &why);
            Err(error(
                400,
                "BadRequestError",
                &format!("LoRA adapter '{name}' was found but could not be loaded."),
                None,
            ))
        }
        Resolution::Crashed(why) => {
            refuse(500, &why);
            Err(error(500, "InternalServerError", &why, None))
        }
    }
}

/// Whether `dir` holds a directory (then it is the parent of nested adapters, not one).
fn has_subdirs(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| {
        entries.any(|e| e.is_ok_and(|e| e.file_type().is_ok_and(|t| t.is_dir())))
    })
}

async fn load_adapter(state: &Arc<State>, req: &Request) -> Response {
    let body = match json_body(req) {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let name = body.get("lora_name").and_then(Value::as_str).unwrap_or("");
    let path = body.get("lora_path").and_then(Value::as_str).unwrap_or("");
    let inplace = body
        .get("load_inplace")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if name.is_empty() || path.is_empty() {
        let msg = "Both 'lora_name' and 'lora_path' must be provided.";
        return error(400, "InvalidUserInput", msg, None);
    }
    let name_lock = name_lock(state, name);
    let _guard = name_lock.lock().await;
    let already = lock(&state.inner).loaded.iter().any(|l| l.name == name);
    if already && !inplace {
        let msg = format!(
            "The lora adapter '{name}' has already been loaded. If you want to load the adapter \
             in place, set 'load_inplace' to True."
        );
        return error(400, "InvalidUserInput", &msg, None);
    }
    let (owned, dir) = (name.to_owned(), PathBuf::from(path));
    let loaded = match blocking(move || vllm_resolve::load_from_path(&owned, &dir)).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(LoadError::NotFound)) => {
            let msg = format!("Loading lora {name} failed: No adapter found for {path}");
            return error(404, "NotFoundError", &msg, None);
        }
        Ok(Err(LoadError::Broken(why))) => return error(500, "InternalServerError", &why, None),
        Err(resp) => return resp,
    };
    let mut inner = lock(&state.inner);
    inner.loaded.retain(|l| l.name != name);
    inner.loaded.push(loaded);
    keep_in_memory(&mut inner, name, state.config.max_cpu_loras);
    bump(&mut inner.loads, name);
    Response::text(
        200,
        format!("Success: LoRA adapter '{name}' added successfully."),
    )
}

async fn unload_adapter(state: &Arc<State>, req: &Request) -> Response {
    let body = match json_body(req) {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let name = body.get("lora_name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        let msg = "'lora_name' needs to be provided to unload a LoRA adapter.";
        return error(400, "InvalidUserInput", msg, None);
    }
    let name_lock = name_lock(state, name);
    let _guard = name_lock.lock().await;
    let mut inner = lock(&state.inner);
    let before = inner.loaded.len();
    inner.loaded.retain(|l| l.name != name);
    inner.in_memory.retain(|n| n != name);
    if inner.loaded.len() == before {
        let msg = format!("The lora adapter '{name}' cannot be found.");
        return error(404, "NotFoundError", &msg, None);
    }
    bump(&mut inner.unloads, name);
    Response::text(
        200,
        format!("Success: LoRA adapter '{name}' removed successfully."),
    )
}
