//! Tests of file discovery: the liveness rules on a synthetic clock, atomic writes under a
//! concurrent reader, and several real instances sharing one directory.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
};

use super::*;
use crate::control::ControlPlane;

const SEC: i128 = 1_000_000_000;

fn put(dir: &Path, addr: &str, stamp: i128) {
    // Written the way the Go project does: in place, not atomically.
    fs::write(dir.join(addr), format!("{addr}\n{stamp}")).unwrap();
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn liveness_follows_our_clock_not_the_writers() {
    let dir = tempfile::tempdir().unwrap();
    let stale = Duration::from_secs(10);
    let mut scanner = Scanner::new(dir.path(), stale, "10.0.0.1:9090".into());
    let (t0, wall0) = (Instant::now(), 1_700_000_000 * SEC);
    let at = |s: u64| t0 + Duration::from_secs(s);
    put(dir.path(), "10.0.0.1:9090", wall0); // our own file: never listed
    put(dir.path(), "10.0.0.2:9090", wall0 - 2 * SEC); // fresh
    put(dir.path(), "10.0.0.3:9090", wall0 - 3600 * SEC); // clock an hour behind (or dead)
    put(dir.path(), "10.0.0.4:9090", wall0 + 3600 * SEC); // clock an hour ahead

    let found = scanner.scan(at(0), wall0).unwrap();
    assert_eq!(sorted(found), ["10.0.0.2:9090", "10.0.0.4:9090"]);

    // Node 3 heartbeats, its clock still an hour behind: alive from this observation on.
    put(dir.path(), "10.0.0.3:9090", wall0 - 3595 * SEC);
    let found = scanner.scan(at(5), wall0 + 5 * SEC).unwrap();
    assert_eq!(
        sorted(found),
        ["10.0.0.2:9090", "10.0.0.3:9090", "10.0.0.4:9090"]
    );

    // Then nobody writes. 2 was fresh until t0+8s, 4 until t0+10s, 3 until t0+15s.
    let found = scanner.scan(at(9), wall0 + 9 * SEC).unwrap();
    assert_eq!(sorted(found), ["10.0.0.3:9090", "10.0.0.4:9090"]);
    let found = scanner.scan(at(12), wall0 + 12 * SEC).unwrap();
    assert_eq!(found, ["10.0.0.3:9090"]);
    assert!(scanner.scan(at(16), wall0 + 16 * SEC).unwrap().is_empty());
}

#[test]
fn dead_files_are_removed_late_and_garbage_never() {
    let dir = tempfile::tempdir().unwrap();
    let stale = Duration::from_secs(10);
    let mut scanner = Scanner::new(dir.path(), stale, "10.0.0.1:9090".into());
    let (t0, wall0) = (Instant::now(), 1_700_000_000 * SEC);
    put(dir.path(), "10.0.0.2:9090", wall0);
    fs::write(dir.path().join("junk"), b"\xff\xfe not a heartbeat").unwrap();

    assert_eq!(scanner.scan(t0, wall0).unwrap(), ["10.0.0.2:9090"]);
    let just_before = t0 + stale * CLEANUP_FACTOR - Duration::from_secs(1);
    assert!(scanner.scan(just_before, wall0).unwrap().is_empty());
    assert!(
        dir.path().join("10.0.0.2:9090").exists(),
        "stale but not yet removed"
    );
    scanner.scan(t0 + stale * CLEANUP_FACTOR, wall0).unwrap();
    assert!(
        !dir.path().join("10.0.0.2:9090").exists(),
        "dead node's file removed"
    );
    assert!(
        dir.path().join("junk").exists(),
        "garbage is not ours to delete"
    );
}

#[test]
fn corrupt_and_foreign_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut scanner = Scanner::new(dir.path(), Duration::from_secs(10), "me:1".into());
    let (t0, wall0) = (Instant::now(), 1_700_000_000 * SEC);
    let p = dir.path();
    put(p, "10.0.0.2:9090", wall0);
    fs::write(p.join("10.0.0.3:9090"), "10.0.0.3:9090").unwrap(); // no timestamp
    fs::write(p.join("10.0.0.4:9090"), "10.0.0.4:9090\nsoon").unwrap(); // bad timestamp
    fs::write(p.join("10.0.0.5:9090"), "").unwrap(); // empty
    fs::write(p.join("x"), "http://10.0.0.6:9090\n1").unwrap(); // bad address
    fs::write(
        p.join("big"),
        format!("10.0.0.7:9090\n{wall0}\n{}", "x".repeat(2000)),
    )
    .unwrap();
    fs::write(
        p.join(".10.0.0.8:9090.tmp"),
        format!("10.0.0.8:9090\n{wall0}"),
    )
    .unwrap();
    fs::create_dir(p.join("10.0.0.9:9090")).unwrap();
    fs::write(p.join("bin"), [0u8, 159, 146, 150, b'\n', b'1']).unwrap();
    assert_eq!(scanner.scan(t0, wall0).unwrap(), ["10.0.0.2:9090"]);
}

#[test]
fn heartbeat_is_go_format_and_never_seen_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let hb = Arc::new(Heartbeat::new(dir.path(), "10.0.0.1:9090").unwrap());
    hb.write().unwrap();
    let path = dir.path().join("10.0.0.1:9090");
    let body = fs::read_to_string(&path).unwrap();
    let (addr, stamp) = body.split_once('\n').unwrap();
    assert_eq!(addr, "10.0.0.1:9090");
    assert!((wall_nanos() - stamp.parse::<i128>().unwrap()).abs() < 60 * SEC);

    // A reader racing the writer must always parse a whole heartbeat.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, path) = (stop.clone(), path.clone());
        thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let beat = read_beat(&path);
                assert!(beat.is_some(), "a reader saw a partial heartbeat");
                reads += 1;
            }
            reads
        })
    };
    for _ in 0..300 {
        hb.write().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);

    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["10.0.0.1:9090"], "the temp file is renamed away");
    hb.leave();
    hb.write().unwrap();
    assert!(!path.exists(), "no heartbeat after leaving");
}

async fn until(rx: &mut watch::Receiver<PeerSet>, want: &[&str]) {
    let seen = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| s.peers() == want))
        .await
        .map(|r| r.is_ok());
    assert_eq!(
        seen,
        Ok(true),
        "never saw {want:?}; last {:?}",
        rx.borrow().peers()
    );
}

fn node(port: u16) -> Identity {
    Identity::new(SocketAddr::from(([127, 0, 0, 1], port)), None).unwrap()
}

use std::net::SocketAddr;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_see_each_other_and_a_crashed_one_drops_out() {
    let dir = tempfile::tempdir().unwrap();
    let timing = Timing {
        interval: Duration::from_millis(40),
        stale: Duration::from_millis(400),
    };
    fs::write(dir.path().join("garbage"), "not a heartbeat").unwrap();
    let control = Control::current();
    let (s1, s2) = (Shutdown::new(), Shutdown::new());
    let (mut rx1, _) = start(dir.path(), timing, &node(7001), &control, s1.clone()).unwrap();
    let (mut rx2, _) = start(dir.path(), timing, &node(7002), &control, s2.clone()).unwrap();
    // Node 3 runs on its own control plane so that it can "crash": dropping the runtime
    // stops its loop without the clean-shutdown removal of its file.
    let plane3 = ControlPlane::start(1).unwrap();
    let (mut rx3, _) = start(
        dir.path(),
        timing,
        &node(7003),
        &plane3.control(),
        Shutdown::new(),
    )
    .unwrap();

    let all = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"];
    for rx in [&mut rx1, &mut rx2, &mut rx3] {
        until(rx, &all).await;
    }
    assert_eq!(rx3.borrow().me(), "127.0.0.1:7003");

    drop(plane3);
    until(&mut rx1, &all[..2]).await;
    until(&mut rx2, &all[..2]).await;
    // Its file is still there (it crashed): only the threshold dropped it.
    assert!(dir.path().join("127.0.0.1:7003").exists());

    // A clean shutdown removes the file at once.
    s2.trigger();
    until(&mut rx1, &all[..1]).await;
    let gone = async {
        while dir.path().join("127.0.0.1:7002").exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), gone)
        .await
        .unwrap();
    assert!(dir.path().join("garbage").exists());
    s1.trigger();
}

#[tokio::test]
async fn bad_timing_or_unwritable_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let control = Control::current();
    let bad = Timing {
        interval: Duration::from_secs(5),
        stale: Duration::from_secs(5),
    };
    let err = start(dir.path(), bad, &node(7010), &control, Shutdown::new()).unwrap_err();
    assert!(err.message.contains("stale_threshold"), "{err}");

    let file = dir.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let ok = Timing {
        interval: Duration::from_secs(5),
        stale: Duration::from_secs(15),
    };
    let err = start(
        &file.join("sub"),
        ok,
        &node(7011),
        &control,
        Shutdown::new(),
    )
    .unwrap_err();
    assert!(err.message.contains("discovery.file"), "{err}");
}
