//! Adapter names the store must keep apart, through the real binary: nested names (`x` and
//! `x/y`, which a plain web server, S3's flat keys and a directory all allow) never damage each
//! other: the second is a 409 naming the first, also when both are fetched at once, and no name
//! turns an adapter's file into a directory. The ledger (`/admin/cache/stats` `size`) equals the
//! apparent size of the files on disk after fetches, evictions, refreshes and restarts; a peer's
//! manifest lists only the adapter's own files. A name the filesystem cannot hold is a 400
//! before any I/O, every name that passes can be stored, and an error quotes only the start of
//! a huge name. Every case runs under both io drivers.

mod common;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use common::{
    Driver, Node, RawResponse, chat_with as chat, eventually,
    s3::S3Server,
    store::{
        assert_ledger_matches_disk, http_origin, metrics, node, request, restart, spec, stand_ins,
        stats,
    },
};
use loraplex::testkit::{
    adapters::{CONFIG_FILE, SAFETENSORS_FILE, adapter_files, file_hash},
    origin::{OriginConfig, OriginStandIn},
};

const BUCKET: &str = "loras";

async fn evict(addr: SocketAddr, name: &str) {
    let body = serde_json::json!({ "adapter": name }).to_string();
    let r = request(addr, "POST", "/admin/cache/evict", &body).await;
    assert_eq!(r.json()["evicted"], true, "{name}");
}

/// The files of `name` a peer is told about.
async fn peer_manifest(addr: SocketAddr, name: &str) -> Vec<String> {
    let r = request(
        addr,
        "GET",
        &format!("/_loraplex/adapters/{name}/manifest"),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let files = r.json()["files"].as_array().unwrap().clone();
    files
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_owned())
        .collect()
}

/// A 409 in OpenAI's shape that names `other`.
fn assert_conflict(r: &RawResponse, other: &str) {
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let e = &r.json()["error"];
    assert_eq!(e["type"], "ConflictError");
    assert_eq!(e["code"], 409);
    assert_eq!(e["param"], "model");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(&format!("`{other}`")), "{msg}");
}

fn stored_hash(lp: &Node, name: &str) -> u64 {
    file_hash(&lp.path("store").join(name).join(SAFETENSORS_FILE)).unwrap()
}

fn served_hash(origin: &OriginStandIn, name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&origin.file(name, SAFETENSORS_FILE).unwrap())
}

async fn nested_names_from_a_web_server_never_damage_each_other(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    // `x` first: putting an adapter replaces every file under its name.
    origin.put_adapter("acme/x", &spec(150_000, 1));
    origin.put_adapter("acme/x/y", &spec(120_000, 2));
    let origins = http_origin(&origin);
    let lp = node(driver, dir, &vllm, &origins, "");

    assert_eq!(chat(lp.addr, "acme/x/y").await.status, 200);
    // `acme/x` would hold `acme/x/y` in its directory: refused before any origin request.
    let asked = origin.requests();
    assert_conflict(&chat(lp.addr, "acme/x").await, "acme/x/y");
    // Nor may a name turn the inner adapter's config file into a directory.
    let config = lp.path("store/acme/x/y").join(CONFIG_FILE);
    assert_conflict(
        &chat(lp.addr, "acme/x/y/adapter_config.json").await,
        "acme/x/y",
    );
    assert_eq!(
        origin.requests(),
        asked,
        "no origin request for a refused name"
    );
    assert!(config.is_file());
    // `acme/x/y` is untouched and still served.
    assert_eq!(chat(lp.addr, "acme/x/y").await.status, 200);
    assert_eq!(
        stored_hash(&lp, "acme/x/y"),
        served_hash(&origin, "acme/x/y")
    );
    assert_ledger_matches_disk(&lp).await;

    // Once it is evicted, `acme/x` may come, and then `acme/x/y` is the one refused.
    evict(lp.addr, "acme/x/y").await;
    assert_eq!(chat(lp.addr, "acme/x").await.status, 200);
    assert_eq!(
        vllm.loaded_hash("acme/x"),
        Some(served_hash(&origin, "acme/x"))
    );
    assert_conflict(&chat(lp.addr, "acme/x/y").await, "acme/x");
    assert_conflict(&chat(lp.addr, "acme/x/adapter_config.json").await, "acme/x");
    assert!(lp.path("store/acme/x").join(CONFIG_FILE).is_file());
    assert!(!lp.path("store/acme/x/y").exists());
    assert_eq!(
        peer_manifest(lp.addr, "acme/x").await,
        [CONFIG_FILE, SAFETENSORS_FILE]
    );
    assert_ledger_matches_disk(&lp).await;

    // After a restart: the same adapter, the same ledger, the same refusal, no refetch.
    let gets = origin.gets(&format!("acme/x/{SAFETENSORS_FILE}"));
    let lp = restart(lp, driver, &vllm, &origins, "");
    assert_eq!(stats(lp.addr).await["items"], 1);
    assert_ledger_matches_disk(&lp).await;
    assert_eq!(
        peer_manifest(lp.addr, "acme/x").await,
        [CONFIG_FILE, SAFETENSORS_FILE]
    );
    assert_conflict(&chat(lp.addr, "acme/x/y").await, "acme/x");
    assert_eq!(chat(lp.addr, "acme/x").await.status, 200);
    assert_eq!(origin.gets(&format!("acme/x/{SAFETENSORS_FILE}")), gets);
    assert!(vllm.faults().is_empty(), "{:?}", vllm.faults());
}

async fn nested_names_in_s3_and_in_a_directory(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let s3 = S3Server::start(&[BUCKET]).await;
    for (name, seed) in [("s3/x", 3), ("s3/x/y", 4)] {
        for (file, bytes) in adapter_files(&spec(100_000, seed)) {
            s3.put_file(BUCKET, &format!("p/{name}/{file}"), &bytes);
        }
    }
    let files = tempfile::tempdir().unwrap();
    for (name, seed) in [("f/x", 5), ("f/x/y", 6)] {
        let at = files.path().join(name);
        std::fs::create_dir_all(&at).unwrap();
        for (file, bytes) in adapter_files(&spec(100_000, seed)) {
            std::fs::write(at.join(file), bytes).unwrap();
        }
    }
    let origins = format!(
        "  - type: s3\n    bucket: {BUCKET}\n    region: us-east-1\n    prefix: p/\n    endpoint: \"{}\"\n\
         \x20 - type: file\n    path: \"{}\"\n",
        s3.url,
        files.path().display()
    );
    let lp = node(driver, dir, &vllm, &origins, "");

    // S3 lists `s3/x/y/...` under the prefix `s3/x/`: those keys are another adapter's.
    assert_eq!(chat(lp.addr, "s3/x").await.status, 200);
    assert!(
        !lp.path("store/s3/x/y").exists(),
        "s3/x took s3/x/y's files"
    );
    assert_eq!(
        peer_manifest(lp.addr, "s3/x").await,
        [CONFIG_FILE, SAFETENSORS_FILE]
    );
    assert_conflict(&chat(lp.addr, "s3/x/y").await, "s3/x");
    // A directory origin, the other way round.
    assert_eq!(chat(lp.addr, "f/x/y").await.status, 200);
    assert_conflict(&chat(lp.addr, "f/x").await, "f/x/y");
    assert_eq!(chat(lp.addr, "f/x/y").await.status, 200);
    assert_ledger_matches_disk(&lp).await;
    assert!(vllm.faults().is_empty(), "{:?}", vllm.faults());
}

async fn concurrent_fetches_of_nested_names_let_exactly_one_in(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/x", &spec(1_000_000, 7));
    origin.put_adapter("acme/x/y", &spec(1_000_000, 8));
    origin.set_throttle(Some(4_000_000)); // both downloads overlap
    let lp = node(driver, dir, &vllm, &http_origin(&origin), "");
    let tasks: Vec<_> = ["acme/x", "acme/x/y", "acme/x", "acme/x/y"]
        .into_iter()
        .map(|name| {
            let addr = lp.addr;
            tokio::spawn(async move { (name, chat(addr, name).await) })
        })
        .collect();
    let mut won = Vec::new();
    for t in tasks {
        let (name, r) = t.await.unwrap();
        match r.status {
            200 => won.push(name),
            _ => assert_conflict(
                &r,
                if name == "acme/x" {
                    "acme/x/y"
                } else {
                    "acme/x"
                },
            ),
        }
    }
    won.sort();
    won.dedup();
    assert_eq!(
        won.len(),
        1,
        "exactly one of the two names is stored: {won:?}"
    );
    let (kept, refused) = match won[0] {
        "acme/x" => ("acme/x", "acme/x/y"),
        _ => ("acme/x/y", "acme/x"),
    };
    assert_eq!(stored_hash(&lp, kept), served_hash(&origin, kept));
    assert!(!lp.path("store").join(refused).join(CONFIG_FILE).exists());
    assert_eq!(stats(lp.addr).await["items"], 1);
    assert_ledger_matches_disk(&lp).await;
    assert!(vllm.faults().is_empty(), "{:?}", vllm.faults());
}

async fn the_ledger_follows_the_disk_across_refreshes_and_restarts(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let store = dir.path().join("store");
    // Left by an older version: `old/x/y` inside `old/x`. It stays part of `old/x`.
    for (name, seed) in [("old/x", 9), ("old/x/y", 10)] {
        let at: PathBuf = store.join(name);
        std::fs::create_dir_all(&at).unwrap();
        for (file, bytes) in adapter_files(&spec(50_000, seed)) {
            std::fs::write(at.join(file), bytes).unwrap();
        }
    }
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    origin.put_adapter("acme/a", &spec(100_000, 11));
    // As deep as a name may go, and one segment deeper (which recovery would not find).
    let (deepest, deeper) = ("d/2/3/4/5/6/7/8", "e/2/3/4/5/6/7/8/9");
    origin.put_adapter(deepest, &spec(30_000, 12));
    origin.put_adapter(deeper, &spec(30_000, 13));
    let origins = http_origin(&origin);
    let lp = node(
        driver,
        dir,
        &vllm,
        &origins,
        "invalidation:\n  ttl: 1000s\n",
    );
    assert_eq!(stats(lp.addr).await["items"], 1);
    assert_ledger_matches_disk(&lp).await;
    assert_conflict(&chat(lp.addr, "old/x/y").await, "old/x");
    assert_eq!(chat(lp.addr, "acme/a").await.status, 200);
    assert_eq!(chat(lp.addr, deepest).await.status, 200);
    let asked = origin.requests();
    let r = chat(lp.addr, deeper).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(origin.requests(), asked);
    // A hidden segment is never a name: `.loraplex_meta` stays a file.
    assert_eq!(chat(lp.addr, "acme/a/.loraplex_meta").await.status, 400);
    assert!(lp.path("store/acme/a/.loraplex_meta").is_file());
    assert_ledger_matches_disk(&lp).await;

    // With a TTL of 1 s, the next request refreshes `.loraplex_meta` (unchanged at the origin):
    // its `ttl_seconds` goes from 1000 to 1, three bytes fewer on disk.
    let extra = "invalidation:\n  ttl: 1s\n";
    let lp = restart(lp, driver, &vllm, &origins, extra);
    assert_ledger_matches_disk(&lp).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(chat(lp.addr, "acme/a").await.status, 200);
    let meta = lp.path("store/acme/a/.loraplex_meta");
    eventually("the meta file to be refreshed", || {
        std::fs::read_to_string(&meta).is_ok_and(|m| m.contains("\"ttl_seconds\":1}"))
    })
    .await;
    // Counted once the refresh (and the ledger's update) is done.
    let counted = "loraplex_revalidations_total{result=\"unchanged\"} 1";
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !metrics(lp.addr).await.contains(counted) {
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh was never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ledger_matches_disk(&lp).await;
    let lp = restart(lp, driver, &vllm, &origins, extra);
    assert_eq!(
        stats(lp.addr).await["items"],
        3,
        "old/x, acme/a and {deepest}"
    );
    assert_ledger_matches_disk(&lp).await;
    let gets = origin.adapter_gets(deepest);
    assert_eq!(chat(lp.addr, deepest).await.status, 200);
    assert_eq!(origin.adapter_gets(deepest), gets, "found again on disk");
}

async fn names_the_filesystem_cannot_hold_are_refused_before_any_io(driver: Driver) {
    let (dir, vllm) = stand_ins();
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    // The longest segment a directory name may have, and a nested name near the 256 bytes.
    let longest = "a".repeat(255);
    let nested = format!("{}/{}", "o".repeat(127), "n".repeat(127));
    let too_long = "b".repeat(256);
    for (i, name) in [&longest, &nested, &too_long].into_iter().enumerate() {
        origin.put_adapter(name, &spec(50_000, 20 + i as u64));
    }
    let extra = "server:\n  max_body_size: 8MB\n";
    let lp = node(driver, dir, &vllm, &http_origin(&origin), extra);
    for name in [&longest, &nested] {
        let r = chat(lp.addr, name).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(stored_hash(&lp, name), served_hash(&origin, name));
    }
    // One directory name of 256 bytes: no filesystem holds it. Refused before the origin.
    let asked = origin.requests();
    let r = chat(lp.addr, &too_long).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["param"], "model");
    assert_eq!(
        origin.requests(),
        asked,
        "no origin request for a name that cannot be stored"
    );
    // A 4 MB name: the error quotes its start, not all of it.
    let huge = "h".repeat(4 << 20);
    let r = chat(lp.addr, &huge).await;
    assert_eq!(r.status, 400);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        r.body.len() < 1024 && msg.contains("4194304 bytes in all"),
        "{msg}"
    );
    let body = serde_json::json!({ "adapters": [huge] }).to_string();
    let r = request(lp.addr, "POST", "/admin/cache/warmup", &body).await;
    assert!(
        r.body.len() < 1024,
        "warm-up answer of {} bytes",
        r.body.len()
    );
    assert_eq!(origin.requests(), asked);
    assert_ledger_matches_disk(&lp).await;
    assert!(vllm.faults().is_empty(), "{:?}", vllm.faults());
}

on_both_drivers!(
    nested_names_from_a_web_server_never_damage_each_other,
    nested_names_in_s3_and_in_a_directory,
    concurrent_fetches_of_nested_names_let_exactly_one_in,
    the_ledger_follows_the_disk_across_refreshes_and_restarts,
    names_the_filesystem_cannot_hold_are_refused_before_any_io,
);
