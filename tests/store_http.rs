//! The `http` origin against a real HTTP server on 127.0.0.1 (axum): layout, ETag content
//! ids, `.bin` fallback, bearer token, 5xx retries, and a transfer cut mid-stream resumed with
//! `Range`.

#[path = "store_common/mod.rs"]
mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use loraplex::{
    config::TransferConfig,
    origin::{Origin, http::HttpOrigin},
    store::validate,
};

fn transfer() -> TransferConfig {
    TransferConfig {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        retries: 3,
        ..TransferConfig::default()
    }
}

fn http(server: &TestServer, token: Option<&str>) -> Arc<dyn Origin> {
    Arc::new(HttpOrigin::new(&server.url(), token.map(str::to_owned), transfer()).unwrap())
}

#[test]
fn fetches_safetensors_or_bin_with_etag_content_ids() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "org/st", 5000);
    let bin = origin_dir.path().join("org/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("adapter_config.json"), validate::tiny_config(BASE)).unwrap();
    std::fs::write(bin.join("adapter_model.bin"), vec![7u8; 3000]).unwrap();
    let cfgonly = origin_dir.path().join("cfgonly");
    std::fs::create_dir_all(&cfgonly).unwrap();
    std::fs::write(
        cfgonly.join("adapter_config.json"),
        validate::tiny_config(BASE),
    )
    .unwrap();

    let env = Env::new(store_dir.path());
    let server = TestServer::start(
        &env.control,
        ServerState {
            root: origin_dir.path().into(),
            ..ServerState::default()
        },
    );
    let origin = http(&server, None);
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);
    let s = store.clone();
    let (st, bin_id, cfgonly, missing) = mono(move || async move {
        let st = s.ensure(&name("org/st")).await.unwrap();
        let bin = s.ensure(&name("org/bin")).await.unwrap();
        (
            st.pin.content_id().map(str::to_owned),
            bin.pin.content_id().map(str::to_owned),
            s.ensure(&name("cfgonly")).await.map(|_| ()),
            s.ensure(&name("nope")).await.map(|_| ()),
        )
    });
    // The content id is the config's ETag, as HEAD gives it.
    let head = env
        .control
        .handle()
        .block_on(origin.head(&name("org/st")))
        .unwrap();
    assert_eq!(st, head);
    assert!(st.unwrap().starts_with('"'));
    assert!(bin_id.is_some());
    validate::check_dir(&store_dir.path().join("org/st")).unwrap();
    assert_eq!(
        std::fs::read(store_dir.path().join("org/bin/adapter_model.bin")).unwrap(),
        vec![7u8; 3000]
    );
    assert!(
        !store_dir
            .path()
            .join("org/bin/adapter_model.safetensors")
            .exists()
    );
    let e = cfgonly.unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(e.message.contains("adapter has no weights"), "{e}");
    assert!(e.message.contains(&server.url()), "names the origin: {e}");
    assert_eq!(missing.unwrap_err().status(), 404);
    assert!(!store_dir.path().join("cfgonly").exists());
}

#[test]
fn bearer_token_is_sent_and_refusal_names_authentication() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "secret", 100);
    let env = Env::new(store_dir.path());
    let server = TestServer::start(
        &env.control,
        ServerState {
            root: origin_dir.path().into(),
            token: Some("s3cr3t".into()),
            ..ServerState::default()
        },
    );
    let without = env.open(
        options(store_dir.path(), 1 << 30),
        vec![http(&server, None)],
    );
    let s = without.clone();
    let e = mono(move || async move { s.ensure(&name("secret")).await.map(|_| ()) }).unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(e.message.contains("authentication"), "{e}");
    without.shutdown();

    let with = env.open(
        options(store_dir.path(), 1 << 30),
        vec![http(&server, Some("s3cr3t"))],
    );
    let s = with.clone();
    mono(move || async move { s.ensure(&name("secret")).await.map(|_| ()) }).unwrap();
    validate::check_dir(&store_dir.path().join("secret")).unwrap();
}

#[test]
fn cut_mid_stream_resumes_with_range() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "big", 500_000); // 2 MB of weights
    let env = Env::new(store_dir.path());
    let server = TestServer::start(
        &env.control,
        ServerState {
            root: origin_dir.path().into(),
            cut_once: std::sync::Mutex::new(Some((
                "/big/adapter_model.safetensors".into(),
                300_000,
            ))),
            ..ServerState::default()
        },
    );
    let store = env.open(
        options(store_dir.path(), 1 << 30),
        vec![http(&server, None)],
    );
    let s = store.clone();
    mono(move || async move { s.ensure(&name("big")).await.map(|_| ()) }).unwrap();
    assert_eq!(
        std::fs::read(store_dir.path().join("big/adapter_model.safetensors")).unwrap(),
        std::fs::read(origin_dir.path().join("big/adapter_model.safetensors")).unwrap()
    );
    let gets: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|(m, p, _)| m == "GET" && p == "/big/adapter_model.safetensors")
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].2, None);
    let range = gets[1].2.clone().expect("the retry asks for the rest");
    let from: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .unwrap()
        .parse()
        .unwrap();
    assert!(from > 0 && from <= 300_000, "{range}");
}

#[test]
fn server_errors_are_retried_then_fall_through() {
    let origin_dir = tempfile::tempdir().unwrap();
    let backup_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "flaky", 100);
    write_adapter(origin_dir.path(), "down", 100);
    write_adapter(backup_dir.path(), "down", 100);
    let env = Env::new(store_dir.path());
    let server = TestServer::start(
        &env.control,
        ServerState {
            root: origin_dir.path().into(),
            ..ServerState::default()
        },
    );
    {
        let mut st = server.state.status.lock().unwrap();
        // Twice 503, then fine: within the 3 retries.
        st.insert("GET /flaky/adapter_model.safetensors".into(), (503, 2));
        // Always 500: the next origin gets the request.
        st.insert(
            "GET /down/adapter_model.safetensors".into(),
            (500, u32::MAX),
        );
    }
    let backup = Counted::file(backup_dir.path());
    let store = env.open(
        options(store_dir.path(), 1 << 30),
        vec![http(&server, None), backup.clone()],
    );
    let s = store.clone();
    let (flaky, down) = mono(move || async move {
        (
            s.ensure(&name("flaky")).await.map(|_| ()),
            s.ensure(&name("down")).await.map(|_| ()),
        )
    });
    flaky.unwrap();
    down.unwrap();
    assert_eq!(
        backup.manifests(),
        1,
        "only `down` reached the second origin"
    );
    let down_gets = server
        .requests()
        .iter()
        .filter(|(m, p, _)| m == "GET" && p == "/down/adapter_model.safetensors")
        .count();
    assert_eq!(down_gets, 4, "1 try + 3 retries");
    let text = env.metrics.encode();
    assert!(
        text.contains("loraplex_fetch_failures_total{origin=\"http\",reason=\"transient\"} 1"),
        "{text}"
    );
}
