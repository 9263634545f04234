//! The stand-in vLLM is as strict as vLLM where a lenient stand-in would hide a proxy's bugs:
//! served names apart from `--model`, the CPU LoRA cache that reads weights again, the idle
//! keep-alive connections uvicorn closes after 5 s, and the multipart speech-to-text routes.
//! Real sockets on 127.0.0.1, real files in a tempdir.

use std::time::{Duration, Instant};

use loraplex::testkit::{
    adapters::{AdapterSpec, SAFETENSORS_FILE, write_adapter},
    vllm::{KEEP_ALIVE_TIMEOUT, VllmConfig, VllmFault, VllmStandIn},
    vllm_audio::transcription_text,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `--model`.
const MODEL: &str = "/models/tiny-base";

async fn chat(vllm: &VllmStandIn, model: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", vllm.url()))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn served_names_are_the_base_model_and_adapters_name_the_model_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_adapter(d, "acme/good", &AdapterSpec::new(MODEL, 5_000, 1)).unwrap();
    // Naming a served name as the base is what vLLM's resolver refuses.
    write_adapter(d, "acme/by-alias", &AdapterSpec::new("tiny", 5_000, 2)).unwrap();
    let vllm = VllmStandIn::start(
        VllmConfig::new(MODEL)
            .served_model_names(["tiny", "tiny-alias"])
            .lora_dir(d),
    )
    .unwrap();

    // Every served name is the base model; answers carry the first one.
    for name in ["tiny", "tiny-alias", ""] {
        let (status, body) = chat(&vllm, name).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["model"], "tiny", "{name}");
    }
    // `--model` is no name to ask for once served names are set (vLLM: 404).
    let (status, body) = chat(&vllm, MODEL).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(chat(&vllm, "acme/good").await.0, 200);
    assert_eq!(chat(&vllm, "acme/by-alias").await.0, 404);

    let models: Value = reqwest::get(format!("{}/v1/models", vllm.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries: Vec<(Value, Value, Value)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].clone(), m["root"].clone(), m["parent"].clone()))
        .collect();
    let adapter_root = d.join("acme/good").display().to_string();
    assert_eq!(
        entries,
        vec![
            (json!("tiny"), json!(MODEL), Value::Null),
            (json!("tiny-alias"), json!(MODEL), Value::Null),
            (json!("acme/good"), json!(adapter_root), json!("tiny")),
        ]
    );
}

/// The model list has the shape of a real vLLM's (`tests/fixtures/vllm/`, vLLM 0.32 with
/// `--served-model-name tiny-b` and one adapter resolved): same keys in the same order, same
/// values but for times, permission ids and the adapter's directory.
#[tokio::test]
async fn the_model_list_is_shaped_like_a_real_vllms() {
    let real: Value = serde_json::from_str(include_str!(
        "fixtures/vllm/models-served-name-after-lora.json"
    ))
    .unwrap();
    let root = real["data"][0]["root"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "acme/b-lora", &AdapterSpec::new(root, 5_000, 1)).unwrap();
    let mut config = VllmConfig::new(root)
        .served_model_names(["tiny-b"])
        .lora_dir(dir.path());
    config.max_model_len = 256;
    let vllm = VllmStandIn::start(config).unwrap();
    assert_eq!(chat(&vllm, "acme/b-lora").await.0, 200);
    let mut ours: Value = reqwest::get(format!("{}/v1/models", vllm.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut real = real;
    for list in [&mut ours, &mut real] {
        for entry in list["data"].as_array_mut().unwrap() {
            entry["created"] = json!(0);
            entry["permission"][0]["created"] = json!(0);
            entry["permission"][0]["id"] = json!("modelperm");
        }
        list["data"][1]["root"] = json!("<adapter dir>");
    }
    assert_eq!(ours.to_string(), real.to_string());
}

#[tokio::test]
async fn weights_pushed_out_of_the_cpu_cache_are_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        write_adapter(d, name, &AdapterSpec::new(MODEL, 5_000, i as u64)).unwrap();
    }
    let vllm = VllmStandIn::start(VllmConfig::new(MODEL).lora_dir(d).max_cpu_loras(2)).unwrap();
    for name in ["a", "b", "a"] {
        assert_eq!(chat(&vllm, name).await.0, 200);
    }
    assert_eq!((vllm.rereads("a"), vllm.rereads("b")), (0, 0));
    // `c` pushes out the least recently used, `b`: its next request reads the disk again.
    assert_eq!(chat(&vllm, "c").await.0, 200);
    write_adapter(d, "b", &AdapterSpec::new(MODEL, 5_000, 9)).unwrap();
    assert_eq!(chat(&vllm, "b").await.0, 200);
    assert_eq!(vllm.rereads("b"), 1);
    assert!(
        matches!(vllm.faults().as_slice(), [VllmFault::WeightsChangedWhileLoaded { name, .. }] if name == "b"),
        "{:?}",
        vllm.faults()
    );
    // `a` is out now (b and c are the two last used); its weights are gone from disk.
    std::fs::remove_file(d.join("a").join(SAFETENSORS_FILE)).unwrap();
    assert_eq!(chat(&vllm, "a").await.0, 500);
    // In memory, `c` is served without a read even with its file gone (and flagged).
    std::fs::remove_file(d.join("c").join(SAFETENSORS_FILE)).unwrap();
    assert_eq!(chat(&vllm, "c").await.0, 200);
    assert_eq!(vllm.rereads("c"), 0);
    assert_eq!(vllm.faults().len(), 3, "{:?}", vllm.faults());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_5s() {
    let vllm = VllmStandIn::start(VllmConfig::new(MODEL)).unwrap();
    let mut s = tokio::net::TcpStream::connect(vllm.addr()).await.unwrap();
    let request = b"GET /health HTTP/1.1\r\nHost: v\r\n\r\n";
    let mut buf = [0u8; 1024];
    // A request 3 s after the last answer keeps the connection (the timer restarts).
    for pause in [Duration::ZERO, Duration::from_secs(3)] {
        tokio::time::sleep(pause).await;
        s.write_all(request).await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{n}");
    }
    let answered = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("the connection stayed open")
        .unwrap();
    assert_eq!(n, 0, "closed, not answered");
    assert!(answered.elapsed() >= KEEP_ALIVE_TIMEOUT - Duration::from_millis(50));
    assert_eq!(vllm.connections(), 1);
}

/// `POST /v1/audio/transcriptions` with a form, raw.
async fn transcribe(vllm: &VllmStandIn, body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/audio/transcriptions", vllm.url()))
        .header("content-type", "multipart/form-data; boundary=B")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn speech_to_text_reads_the_form_as_fastapi_does() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "acme/w", &AdapterSpec::new(MODEL, 5_000, 1)).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(MODEL).lora_dir(dir.path())).unwrap();
    let part = |name: &str, file: bool, value: &str| {
        let file = if file { "; filename=\"a.wav\"" } else { "" };
        format!("--B\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n{value}\r\n")
    };
    let audio = part("file", true, "RIFF..");
    let weights = vllm_resolve_hash(dir.path(), "acme/w");
    // The last of two `model` fields counts; an empty one is the base model.
    let twice = format!(
        "{audio}{}{}--B--",
        part("model", false, "x"),
        part("model", false, "acme/w")
    );
    let (status, body) = transcribe(&vllm, &twice).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["text"],
        transcription_text(Some(("acme/w", weights)), b"RIFF..")
    );
    let (status, body) =
        transcribe(&vllm, &format!("{audio}{}--B--", part("model", false, ""))).await;
    assert_eq!(
        (status, &body["text"]),
        (200, &json!(transcription_text(None, b"RIFF..")))
    );
    // No file, a file for the model, or no form at all: 400.
    for bad in [
        format!("{}--B--", part("model", false, "acme/w")),
        format!("{audio}{}--B--", part("model", true, "acme/w")),
        "not a form".to_owned(),
    ] {
        assert_eq!(transcribe(&vllm, &bad).await.0, 400, "{bad}");
    }
    assert_eq!(vllm.served("acme/w"), 1);
}

fn vllm_resolve_hash(dir: &std::path::Path, name: &str) -> u64 {
    loraplex::testkit::adapters::file_hash(&dir.join(name).join(SAFETENSORS_FILE)).unwrap()
}
