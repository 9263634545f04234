//! The adapter store driven as the proxy drives it: from monoio threads, against real files
//! in temp dirs and a real control plane. Disk behaviour (drivers, O_DIRECT, ENOSPC,
//! crashes, restarts) is in `store_disk.rs`, the HTTP origin in `store_http.rs`.

#[path = "store_common/mod.rs"]
mod common;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use common::*;
use loraplex::{adapter::AdapterName, origin::Origin, store::validate};

#[test]
fn cold_then_warm() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let bytes = write_adapter(origin_dir.path(), "acme/sum", 1000);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);

    let s = store.clone();
    let (first, second) = mono(move || async move {
        let n = name("acme/sum");
        let a = s.ensure(&n).await.unwrap();
        let b = s.ensure(&n).await.unwrap();
        (
            (a.fetched, a.pin.size()),
            (b.fetched, b.pin.content_id().map(str::to_owned)),
        )
    });
    assert!(first.0, "first ensure fetched");
    assert!(first.1 > bytes, "size counts the meta file too");
    assert!(!second.0, "second ensure is a hit");
    assert!(second.1.unwrap().starts_with("file-"));
    assert_eq!(origin.manifests(), 1);
    let stored = store_dir.path().join("acme/sum");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(stored.join(f)).unwrap(),
            std::fs::read(origin_dir.path().join("acme/sum").join(f)).unwrap(),
            "{f}"
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored.join(".loraplex_meta")).unwrap()).unwrap();
    assert_eq!(meta["origin"], "file");
    assert!(meta["fetched_at"].as_str().unwrap().ends_with('Z'));
    assert!(tmp_entries(store_dir.path()).is_empty());
    let stats = store.stats();
    assert_eq!(stats["items"], 1);
    assert_eq!(stats["dir"], store_dir.path().display().to_string());
    assert_eq!(stats["misses"], 1);
    assert!(stats["hits"].as_u64().unwrap() >= 1);
    assert_eq!(
        store.pin(&name("acme/sum")).unwrap().name().as_str(),
        "acme/sum"
    );
    let text = env.metrics.encode();
    assert!(
        text.contains("loraplex_fetches_total{origin=\"file\",result=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("loraplex_cache_items{tier=\"local\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("loraplex_cache_max_size_bytes{tier=\"local\"} 1073741824"),
        "the budget gauge is storage.max_size: {text}"
    );
}

#[test]
fn concurrent_cold_ensures_download_once() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "hot", 50_000);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    origin.hold();
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);

    // 2 threads × 100 concurrent ensures, all waiting on the held origin.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let s = store.clone();
            std::thread::spawn(move || {
                mono(move || async move {
                    let n = name("hot");
                    let tasks: Vec<_> = (0..100)
                        .map(|_| {
                            let s = s.clone();
                            let n = n.clone();
                            monoio::spawn(async move { s.ensure(&n).await.map(|e| e.fetched) })
                        })
                        .collect();
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await);
                    }
                    out
                })
            })
        })
        .collect();
    wait_until(20, "200 waiters and the held download", || {
        store.stats()["misses"] == 200 && origin.manifests() == 1
    });
    origin.release();
    let results: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(results.len(), 200);
    assert!(results.iter().all(|r| matches!(r, Ok(true))), "{results:?}");
    assert_eq!(origin.manifests(), 1);
    // config + weights, once each.
    assert_eq!(origin.opens.load(Ordering::SeqCst), 2);
    // Every waiter's pin is gone; the flight's too.
    let entry_pins = store.stats()["pinned"].as_u64().unwrap();
    assert_eq!(entry_pins, 0);
}

#[test]
fn all_waiters_get_the_origin_error_and_a_waiter_leaving_does_not_cancel() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    // Config only: the Go project stored these; we refuse them.
    std::fs::create_dir_all(origin_dir.path().join("noweights")).unwrap();
    std::fs::write(
        origin_dir.path().join("noweights/adapter_config.json"),
        validate::tiny_config(BASE),
    )
    .unwrap();
    write_adapter(origin_dir.path(), "good", 100);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    origin.hold();
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);

    let s = store.clone();
    let waiters = std::thread::spawn(move || {
        mono(move || async move {
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let s = s.clone();
                    monoio::spawn(async move { s.ensure(&name("noweights")).await.map(|_| ()) })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await);
            }
            out
        })
    });
    // A waiter that gives up: its future is dropped while the fetch is held.
    let s = store.clone();
    let leaver = std::thread::spawn(move || {
        mono(move || async move {
            let n = name("good");
            let fut = s.ensure(&n);
            let timer = monoio::time::sleep(Duration::from_millis(20));
            monoio::select! {
                _ = fut => panic!("the origin is held"),
                _ = timer => {}
            }
        })
    });
    leaver.join().unwrap();
    wait_until(20, "waiters", || {
        store.stats()["misses"].as_u64() >= Some(21)
    });
    origin.release();
    let results = waiters.join().unwrap();
    for r in &results {
        let e = r.as_ref().unwrap_err();
        assert_eq!(e.status(), 502, "{e}");
        assert!(e.message.contains("adapter has no weights"), "{e}");
    }
    assert_eq!(results[0], results[19]);
    assert!(!store_dir.path().join("noweights").exists());
    // The abandoned fetch of "good" finished anyway.
    wait_until(20, "abandoned fetch to land", || {
        store.pin(&name("good")).is_some()
    });
    assert_eq!(origin.manifests(), 2);
    assert!(tmp_entries(store_dir.path()).is_empty());
}

#[test]
fn not_found_anywhere_is_404_and_origins_fall_through() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(second.path(), "only-second", 10);
    let env = Env::new(store_dir.path());
    let (o1, o2) = (Counted::file(first.path()), Counted::file(second.path()));
    let store = env.open(
        options(store_dir.path(), 1 << 30),
        vec![o1.clone(), o2.clone()],
    );
    let s = store.clone();
    let (found, missing) = mono(move || async move {
        let found = s.ensure(&name("only-second")).await.map(|e| e.fetched);
        let missing = s.ensure(&name("nowhere")).await.map(|e| e.fetched);
        (found, missing)
    });
    assert!(found.unwrap());
    let e = missing.unwrap_err();
    assert_eq!(e.status(), 404);
    assert_eq!(e.message, "The model `nowhere` does not exist.");
    assert_eq!((o1.manifests(), o2.manifests()), (2, 2));
}

#[test]
fn eviction_spares_pinned_adapters_and_refuses_when_all_pinned() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let size = write_adapter(origin_dir.path(), "org/a", 25_000);
    for n in ["org/b", "c", "d"] {
        write_adapter(origin_dir.path(), n, 25_000);
    }
    let env = Env::new(store_dir.path());
    // Room for two adapters (plus their meta files), not three.
    let store = env.open(
        options(store_dir.path(), 2 * size + 8192),
        vec![Counted::file(origin_dir.path())],
    );
    let s = store.clone();
    let (c_ok, d_err, d_after) = mono(move || async move {
        let a = s.ensure(&name("org/a")).await.unwrap();
        let b = s.ensure(&name("org/b")).await.unwrap();
        drop(b);
        // "org/a" is in use (pinned); "org/b" is not: it must be the one to go.
        let c = s.ensure(&name("c")).await.map(|e| e.pin);
        // Now both stored adapters are pinned: no room, 507 after a short wait.
        let d_err = s.ensure(&name("d")).await.map(|_| ());
        drop(a);
        let d_after = s.ensure(&name("d")).await.map(|_| ());
        (c.map(|_| ()), d_err, d_after)
    });
    c_ok.unwrap();
    assert_eq!(d_err.unwrap_err().status(), 507);
    d_after.unwrap();
    assert!(store.pin(&name("d")).is_some());
    assert!(store.pin(&name("org/b")).is_none());
    assert!(!store_dir.path().join("org/b").exists());
    let unloads = env.hooks.unloaded();
    assert!(unloads.contains(&"org/b".to_owned()), "{unloads:?}");
    assert!(store.stats()["size"].as_u64().unwrap() <= 2 * size + 8192);
    assert!(tmp_entries(store_dir.path()).is_empty());
    let text = env.metrics.encode();
    assert!(
        text.contains("loraplex_cache_evictions_total{tier=\"local\"} 2"),
        "{text}"
    );
}

#[test]
fn larger_than_max_size_is_507_with_nothing_written() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let size = write_adapter(origin_dir.path(), "big", 10_000);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    let store = env.open(options(store_dir.path(), size / 2), vec![origin.clone()]);
    let s = store.clone();
    let e = mono(move || async move { s.ensure(&name("big")).await.map(|_| ()) }).unwrap_err();
    assert_eq!(e.status(), 507);
    assert!(e.message.contains("max_size"), "{e}");
    assert_eq!(origin.opens.load(Ordering::SeqCst), 0);
    assert!(!store_dir.path().join("big").exists());
    assert!(tmp_entries(store_dir.path()).is_empty());
}

#[test]
fn unknown_sizes_reserve_as_they_go_and_stop_at_the_budget() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let fits = write_adapter(origin_dir.path(), "fits", 300_000); // 1.2 MB
    write_adapter(origin_dir.path(), "toobig", 1_000_000); // 4 MB
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    origin.strip_sizes.store(true, Ordering::SeqCst);
    // Budget 3 MB: reservations grow in steps of 375 KB.
    let store = env.open(options(store_dir.path(), 3_000_000), vec![origin.clone()]);
    let s = store.clone();
    let (fits_r, toobig_r) = mono(move || async move {
        (
            s.ensure(&name("fits")).await.map(|e| e.pin.size()),
            s.ensure(&name("toobig")).await.map(|_| ()),
        )
    });
    assert!(fits_r.unwrap() > fits);
    let e = toobig_r.unwrap_err();
    assert_eq!(e.status(), 507, "{e}");
    assert!(!store_dir.path().join("toobig").exists());
    assert!(tmp_entries(store_dir.path()).is_empty());
    assert_eq!(store.stats()["reserved"], 0);
    assert!(store.stats()["size"].as_u64().unwrap() <= 3_000_000);
}

#[test]
fn evict_removes_unloads_and_cleans_parents() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "org/x", 10);
    write_adapter(origin_dir.path(), "org2/y", 10);
    let env = Env::new(store_dir.path());
    let store = env.open(
        options(store_dir.path(), 1 << 30),
        vec![Counted::file(origin_dir.path())],
    );
    let s = store.clone();
    let (first, again, refetch) = mono(move || async move {
        s.ensure(&name("org/x")).await.unwrap();
        s.ensure(&name("org2/y")).await.unwrap();
        let first = s.evict(&name("org/x")).await;
        let again = s.evict(&name("org/x")).await;
        let refetch = s.ensure(&name("org/x")).await.map(|e| e.fetched);
        (first, again, refetch)
    });
    assert_eq!(first, Ok(true));
    assert_eq!(again, Ok(false));
    assert_eq!(refetch, Ok(true));
    assert_eq!(env.hooks.unloaded(), vec!["org/x".to_owned()]);
    let s = store.clone();
    assert_eq!(
        mono(move || async move { s.evict(&name("org/x")).await }),
        Ok(true)
    );
    assert!(
        !store_dir.path().join("org").exists(),
        "empty parent removed"
    );
    assert!(store_dir.path().join("org2/y").exists());
    assert!(tmp_entries(store_dir.path()).is_empty());
}

#[test]
fn names_that_escape_are_refused_everywhere() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "ok", 10);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);
    for bad in [
        ".",
        "..",
        "../etc",
        "a/../b",
        "/abs",
        ".loraplex-tmp",
        "x/./y",
    ] {
        assert_eq!(AdapterName::parse(bad).unwrap_err().status(), 400, "{bad}");
    }
    let s = store.clone();
    let out = mono(move || async move {
        s.warmup(&["../escape".into(), "ok".into(), "missing".into()])
            .await
    });
    let r = &out["results"];
    assert_eq!(r[0]["adapter"], "../escape");
    assert!(
        r[0]["status"]
            .as_str()
            .unwrap()
            .starts_with("error: invalid adapter name")
    );
    assert_eq!(r[1]["status"], "ok");
    assert_eq!(r[2]["status"], "error: The model `missing` does not exist.");
    // An origin listing a file outside the adapter directory is refused before any write.
    *origin.extra_path.lock().unwrap() = Some("../../outside".into());
    write_adapter(origin_dir.path(), "hostile", 10);
    let s = store.clone();
    let e = mono(move || async move { s.ensure(&name("hostile")).await.map(|_| ()) }).unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(e.message.contains("must stay inside"), "{e}");
    assert!(!store_dir.path().join("outside").exists());
    assert!(!store_dir.path().join("hostile").exists());
}

#[test]
fn sha256_mismatch_is_rejected_and_nothing_published() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "tampered", 1000);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    origin.wrong_sha.store(true, Ordering::SeqCst);
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);
    let s = store.clone();
    let e = mono(move || async move { s.ensure(&name("tampered")).await.map(|_| ()) }).unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(e.message.contains("sha256 mismatch"), "{e}");
    assert!(!store_dir.path().join("tampered").exists());
    assert!(tmp_entries(store_dir.path()).is_empty());
    assert_eq!(store.stats()["reserved"], 0);
}

#[test]
fn invalid_config_is_rejected_and_base_model_rewritten_when_asked() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "ia3", 10);
    std::fs::write(
        origin_dir.path().join("ia3/adapter_config.json"),
        br#"{"peft_type":"IA3","base_model_name_or_path":"m"}"#,
    )
    .unwrap();
    write_adapter(origin_dir.path(), "rebased", 10);
    let env = Env::with_hooks(
        store_dir.path(),
        Hooks {
            base: Some("served/model".into()),
            ..Hooks::default()
        },
    );
    let mut opts = options(store_dir.path(), 1 << 30);
    opts.rewrite_base_model = true;
    let store = env.open(opts, vec![Counted::file(origin_dir.path())]);
    let s = store.clone();
    let (ia3, rebased) = mono(move || async move {
        (
            s.ensure(&name("ia3")).await.map(|_| ()),
            s.ensure(&name("rebased")).await.map(|_| ()),
        )
    });
    let e = ia3.unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(e.message.contains("not \"LORA\""), "{e}");
    assert!(!store_dir.path().join("ia3").exists());
    rebased.unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store_dir.path().join("rebased/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "served/model");
    assert_eq!(cfg["peft_type"], "LORA");
}

#[test]
fn ttl_revalidation_unchanged_refreshes_changed_replaces_and_unloads() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "org/live", 1000);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    let mut opts = options(store_dir.path(), 1 << 30);
    opts.ttl = Some(Duration::from_millis(30));
    let store = env.open(opts, vec![origin.clone()]);
    let n = name("org/live");
    let s = store.clone();
    let v1 = mono(move || async move {
        s.ensure(&name("org/live"))
            .await
            .unwrap()
            .pin
            .content_id()
            .map(str::to_owned)
    });
    let meta_path = store_dir.path().join("org/live/.loraplex_meta");
    let fetched_at = |p: &std::path::Path| -> String {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        v["fetched_at"].as_str().unwrap().to_owned()
    };
    let first_at = fetched_at(&meta_path);

    // Unchanged at the origin: a hit after the TTL refreshes fetched_at, nothing else.
    std::thread::sleep(Duration::from_millis(40));
    assert!(store.pin(&n).is_some());
    wait_until(10, "a head", || origin.heads.load(Ordering::SeqCst) == 1);
    wait_until(10, "meta refresh", || fetched_at(&meta_path) != first_at);
    assert!(env.hooks.unloaded().is_empty());
    assert_eq!(origin.manifests(), 1);

    // Changed at the origin: the hit is served from the old copy, the new one replaces it.
    write_adapter(origin_dir.path(), "org/live", 2000);
    let t = store_dir.path().join("org/live");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (t2, st) = (t.clone(), stop.clone());
    let watcher = std::thread::spawn(move || {
        while !st.load(Ordering::SeqCst) {
            validate::check_dir(&t2).expect("the adapter is always there and whole");
        }
    });
    wait_until(10, "ttl to pass", || {
        store
            .pin(&n)
            .is_some_and(|p| p.content_id().map(str::to_owned) != v1)
    });
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    wait_until(10, "unload", || {
        env.hooks.unloaded() == vec!["org/live".to_owned()]
    });
    assert_eq!(
        std::fs::read(t.join("adapter_model.safetensors")).unwrap(),
        validate::tiny_safetensors(2000)
    );
    assert_eq!(origin.manifests(), 2);
    wait_until(10, "old copy deleted", || {
        tmp_entries(store_dir.path()).is_empty()
    });
    assert_eq!(store.stats()["items"], 1);

    // The origin loses it: the stored copy stays, and a failure backs off (no head storm).
    std::fs::remove_dir_all(origin_dir.path().join("org/live")).unwrap();
    std::thread::sleep(Duration::from_millis(40));
    assert!(store.pin(&n).is_some());
    wait_until(10, "failed revalidation", || {
        env.metrics
            .encode()
            .contains("loraplex_revalidations_total{result=\"failed\"} 1")
    });
    wait_until(10, "revalidation to end", || {
        store.stats()["revalidations_in_flight"] == 0
    });
    let heads = origin.heads.load(Ordering::SeqCst);
    for _ in 0..50 {
        assert!(store.pin(&n).is_some());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(origin.heads.load(Ordering::SeqCst), heads, "backed off");
    assert!(t.join("adapter_model.safetensors").exists());
}

#[test]
fn fetches_in_flight_show_progress() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "slow", 1 << 20);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    origin.slow.store(true, Ordering::SeqCst);
    origin.hold_body();
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);
    let s = store.clone();
    let fetch = std::thread::spawn(move || {
        mono(move || async move { s.ensure(&name("slow")).await.map(|_| ()) })
    });
    wait_until(20, "progress", || {
        store.fetch_progress().first().is_some_and(|p| p.bytes > 0)
    });
    let f = store.fetches();
    assert_eq!(f["fetches"][0]["adapter"], "slow");
    assert!(
        f["fetches"][0]["origin"]
            .as_str()
            .unwrap()
            .starts_with("file ")
    );
    assert!(f["fetches"][0]["total"].as_u64().unwrap() > 4 << 20);
    assert_eq!(store.stats()["fetches_in_flight"], 1);
    origin.release_body();
    fetch.join().unwrap().unwrap();
    assert!(store.fetch_progress().is_empty());
    assert_eq!(store.stats()["fetches_in_flight"], 0);
}

#[test]
fn origin_trait_objects_are_usable_from_the_chain() {
    // The chain's `head` finds the first origin that has the adapter.
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write_adapter(b.path(), "x", 10);
    let chain = loraplex::origin::OriginChain::new(vec![
        Counted::file(a.path()) as Arc<dyn Origin>,
        Counted::file(b.path()),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (kind, id) = rt.block_on(chain.head(&name("x"))).unwrap();
    assert_eq!(kind, "file");
    assert!(id.unwrap().starts_with("file-"));
    let e = rt.block_on(chain.head(&name("y"))).unwrap_err();
    assert_eq!(e.kind, loraplex::origin::OriginErrorKind::NotFound);
}
