//! The Hugging Face and S3 origins against real servers on 127.0.0.1: the stand-in Hub
//! (`loraplex::testkit::hub`) and an in-process S3 (`s3s` + `s3s-fs`, `common/s3.rs`).

mod common;

use std::{sync::Arc, time::Duration};

use aws_sdk_s3::primitives::ByteStream;
use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use common::s3::{S3Server, credentials};
use loraplex::{
    Error,
    adapter::AdapterName,
    config::TransferConfig,
    origin::{
        CrcAlgorithm, Manifest, Origin, OriginChain, OriginError, OriginErrorKind, check_manifest,
        huggingface::HuggingFace,
        s3::{S3, S3Settings},
        transfer::{ChunkSink, TransferError, pull_file},
    },
    testkit::{
        adapters::{AdapterSpec, SAFETENSORS_FILE},
        hub::{CdnHost, Fault, HubFile, StandInHub},
        origin::{Fault as OriginFault, FaultKind, OriginConfig, OriginStandIn, nginx_etag},
    },
};
use sha2::{Digest, Sha256};

fn transfer() -> TransferConfig {
    TransferConfig {
        connect_timeout: Duration::from_secs(2),
        // Generous: the machine is shared and loaded; only the stall test shortens it.
        idle_timeout: Duration::from_secs(10),
        retries: 3,
        ..TransferConfig::default()
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

struct VecSink(Vec<u8>);

impl ChunkSink for VecSink {
    async fn accept(&mut self, chunk: Bytes) -> Result<(), TransferError> {
        self.0.extend_from_slice(&chunk);
        Ok(())
    }
}

fn origin_err(e: TransferError) -> OriginError {
    match e {
        TransferError::Origin(e) => e,
        TransferError::Sink(e) => panic!("the sink failed: {e}"),
    }
}

/// What the store does with an origin, minus the disk: manifest, checks, every file through
/// the shared transfer (retries, `Range` resume, size and sha256 checks).
async fn fetch(
    origin: &dyn Origin,
    n: &AdapterName,
) -> Result<(Manifest, Vec<(String, Vec<u8>)>), OriginError> {
    let manifest = origin.manifest(n).await?;
    check_manifest(&manifest)?;
    let mut out = Vec::new();
    for file in &manifest.files {
        let mut sink = VecSink(Vec::new());
        pull_file(origin, n, &manifest, file, &mut sink)
            .await
            .map_err(origin_err)?;
        out.push((file.path.clone(), sink.0));
    }
    Ok((manifest, out))
}

async fn fetch_files(origin: &dyn Origin, n: &str) -> Vec<(String, Vec<u8>)> {
    fetch(origin, &name(n)).await.unwrap().1
}

/// A fetch that must fail; its error.
async fn refused(origin: &dyn Origin, n: &str) -> OriginError {
    match fetch(origin, &name(n)).await {
        Ok((_, files)) => panic!("accepted: {:?}", paths(&files)),
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

fn hf(hub: &StandInHub, token: Option<&str>) -> HuggingFace {
    HuggingFace::new(&hub.url(), token.map(str::to_owned), transfer()).unwrap()
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
    let origin = hf(&hub, None);

    let (manifest, files) = fetch(&origin, &name("acme/sum")).await.unwrap();
    assert_eq!(manifest.content_id(), Some("c0ffee01"));
    assert_eq!(
        manifest.files[0].path, "adapter_config.json",
        "config first"
    );
    let want_sha: [u8; 32] = Sha256::digest(&weights).into();
    assert_eq!(
        manifest.files[1].sha256,
        Some(want_sha),
        "LFS sha256 from the listing"
    );
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
    assert_eq!(
        origin.head(&name("acme/sum")).await.unwrap().as_deref(),
        Some("c0ffee01")
    );
}

#[tokio::test]
async fn hf_downloads_the_commit_it_resolved_even_if_main_moves() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    let (old, new) = (pattern(100_000, 1), pattern(100_000, 2));
    hub.add_commit("acme/x", "aaaa1111", &["main"], adapter_repo(&old));
    let origin = hf(&hub, None);
    let n = name("acme/x");
    let manifest = origin.manifest(&n).await.unwrap();
    // A push lands between the resolve and the transfer.
    hub.add_commit("acme/x", "bbbb2222", &["main"], adapter_repo(&new));
    let mut sink = VecSink(Vec::new());
    pull_file(&origin, &n, &manifest, &manifest.files[1], &mut sink)
        .await
        .unwrap();
    assert_eq!(sink.0, old);
    assert_eq!(origin.head(&n).await.unwrap().as_deref(), Some("bbbb2222"));
}

#[tokio::test]
async fn hf_pinned_revision_fetches_that_revision() {
    let hub = StandInHub::start(None, CdnHost::Other).await.unwrap();
    let (v1, v2) = (pattern(50_000, 1), pattern(50_000, 2));
    hub.add_commit("acme/x", "1111aaaa", &["v1"], adapter_repo(&v1));
    hub.add_commit("acme/x", "2222bbbb", &["main"], adapter_repo(&v2));
    let origin = hf(&hub, None);

    let (manifest, files) = fetch(&origin, &name("acme/x@v1")).await.unwrap();
    assert_eq!(manifest.content_id(), Some("1111aaaa"));
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &v1[..]);
    let files = fetch_files(&origin, "acme/x@2222bbbb").await;
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &v2[..]);
    let e = refused(&origin, "acme/x@v9").await;
    assert_eq!(e.kind, OriginErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn hf_token_goes_to_the_hub_and_never_to_a_cdn_on_another_origin() {
    let weights = pattern(10_000, 9);
    let weights_file = HubFile::lfs("adapter_model.safetensors", weights.clone());
    let cdn_path = StandInHub::cdn_path(&weights_file);
    for (cdn, cdn_sees_token) in [(CdnHost::Other, false), (CdnHost::Same, true)] {
        let hub = StandInHub::start(Some("hf_secret"), cdn).await.unwrap();
        hub.add_commit("acme/p", "5ec12e7", &["main"], adapter_repo(&weights));
        let files = fetch_files(&hf(&hub, Some("hf_secret")), "acme/p").await;
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
async fn hf_a_refused_token_is_a_502_naming_authentication() {
    let hub = StandInHub::start(Some("right"), CdnHost::Other)
        .await
        .unwrap();
    hub.add_commit(
        "acme/p",
        "5ec12e7",
        &["main"],
        adapter_repo(&pattern(100, 1)),
    );
    let n = name("acme/p");
    let e = refused(&hf(&hub, Some("wrong")), "acme/p").await;
    assert_eq!(e.kind, OriginErrorKind::Auth, "{e}");
    let err: Error = e.into_error(&n, "huggingface");
    assert_eq!(err.status(), 502);
    assert!(err.message.contains("authentication"), "{}", err.message);
    assert!(err.message.contains("wrong or expired"), "{}", err.message);
}

#[tokio::test]
async fn hf_401_without_a_token_is_not_found_with_a_hint_as_huggingface_hub_reads_it() {
    // The public Hub answers a request without a token for a repo that does not exist with
    // 401 "Invalid username or password." (no X-Error-Code), as it does for a private repo.
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    let api = format!(
        "{}/api/models/acme/nope/revision/main?blobs=true",
        hub.url()
    );
    let resp = reqwest::get(&api).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers().get("x-error-code"), None);
    assert_eq!(
        resp.headers()["x-error-message"],
        "Invalid username or password."
    );
    assert!(resp.headers().contains_key("www-authenticate"));
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"error": "Invalid username or password."})
    );
    let e = refused(&hf(&hub, None), "acme/nope").await;
    assert_eq!(e.kind, OriginErrorKind::NotFound, "{e}");
    assert!(e.message.contains("private repo needs a token"), "{e}");
    assert_eq!(
        e.into_error(&name("acme/nope"), "huggingface"),
        Error::model_not_found("acme/nope"),
        "vLLM's 404, not a 502"
    );
    // With a token the Hub accepts, a missing repo is a plain 404 RepoNotFound.
    let e = refused(&hf(&hub, Some("any")), "acme/nope").await;
    assert_eq!(e.kind, OriginErrorKind::NotFound, "{e}");
    assert!(!e.message.contains("needs a token"), "{e}");

    // A private repo (the stand-in has a token): without one it looks missing, the same 401.
    let private = StandInHub::start(Some("right"), CdnHost::Other)
        .await
        .unwrap();
    private.add_commit(
        "acme/p",
        "5ec12e7",
        &["main"],
        adapter_repo(&pattern(100, 1)),
    );
    let e = refused(&hf(&private, None), "acme/p").await;
    assert_eq!(e.kind, OriginErrorKind::NotFound, "{e}");
    assert!(e.message.contains("private repo needs a token"), "{e}");
    let files = fetch_files(&hf(&private, Some("right")), "acme/p").await;
    assert_eq!(bytes_of(&files, "adapter_config.json"), CONFIG);
}

#[tokio::test]
async fn hf_mirror_without_lfs_listing_is_verified_by_x_linked_etag() {
    // Mirrors and proxies of the Hub often list no `lfs` (no SHA-256) in the revision API;
    // the `X-Linked-Etag` of `/resolve/` still carries the LFS file's SHA-256.
    let hub = StandInHub::start(None, CdnHost::Other).await.unwrap();
    hub.list_lfs(false);
    let weights = pattern(300_000, 3);
    hub.add_commit("acme/m", "3333cccc", &["main"], adapter_repo(&weights));
    let origin = hf(&hub, None);
    let n = name("acme/m");
    let manifest = origin.manifest(&n).await.unwrap();
    assert!(
        manifest.files.iter().all(|f| f.sha256.is_none()),
        "nothing listed"
    );
    let mut pulled = Vec::new();
    for file in &manifest.files {
        let mut sink = VecSink(Vec::new());
        let t = pull_file(&origin, &n, &manifest, file, &mut sink)
            .await
            .unwrap();
        pulled.push((file.path.clone(), t.sha256));
    }
    let want: [u8; 32] = Sha256::digest(&weights).into();
    assert_eq!(
        pulled,
        [
            ("adapter_config.json".to_owned(), None),
            ("adapter_model.safetensors".to_owned(), Some(want)),
            ("tokenizer_config.json".to_owned(), None),
        ],
        "the weights were hashed against X-Linked-Etag; a git file's (a 40-digit sha1) is no SHA-256"
    );
    // Small files went through the Hub's 307 to its resolve cache, which names the git blob.
    assert_eq!(
        hub.hits("/api/resolve-cache/models/acme/m/3333cccc/adapter_config.json"),
        1
    );

    // Bytes that do not match the announced SHA-256 are refused.
    let mut lying = adapter_repo(&pattern(300_000, 4));
    lying[1].lie_sha256 = Some([0xab; 32]);
    hub.add_commit("acme/lie", "4444dddd", &["main"], lying);
    let e = refused(&origin, "acme/lie").await;
    assert_eq!(e.kind, OriginErrorKind::Invalid, "{e}");
    assert!(e.message.contains("sha256 mismatch"), "{e}");
}

#[tokio::test]
async fn hf_bytes_not_matching_their_sha256_are_rejected() {
    let hub = StandInHub::start(None, CdnHost::Other).await.unwrap();
    let mut files = adapter_repo(&pattern(200_000, 5));
    files[1].lie_sha256 = Some([0xab; 32]);
    hub.add_commit("acme/bad", "badbad00", &["main"], files);
    let e = refused(&hf(&hub, None), "acme/bad").await;
    assert_eq!(e.kind, OriginErrorKind::Invalid, "{e}");
    assert!(e.message.contains("sha256 mismatch"), "{e}");
    assert_eq!(e.into_error(&name("acme/bad"), "hf").status(), 502);
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
        let mut t = transfer();
        if matches!(fault, Fault::Stall(_)) {
            t.idle_timeout = Duration::from_secs(1);
            t.retries = 6;
        }
        let origin = HuggingFace::new(&hub.url(), None, t).unwrap();
        let files = fetch_files(&origin, "acme/r").await;
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
async fn hf_5xx_are_transient_retried_then_given_up() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    hub.add_commit("acme/f", "f00d", &["main"], adapter_repo(&pattern(1000, 1)));
    let path = "/acme/f/resolve/f00d/adapter_config.json";
    hub.arm(path, Fault::Status(503));
    hub.arm(path, Fault::Status(502));
    let files = fetch_files(&hf(&hub, None), "acme/f").await;
    assert_eq!(bytes_of(&files, "adapter_config.json"), CONFIG);
    assert_eq!(hub.hits(path), 3);

    for _ in 0..4 {
        hub.arm(path, Fault::Status(500));
    }
    let e = refused(&hf(&hub, None), "acme/f").await;
    assert_eq!(e.kind, OriginErrorKind::Transient, "{e}");
    assert_eq!(hub.hits(path), 3 + 4, "1 try + 3 retries");
    // The revision API classifies the same way (the store retries manifests).
    hub.arm("/api/models/acme/f/revision/main", Fault::Status(503));
    let e = hf(&hub, None).manifest(&name("acme/f")).await.unwrap_err();
    assert_eq!(e.kind, OriginErrorKind::Transient, "{e}");
}

#[tokio::test]
async fn hf_missing_repo_or_non_adapter_is_not_found_and_weightless_is_refused() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    let model = vec![HubFile::small("config.json", &b"{}"[..])];
    hub.add_commit("acme/model", "1", &["main"], model);
    let config_only = vec![HubFile::small("adapter_config.json", CONFIG)];
    hub.add_commit("acme/cfg", "2", &["main"], config_only);
    let origin = hf(&hub, None);
    assert_eq!(
        refused(&origin, "acme/nope").await.kind,
        OriginErrorKind::NotFound
    );
    let e = refused(&origin, "acme/model@v9").await;
    assert_eq!(e.kind, OriginErrorKind::NotFound, "{e}");
    assert_eq!(
        refused(&origin, "acme/model").await.kind,
        OriginErrorKind::NotFound
    );
    let e = refused(&origin, "acme/cfg").await;
    assert_eq!(e.kind, OriginErrorKind::Invalid, "{e}");
    assert_eq!(e.into_error(&name("acme/cfg"), "hf").status(), 502);
}

// ---------------------------------------------------------------------------------------
// S3

fn s3(server: &S3Server, bucket: &str, prefix: &str) -> S3 {
    let settings = S3Settings {
        bucket: bucket.into(),
        region: Some("us-east-1".into()),
        prefix: prefix.into(),
        endpoint: Some(server.url.clone()),
    };
    S3::with_credentials(settings, transfer(), Some(credentials()))
}

/// Upload through the S3 API (the listing then carries the object's ETag), with its SHA-256
/// checksum when `checksum`.
async fn put(origin: &S3, bucket: &str, key: &str, body: &[u8], checksum: bool) {
    let sdk = origin.client().await.sdk();
    let sum = checksum.then(|| STANDARD.encode(Sha256::digest(body)));
    let put = sdk
        .put_object()
        .bucket(bucket)
        .key(key)
        .set_checksum_sha256(sum);
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
    let origin = s3(&server, "adapters", "lora");
    put(
        &origin,
        "adapters",
        "lora/acme/x/adapter_config.json",
        CONFIG,
        false,
    )
    .await;

    let (manifest, files) = fetch(&origin, &name("acme/x")).await.unwrap();
    let content_id = manifest.content_id().unwrap().to_owned();
    assert!(!content_id.is_empty());
    assert_eq!(
        manifest.files[0].path, "adapter_config.json",
        "config first"
    );
    assert_eq!(
        paths(&files),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "extra/notes.txt"
        ]
    );
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);
    assert_eq!(
        origin.head(&name("acme/x")).await.unwrap(),
        Some(content_id)
    );
    assert_eq!(
        refused(&origin, "acme/none").await.kind,
        OriginErrorKind::NotFound
    );
}

#[tokio::test]
async fn s3_empty_prefix_lists_keys_without_a_leading_slash() {
    let server = S3Server::start(&["bkt"]).await;
    server.put_file("bkt", "acme/x/adapter_config.json", CONFIG);
    server.put_file("bkt", "acme/x/adapter_model.bin", b"weights");
    let origin = s3(&server, "bkt", "");
    assert_eq!(
        origin.client().await.adapter_dir(&name("acme/x")),
        "acme/x/"
    );
    let files = fetch_files(&origin, "acme/x").await;
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
    server.put_file("bkt", "p/acme/big/adapter_model.safetensors", b"w");
    for i in 0..1100 {
        let key = format!("p/acme/big/shards/{i:04}.json");
        server.put_file("bkt", &key, i.to_string().as_bytes());
    }
    let origin = s3(&server, "bkt", "p/");
    let n = name("acme/big");
    let manifest = origin.manifest(&n).await.unwrap();
    assert_eq!(
        manifest.files.len(),
        1102,
        "more than one ListObjectsV2 page"
    );
    // Read a key of the second page (reading all 1102 tiny objects would only add time).
    let last = manifest
        .files
        .iter()
        .find(|f| f.path == "shards/1099.json")
        .unwrap();
    let mut sink = VecSink(Vec::new());
    pull_file(&origin, &n, &manifest, last, &mut sink)
        .await
        .unwrap();
    assert_eq!(sink.0, b"1099");
}

#[tokio::test]
async fn s3_refuses_an_adapter_with_a_key_escaping_its_directory() {
    let server = S3Server::start(&["bkt"]).await;
    server.put_file("bkt", "p/acme/x/adapter_config.json", CONFIG);
    server.put_file("bkt", "p/acme/x/adapter_model.safetensors", b"w");
    *server.knobs.hostile_key.lock().unwrap() = Some("p/acme/x/../../../etc/cron.d/evil".into());
    let origin = s3(&server, "bkt", "p");
    let e = refused(&origin, "acme/x").await;
    assert_eq!(e.kind, OriginErrorKind::Invalid, "{e}");
    assert!(e.message.contains("escape"), "{e}");
    assert_eq!(e.into_error(&name("acme/x"), "s3").status(), 502);
    assert!(
        server.knobs.gets.lock().unwrap().is_empty(),
        "nothing was fetched"
    );
}

#[tokio::test]
async fn s3_verifies_sha256_checksums_and_rejects_corrupt_objects() {
    let server = S3Server::start(&["bkt"]).await;
    let origin = s3(&server, "bkt", "");
    let weights = pattern(1 << 20, 6);
    put(&origin, "bkt", "acme/c/adapter_config.json", CONFIG, true).await;
    put(
        &origin,
        "bkt",
        "acme/c/adapter_model.safetensors",
        &weights,
        true,
    )
    .await;
    let (manifest, files) = fetch(&origin, &name("acme/c")).await.unwrap();
    let want: [u8; 32] = Sha256::digest(&weights).into();
    assert_eq!(
        manifest.files[1].sha256,
        Some(want),
        "x-amz-checksum-sha256 read"
    );
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);

    // Same size, different bytes, behind the server's back: its recorded checksum now lies.
    let mut corrupt = weights.clone();
    corrupt[500_000] ^= 0xff;
    let path = server.object_path("bkt", "acme/c/adapter_model.safetensors");
    std::fs::write(path, &corrupt).unwrap();
    let e = refused(&origin, "acme/c").await;
    assert_eq!(e.kind, OriginErrorKind::Invalid, "{e}");
    assert!(e.message.contains("sha256 mismatch"), "{e}");
}

/// CRC-64/NVME of `data`, as S3 computes it (the SDK's implementation; its check value is
/// pinned in `crc64nvme_matches_the_standard_check_value`).
fn crc64nvme(data: &[u8]) -> Vec<u8> {
    let mut c = CrcAlgorithm::Crc64Nvme.smithy().into_impl();
    c.update(data);
    c.finalize().to_vec()
}

#[test]
fn crc64nvme_matches_the_standard_check_value() {
    // CRC-64/NVME of "123456789" (the catalogue's check value).
    assert_eq!(
        crc64nvme(b"123456789"),
        0xae8b_1486_0a79_9888u64.to_be_bytes()
    );
}

#[tokio::test]
async fn s3_verifies_crc64nvme_checksums_and_rejects_corrupt_objects() {
    // S3's default checksum for new objects: a full-object CRC64NVME, verified instead of
    // nothing, at a fraction of SHA-256's cost.
    let server = S3Server::start(&["bkt"]).await;
    let origin = s3(&server, "bkt", "");
    let weights = pattern(1 << 20, 7);
    put(&origin, "bkt", "acme/n/adapter_config.json", CONFIG, false).await;
    let sdk = origin.client().await.sdk();
    sdk.put_object()
        .bucket("bkt")
        .key("acme/n/adapter_model.safetensors")
        .checksum_crc64_nvme(STANDARD.encode(crc64nvme(&weights)))
        .body(ByteStream::from(weights.clone()))
        .send()
        .await
        .unwrap();
    let (manifest, files) = fetch(&origin, &name("acme/n")).await.unwrap();
    let crc = manifest.files[1]
        .crc
        .as_ref()
        .expect("x-amz-checksum-crc64nvme read");
    assert_eq!(crc.algorithm, CrcAlgorithm::Crc64Nvme);
    assert_eq!(crc.value, crc64nvme(&weights));
    assert_eq!(manifest.files[1].sha256, None);
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);

    // Same size, different bytes, behind the server's back: its recorded CRC now lies.
    let mut corrupt = weights.clone();
    corrupt[700_000] ^= 0x01;
    let path = server.object_path("bkt", "acme/n/adapter_model.safetensors");
    std::fs::write(path, &corrupt).unwrap();
    let e = refused(&origin, "acme/n").await;
    assert_eq!(e.kind, OriginErrorKind::Invalid, "{e}");
    assert!(e.message.contains("crc64nvme mismatch"), "{e}");
    assert_eq!(e.into_error(&name("acme/n"), "s3").status(), 502);
}

fn crc(algorithm: CrcAlgorithm, data: &[u8]) -> Vec<u8> {
    let mut c = algorithm.smithy().into_impl();
    c.update(data);
    c.finalize().to_vec()
}

/// Upload through the S3 API with the object's full-object `algorithm` checksum.
async fn put_with_crc(origin: &S3, key: &str, body: &[u8], algorithm: CrcAlgorithm) {
    let sum = STANDARD.encode(crc(algorithm, body));
    let put = origin
        .client()
        .await
        .sdk()
        .put_object()
        .bucket("bkt")
        .key(key);
    let put = match algorithm {
        CrcAlgorithm::Crc32 => put.checksum_crc32(sum),
        CrcAlgorithm::Crc32c => put.checksum_crc32_c(sum),
        CrcAlgorithm::Crc64Nvme => put.checksum_crc64_nvme(sum),
    };
    put.body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn s3_stand_in_answers_checksums_only_in_checksum_mode_as_s3_does() {
    let server = S3Server::start(&["bkt"]).await;
    let origin = s3(&server, "bkt", "");
    let key = "acme/k/adapter_model.safetensors";
    put_with_crc(&origin, key, b"weights", CrcAlgorithm::Crc32c).await;
    let sdk = origin.client().await.sdk();
    let plain = sdk
        .head_object()
        .bucket("bkt")
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        plain.checksum_crc32_c(),
        None,
        "HeadObject without ChecksumMode"
    );
    let get = sdk
        .get_object()
        .bucket("bkt")
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        get.checksum_crc32_c(),
        None,
        "GetObject without ChecksumMode"
    );
    let asked = sdk
        .head_object()
        .bucket("bkt")
        .key(key)
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    let want = STANDARD.encode(crc(CrcAlgorithm::Crc32c, b"weights"));
    assert_eq!(asked.checksum_crc32_c(), Some(want.as_str()));
    assert_eq!(
        asked.checksum_type(),
        Some(&aws_sdk_s3::types::ChecksumType::FullObject)
    );
    let listed = sdk.list_objects_v2().bucket("bkt").send().await.unwrap();
    assert_eq!(
        listed.contents()[0].checksum_algorithm(),
        [aws_sdk_s3::types::ChecksumAlgorithm::Crc32C]
    );
    // loraplex asks: its manifest reads the weights' checksum in checksum mode.
    server.put_file("bkt", "acme/k/adapter_config.json", CONFIG);
    server.knobs.heads.lock().unwrap().clear();
    let manifest = origin.manifest(&name("acme/k")).await.unwrap();
    assert_eq!(
        manifest.files[1].crc.as_ref().map(|c| c.algorithm),
        Some(CrcAlgorithm::Crc32c)
    );
    let heads = server.knobs.heads.lock().unwrap().clone();
    assert!(heads.contains(&(key.to_owned(), true)), "{heads:?}");
}

#[tokio::test]
async fn s3_verifies_crc32c_and_crc32_checksums_and_rejects_corrupt_objects() {
    for (algorithm, label) in [
        (CrcAlgorithm::Crc32c, "crc32c"),
        (CrcAlgorithm::Crc32, "crc32"),
    ] {
        let server = S3Server::start(&["bkt"]).await;
        let origin = s3(&server, "bkt", "");
        let weights = pattern(1 << 20, 9);
        put_with_crc(&origin, "acme/c/adapter_config.json", CONFIG, algorithm).await;
        put_with_crc(
            &origin,
            "acme/c/adapter_model.safetensors",
            &weights,
            algorithm,
        )
        .await;
        let (manifest, files) = fetch(&origin, &name("acme/c")).await.unwrap();
        for (file, body) in [(0, CONFIG), (1, &weights[..])] {
            let got = manifest.files[file].crc.as_ref().expect(label);
            assert_eq!(
                (got.algorithm, &got.value),
                (algorithm, &crc(algorithm, body)),
                "{label}"
            );
        }
        assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);

        // Same size, other bytes, behind the server's back: the recorded CRC now lies. The
        // config is checked too (the listing names its checksum), not only the weights.
        for (key, at) in [
            ("acme/c/adapter_model.safetensors", 300_000),
            ("acme/c/adapter_config.json", 3),
        ] {
            let path = server.object_path("bkt", key);
            let good = std::fs::read(&path).unwrap();
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            let e = refused(&origin, "acme/c").await;
            assert_eq!(e.kind, OriginErrorKind::Invalid, "{label} {key}: {e}");
            assert!(e.message.contains(&format!("{label} mismatch")), "{e}");
            let file = key.rsplit('/').next().unwrap();
            assert!(e.message.contains(file), "{e}");
            std::fs::write(&path, &good).unwrap();
        }
    }
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
    let files = fetch_files(&s3(&server, "bkt", ""), "acme/r").await;
    assert_eq!(bytes_of(&files, "adapter_model.safetensors"), &weights[..]);
    let gets = server.knobs.gets.lock().unwrap().clone();
    let gets: Vec<_> = gets
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
async fn the_chain_falls_through_a_hub_miss_to_s3() {
    let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
    let server = S3Server::start(&["bkt"]).await;
    server.put_file("bkt", "acme/only-s3/adapter_config.json", CONFIG);
    server.put_file("bkt", "acme/only-s3/adapter_model.safetensors", b"weights");
    hub.add_commit("acme/both", "b07h", &["main"], adapter_repo(b"hub weights"));
    let chain = OriginChain::new(vec![
        Arc::new(hf(&hub, None)),
        Arc::new(s3(&server, "bkt", "")),
    ]);
    let (from, id) = chain.head(&name("acme/only-s3")).await.unwrap();
    assert_eq!(from, "s3");
    assert!(id.is_some_and(|id| !id.is_empty()));
    let (from, id) = chain.head(&name("acme/both")).await.unwrap();
    assert_eq!(
        (from.as_str(), id.as_deref()),
        ("huggingface", Some("b07h"))
    );
    let e = chain.head(&name("acme/nowhere")).await.unwrap_err();
    assert_eq!(e.kind, OriginErrorKind::NotFound);
}

#[tokio::test]
async fn the_config_builds_huggingface_and_s3_origins_in_order() {
    use loraplex::{
        config::{Config, OriginConfig},
        control::Control,
    };
    let cfg = Config {
        origins: vec![
            OriginConfig::HuggingFace {
                endpoint: "http://127.0.0.1:9".into(),
                token: Some("t".into()),
                transfer: transfer(),
            },
            OriginConfig::S3 {
                bucket: "b".into(),
                region: Some("us-east-1".into()),
                prefix: "".into(),
                endpoint: Some("http://127.0.0.1:9".into()),
                transfer: transfer(),
            },
        ],
        ..Config::default()
    };
    let chain = OriginChain::from_config(&cfg, &Control::current()).unwrap();
    let kinds: Vec<_> = chain.iter().map(|o| o.kind()).collect();
    assert_eq!(kinds, ["huggingface", "s3"]);
    let described: Vec<_> = chain.iter().map(|o| o.describe()).collect();
    assert_eq!(described[1], "s3 s3://b/ at http://127.0.0.1:9");
}

// ---------------------------------------------------------------------------------------
// HTTP

#[tokio::test]
async fn http_origin_notices_new_weights_of_the_same_size_by_nginx_etags() {
    // nginx's ETag is `"{mtime hex}-{size hex}"`, no hash of the content: retrained weights
    // have the same size, so only their new mtime tells them apart. The content id joins the
    // config's ETag and the weights' (the Go project looked at the config's alone).
    let server = OriginStandIn::start(OriginConfig::default()).unwrap();
    let spec = AdapterSpec::new("base", 50_000, 1);
    server.put_adapter("acme/h", &spec);
    let origin =
        loraplex::origin::http::HttpOrigin::new(&server.base_url(), None, transfer()).unwrap();
    let n = name("acme/h");
    let before = origin.head(&n).await.unwrap().unwrap();
    let weights = server.file("acme/h", SAFETENSORS_FILE).unwrap();
    let mtime = server.mtime("acme/h", SAFETENSORS_FILE).unwrap();
    let etag = server.etag("acme/h", SAFETENSORS_FILE).unwrap();
    assert_eq!(etag, nginx_etag(mtime, weights.len() as u64));
    assert_eq!(
        etag,
        format!("\"{mtime:x}-{:x}\"", weights.len()),
        "nginx's shape"
    );
    let (manifest, _) = fetch(&origin, &n).await.unwrap();
    assert_eq!(manifest.content_id(), Some(before.as_str()));

    // New weights, same size, a later mtime; the config untouched.
    let mut retrained = weights.to_vec();
    retrained[weights.len() / 2] ^= 0xff;
    server.put_file_at("acme/h", SAFETENSORS_FILE, retrained.clone(), mtime + 60);
    let after = origin.head(&n).await.unwrap().unwrap();
    assert_ne!(after, before, "the new weights are noticed");
    let files = fetch_files(&origin, "acme/h").await;
    assert_eq!(bytes_of(&files, SAFETENSORS_FILE), &retrained[..]);
}

#[tokio::test]
async fn http_origin_refuses_a_file_replaced_during_its_download() {
    let server = OriginStandIn::start(OriginConfig::default()).unwrap();
    server.put_adapter("acme/r", &AdapterSpec::new("base", 400_000, 2));
    let weights = format!("acme/r/{SAFETENSORS_FILE}");
    // The first GET of the weights stalls after 100 KB, longer than the idle timeout.
    let pause = Duration::from_secs(5);
    let stall = FaultKind::StallAfter {
        bytes: 100_000,
        pause,
    };
    server.inject(OriginFault::new(stall).on(weights.clone()));
    let mut t = transfer();
    t.idle_timeout = Duration::from_secs(1);
    let origin =
        Arc::new(loraplex::origin::http::HttpOrigin::new(&server.base_url(), None, t).unwrap());
    let n = name("acme/r");
    let manifest = origin.manifest(&n).await.unwrap();
    let task = tokio::spawn({
        let (origin, manifest) = (origin.clone(), manifest.clone());
        async move {
            let mut sink = VecSink(Vec::new());
            let r = pull_file(
                origin.as_ref(),
                &n,
                &manifest,
                &manifest.files[1],
                &mut sink,
            )
            .await;
            (r, sink.0)
        }
    });
    // While that download stalls, retrained weights of the same size replace the file.
    let started = std::time::Instant::now();
    while server.gets(&weights) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no GET of the weights"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut retrained = server.file("acme/r", SAFETENSORS_FILE).unwrap().to_vec();
    let half = retrained.len() / 2;
    retrained[half..].iter_mut().for_each(|b| *b ^= 0x5a);
    server.put_file("acme/r", SAFETENSORS_FILE, retrained);
    let (r, got) = task.await.unwrap();
    match r {
        Err(TransferError::Origin(e)) => {
            assert_eq!(e.kind, OriginErrorKind::Invalid, "{e}");
            assert!(e.message.contains("changed at the origin"), "{e}");
        }
        other => panic!(
            "stitched from two versions ({} bytes): {other:?}",
            got.len()
        ),
    }
    assert_eq!(server.gets(&weights), 2, "one resume, refused");
}
