//! The Hugging Face and S3 origins against real servers on 127.0.0.1: the stand-in Hub
//! (`loraplex::testkit::hub`) and an in-process S3 (`s3s` + `s3s-fs`, `common/s3.rs`).

mod common;

use std::{sync::Arc, time::Duration};

use aws_sdk_s3::primitives::ByteStream;
use base64::{Engine, engine::general_purpose::STANDARD};
use common::s3::{S3Server, credentials};
use loraplex::{
    Error,
    metrics::Metrics,
    origin::{
        download::Download,
        huggingface::HuggingFace,
        s3::{S3, S3Client, S3Settings},
        transfer::{FailClass, FetchError, RetryPolicy},
    },
    store::AdapterName,
    testkit::hub::{CdnHost, Fault, HubFile, StandInHub},
};
use sha2::{Digest, Sha256};

fn policy() -> RetryPolicy {
    RetryPolicy {
        retries: 3,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        // Generous: the machine is shared and loaded; only the stall test shortens it.
        idle_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
    }
}

fn name(s: &str) -> AdapterName {
    AdapterName::parse(s).unwrap()
}

/// Bytes that differ at every offset (so a wrong resume offset cannot go unnoticed).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

const CONFIG: &[u8] = br#"{"peft_type":"LORA","base_model_name_or_path":"base","r":8}"#;

/// Read every file of a download into memory; `finish` it when all verified.
async fn drain(d: Download) -> Result<Vec<(String, Vec<u8>)>, FetchError> {
    let mut out = Vec::new();
    for i in 0..d.files().len() {
        let mut body = d.body(i);
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next_chunk().await? {
            bytes.extend_from_slice(&chunk);
        }
        out.push((body.file().path.clone(), bytes));
    }
    d.finish();
    Ok(out)
}

/// Drain a download that must fail; its error.
async fn refused(d: Download) -> FetchError {
    match drain(d).await {
        Ok(files) => panic!("accepted: {:?}", paths(&files)),
        Err(e) => e,
    }
}

fn paths(files: &[(String, Vec<u8>)]) -> Vec<&str> {
    let mut p: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    p.sort();
    p
}

fn bytes_of<'a>(files: &'a [(String, Vec<u8>)], path: &str) -> &'a [u8] {
    &files.iter().find(|(p, _)| p == path).expect(path).1
}

fn hf(hub: &StandInHub, token: Option<&str>, metrics: Option<Arc<Metrics>>) -> HuggingFace {
    HuggingFace::new(&hub.url(), token.map(str::to_owned), policy(), metrics).unwrap()
}

/// A typical adapter repo, with files an adapter does not need.
fn adapter_repo(weights: &[u8]) -> Vec<HubFile> {
    vec![
        HubFile::small("adapter_config.json", CONFIG),
        HubFile::lfs("adapter_model.safetensors", weights.to_vec()),
        HubFile::small("tokenizer_config.json", &b"{}"[..]),
        HubFile::small("README.md", &b"# card"[..]),
        HubFile::lfs("training_args.bin", pattern(1000, 1)),
        HubFile::lfs("model.safetensors", pattern(300_000, 2)),
        HubFile::lfs("checkpoint-10/adapter_model.safetensors", pattern(1000, 3)),
        HubFile::lfs("images/loss.png", pattern(1000, 4)),
    ]
}

#[tokio::test]
async fn hf_fetches_the_adapter_files_of_the_resolved_commit() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    let weights = pattern(3 << 20, 7);
    hub.add_commit("acme/sum", "c0ffee01", &["main"], adapter_repo(&weights));
    let metrics = Arc::new(Metrics::new());
    let origin = hf(&hub, None, Some(metrics.clone()));

    let d = origin.download(&name("acme/sum")).await.unwrap();
    assert_eq!(d.content_id(), "c0ffee01");
    let files = drain(d).await.unwrap();
    assert_eq!(
        paths(&files),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(bytes_of(&files, "adapter_config.json"), CONFIG);
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);
    // Only what was selected was requested; downloads name the commit, not the branch.
    assert_eq!(hub.hits("/acme/sum/resolve/c0ffee01/README.md"), 0);
    assert_eq!(hub.hits("/acme/sum/resolve/c0ffee01/model.safetensors"), 0);
    assert_eq!(
        hub.hits("/acme/sum/resolve/c0ffee01/adapter_model.safetensors"),
        1
    );
    assert_eq!(
        hub.hits("/acme/sum/resolve/main/adapter_model.safetensors"),
        0
    );
    assert_eq!(origin.head(&name("acme/sum")).await.unwrap(), "c0ffee01");

    let text = metrics.encode();
    assert!(
        text.contains(r#"loraplex_fetches_total{origin="huggingface",result="ok"} 1"#),
        "{text}"
    );
    let total = weights.len() + CONFIG.len() + 2;
    assert!(
        text.contains(&format!(
            r#"loraplex_fetch_bytes_total{{origin="huggingface"}} {total}"#
        )),
        "{text}"
    );
    assert!(text.contains(r#"loraplex_fetch_duration_seconds_count{origin="huggingface"} 1"#));
}

#[tokio::test]
async fn hf_downloads_the_commit_it_resolved_even_if_main_moves() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    let (old, new) = (pattern(100_000, 1), pattern(100_000, 2));
    hub.add_commit("acme/x", "aaaa1111", &["main"], adapter_repo(&old));
    let origin = hf(&hub, None, None);
    let d = origin.download(&name("acme/x")).await.unwrap();
    // A push lands between the resolve and the transfer.
    hub.add_commit("acme/x", "bbbb2222", &["main"], adapter_repo(&new));
    let files = drain(d).await.unwrap();
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &old[..]);
    assert_eq!(origin.head(&name("acme/x")).await.unwrap(), "bbbb2222");
}

#[tokio::test]
async fn hf_pinned_revision_fetches_that_revision() {
    let hub = StandInHub::start(None, CdnHost::Other).await.unwrap();
    let (v1, v2) = (pattern(50_000, 1), pattern(50_000, 2));
    hub.add_commit("acme/x", "1111aaaa", &["v1"], adapter_repo(&v1));
    hub.add_commit("acme/x", "2222bbbb", &["main"], adapter_repo(&v2));
    let origin = hf(&hub, None, None);

    let pinned = origin.download(&name("acme/x@v1")).await.unwrap();
    assert_eq!(pinned.content_id(), "1111aaaa");
    let files = drain(pinned).await.unwrap();
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &v1[..]);

    let by_sha = origin.download(&name("acme/x@2222bbbb")).await.unwrap();
    let files = drain(by_sha).await.unwrap();
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &v2[..]);

    let e = origin.download(&name("acme/x@v9")).await.unwrap_err();
    assert_eq!(e.class, FailClass::NotFound, "{e}");
}

#[tokio::test]
async fn hf_token_goes_to_the_hub_and_never_to_a_cdn_on_another_origin() {
    let weights = pattern(10_000, 9);
    let weights_file = HubFile::lfs("adapter_model.safetensors", weights.clone());
    let cdn_path = StandInHub::cdn_path(&weights_file);
    for (cdn, cdn_sees_token) in [(CdnHost::Other, false), (CdnHost::Same, true)] {
        let hub = StandInHub::start(Some("hf_secret"), cdn).await.unwrap();
        hub.add_commit("acme/p", "5ec12e7", &["main"], adapter_repo(&weights));
        let files = drain(
            hf(&hub, Some("hf_secret"), None)
                .download(&name("acme/p"))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);
        let bearer = Some("Bearer hf_secret".to_owned());
        let resolve = hub.auth_seen("/acme/p/resolve/5ec12e7/adapter_model.safetensors");
        assert_eq!(resolve, std::slice::from_ref(&bearer), "{cdn:?}");
        let seen = hub.auth_seen(&cdn_path);
        let expected = if cdn_sees_token { bearer } else { None };
        assert_eq!(seen, [expected], "{cdn:?}: the CDN saw {seen:?}");
    }
}

#[tokio::test]
async fn hf_auth_failures_are_502_naming_authentication() {
    let hub = StandInHub::start(Some("right"), CdnHost::Other)
        .await
        .unwrap();
    hub.add_commit(
        "acme/p",
        "5ec12e7",
        &["main"],
        adapter_repo(&pattern(100, 1)),
    );
    for (token, says) in [(None, "missing"), (Some("wrong"), "wrong")] {
        let e = hf(&hub, token, None)
            .download(&name("acme/p"))
            .await
            .unwrap_err();
        assert_eq!(e.class, FailClass::Auth, "{e}");
        let err: Error = e.into();
        assert_eq!(err.status(), 502);
        assert!(err.message.contains("authentication"), "{}", err.message);
        assert!(err.message.contains(says), "{}", err.message);
    }
}

#[tokio::test]
async fn hf_bytes_not_matching_their_sha256_are_rejected() {
    let hub = StandInHub::start(None, CdnHost::Other).await.unwrap();
    let mut files = adapter_repo(&pattern(200_000, 5));
    files[1].lie_sha256 = Some([0xab; 32]);
    hub.add_commit("acme/bad", "badbad00", &["main"], files);
    let metrics = Arc::new(Metrics::new());
    let d = hf(&hub, None, Some(metrics.clone()))
        .download(&name("acme/bad"))
        .await
        .unwrap();
    let e = refused(d).await;
    assert_eq!(e.class, FailClass::Checksum, "{e}");
    assert!(e.message.contains("sha256 mismatch"), "{e}");
    assert_eq!(Error::from(e).status(), 502);
    let text = metrics.encode();
    assert!(
        text.contains(r#"loraplex_fetch_failures_total{origin="huggingface",reason="checksum"} 1"#),
        "{text}"
    );
    assert!(!text.contains(r#"result="ok""#), "{text}");
}

#[tokio::test]
async fn hf_resumes_with_range_after_a_reset_and_after_a_stall() {
    for fault in [Fault::Cut(1 << 20), Fault::Stall(700_000)] {
        let hub = StandInHub::start(None, CdnHost::Other).await.unwrap();
        let weights = pattern(3 << 20, 3);
        let file = HubFile::lfs("adapter_model.safetensors", weights.clone());
        hub.add_commit("acme/r", "4e5e7000", &["main"], adapter_repo(&weights));
        let cdn_path = StandInHub::cdn_path(&file);
        hub.arm(&cdn_path, fault);
        let mut policy = policy();
        if matches!(fault, Fault::Stall(_)) {
            policy.idle_timeout = Duration::from_secs(1);
            policy.retries = 6;
        }
        let origin = HuggingFace::new(&hub.url(), None, policy, None).unwrap();
        let files = drain(origin.download(&name("acme/r")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(
            bytes_of(&files, "adapter_model.safetensors"),
            &weights[..],
            "{fault:?}"
        );
        // The first request had no Range; the resume asked for the bytes it lacked. (With a
        // short idle timeout on a loaded machine a later attempt may stall too: still ranged.)
        let ranges = hub.ranges_seen(&cdn_path);
        assert!(ranges.len() >= 2, "{fault:?}: {ranges:?}");
        assert_eq!(ranges[0], None);
        let at = match fault {
            Fault::Cut(n) | Fault::Stall(n) => n,
            Fault::Status(_) => unreachable!(),
        };
        let resumed = ranges[1].expect("the resume asks a Range");
        assert!(resumed > 0 && resumed <= at, "{fault:?}: {ranges:?}");
        assert!(
            ranges[1..].iter().all(|r| r.is_some_and(|n| n >= resumed)),
            "{ranges:?}"
        );
    }
}

#[tokio::test]
async fn hf_retries_5xx_and_gives_up_after_the_configured_retries() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    hub.add_commit("acme/f", "f00d", &["main"], adapter_repo(&pattern(1000, 1)));
    let api = "/api/models/acme/f/revision/main";
    hub.arm(api, Fault::Status(503));
    hub.arm(api, Fault::Status(502));
    assert!(hf(&hub, None, None).download(&name("acme/f")).await.is_ok());
    assert_eq!(hub.hits(api), 3);

    for _ in 0..4 {
        hub.arm(api, Fault::Status(500));
    }
    let e = hf(&hub, None, None)
        .download(&name("acme/f"))
        .await
        .unwrap_err();
    assert_eq!(e.class, FailClass::Transient, "{e}");
    assert_eq!(hub.hits(api), 3 + 4, "1 try + 3 retries");
}

#[tokio::test]
async fn hf_missing_repo_or_non_adapter_is_not_found_and_weightless_is_refused() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    hub.add_commit(
        "acme/model",
        "1",
        &["main"],
        vec![HubFile::small("config.json", &b"{}"[..])],
    );
    hub.add_commit(
        "acme/cfg",
        "2",
        &["main"],
        vec![HubFile::small("adapter_config.json", CONFIG)],
    );
    let origin = hf(&hub, None, None);
    let e = origin.download(&name("acme/nope")).await.unwrap_err();
    assert_eq!(e.class, FailClass::NotFound, "{e}");
    let e = origin.download(&name("acme/model")).await.unwrap_err();
    assert_eq!(e.class, FailClass::NotFound, "{e}");
    let e = origin.download(&name("acme/cfg")).await.unwrap_err();
    assert_eq!(e.class, FailClass::Invalid, "{e}");
    assert_eq!(Error::from(e).status(), 502);
}

// ---------------------------------------------------------------------------------------
// S3

async fn s3(server: &S3Server, bucket: &str, prefix: &str, metrics: Option<Arc<Metrics>>) -> S3 {
    let settings = S3Settings {
        bucket: bucket.into(),
        region: Some("us-east-1".into()),
        prefix: prefix.into(),
        endpoint: Some(server.url.clone()),
    };
    S3::new(
        S3Client::connect(&settings, policy(), Some(credentials())).await,
        metrics,
    )
}

/// Upload through the S3 API (the listing then carries the object's ETag).
async fn put(origin: &S3, bucket: &str, key: &str, body: &[u8]) {
    let put = origin.client().sdk().put_object().bucket(bucket).key(key);
    put.body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn s3_fetches_every_object_under_the_prefix() {
    let server = S3Server::start(&["adapters"]).await;
    let weights = pattern(2 << 20, 4);
    server.put_file(
        "adapters",
        "lora/acme/x/adapter_model.safetensors",
        &weights,
    );
    server.put_file("adapters", "lora/acme/x/extra/notes.txt", b"hi");
    server.put_file(
        "adapters",
        "lora/acme/xy/adapter_config.json",
        b"other adapter",
    );
    server.put_file("adapters", "lora/acme/x.json", b"sibling");
    let metrics = Arc::new(Metrics::new());
    let origin = s3(&server, "adapters", "lora", Some(metrics.clone())).await;
    put(
        &origin,
        "adapters",
        "lora/acme/x/adapter_config.json",
        CONFIG,
    )
    .await;

    let d = origin.download(&name("acme/x")).await.unwrap();
    let content_id = d.content_id().to_owned();
    assert!(!content_id.is_empty());
    assert_eq!(d.files()[0].path, "adapter_config.json", "config first");
    let files = drain(d).await.unwrap();
    assert_eq!(
        paths(&files),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "extra/notes.txt"
        ]
    );
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);
    assert_eq!(origin.head(&name("acme/x")).await.unwrap(), content_id);
    let text = metrics.encode();
    assert!(
        text.contains(r#"loraplex_fetches_total{origin="s3",result="ok"} 1"#),
        "{text}"
    );

    let e = origin.download(&name("acme/none")).await.unwrap_err();
    assert_eq!(e.class, FailClass::NotFound, "{e}");
}

#[tokio::test]
async fn s3_empty_prefix_lists_keys_without_a_leading_slash() {
    let server = S3Server::start(&["bkt"]).await;
    server.put_file("bkt", "acme/x/adapter_config.json", CONFIG);
    server.put_file("bkt", "acme/x/adapter_model.bin", b"weights");
    let origin = s3(&server, "bkt", "", None).await;
    assert_eq!(origin.client().adapter_dir(&name("acme/x")), "acme/x/");
    let files = drain(origin.download(&name("acme/x")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(paths(&files), ["adapter_config.json", "adapter_model.bin"]);
    let gets = server.knobs.gets.lock().unwrap().clone();
    assert!(
        gets.iter().all(|(k, _)| k.starts_with("acme/x/")),
        "{gets:?}"
    );
}

#[tokio::test]
async fn s3_lists_every_page_of_a_large_adapter() {
    let server = S3Server::start(&["bkt"]).await;
    server.put_file("bkt", "p/acme/big/adapter_config.json", CONFIG);
    for i in 0..1100 {
        server.put_file(
            "bkt",
            &format!("p/acme/big/shards/{i:04}.json"),
            i.to_string().as_bytes(),
        );
    }
    let origin = s3(&server, "bkt", "p/", None).await;
    let d = origin.download(&name("acme/big")).await.unwrap();
    assert_eq!(d.files().len(), 1101, "more than one ListObjectsV2 page");
    // Read a key of the second page (reading all 1101 tiny objects would only add time).
    let last = d
        .files()
        .iter()
        .position(|f| f.path == "shards/1099.json")
        .unwrap();
    let mut body = d.body(last);
    assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"1099");
    assert_eq!(body.next_chunk().await.unwrap(), None);
}

#[tokio::test]
async fn s3_refuses_an_adapter_with_a_key_escaping_its_directory() {
    let server = S3Server::start(&["bkt"]).await;
    server.put_file("bkt", "p/acme/x/adapter_config.json", CONFIG);
    server.put_file("bkt", "p/acme/x/adapter_model.safetensors", b"w");
    *server.knobs.hostile_key.lock().unwrap() = Some("p/acme/x/../../../etc/cron.d/evil".into());
    let metrics = Arc::new(Metrics::new());
    let origin = s3(&server, "bkt", "p", Some(metrics.clone())).await;
    let e = origin.download(&name("acme/x")).await.unwrap_err();
    assert_eq!(e.class, FailClass::Invalid, "{e}");
    assert!(e.message.contains("escape"), "{e}");
    assert_eq!(Error::from(e).status(), 502);
    assert!(
        server.knobs.gets.lock().unwrap().is_empty(),
        "nothing was fetched"
    );
    let text = metrics.encode();
    assert!(
        text.contains(r#"loraplex_fetch_failures_total{origin="s3",reason="invalid"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn s3_verifies_sha256_checksums_and_rejects_corrupt_objects() {
    let server = S3Server::start(&["bkt"]).await;
    let origin = s3(&server, "bkt", "", None).await;
    let weights = pattern(1 << 20, 6);
    for (key, body) in [
        ("acme/c/adapter_config.json", CONFIG.to_vec()),
        ("acme/c/adapter_model.safetensors", weights.clone()),
    ] {
        origin
            .client()
            .sdk()
            .put_object()
            .bucket("bkt")
            .key(key)
            .checksum_sha256(STANDARD.encode(Sha256::digest(&body)))
            .body(ByteStream::from(body))
            .send()
            .await
            .unwrap();
    }
    let files = drain(origin.download(&name("acme/c")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);

    // Same size, different bytes, behind the server's back: its recorded checksum now lies.
    let mut corrupt = weights.clone();
    corrupt[500_000] ^= 0xff;
    std::fs::write(
        server.object_path("bkt", "acme/c/adapter_model.safetensors"),
        &corrupt,
    )
    .unwrap();
    let e = refused(origin.download(&name("acme/c")).await.unwrap()).await;
    assert_eq!(e.class, FailClass::Checksum, "{e}");
}

#[tokio::test]
async fn s3_resumes_with_range_after_a_reset() {
    let server = S3Server::start(&["bkt"]).await;
    let weights = pattern(3 << 20, 8);
    server.put_file("bkt", "acme/r/adapter_config.json", CONFIG);
    server.put_file("bkt", "acme/r/adapter_model.safetensors", &weights);
    let key = "acme/r/adapter_model.safetensors";
    server
        .knobs
        .cuts
        .lock()
        .unwrap()
        .insert(key.into(), 1_000_000);
    let origin = s3(&server, "bkt", "", None).await;
    let files = drain(origin.download(&name("acme/r")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);
    let gets: Vec<_> = server
        .knobs
        .gets
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, r)| *r)
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0], None);
    let resumed_at = gets[1].expect("the second GET has a Range");
    assert!(resumed_at > 0 && resumed_at <= 1_000_000, "{gets:?}");
}

#[tokio::test]
async fn a_hub_miss_falls_through_to_s3() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    let server = S3Server::start(&["bkt"]).await;
    server.put_file("bkt", "acme/only-s3/adapter_config.json", CONFIG);
    server.put_file("bkt", "acme/only-s3/adapter_model.safetensors", b"weights");
    let (hub_origin, s3_origin) = (hf(&hub, None, None), s3(&server, "bkt", "", None).await);
    let n = name("acme/only-s3");
    // The order of the chain: the first origin that has the adapter serves it.
    let d = match hub_origin.download(&n).await {
        Err(e) if e.class == FailClass::NotFound => s3_origin.download(&n).await.unwrap(),
        other => panic!(
            "the hub should miss: {:?}",
            other.map(|d| d.content_id().to_owned())
        ),
    };
    let files = drain(d).await.unwrap();
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), b"weights");
}
