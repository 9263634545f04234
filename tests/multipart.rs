//! Multipart forms (vLLM's `/v1/audio/transcriptions` and `/translations`) through the real
//! binary: the `model` field is read like JSON's `model` (an adapter is fetched, the base model
//! is not), the fallback rewrites it, a malformed form is a 400 from loraplex, and the form
//! reaches the stand-in vLLM (which reads it with a reader of its own) byte for byte. Every
//! case runs under both io drivers (`io_uring::case`, `epoll::case`).

mod common;

use common::{Driver, Node, Raw, RawResponse};
use loraplex::testkit::{
    adapters::{AdapterSpec, SAFETENSORS_FILE, file_hash},
    origin::{OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmStandIn},
    vllm_audio::transcription_text,
};

const BASE: &str = "tiny-whisper";
const BOUNDARY: &str = "----loraplex-form-7MA4YWxk";

/// Audio bytes: every byte value, line breaks, and the boundary without the line break that
/// would make it a delimiter.
fn audio() -> Vec<u8> {
    let mut audio = b"RIFF\x24\x00\x00\x00WAVEfmt ".to_vec();
    audio.extend_from_slice(format!("\r\n\r\n-{BOUNDARY}\r\nx--{BOUNDARY}--\r\n").as_bytes());
    audio.extend((0..=255u8).cycle().take(20_000));
    audio
}

/// A form as clients write it: `(name, filename, data)` parts.
fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let file = filename.map_or(String::new(), |f| format!("; filename=\"{f}\""));
        body.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"{file}\r\n").as_bytes(),
        );
        if filename.is_some() {
            body.extend_from_slice(b"Content-Type: audio/wav\r\n");
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// A transcription form for `model` (no model field when `None`).
fn transcription(model: Option<&str>) -> Vec<u8> {
    let audio = audio();
    let mut parts: Vec<(&str, Option<&str>, &[u8])> = vec![("file", Some("a.wav"), &audio)];
    if let Some(m) = model {
        parts.push(("model", None, m.as_bytes()));
    }
    parts.push(("language", None, b"en"));
    form(&parts)
}

async fn post_form(node: &Node, path: &str, body: &[u8]) -> RawResponse {
    let mut c = Raw::connect(node.addr).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; \
         boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.send(&[head.as_bytes(), body].concat()).await;
    c.response(false).await
}

struct Setup {
    node: Node,
    vllm: VllmStandIn,
    origin: OriginStandIn,
}

fn start(driver: Driver, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(&store)).unwrap();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let yaml = format!(
        "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n  health_check_interval: 1h\n\
         origins:\n  - type: http\n    base_url: \"{}\"\nstorage:\n  dir: \"{{DIR}}/store\"\n{extra}",
        vllm.url(),
        origin.base_url()
    );
    let node = Node::start_in(dir, &driver.config(&yaml), &[]);
    node.assert_driver(driver);
    Setup { node, vllm, origin }
}

fn text(r: &RawResponse) -> String {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["text"].as_str().unwrap().to_owned()
}

/// Requests vLLM received other than loraplex's own polls.
fn app_requests(vllm: &VllmStandIn) -> usize {
    vllm.recent_heads()
        .iter()
        .filter(|h| h.target != "/health" && h.target != "/v1/models")
        .count()
}

async fn a_transcription_for_an_adapter_fetches_it_and_reaches_vllm_whole(driver: Driver) {
    let s = start(driver, "");
    s.origin
        .put_adapter("acme/whisper-lora", &AdapterSpec::new(BASE, 40_000, 1));
    for path in ["/v1/audio/transcriptions", "/v1/audio/translations"] {
        let body = transcription(Some("acme/whisper-lora"));
        let r = post_form(&s.node, path, &body).await;
        let weights = file_hash(
            &s.node
                .path("store/acme/whisper-lora")
                .join(SAFETENSORS_FILE),
        )
        .unwrap();
        let want = transcription_text(Some(("acme/whisper-lora", weights)), &audio());
        assert_eq!(text(&r), want, "{path}");
        let head = s.vllm.recent_heads().into_iter().last().unwrap();
        assert_eq!(head.target, path);
        assert_eq!(
            head.header("content-length"),
            Some(&*body.len().to_string())
        );
    }
    assert_eq!(s.vllm.served("acme/whisper-lora"), 2);
    assert_eq!(
        s.origin.adapter_gets("acme/whisper-lora"),
        2,
        "one download"
    );
}

async fn the_fallback_rewrites_the_form_model_field(driver: Driver) {
    let s = start(driver, "routing:\n  fallback_to_base_model: true\n");
    let r = post_form(
        &s.node,
        "/v1/audio/transcriptions",
        &transcription(Some("acme/missing")),
    )
    .await;
    assert_eq!(text(&r), transcription_text(None, &audio()));
    assert_eq!(
        r.header("x-loraplex-fallback").as_deref(),
        Some("base-model")
    );
    assert_eq!(s.vllm.served(BASE), 1);
    assert_eq!(
        s.vllm.requests("acme/missing"),
        0,
        "vLLM never saw the name"
    );
}

async fn a_form_without_model_is_a_base_model_request(driver: Driver) {
    let s = start(driver, "");
    for body in [transcription(None), transcription(Some(""))] {
        let r = post_form(&s.node, "/v1/audio/transcriptions", &body).await;
        assert_eq!(text(&r), transcription_text(None, &audio()));
    }
    assert_eq!(s.vllm.served(BASE), 2);
    assert_eq!(s.origin.requests(), 0, "no adapter was looked for");
}

async fn a_malformed_form_is_400_and_never_reaches_vllm(driver: Driver) {
    let s = start(driver, "");
    let audio = audio();
    let twice = form(&[
        ("file", Some("a.wav"), &audio),
        ("model", None, b"acme/a"),
        ("model", None, b"acme/b"),
    ]);
    let unclosed = {
        let mut b = transcription(Some("acme/a"));
        b.truncate(b.len() - BOUNDARY.len() - 6);
        b
    };
    let file_model = form(&[("model", Some("m.txt"), b"acme/a")]);
    let no_name = format!("--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--");
    for (why, body) in [
        ("two model fields", twice),
        ("no closing boundary", unclosed),
        ("model as a file", file_model),
        ("a part without a name", no_name.into_bytes()),
    ] {
        let r = post_form(&s.node, "/v1/audio/transcriptions", &body).await;
        assert_eq!(r.status, 400, "{why}: {}", String::from_utf8_lossy(&r.body));
        let e = &r.json()["error"];
        assert_eq!(e["type"], "BadRequestError", "{why}");
        assert_eq!(e["code"], 400, "{why}");
    }
    // A multipart content type without a boundary.
    let mut c = Raw::connect(s.node.addr).await;
    c.send(
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: t\r\n\
          Content-Type: multipart/form-data\r\nContent-Length: 2\r\n\r\nxx",
    )
    .await;
    assert_eq!(c.response(false).await.status, 400);
    assert_eq!(app_requests(&s.vllm), 0);
    assert_eq!(s.origin.requests(), 0);
}

on_both_drivers!(
    a_transcription_for_an_adapter_fetches_it_and_reaches_vllm_whole,
    the_fallback_rewrites_the_form_model_field,
    a_form_without_model_is_a_base_model_request,
    a_malformed_form_is_400_and_never_reaches_vllm,
);
