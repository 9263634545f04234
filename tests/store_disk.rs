//! The store on real disks: the writer on io_uring and epoll, O_DIRECT and its buffered
//! fallback (and `storage.direct_io: off`), checked against the page cache (`cachestat(2)`:
//! direct writes leave none, buffered ones leave clean pages once fsynced), ENOSPC on a real
//! full filesystem and injected, a real `kill -9` mid-fetch, crash leftovers and corrupt
//! entries at startup, restarts, and what vLLM can see while an adapter is being written.
//!
//! A test that needs a capability the machine may lack (mounting a tmpfs, `cachestat`) says
//! so on stdout when it is absent; under `CI=true` it fails instead, unless the capability is
//! truly absent (no `CAP_SYS_ADMIN`, a kernel without `cachestat`).

#[path = "store_common/mod.rs"]
mod common;

use std::{
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use common::*;
use loraplex::{
    config::{DirectIo, Driver},
    store::validate,
};

/// Whether this run is CI's (`CI=true`), where a capability the machine has must be used.
fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Page-cache state of a whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CacheStat {
    cached: u64,
    dirty: u64,
    writeback: u64,
}

/// `cachestat(2)` (Linux 6.5+): pages of `path` in the page cache, dirty, under writeback.
/// `Err` with `ENOSYS` on older kernels.
fn cachestat(path: &Path) -> io::Result<CacheStat> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// The same number in every architecture's table (it came after the unification).
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = std::fs::File::open(path)?;
    let range = Range { off: 0, len: 0 }; // len 0: to the end
    let mut stat = Stat::default();
    // SAFETY: the two pointers are to live, correctly laid out structs; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CacheStat {
        cached: stat.nr_cache,
        dirty: stat.nr_dirty,
        writeback: stat.nr_writeback,
    })
}

/// Check that `file` was written as `mode` says: `direct` leaves nothing in the page cache
/// (but the last page, see below); `buffered` leaves all its pages cached, none dirty or under
/// writeback (it was fsynced before it was published). Call it before anything reads the file.
/// Says so on stdout when the kernel has no `cachestat`.
fn assert_written_as(file: &Path, mode: &str) {
    let stat = match cachestat(file) {
        Ok(stat) => stat,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            println!(
                "\n!!! SKIPPED: this kernel has no cachestat(2) (before 6.5): how {} was \
                 written ({mode}) is NOT checked against the page cache !!!\n",
                file.display()
            );
            return;
        }
        Err(e) => panic!("cachestat {}: {e}", file.display()),
    };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let pages = std::fs::metadata(file).unwrap().len().div_ceil(page);
    let at = file.display();
    match mode {
        // At most the last page: the ftruncate after the padded tail zeroes it in the cache.
        "direct" => assert!(
            stat.cached <= 1,
            "{at}: went through the page cache: {stat:?}"
        ),
        "buffered" => {
            assert_eq!(
                stat.cached, pages,
                "{at}: not through the page cache: {stat:?}"
            );
            assert_eq!(
                (stat.dirty, stat.writeback),
                (0, 0),
                "{at}: not fsynced: {stat:?}"
            );
        }
        other => panic!("write mode {other:?}"),
    }
}

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
    // Before anything reads the files back into the page cache.
    let stats = store.stats();
    let weights = store_dir.path().join("w/adapter_model.safetensors");
    assert_written_as(&weights, stats["write_mode"].as_str().unwrap());
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(store_dir.path().join("w").join(f)).unwrap(),
            std::fs::read(origin_dir.path().join("w").join(f)).unwrap(),
            "{f} on {driver:?}"
        );
    }
    validate::check_dir(&store_dir.path().join("w")).unwrap();
    stats
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

/// `storage.direct_io: off`: every file is written buffered and fsynced before the adapter is
/// published, whatever the filesystem allows (this one takes O_DIRECT), and the stats say so.
#[test]
fn direct_io_off_writes_buffered_and_fsyncs() {
    let mut drivers = vec![Driver::Epoll];
    if monoio::utils::detect_uring() {
        drivers.push(Driver::IoUring);
    }
    for driver in drivers {
        let origin_dir = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        write_adapter(origin_dir.path(), "off", 700_001);
        let env = Env::new(store_dir.path());
        let mut opts = options(store_dir.path(), 1 << 30);
        opts.driver = driver;
        opts.direct_io = DirectIo::Off;
        let store = env.open(opts, vec![Counted::file(origin_dir.path())]);
        assert_eq!(store.stats()["write_mode"], "buffered", "{driver:?}");
        let s = store.clone();
        mono(move || async move { s.ensure(&name("off")).await.map(|_| ()) }).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            let stored = store_dir.path().join("off").join(f);
            assert_written_as(&stored, "buffered");
            assert_eq!(
                std::fs::read(&stored).unwrap(),
                std::fs::read(origin_dir.path().join("off").join(f)).unwrap(),
                "{f} on {driver:?}"
            );
        }
        assert_eq!(store.stats()["write_mode"], "buffered");
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

    /// A tmpfs, or `None` after saying on stdout why `test` goes without one. Under
    /// `CI=true` a process that may mount (it has `CAP_SYS_ADMIN`) must get one.
    fn or_skip(size: &str, test: &str, instead: &str) -> Option<Tmpfs> {
        let why = match Tmpfs::mount(size) {
            Ok(fs) => return Some(fs),
            Err(why) => why,
        };
        let capable = can_mount();
        assert!(
            !(capable && ci()),
            "{test}: this process has CAP_SYS_ADMIN but mounting a {size} tmpfs failed: {why}"
        );
        println!(
            "\n!!! SKIPPED {test}: could not mount a {size} tmpfs ({}; CAP_SYS_ADMIN {}); {instead} !!!\n",
            why.trim(),
            if capable { "present" } else { "absent" }
        );
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// Whether this process may mount filesystems: `CAP_SYS_ADMIN` (bit 21) in its effective set.
fn can_mount() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 21) != 0)
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
    let test = "enospc_on_a_real_full_filesystem";
    let instead = "the REAL ENOSPC path is NOT tested; running the injected-ENOSPC variant instead";
    match Tmpfs::or_skip("2m", test, instead) {
        Some(fs) => check_enospc(&fs.0.path().join("store"), false),
        None => {
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

/// Whether an aligned O_DIRECT write works in `dir`, asked of the kernel without the store.
fn o_direct_write_works(dir: &Path) -> bool {
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: a non-zero size; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buf.is_null());
    // SAFETY: `buf` points to 4096 initialised bytes.
    let block = unsafe { std::slice::from_raw_parts(buf, 4096) };
    let path = dir.join("o_direct-check");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .and_then(|mut f| io::Write::write_all(&mut f, block));
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    let _ = std::fs::remove_file(&path);
    written.is_ok()
}

/// On tmpfs (which takes O_DIRECT since Linux 6.6 and refused it before), the store writes
/// direct exactly when the kernel takes an O_DIRECT write there, buffered otherwise.
#[test]
fn tmpfs_store_writes_direct_exactly_when_the_kernel_takes_it() {
    let test = "tmpfs_store_writes_direct_exactly_when_the_kernel_takes_it";
    let Some(fs) = Tmpfs::or_skip("64m", test, "the store on tmpfs is NOT tested") else {
        return;
    };
    let direct = o_direct_write_works(fs.0.path());
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
    let mode = store.stats()["write_mode"].as_str().unwrap().to_owned();
    println!("tmpfs takes O_DIRECT on this kernel: {direct}; the store writes {mode}");
    assert_eq!(mode, if direct { "direct" } else { "buffered" });
}
