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

/// vLLM's form reader: Starlette 1.10 with python-multipart 0.0.34 (vLLM 0.32's), installed from
/// PyPI into the target directory on first use; `None` after saying loudly why not.
fn starlette() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("starlette-1.10.0");
    if dir.join("starlette").is_dir() && dir.join("python_multipart").is_dir() {
        return Some(dir);
    }
    let installed = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--no-warn-script-location",
            "--root-user-action=ignore",
            "--target",
        ])
        .arg(&dir)
        .args(["starlette==1.10.0", "python-multipart==0.0.34"])
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return Some(dir);
    }
    common::tools::skip_or_fail_in_ci(
        "agrees_with_starlette_on_every_form_it_accepts",
        "python3 -m pip could not install starlette and python-multipart from PyPI",
    );
    None
}

/// Reads each `[content_type, base64 body]` of stdin's JSON list as FastAPI hands a `Form()`
/// model its `model` field: `"not a form"`, `"refused"`, or the value (the last of several; an
/// empty one is none).
const STARLETTE_READER: &str = r#"
import asyncio, base64, json, sys
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

async def read(content_type, body):
    media, _ = parse_options_header(content_type)
    if media != b"multipart/form-data":
        return "not a form"
    async def stream():
        yield body
        yield b""
    headers = Headers(raw=[(b"content-type", content_type.encode("latin-1"))])
    try:
        form = await MultiPartParser(headers, stream()).parse()
    except MultiPartException:
        return "refused"
    model = form.get("model")
    if model is not None and not isinstance(model, str):
        return "refused"
    return {"model": model or None}

async def main():
    cases = json.load(sys.stdin)
    out = [await read(ct, base64.b64decode(body)) for ct, body in cases]
    json.dump(out, sys.stdout)

asyncio.run(main())
"#;

/// Forms a client or an attacker could send: `(Content-Type, body)`.
fn tricky_forms() -> Vec<(String, Vec<u8>)> {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let part = |cd: &str, value: &str| {
        format!("--{BOUNDARY}\r\nContent-Disposition: {cd}\r\n\r\n{value}\r\n").into_bytes()
    };
    let end = format!("--{BOUNDARY}--\r\n").into_bytes();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cd in [
        "form-data; name=\"model\"",
        "form-data; NAME=model",
        "attachment ;name = \"model\" ",
        "form-data; name*=utf-8''other; name=\"model\"",
        "form-data; x=\"a;b\"; name=\"model\"",
        "form-data; filename=\"a; name=model\"; name=\"file\"",
        "form-data; name=\"x name=model\"",
        "form-data; name=\"model\"; name=\"other\"",
        "form-data; name=\"mo\\\"del\"",
        "form-data; name=\"model\"x",
        "name=\"model\"",
        "form-data;; name=model",
        "form-data; flag; name=model",
        "form-data; name=\"model\"; filename=\"m.txt\"",
        "form-data; name=model\t",
        "form-data; name=\"model\\\\\"; a=\"",
    ] {
        cases.push((ct.clone(), [part(cd, "acme/x"), end.clone()].concat()));
    }
    let model = part("form-data; name=\"model\"", "acme/x");
    let other = part("form-data; name=\"language\"", "en");
    for body in [
        [model.clone(), end.clone()].concat(),
        [other.clone(), model.clone(), other.clone(), end.clone()].concat(),
        [other.clone(), end.clone()].concat(),
        [model.clone(), part("form-data; name=\"model\"", "acme/y"), end.clone()].concat(),
        [model.clone(), part("form-data; name=\"model\"", ""), end.clone()].concat(),
        [b"\r\n".to_vec(), model.clone(), end.clone()].concat(),
        [b"preamble\r\n".to_vec(), model.clone(), end.clone()].concat(),
        [model.clone(), end.clone(), model.clone()].concat(),
        [end.clone(), model.clone(), end.clone()].concat(),
        model.clone(),
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=model\r\n\r\nacme/x\r\n--{BOUNDARY}  \r\n--{BOUNDARY}--").into_bytes(),
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=model\r\n\r\nacme/x\r\n--{BOUNDARY}-x\r\n--{BOUNDARY}--").into_bytes(),
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=model\r\n\r\nacme/x\r\n--{BOUNDARY}\rx\r\n--{BOUNDARY}--").into_bytes(),
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=model\nX: y\r\n\r\nacme/x\r\n--{BOUNDARY}--").into_bytes(),
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=a\r\nContent-Disposition: form-data; name=model\r\n\r\nacme/x\r\n--{BOUNDARY}--").into_bytes(),
        format!("--{BOUNDARY}\r\nX-A: 1\r\nX-A: 2\r\nX-A: 3\r\nX-A: 4\r\nX-A: 5\r\nX-A: 6\r\nX-A: 7\r\nX-A: 8\r\nContent-Disposition: form-data; name=model\r\n\r\nacme/x\r\n--{BOUNDARY}--").into_bytes(),
        transcription(Some("acme/whisper-lora")),
        Vec::new(),
    ] {
        cases.push((ct.clone(), body));
    }
    let body = [model, end].concat();
    for content_type in [
        format!(" Multipart/Form-Data ;\tBoundary = \"{BOUNDARY}\" ; charset=UTF-8"),
        format!("multipart/form-data; charset=latin-1; boundary={BOUNDARY}"),
        format!("multipart/form-data ; boundary={BOUNDARY}; boundary=other"),
        format!("multipart/form-data;boundary=\"{BOUNDARY}\"x"),
        format!("multipart/mixed; boundary={BOUNDARY}"),
        format!("application/json; boundary={BOUNDARY}"),
        "multipart/form-data".to_owned(),
        format!("\"multipart/form-data\"; boundary={BOUNDARY}"),
    ] {
        cases.push((content_type, body.clone()));
    }
    // The fuzz seeds and regressions: a Content-Type line, then the body; and the same from
    // `LORAPLEX_FORMS_DIR` when set (a fuzzer's work corpus, for a longer run by hand).
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let extra = std::env::var_os("LORAPLEX_FORMS_DIR").map(std::path::PathBuf::from);
    let dirs = ["corpus", "regressions"]
        .map(|sub| fuzz.join(sub).join("multipart_model"))
        .into_iter()
        .chain(extra);
    for dir in dirs {
        let Ok(dir) = std::fs::read_dir(dir) else {
            continue;
        };
        for file in dir {
            let data = std::fs::read(file.unwrap().path()).unwrap();
            let at = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
            let ct = String::from_utf8_lossy(&data[..at]).into_owned();
            cases.push((ct, data.get(at + 1..).unwrap_or_default().to_vec()));
        }
    }
    cases
}

/// On every form loraplex accepts, it reads the `model` vLLM's Starlette reads (or it refuses
/// the form): a client can never show loraplex one model and vLLM another.
#[test]
fn agrees_with_starlette_on_every_form_it_accepts() {
    use base64::Engine;
    use loraplex::http::multipart::{Boundary, extract_model};
    let Some(pythonpath) = starlette() else {
        return;
    };
    let cases = tricky_forms();
    let input: Vec<(String, String)> = cases
        .iter()
        .map(|(ct, body)| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(body);
            (ct.clone(), b64)
        })
        .collect();
    let mut child = std::process::Command::new("python3")
        .args(["-c", STARLETTE_READER])
        .env("PYTHONPATH", &pythonpath)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    serde_json::to_writer(stdin, &input).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Starlette reader failed: {stderr}"
    );
    let theirs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(theirs.len(), cases.len());
    let (mut both, mut stricter) = (0, 0);
    for ((ct, body), theirs) in cases.iter().zip(&theirs) {
        let ours = match Boundary::of_content_type(ct.as_bytes()) {
            Err(_) => None,
            Ok(None) => Some(serde_json::json!("not a form")),
            Ok(Some(b)) => extract_model(body, &b)
                .ok()
                .map(|m| serde_json::json!({"model": m.filter(|m| !m.is_empty())})),
        };
        let shown = || format!("{ct:?} {:?}", String::from_utf8_lossy(body));
        match (&ours, theirs.get("model")) {
            // loraplex refuses: vLLM never sees the request.
            (None, _) => stricter += usize::from(theirs.get("model").is_some()),
            // vLLM reads a model: loraplex must read the same one.
            (Some(ours), Some(model)) => {
                let ours_none = ours == "not a form" || ours["model"].is_null();
                if !(model.is_null() && ours_none) {
                    assert_eq!(ours, theirs, "{}", shown());
                }
                both += 1;
            }
            // vLLM reads no form or refuses it: loraplex must not have read a model vLLM reads.
            (Some(ours), None) => assert!(
                ours.get("model").is_none_or(|m| m.is_null()) || theirs == "refused",
                "loraplex {ours}, Starlette {theirs}: {}",
                shown()
            ),
        }
    }
    println!(
        "{} forms: {both} read alike, {stricter} refused by loraplex only",
        cases.len()
    );
    assert!(both >= 15, "too few forms both read: {both}");
}
