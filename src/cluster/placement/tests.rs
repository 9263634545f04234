//! Placement tests: determinism, movement on leave/join, fallback order, balance, edge cases.

use super::*;

fn addrs(n: usize, from: usize) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("10.{}.{}.{}:8000", i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("org{}/lora-{:x}", i % 97, fmix64(i as u64)))
        .collect()
}

/// Owner address of every key.
fn owners<'a>(p: &'a Placement, keys: &[String]) -> Vec<&'a str> {
    keys.iter()
        .map(|k| p.peers()[p.owner(k.as_bytes()).unwrap()].as_str())
        .collect()
}

#[test]
fn build_ignores_input_order_and_duplicates() {
    let base = addrs(37, 0);
    let reference = Placement::build(&base);
    let mut reversed = base.clone();
    reversed.reverse();
    let mut rotated = base.clone();
    rotated.rotate_left(11);
    let mut shuffled = base.clone();
    // Deterministic Fisher-Yates driven by a hash.
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, fmix64(i as u64) as usize % (i + 1));
    }
    let mut duplicated = base.clone();
    duplicated.extend(base.iter().take(5).cloned());
    duplicated.insert(3, base[20].clone());

    let keys = keys(20_000);
    let expected = owners(&reference, &keys);
    for input in [reversed, rotated, shuffled, duplicated] {
        let p = Placement::build(&input);
        assert_eq!(p.peers(), reference.peers());
        assert_eq!(owners(&p, &keys), expected);
        for k in keys.iter().take(50) {
            let a: Vec<usize> = p.order(k.as_bytes()).collect();
            let b: Vec<usize> = reference.order(k.as_bytes()).collect();
            assert_eq!(a, b);
        }
    }
    let mut sorted = base.clone();
    sorted.sort();
    assert_eq!(reference.peers(), &sorted[..]);
}

/// Remove `gone` from a placement of `n` peers; every moved key must have been `gone`'s and
/// the moved fraction must be about 1/n.
fn check_removal(n: usize, gone: usize, keys: &[String]) {
    let peers = addrs(n, 0);
    let before = Placement::build(&peers);
    let gone_addr = before.peers()[gone].clone();
    let rest: Vec<String> = peers.iter().filter(|p| **p != gone_addr).cloned().collect();
    let after = Placement::build(&rest);
    let (old, new) = (owners(&before, keys), owners(&after, keys));
    let mut moved = 0;
    for (o, n) in old.iter().zip(&new) {
        if o != n {
            assert_eq!(*o, gone_addr, "a key of a surviving peer moved");
            moved += 1;
        } else {
            assert_ne!(*o, gone_addr);
        }
    }
    let fraction = moved as f64 / keys.len() as f64;
    let ideal = 1.0 / n as f64;
    assert!(
        (fraction - ideal).abs() < 0.25 * ideal,
        "removing peer {gone} of {n} moved {fraction:.4}, ideal {ideal:.4}"
    );
}

#[test]
fn removing_any_peer_moves_only_its_keys() {
    let keys = keys(60_000);
    for (n, gone) in [
        (8, 0),
        (8, 4),
        (8, 7),
        (40, 0),
        (40, 19),
        (40, 39),
        (200, 100),
    ] {
        check_removal(n, gone, &keys);
    }
}

#[test]
fn adding_a_peer_moves_keys_only_to_it() {
    let keys = keys(60_000);
    for n in [1, 5, 40, 200] {
        let peers = addrs(n, 0);
        let newcomer = addrs(1, 1000)[0].clone();
        let mut grown = peers.clone();
        grown.push(newcomer.clone());
        let (before, after) = (Placement::build(&peers), Placement::build(&grown));
        let (old, new) = (owners(&before, &keys), owners(&after, &keys));
        let mut moved = 0;
        for (o, n) in old.iter().zip(&new) {
            if o != n {
                assert_eq!(*n, newcomer, "a key moved between old peers");
                moved += 1;
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        let ideal = 1.0 / (n + 1) as f64;
        assert!(
            (fraction - ideal).abs() < 0.25 * ideal,
            "adding to {n} peers moved {fraction:.4}, ideal {ideal:.4}"
        );
    }
}

#[test]
fn order_lists_each_peer_once_owner_first() {
    for n in [1, 2, 5, 64, 300] {
        let p = Placement::build(&addrs(n, 0));
        for k in keys(200) {
            let order: Vec<usize> = p.order(k.as_bytes()).collect();
            assert_eq!(order.len(), n);
            assert_eq!(Some(order[0]), p.owner(k.as_bytes()));
            let mut seen = order.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            assert_eq!(p.order(k.as_bytes()).len(), n);
        }
    }
}

#[test]
fn fallbacks_are_the_owners_after_departures() {
    // The k-th entry of a key's order owns the key once the first k-1 entries have left.
    let keys = keys(30_000);
    for (n, first) in [(3, 1), (30, 0), (250, 125)] {
        let peers = addrs(n, 0);
        let full = Placement::build(&peers);
        let name = |i: usize| full.peers()[i].clone();
        let orders: Vec<Vec<String>> = keys
            .iter()
            .map(|k| full.order(k.as_bytes()).take(3).map(name).collect())
            .collect();
        let r = name(first);
        // The peer most often second behind `r`, so that enough keys rank r, s first.
        let mut seconds: Vec<&String> = orders
            .iter()
            .filter(|o| o[0] == r && o.len() > 1)
            .map(|o| &o[1])
            .collect();
        seconds.sort();
        let s = seconds
            .chunk_by(|a, b| a == b)
            .max_by_key(|c| c.len())
            .map(|c| c[0].clone());
        let without_r: Vec<String> = peers.iter().filter(|a| **a != r).cloned().collect();
        let after_r = Placement::build(&without_r);
        let mut checked = [0usize; 2];
        for (k, o) in keys.iter().zip(&orders) {
            if o[0] == r {
                assert_eq!(after_r.peers()[after_r.owner(k.as_bytes()).unwrap()], o[1]);
                checked[0] += 1;
            }
        }
        if let Some(s) = s.filter(|_| n > 2) {
            let rest: Vec<String> = without_r.iter().filter(|a| **a != s).cloned().collect();
            let after_rs = Placement::build(&rest);
            for (k, o) in keys.iter().zip(&orders) {
                if o[0] == r && o[1] == s {
                    assert_eq!(
                        after_rs.peers()[after_rs.owner(k.as_bytes()).unwrap()],
                        o[2]
                    );
                    checked[1] += 1;
                }
            }
        }
        assert!(
            checked[0] > 50 && checked[1] > 0,
            "n={n}: too few keys checked {checked:?}"
        );
    }
}

#[test]
fn load_is_balanced() {
    let keys = keys(200_000);
    for n in [3, 64] {
        let p = Placement::build(&addrs(n, 0));
        let mut load = vec![0usize; n];
        for k in &keys {
            load[p.owner(k.as_bytes()).unwrap()] += 1;
        }
        let peak = *load.iter().max().unwrap() as f64 / (keys.len() as f64 / n as f64);
        // Sampling noise alone: about 1 + 3·sqrt(n / keys) (1.005 at 3, 1.054 at 64).
        assert!(peak < 1.1, "peak-to-mean {peak:.4} at {n} peers");
    }
}

#[test]
fn empty_and_single_peer() {
    let empty = Placement::build(&[]);
    assert!(empty.is_empty());
    assert_eq!(empty.owner(b"anything"), None);
    assert_eq!(empty.order(b"anything").count(), 0);
    assert_eq!(empty.index_of("10.0.0.1:8000"), None);

    let one = Placement::build(&["10.0.0.1:8000".to_string(), "10.0.0.1:8000".to_string()]);
    assert_eq!(one.len(), 1);
    for k in keys(1000) {
        assert_eq!(one.owner(k.as_bytes()), Some(0));
        assert_eq!(one.order(k.as_bytes()).collect::<Vec<_>>(), vec![0]);
    }
    assert_eq!(one.owner(b""), Some(0));
    assert_eq!(one.index_of("10.0.0.1:8000"), Some(0));
}

#[test]
fn index_of_finds_members() {
    let p = Placement::build(&addrs(10, 0));
    for (i, a) in p.peers().iter().enumerate() {
        assert_eq!(p.index_of(a), Some(i));
    }
    assert_eq!(p.index_of("10.9.9.9:1"), None);
}

#[test]
fn order_is_the_full_score_ranking() {
    // Brute force: every peer scored by (hot in the key's slot, key-level or slot-level rank).
    for n in [2, 9, 64, 200] {
        let p = Placement::build(&addrs(n, 0));
        for k in keys(60) {
            let h = xxh3_64(k.as_bytes());
            let slot = slot_of(h);
            let hot = if p.slot_is_hot(slot) {
                p.slot_candidates(slot).to_vec()
            } else {
                Vec::new()
            };
            let mut expected: Vec<(bool, u64)> = (0..n)
                .map(|i| match hot.contains(&(i as u16)) {
                    true => (true, p.key_rank(h, i)),
                    false => (false, p.slot_rank(slot, i)),
                })
                .collect();
            expected.sort_unstable_by(|a, b| b.cmp(a));
            let expected: Vec<usize> = expected.into_iter().map(|(_, r)| unpack(r)).collect();
            assert_eq!(
                p.order(k.as_bytes()).collect::<Vec<_>>(),
                expected,
                "n={n} key={k}"
            );
        }
    }
}

/// The CPU's own word on AVX-512F and DQ (`/proc/cpuinfo` flags), apart from the runtime
/// detection the placement uses.
fn cpuinfo_has_avx512() -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines().filter(|l| l.starts_with("flags")).any(|l| {
        let flags: Vec<&str> = l.split_whitespace().collect();
        flags.contains(&"avx512f") && flags.contains(&"avx512dq")
    })
}

#[test]
fn avx512_agrees_with_the_portable_path() {
    if !simd_available() {
        let listed = cpuinfo_has_avx512();
        // A CPU that lists the flags but is not detected as having them is a broken
        // detection, not a missing capability: CI must not pass over it.
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !(listed && ci),
            "/proc/cpuinfo lists avx512f and avx512dq, but the placement does not detect them"
        );
        println!(
            "\n!!! SKIPPED avx512_agrees_with_the_portable_path: AVX-512F/DQ not detected \
             (/proc/cpuinfo lists them: {listed}); the SIMD owner path is NOT tested here \
             (and not used) !!!\n"
        );
        return;
    }
    let p = Placement::build(&addrs(256, 0));
    assert!(p.avx512);
    let mut simd = 0;
    for k in keys(200_000) {
        let key_hash = xxh3_64(k.as_bytes());
        let slot = slot_of(key_hash);
        simd += usize::from(p.table.record8(slot).is_some());
        assert_eq!(
            p.owner(k.as_bytes()),
            p.owner_portable(key_hash, slot),
            "{k}"
        );
    }
    // 256 peers make 8-wide records, and most slots are not spilled: the SIMD path ran.
    assert!(
        simd > 180_000,
        "{simd} of 200000 lookups took the AVX-512 path"
    );
}

#[test]
fn top_is_the_start_of_the_order() {
    for n in [1, 2, 3, 7, 64, 130] {
        let p = Placement::build(&addrs(n, 0));
        for key in keys(300) {
            let hash = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
            let order: Vec<usize> = p.order(key.as_bytes()).collect();
            // 3 to 6 cross the end of the cached tail (`TAIL_CACHE` past the hot peers).
            for want in [1, 2, 3, 4, 5, 6, MAX_TOP, MAX_TOP + 5] {
                let mut out = [0u16; MAX_TOP + 5];
                let got = p.top(hash, &mut out[..want]);
                let expect = want.min(MAX_TOP).min(n);
                assert_eq!(got, expect, "n={n} want={want}");
                let got: Vec<usize> = out[..got].iter().map(|&i| usize::from(i)).collect();
                assert_eq!(got, order[..expect], "n={n} key={key}");
            }
            assert_eq!(p.owner_of_hash(hash), Some(order[0]));
        }
    }
    assert_eq!(Placement::build(&[]).top(1, &mut [0; 4]), 0);
}

#[test]
fn top_where_is_the_start_of_the_filtered_order() {
    // Pools of every shape: most nodes, half, a few, one, none.
    type Pool = (&'static str, fn(usize) -> bool);
    let pools: [Pool; 6] = [
        ("all", |_| true),
        ("even", |i| i % 2 == 0),
        ("thirds", |i| i % 3 == 1),
        ("few", |i| i % 17 == 5),
        ("one", |i| i == 6),
        ("none", |_| false),
    ];
    for n in [1, 2, 3, 7, 64, 130] {
        let p = Placement::build(&addrs(n, 0));
        for key in keys(200) {
            let hash = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
            for (pool, keep) in pools {
                let order: Vec<usize> = p.order(key.as_bytes()).filter(|&i| keep(i)).collect();
                for want in [1, 2, 3, 4, 5, 6, MAX_TOP] {
                    let mut out = [0u16; MAX_TOP];
                    let got = p.top_where(hash, &mut out[..want], keep);
                    let expect = want.min(order.len());
                    assert_eq!(got, expect, "n={n} pool={pool} want={want}");
                    let got: Vec<usize> = out[..got].iter().map(|&i| usize::from(i)).collect();
                    assert_eq!(got, order[..expect], "n={n} pool={pool} key={key}");
                }
            }
        }
    }
    assert_eq!(Placement::build(&[]).top_where(1, &mut [0; 4], |_| true), 0);
}
