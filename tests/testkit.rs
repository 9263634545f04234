//! The stand-ins behave like what they stand for: the vLLM resolver's decisions and bodies, SSE
//! pacing, transparency probes, and the origin's ETag, Range and faults. Real sockets on
//! 127.0.0.1, real files in a tempdir, reqwest (or raw TCP where bytes matter) as the client.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use loraplex::testkit::{
    adapters::{AdapterSpec, Defect, SAFETENSORS_FILE, file_hash, write_adapter},
    origin::{Fault, FaultKind, OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmFault, VllmStandIn},
    vllm_api::completion_text,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BASE: &str = "/models/tiny-base";

thread_local! {
    // Building a client loads TLS roots (~70 ms in debug); libtest runs each test on its own
    // thread, so one client per thread is one per test and never outlives its runtime.
    static CLIENT: reqwest::Client = reqwest::Client::builder().no_proxy().build().unwrap();
}

fn client() -> reqwest::Client {
    CLIENT.with(|c| c.clone())
}

async fn chat(vllm: &VllmStandIn, model: &str) -> (u16, String) {
    let resp = client()
        .post(format!("{}/v1/chat/completions", vllm.url()))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn content(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn weights_hash(dir: &Path, name: &str) -> u64 {
    file_hash(&dir.join(name).join(SAFETENSORS_FILE)).unwrap()
}

/// Poll `cond` every 10 ms; fail after 10 s (only a failing test ever waits that long).
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Send raw bytes, read until the server closes: the head (as text) and the body bytes.
async fn raw(addr: SocketAddr, request: &str) -> (String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let end = memchr::memmem::find(&out, b"\r\n\r\n").expect("a whole head") + 4;
    let body = out.split_off(end);
    (String::from_utf8(out).unwrap(), body)
}

#[tokio::test]
async fn vllm_resolves_a_generated_adapter_once_and_names_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "acme/sum", &AdapterSpec::new(BASE, 50_000, 1)).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(dir.path())).unwrap();

    let (status, body) = chat(&vllm, "acme/sum").await;
    assert_eq!(status, 200, "{body}");
    let hash = weights_hash(dir.path(), "acme/sum");
    assert_eq!(
        content(&body),
        completion_text(Some(("acme/sum", hash)), 2, 8)
    );
    let (status, body) = chat(&vllm, BASE).await;
    assert_eq!((status, content(&body)), (200, completion_text(None, 2, 8)));
    chat(&vllm, "acme/sum").await;

    assert_eq!(vllm.resolutions("acme/sum"), 1);
    assert_eq!(vllm.loads("acme/sum"), 1);
    assert_eq!(vllm.requests("acme/sum"), 2);
    assert_eq!(vllm.loaded_hash("acme/sum"), Some(hash));
    let want = completion_text(Some(("acme/sum", hash)), 2, 8);
    assert_eq!(vllm.expected_text("acme/sum", 2, 8), Some(want));
    assert_eq!(vllm.expected_text("acme/none", 2, 8), None);

    let models: Value = client()
        .get(format!("{}/v1/models", vllm.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], BASE);
    assert_eq!(models["data"][0]["root"], BASE);
    assert!(models["data"][0]["parent"].is_null());
    assert_eq!(models["data"][1]["id"], "acme/sum");
    assert_eq!(models["data"][1]["parent"], BASE);
    assert_eq!(models["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn vllm_unknown_model_is_vllms_exact_404() {
    let dir = tempfile::tempdir().unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(dir.path())).unwrap();
    let (status, body) = chat(&vllm, "acme/nope").await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        r#"{"error":{"message":"The model `acme/nope` does not exist.","type":"NotFoundError","param":"model","code":404}}"#
    );
    assert_eq!(vllm.resolutions("acme/nope"), 1);
    // Without a resolver directory nothing resolves and nothing is read.
    let bare = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    assert_eq!(chat(&bare, "acme/nope").await.0, 404);
    assert_eq!(bare.resolutions("acme/nope"), 0);
}

#[tokio::test]
async fn vllm_refuses_broken_adapters_and_does_not_cache_failures() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = AdapterSpec::new(BASE, 20_000, 2);
    write_adapter(d, "x/trunc", &spec.clone().defect(Defect::TruncatedWeights)).unwrap();
    write_adapter(d, "x/other", &AdapterSpec::new("/models/other", 20_000, 2)).unwrap();
    write_adapter(
        d,
        "x/nobase",
        &spec.clone().defect(Defect::MissingBaseModel),
    )
    .unwrap();
    write_adapter(d, "x/json", &spec.clone().defect(Defect::InvalidConfigJson)).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(d)).unwrap();

    let (status, body) = chat(&vllm, "x/trunc").await;
    assert_eq!(status, 400);
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["type"], "BadRequestError");
    assert_eq!(
        err["error"]["message"],
        "LoRA adapter 'x/trunc' was found but could not be loaded."
    );
    assert_eq!(chat(&vllm, "x/other").await.0, 404);
    assert_eq!(chat(&vllm, "x/nobase").await.0, 500);
    assert_eq!(chat(&vllm, "x/json").await.0, 500);
    assert!(vllm.loaded().is_empty());
    // A directory without its config (a partial publish) is vLLM's 404 too; a parent of nested
    // adapters (`x`) and another base model's adapter are not partial.
    std::fs::create_dir(d.join("bare")).unwrap();
    assert_eq!(chat(&vllm, "bare").await.0, 404);
    assert_eq!(chat(&vllm, "x").await.0, 404);
    let refused: Vec<_> = vllm
        .refusals()
        .into_iter()
        .map(|r| (r.name, r.status))
        .collect();
    let want = [
        ("x/trunc", 400),
        ("x/nobase", 500),
        ("x/json", 500),
        ("bare", 404),
    ];
    assert_eq!(refused, want.map(|(n, s)| (n.to_owned(), s)));

    // Once the files are whole, the next request resolves again and succeeds.
    write_adapter(d, "x/trunc", &spec).unwrap();
    assert_eq!(chat(&vllm, "x/trunc").await.0, 200);
    assert_eq!(vllm.resolutions("x/trunc"), 2);
    assert_eq!(vllm.refusals().len(), 4);
}

#[tokio::test]
async fn vllm_keeps_a_name_until_unloaded_even_when_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_adapter(d, "acme/up", &AdapterSpec::new(BASE, 20_000, 10)).unwrap();
    let old = weights_hash(d, "acme/up");
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(d)).unwrap();
    assert_eq!(chat(&vllm, "acme/up").await.0, 200);

    write_adapter(d, "acme/up", &AdapterSpec::new(BASE, 20_000, 11)).unwrap();
    let new = weights_hash(d, "acme/up");
    assert_ne!(old, new);
    let (_, body) = chat(&vllm, "acme/up").await;
    assert!(
        content(&body).contains(&format!("weights={old:016x}")),
        "{body}"
    );

    let unload = |name: &'static str| {
        let url = format!("{}/v1/unload_lora_adapter", vllm.url());
        async move {
            let resp = client()
                .post(url)
                .json(&json!({"lora_name": name}))
                .send()
                .await
                .unwrap();
            resp.status().as_u16()
        }
    };
    assert_eq!(unload("acme/up").await, 200);
    assert_eq!(unload("acme/up").await, 404);
    let (_, body) = chat(&vllm, "acme/up").await;
    assert!(
        content(&body).contains(&format!("weights={new:016x}")),
        "{body}"
    );
    assert_eq!(
        (vllm.resolutions("acme/up"), vllm.unloads("acme/up")),
        (2, 1)
    );

    // Deleting a loaded adapter's directory: still served from memory, but flagged.
    std::fs::remove_dir_all(d.join("acme/up")).unwrap();
    assert_eq!(chat(&vllm, "acme/up").await.0, 200);
    assert!(matches!(
        vllm.faults().as_slice(),
        [VllmFault::WeightsGoneWhileLoaded { name, .. }] if name == "acme/up"
    ));
}

#[tokio::test]
async fn vllm_reread_mode_fails_when_weights_vanish() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "a", &AdapterSpec::new(BASE, 5_000, 1)).unwrap();
    let config = VllmConfig::new(BASE)
        .lora_dir(dir.path())
        .reread_weights(true);
    let vllm = VllmStandIn::start(config).unwrap();
    assert_eq!(chat(&vllm, "a").await.0, 200);
    std::fs::remove_file(dir.path().join("a").join(SAFETENSORS_FILE)).unwrap();
    assert_eq!(chat(&vllm, "a").await.0, 500);
    assert_eq!(vllm.faults().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_concurrent_first_requests_resolve_once() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "acme/hot", &AdapterSpec::new(BASE, 200_000, 3)).unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE).lora_dir(dir.path())).unwrap();
    let all = futures_util::future::join_all((0..32).map(|_| chat(&vllm, "acme/hot"))).await;
    assert!(all.iter().all(|(s, _)| *s == 200));
    assert_eq!(vllm.resolutions("acme/hot"), 1);
    assert_eq!(vllm.loads("acme/hot"), 1);
    assert_eq!(vllm.served("acme/hot"), 32);
}

#[tokio::test]
async fn vllm_load_endpoint_mirrors_vllm() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_adapter(
        dir.path(),
        "elsewhere/a",
        &AdapterSpec::new("any", 5_000, 1),
    )
    .unwrap();
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let load = |body: Value| {
        let url = format!("{}/v1/load_lora_adapter", vllm.url());
        async move {
            let resp = client().post(url).json(&body).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let p = path.to_string_lossy().into_owned();
    let (status, text) = load(json!({"lora_name": "mine", "lora_path": p})).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'mine' added successfully.")
    );
    assert_eq!(
        load(json!({"lora_name": "mine", "lora_path": p})).await.0,
        400
    );
    assert_eq!(
        load(json!({"lora_name": "mine", "lora_path": p, "load_inplace": true}))
            .await
            .0,
        200
    );
    assert_eq!(
        load(json!({"lora_name": "x", "lora_path": "/no/such/dir"}))
            .await
            .0,
        404
    );
    assert_eq!(load(json!({"lora_name": "x"})).await.0, 400);
    assert_eq!(chat(&vllm, "mine").await.0, 200);
    assert_eq!(vllm.loads("mine"), 2);
}

#[tokio::test]
async fn vllm_sse_events_arrive_one_by_one() {
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let gap = Duration::from_millis(150);
    let started = Instant::now();
    let resp = client()
        .post(format!("{}/v1/completions", vllm.url()))
        .header("x-test-event-gap-ms", gap.as_millis().to_string())
        .json(&json!({"model": BASE, "prompt": "a b c", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let mut chunks = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        chunks.push(String::from_utf8(chunk.unwrap().to_vec()).unwrap());
    }
    // The server sleeps `gap` before each event after the first and before [DONE].
    assert!(started.elapsed() >= gap * 3);
    assert!(chunks.len() >= 2, "events came in one piece: {chunks:?}");
    assert!(!chunks[0].contains("[DONE]"));
    let all = chunks.concat();
    let events: Vec<&str> = all.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4);
    assert_eq!(events[3], "data: [DONE]");
    let text: String = events[..3]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, completion_text(None, 3, 3));
}

#[tokio::test]
async fn echo_reflects_target_headers_and_body() {
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let echo: Value = client()
        .put(format!("{}/echo/x/y?a=1&b=%20z&a=2", vllm.url()))
        .header("x-first", "1")
        .header("x-dup", "one")
        .header("x-other", "o")
        .body("hello body")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["target"], "/echo/x/y?a=1&b=%20z&a=2");
    assert_eq!(echo["body_len"], 10);
    assert_eq!(
        echo["body_xxh3"],
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b"hello body"))
    );
    assert_eq!(echo["chunked"], false);
    let names: Vec<&str> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap())
        .collect();
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(
        pos("x-first") < pos("x-dup") && pos("x-dup") < pos("x-other"),
        "{names:?}"
    );

    // Repeated headers stay apart and in order; a chunked body is seen as chunked.
    let out = raw(
        vllm.addr(),
        "POST /echo/c HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nX-Mid: m\r\nX-Dup: 2\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
    )
    .await;
    let body: Value = serde_json::from_slice(&out.1).unwrap();
    assert_eq!(
        body["headers"],
        json!([
            ["host", "h"],
            ["x-dup", "1"],
            ["x-mid", "m"],
            ["x-dup", "2"],
            ["transfer-encoding", "chunked"],
            ["connection", "close"]
        ])
    );
    assert_eq!(
        (body["chunked"].clone(), body["body_chunks"].clone()),
        (json!(true), json!(2))
    );
    assert_eq!(body["body_len"], 5);
}

#[tokio::test]
async fn framing_routes_frame_as_named() {
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let get = |target: &str, method: &str| {
        format!("{method} {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    };
    let (head, body) = raw(
        vllm.addr(),
        &get("/framing/chunked?size=300&pieces=3", "GET"),
    )
    .await;
    assert!(head.contains("transfer-encoding: chunked\r\n"));
    // Three chunks of 100 (0x64) bytes, then the last chunk.
    let mut rest = body.as_slice();
    for _ in 0..3 {
        assert!(rest.starts_with(b"64\r\n"));
        rest = &rest[4 + 100..];
        assert!(rest.starts_with(b"\r\n"));
        rest = &rest[2..];
    }
    assert_eq!(rest, b"0\r\n\r\n");

    let (head, body) = raw(vllm.addr(), &get("/framing/close?size=100&pieces=4", "GET")).await;
    assert!(!head.contains("content-length") && !head.contains("transfer-encoding"));
    assert_eq!(body.len(), 100);

    let (head, body) = raw(vllm.addr(), &get("/framing/length?size=777", "HEAD")).await;
    assert!(head.contains("content-length: 777\r\n") && body.is_empty());

    let (head, body) = raw(vllm.addr(), &get("/status/204", "GET")).await;
    assert!(head.starts_with("HTTP/1.1 204 ") && !head.contains("content-length"));
    assert!(body.is_empty());

    let (head, body) = raw(vllm.addr(), &get("/framing/cut?size=1000&after=10", "GET")).await;
    assert!(head.contains("content-length: 1000\r\n"));
    assert_eq!(body.len(), 10);

    let resp = client()
        .get(format!("{}/framing/length?size=5000&seed=9", vllm.url()))
        .send()
        .await
        .unwrap();
    let want = resp.headers()["x-body-xxh3"].to_str().unwrap().to_owned();
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        (
            body.len(),
            format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body))
        ),
        (5000, want)
    );
}

#[tokio::test]
async fn slow_request_left_by_its_client_is_counted_cancelled() {
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let mut s = tokio::net::TcpStream::connect(vllm.addr()).await.unwrap();
    s.write_all(b"GET /slow?ms=60000 HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    eventually("the request to arrive", || vllm.http_requests() == 1).await;
    assert_eq!(vllm.cancelled(), 0);
    drop(s);
    eventually("the cancel to be seen", || vllm.cancelled() == 1).await;
    assert_eq!(vllm.cancelled_targets(), vec!["/slow?ms=60000".to_owned()]);
}

#[tokio::test]
async fn keep_alive_reuses_one_connection_and_health_toggles() {
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let c = client();
    for _ in 0..3 {
        let resp = c
            .get(format!("{}/health", vllm.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!((vllm.connections(), vllm.http_requests()), (1, 3));
    vllm.set_healthy(false);
    assert_eq!(
        c.get(format!("{}/health", vllm.url()))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(vllm.recent_heads().last().unwrap().target, "/health");

    let addr = vllm.addr();
    vllm.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

async fn origin_with(name: &str, spec: &AdapterSpec) -> OriginStandIn {
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter(name, spec);
    origin
}

#[tokio::test]
async fn origin_serves_etag_range_head_and_404() {
    let origin = origin_with("acme/a", &AdapterSpec::new(BASE, 30_000, 5)).await;
    let url = format!("{}/acme/a/{SAFETENSORS_FILE}", origin.base_url());
    let file = origin.file("acme/a", SAFETENSORS_FILE).unwrap();
    let c = client();

    let whole = c.get(&url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    let etag = whole.headers()["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'));
    assert_eq!(
        whole.headers()["content-length"],
        file.len().to_string().as_str()
    );
    assert_eq!(whole.bytes().await.unwrap(), file);

    let part = c
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    let expect_range = format!("bytes 100-199/{}", file.len());
    assert_eq!(part.headers()["content-range"], expect_range.as_str());
    assert_eq!(part.bytes().await.unwrap(), file.slice(100..200));
    let tail = c
        .get(&url)
        .header("range", "bytes=29000-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.bytes().await.unwrap(), file.slice(29000..));
    let past = c
        .get(&url)
        .header("range", format!("bytes={}-", file.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);

    let head = c.head(&url).send().await.unwrap();
    assert_eq!(
        (
            head.status().as_u16(),
            head.headers()["etag"].to_str().unwrap()
        ),
        (200, etag.as_str())
    );
    let cached = c
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    let escaped = format!("{}/acme%2Fa/adapter%5Fconfig.json", origin.base_url());
    assert_eq!(c.get(escaped).send().await.unwrap().status(), 200);
    let missing = c
        .get(format!("{}/acme/a/adapter_model.bin", origin.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // New content: new ETag, and a Range with the old ETag in If-Range gets the whole new file.
    origin.put_adapter("acme/a", &AdapterSpec::new(BASE, 30_000, 6));
    let fresh = c
        .get(&url)
        .header("range", "bytes=100-")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 200);
    assert_ne!(fresh.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(
        fresh.bytes().await.unwrap(),
        origin.file("acme/a", SAFETENSORS_FILE).unwrap()
    );
    // whole, 100-199, tail, past the end, if-none-match, if-range.
    assert_eq!(origin.gets(&format!("acme/a/{SAFETENSORS_FILE}")), 6);
    assert_eq!(origin.heads(&format!("acme/a/{SAFETENSORS_FILE}")), 1);
}

#[tokio::test]
async fn origin_faults_status_cut_and_resume() {
    let origin = origin_with("acme/f", &AdapterSpec::new(BASE, 20_000, 7)).await;
    let rel = format!("acme/f/{SAFETENSORS_FILE}");
    let url = format!("{}/{rel}", origin.base_url());
    let file = origin.file("acme/f", SAFETENSORS_FILE).unwrap();
    let c = client();

    origin.inject(Fault::new(FaultKind::Status(500)).on(rel.clone()).nth(2));
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 500);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert!(origin.pending_faults().is_empty());

    // Cut after 5000 bytes: the body ends early; a Range resume gets the rest.
    origin.inject(Fault::new(FaultKind::CutAfter(5000)).on(rel.clone()));
    let resp = c.get(&url).send().await.unwrap();
    let mut got = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => failed = true,
        }
    }
    assert!(failed, "a cut body must surface as an error");
    assert_eq!(got.len(), 5000);
    let rest = c
        .get(&url)
        .header("range", "bytes=5000-")
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 206);
    got.extend_from_slice(&rest.bytes().await.unwrap());
    assert_eq!(got, file);
    assert_eq!(origin.gets(&rel), 5);
}

#[tokio::test]
async fn origin_stall_throttle_and_bearer() {
    let origin = origin_with("acme/s", &AdapterSpec::new(BASE, 4_000, 8)).await;
    let rel = format!("acme/s/{SAFETENSORS_FILE}");
    let url = format!("{}/{rel}", origin.base_url());
    let file = origin.file("acme/s", SAFETENSORS_FILE).unwrap();
    let c = client();

    let pause = Duration::from_millis(200);
    origin.inject(Fault::new(FaultKind::StallAfter { bytes: 1000, pause }).on(rel.clone()));
    let started = Instant::now();
    assert_eq!(
        c.get(&url).send().await.unwrap().bytes().await.unwrap(),
        file
    );
    assert!(started.elapsed() >= pause);

    // 20 KB/s for ~4 KB: the body is sent in 1000-byte pieces 50 ms apart.
    origin.set_throttle(Some(20_000));
    let started = Instant::now();
    assert_eq!(
        c.get(&url).send().await.unwrap().bytes().await.unwrap(),
        file
    );
    let pieces = file.len().div_ceil(1000) as u32;
    assert!(started.elapsed() >= Duration::from_millis(50) * (pieces - 1));
    origin.set_throttle(None);

    origin.require_bearer(Some("s3cret"));
    assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
    let ok = c.get(&url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn stand_ins_start_from_a_plain_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "a", &AdapterSpec::new(BASE, 2_000, 1)).unwrap();
    let vllm =
        VllmStandIn::start_on(rt.handle(), VllmConfig::new(BASE).lora_dir(dir.path())).unwrap();
    let origin = OriginStandIn::start_on(rt.handle(), OriginConfig::default()).unwrap();
    origin.put_dir("a", &dir.path().join("a")).unwrap();
    let (status, body) = rt.block_on(chat(&vllm, "a"));
    assert_eq!(status, 200, "{body}");
    let url = format!("{}/a/adapter_config.json", origin.base_url());
    let config = rt.block_on(async {
        client()
            .get(url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    assert_eq!(
        config,
        std::fs::read(dir.path().join("a/adapter_config.json")).unwrap()
    );
}
