//! The store on real disks: the writer on io_uring and epoll, O_DIRECT and its buffered
//! fallback, ENOSPC on a real full filesystem and injected, a real `kill -9` mid-fetch,
//! crash leftovers and corrupt entries at startup, restarts, and what vLLM can see while an
//! adapter is being written.

#[path = "store_common/mod.rs"]
mod common;

use std::sync::{Arc, atomic::Ordering};

use common::*;
use loraplex::{config::Driver, store::validate};

#[test]
fn restart_rebuilds_the_index_without_refetching() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "org/one", 100);
    write_adapter(origin_dir.path(), "two", 100);
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);
    let s = store.clone();
    let ids = mono(move || async move {
        let a = s.ensure(&name("org/one")).await.unwrap();
        let b = s.ensure(&name("two")).await.unwrap();
        (a.pin.content_id().map(str::to_owned), b.pin.size())
    });
    store.shutdown();
    drop(store);

    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);
    assert_eq!(store.stats()["items"], 2);
    let one = store.pin(&name("org/one")).expect("indexed at open");
    assert_eq!(one.content_id().map(str::to_owned), ids.0);
    assert_eq!(store.pin(&name("two")).unwrap().size(), ids.1);
    assert_eq!(origin.manifests(), 2, "nothing refetched");
}

#[test]
fn crash_leftovers_and_corrupt_entries_are_cleaned_at_open() {
    let store_dir = tempfile::tempdir().unwrap();
    let root = store_dir.path();
    // A fetch killed mid-write: its temp dir, and the Go project's kind of leftover.
    std::fs::create_dir_all(root.join(".loraplex-tmp/fetch-7-x")).unwrap();
    std::fs::write(
        root.join(".loraplex-tmp/fetch-7-x/adapter_model.safetensors"),
        b"part",
    )
    .unwrap();
    std::fs::create_dir_all(root.join(".tmp-acme__x")).unwrap();
    // Corrupt entries: truncated weights, unparsable config, config-only.
    write_adapter(root, "trunc", 1000);
    let w = root.join("trunc/adapter_model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&w)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    write_adapter(root, "org/badjson", 10);
    std::fs::write(root.join("org/badjson/adapter_config.json"), b"{not json").unwrap();
    std::fs::create_dir_all(root.join("cfgonly")).unwrap();
    std::fs::write(
        root.join("cfgonly/adapter_config.json"),
        validate::tiny_config(BASE),
    )
    .unwrap();
    // Good ones: copied in by hand (nested, no meta), and a Go-fetched one with its meta.
    write_adapter(root, "team/hand/made", 10);
    write_adapter(root, "gofetched", 10);
    std::fs::write(
        root.join("gofetched/.loraplex_meta"),
        br#"{"origin":"http","etag":"\"abc\"","fetched_at":"2025-01-02T03:04:05.5+01:00","ttl_seconds":3600}"#,
    )
    .unwrap();
    // Something hidden that is not ours stays.
    std::fs::create_dir_all(root.join(".keep-me")).unwrap();

    let env = Env::new(root);
    let store = env.open(options(root, 1 << 30), vec![]);
    assert!(tmp_entries(root).is_empty());
    assert!(!root.join(".tmp-acme__x").exists());
    assert!(root.join(".keep-me").exists());
    for gone in ["trunc", "org/badjson", "cfgonly"] {
        assert!(!root.join(gone).exists(), "{gone} should be removed");
        assert!(store.pin(&name(gone)).is_none());
    }
    assert!(!root.join("org").exists(), "empty parent removed");
    assert!(store.pin(&name("team/hand/made")).is_some());
    let go = store.pin(&name("gofetched")).unwrap();
    assert_eq!(go.content_id(), Some("\"abc\""));
    assert_eq!(store.stats()["items"], 2);
}

/// Run by `kill_9_during_a_fetch_leaves_nothing_partial` in a child process, which it kills.
#[test]
#[ignore = "a child process of kill_9_during_a_fetch_leaves_nothing_partial"]
fn child_fetch_that_never_ends() {
    let origin_dir = std::env::var("LORAPLEX_TEST_ORIGIN").expect("run by the parent test");
    let store_dir = std::env::var("LORAPLEX_TEST_STORE").unwrap();
    let env = Env::new(store_dir.as_ref());
    let origin = Counted::file(origin_dir.as_ref());
    origin.slow.store(true, Ordering::SeqCst);
    // 48 × 64 KiB = 3 MiB of weights pass (one 2 MiB write reaches the disk), then it stalls.
    origin.hold_after.store(48, Ordering::SeqCst);
    origin.hold_body();
    let store = env.open(options(store_dir.as_ref(), 1 << 30), vec![origin.clone()]);
    let s = store.clone();
    mono(move || async move { s.ensure(&name("org/big")).await.map(|_| ()) }).unwrap();
    unreachable!("the parent kills this process mid-fetch");
}

#[test]
fn kill_9_during_a_fetch_leaves_nothing_partial() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "org/big", 2 << 20); // 8 MiB of weights
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_fetch_that_never_ends",
            "--nocapture",
        ])
        .env("LORAPLEX_TEST_ORIGIN", origin_dir.path())
        .env("LORAPLEX_TEST_STORE", store_dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until part of the weights is on disk in the temp area.
    let partial = || {
        std::fs::read_dir(store_dir.path().join(".loraplex-tmp"))
            .ok()?
            .flatten()
            .find_map(|e| {
                let w = e.path().join("adapter_model.safetensors");
                std::fs::metadata(&w)
                    .ok()
                    .filter(|m| m.len() > 0)
                    .map(|_| w)
            })
    };
    wait_until(60, "a partial download in the temp area", || {
        partial().is_some()
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        partial().is_some(),
        "the killed fetch left its partial files"
    );
    assert!(
        !store_dir.path().join("org/big").exists(),
        "nothing partial is visible"
    );

    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);
    assert!(
        tmp_entries(store_dir.path()).is_empty(),
        "leftovers removed at open"
    );
    assert_eq!(store.stats()["items"], 0);
    let s = store.clone();
    let fetched = mono(move || async move { s.ensure(&name("org/big")).await.map(|e| e.fetched) });
    assert_eq!(fetched, Ok(true));
    validate::check_dir(&store_dir.path().join("org/big")).unwrap();
}

#[test]
fn startup_enforces_max_size() {
    let store_dir = tempfile::tempdir().unwrap();
    let root = store_dir.path();
    let size = write_adapter(root, "a", 1000);
    write_adapter(root, "b", 1000);
    write_adapter(root, "c", 1000);
    let env = Env::new(root);
    let store = env.open(options(root, 2 * size), vec![]);
    assert_eq!(store.stats()["items"], 2);
    assert!(store.stats()["size"].as_u64().unwrap() <= 2 * size);
    let left = ["a", "b", "c"]
        .iter()
        .filter(|n| root.join(n).exists())
        .count();
    assert_eq!(left, 2);
    assert!(tmp_entries(root).is_empty());
}

#[test]
fn target_path_is_absent_or_complete_at_every_instant() {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let floats = 1 << 20; // 4 MiB of weights
    write_adapter(origin_dir.path(), "org/watched", floats);
    let want = std::fs::metadata(
        origin_dir
            .path()
            .join("org/watched/adapter_model.safetensors"),
    )
    .unwrap()
    .len();
    let env = Env::new(store_dir.path());
    let origin = Counted::file(origin_dir.path());
    origin.slow.store(true, Ordering::SeqCst);
    let store = env.open(options(store_dir.path(), 1 << 30), vec![origin.clone()]);

    let target = store_dir.path().join("org/watched");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (t, st) = (target.clone(), stop.clone());
    let watcher = std::thread::spawn(move || {
        let (mut absent, mut complete) = (0u64, 0u64);
        while !st.load(Ordering::SeqCst) || complete == 0 {
            match std::fs::metadata(t.join("adapter_config.json")) {
                Err(_) => absent += 1,
                Ok(_) => {
                    let w = std::fs::metadata(t.join("adapter_model.safetensors"))
                        .expect("config visible without weights");
                    assert_eq!(w.len(), want, "partial weights visible");
                    validate::check_dir(&t).expect("visible adapter is valid");
                    complete += 1;
                }
            }
        }
        (absent, complete)
    });
    let s = store.clone();
    mono(move || async move { s.ensure(&name("org/watched")).await.map(|_| ()) }).unwrap();
    stop.store(true, Ordering::SeqCst);
    let (absent, complete) = watcher.join().unwrap();
    assert!(
        absent > 0 && complete > 0,
        "absent {absent} complete {complete}"
    );
}

/// How O_DIRECT is refused in [`fetch_with`].
#[derive(Clone, Copy, PartialEq)]
enum Refuse {
    Never,
    /// By the open-time probe (the store starts buffered).
    AtProbe,
    /// At the first file open (the store started direct and falls back).
    AtWrite,
}

/// One fetch through a store whose storage thread runs on `driver`.
fn fetch_with(driver: Driver, refuse: Refuse) -> serde_json::Value {
    let origin_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    // Not a multiple of 4096 and over one 2 MiB write buffer: padded tail + ftruncate.
    write_adapter(origin_dir.path(), "w", 700_001);
    let env = Env::new(store_dir.path());
    let mut opts = options(store_dir.path(), 1 << 30);
    opts.driver = driver;
    opts.faults
        .refuse_direct
        .store(refuse == Refuse::AtProbe, Ordering::SeqCst);
    let faults = opts.faults.clone();
    let store = env.open(opts, vec![Counted::file(origin_dir.path())]);
    if refuse == Refuse::AtWrite {
        assert_eq!(store.stats()["write_mode"], "direct");
        faults.refuse_direct.store(true, Ordering::SeqCst);
    }
    let s = store.clone();
    mono(move || async move { s.ensure(&name("w")).await.map(|_| ()) }).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(store_dir.path().join("w").join(f)).unwrap(),
            std::fs::read(origin_dir.path().join("w").join(f)).unwrap(),
            "{f} on {driver:?}"
        );
    }
    validate::check_dir(&store_dir.path().join("w")).unwrap();
    store.stats()
}

#[test]
fn writer_on_io_uring() {
    if !monoio::utils::detect_uring() {
        panic!(
            "io_uring is not available on this machine: the io_uring writer cannot be tested here"
        );
    }
    let stats = fetch_with(Driver::IoUring, Refuse::Never);
    assert_eq!(stats["driver"], "io_uring");
    assert_eq!(
        stats["write_mode"], "direct",
        "temp dirs are on a disk filesystem here"
    );
}

#[test]
fn writer_on_epoll() {
    let stats = fetch_with(Driver::Epoll, Refuse::Never);
    assert_eq!(stats["driver"], "epoll");
    assert_eq!(stats["write_mode"], "direct");
}

#[test]
fn writer_falls_back_to_buffered_when_direct_is_refused() {
    for driver in [Driver::IoUring, Driver::Epoll] {
        for refuse in [Refuse::AtProbe, Refuse::AtWrite] {
            let stats = fetch_with(driver, refuse);
            assert_eq!(stats["write_mode"], "buffered");
        }
    }
}

/// A mounted tmpfs of `size`, unmounted on drop. `Err` says why it could not be mounted.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// ENOSPC during a fetch: 507, temp files removed, the store keeps working.
fn check_enospc(store_dir: &std::path::Path, inject: bool) {
    let origin_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "huge", 1 << 20); // 4 MiB: more than the 2 MiB fs
    write_adapter(origin_dir.path(), "small", 1000);
    let env = Env::new(store_dir);
    let opts = options(store_dir, 1 << 30);
    if inject {
        opts.faults.fail_writes(libc::ENOSPC, 1 << 20);
    }
    let faults = opts.faults.clone();
    let store = env.open(opts, vec![Counted::file(origin_dir.path())]);
    let s = store.clone();
    let e = mono(move || async move { s.ensure(&name("huge")).await.map(|_| ()) }).unwrap_err();
    assert_eq!(e.status(), 507, "{e}");
    assert!(e.message.contains("no space left"), "{e}");
    assert!(!store_dir.join("huge").exists());
    assert!(tmp_entries(store_dir).is_empty(), "temp files removed");
    assert_eq!(store.stats()["reserved"], 0);
    faults.clear();
    let s = store.clone();
    mono(move || async move { s.ensure(&name("small")).await.map(|_| ()) }).unwrap();
    validate::check_dir(&store_dir.join("small")).unwrap();
}

#[test]
fn enospc_on_a_real_full_filesystem() {
    match Tmpfs::mount("2m") {
        Ok(fs) => check_enospc(&fs.0.path().join("store"), false),
        Err(why) => {
            eprintln!(
                "\n!!! enospc_on_a_real_full_filesystem: could not mount a 2 MiB tmpfs ({why}); \
                 the REAL ENOSPC path is NOT tested here; running the injected-ENOSPC variant instead !!!\n"
            );
            let dir = tempfile::tempdir().unwrap();
            check_enospc(dir.path(), true);
        }
    }
}

#[test]
fn injected_enospc_and_eio() {
    let dir = tempfile::tempdir().unwrap();
    check_enospc(dir.path(), true);
    // Any other I/O error: 502, nothing left behind.
    let origin_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "eio", 1 << 18);
    let store_dir = tempfile::tempdir().unwrap();
    let env = Env::new(store_dir.path());
    let opts = options(store_dir.path(), 1 << 30);
    opts.faults.fail_writes(libc::EIO, 0);
    let store = env.open(opts, vec![Counted::file(origin_dir.path())]);
    let s = store.clone();
    let e = mono(move || async move { s.ensure(&name("eio")).await.map(|_| ()) }).unwrap_err();
    assert_eq!(e.status(), 502, "{e}");
    assert!(e.message.contains("storage I/O error"), "{e}");
    assert!(tmp_entries(store_dir.path()).is_empty());
}

#[test]
fn tmpfs_store_works_in_whatever_mode_it_allows() {
    let fs = match Tmpfs::mount("64m") {
        Ok(fs) => fs,
        Err(why) => panic!("cannot mount tmpfs to test the store on it: {why}"),
    };
    let dir = fs.0.path().join("store");
    let origin_dir = tempfile::tempdir().unwrap();
    write_adapter(origin_dir.path(), "t", 300_001);
    let env = Env::new(&dir);
    let store = env.open(
        options(&dir, 1 << 30),
        vec![Counted::file(origin_dir.path())],
    );
    let s = store.clone();
    mono(move || async move { s.ensure(&name("t")).await.map(|_| ()) }).unwrap();
    validate::check_dir(&dir.join("t")).unwrap();
    // Kernels since 6.6 accept O_DIRECT on tmpfs; older ones refuse it (buffered then).
    let mode = store.stats()["write_mode"].as_str().unwrap().to_owned();
    eprintln!("tmpfs write mode on this kernel: {mode}");
    assert!(mode == "direct" || mode == "buffered");
}
