use std::net::{IpAddr, Ipv4Addr};

use xxhash_rust::xxh3::xxh3_64;

use super::*;
use crate::{
    cluster::{discovery::Members, identity::Identity},
    config::Config,
    metrics::Metrics,
};

fn state(n: usize) -> (Arc<Router>, Arc<ClusterState>) {
    let ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))];
    let me = Identity::with_local_ips("10.0.0.1:9090".parse().unwrap(), None, ips).unwrap();
    let r = Arc::new(Router::new(
        &Config::default(),
        me,
        Arc::new(Metrics::new()),
    ));
    let peers: Vec<String> = (1..=n).map(|i| format!("10.0.0.{i}:9090")).collect();
    r.rebuild(&Members::build(&peers, &r.me), Default::default());
    let s = ClusterState::new(
        r.clone(),
        Arc::new(Metrics::new()),
        Duration::from_millis(100),
        1,
    );
    (r, s)
}

fn sample(capacity: f32) -> LocalSample {
    LocalSample {
        healthy: true,
        known: true,
        max_lora: 4,
        batch: 8.0,
        capacity,
        ..LocalSample::default()
    }
}

fn report(capacity: f32, waiting: f32) -> BackendReport {
    BackendReport {
        known: true,
        healthy: true,
        waiting,
        running: 8.0,
        max_lora: 4,
        batch: 8.0,
        capacity,
        seq: 1,
        ..BackendReport::default()
    }
}

/// The addresses of every peer of `r` but this node (10.0.0.1:9090, see [`state`]).
fn other_peers(r: &Router) -> Vec<String> {
    r.topology()
        .peers
        .iter()
        .map(|p| p.addr.clone())
        .filter(|a| *a != "10.0.0.1:9090")
        .collect()
}

fn peer_state(capacity: f32, hot: &[(u64, f32)]) -> PeerState {
    PeerState {
        instance: 7,
        backends: vec![report(capacity, 0.0)],
        hot: hot.iter().map(|&(h, r)| HotKey { h, r, p: 0 }).collect(),
        ..PeerState::default()
    }
}

#[test]
fn replicas_follow_demand_and_shrink_after_the_cooldown() {
    let (r, s) = state(4);
    let others = other_peers(&r);
    let hot = xxh3_64(b"hot");
    let table = s.demand.table();
    s.set_local(sample(10.0));
    // 10 req/s here and 10 on each of three peers: 40 req/s over nodes of 10 req/s at a target
    // share of 0.5: 8 wanted, clamped to the 4 nodes.
    for _ in 0..8 {
        for _ in 0..10 {
            table.count(hot, 0, "hot");
        }
        for p in &others {
            s.set_peer(p, peer_state(10.0, &[(hot, 10.0)]));
        }
        s.lock().last_tick = Instant::now() - Duration::from_secs(1);
        s.tick();
    }
    assert_eq!(r.view().replicas.get(hot), 4);
    let top = s.top_keys();
    assert_eq!(top[0].0, "hot");
    assert_eq!(top[0].2, 4);
    assert!(top[0].1 > 35.0, "cluster rate {}", top[0].1);
    // Demand stops: still 4 for the cooldown, then back to 1.
    for p in &others {
        s.set_peer(p, peer_state(10.0, &[]));
    }
    let mut ks = Vec::new();
    for _ in 0..12 {
        s.lock().last_tick = Instant::now() - Duration::from_secs(1);
        s.tick();
        ks.push(r.view().replicas.get(hot));
    }
    assert_eq!(ks[0], 4, "{ks:?}");
    assert_eq!(*ks.last().unwrap(), 1, "{ks:?}");
    // A rare key never gets more than one.
    assert_eq!(r.view().replicas.get(xxh3_64(b"rare")), 1);
}

#[test]
fn without_learnt_capacity_a_key_grows_while_its_replicas_queue() {
    let (r, s) = state(3);
    let others = other_peers(&r);
    let hot = xxh3_64(b"hot");
    let table = s.demand.table();
    let mut queued = sample(0.0);
    queued.waiting = 5.0;
    queued.running = 8.0;
    s.set_local(queued);
    for p in &others {
        let mut st = peer_state(0.0, &[]);
        st.backends[0].waiting = 5.0;
        s.set_peer(p, st);
    }
    for _ in 0..6 {
        for _ in 0..20 {
            table.count(hot, 0, "hot");
        }
        s.lock().last_tick = Instant::now() - Duration::from_secs(1);
        s.tick();
    }
    assert_eq!(r.view().replicas.get(hot), 3);
}

#[test]
fn stale_peer_state_ages_out() {
    let (r, s) = state(2);
    let peer = r
        .topology()
        .peers
        .iter()
        .find(|p| p.addr != "10.0.0.1:9090")
        .unwrap()
        .addr
        .clone();
    let idx = r.topology().placement.index_of(&peer).unwrap();
    s.set_peer(&peer, peer_state(10.0, &[]));
    assert!(r.view().nodes[idx].backends[0].known);
    // A sample already old when it arrived is stale at once.
    let mut old = peer_state(10.0, &[]);
    old.backends[0].age_ms = 60_000;
    s.set_peer(&peer, old);
    assert!(!r.view().nodes[idx].backends[0].known);
    // And a fresh one ages out by itself after a few intervals.
    s.set_peer(&peer, peer_state(10.0, &[]));
    std::thread::sleep(s.stale_after() + Duration::from_millis(50));
    s.tick();
    assert!(!r.view().nodes[idx].backends[0].known);
}

#[test]
fn the_disk_filter_travels_in_deltas_and_resets_with_a_new_instance() {
    let (r, a) = state(2);
    let (_, b) = state(2);
    let stored: Vec<u64> = (0..500)
        .map(|i| xxh3_64(format!("a-{i}").as_bytes()))
        .collect();
    let set = stored.clone();
    a.set_stored(move || set.clone());
    a.tick();
    let peer = "10.0.0.2:9090";
    let idx = r.topology().placement.index_of(peer).unwrap();
    let (since, inst) = b.poll_args(peer);
    let st = a.publish(since, inst);
    assert!(!st.disk.is_empty());
    b.set_peer(peer, st);
    let view = b.router.view();
    let disk = view.nodes[idx].disk.as_ref().expect("received");
    assert!(stored.iter().all(|&h| disk.contains(h)));
    // Nothing changed: nothing resent.
    let (since, inst) = b.poll_args(peer);
    assert!(a.publish(since, inst).disk.is_empty());
    // Another instance (a restart of the poller's view of it) starts over.
    assert!(!a.publish(since, inst + 1).disk.is_empty());
}

#[test]
fn the_local_gpu_set_is_what_vllm_runs_then_what_was_sent() {
    let (r, s) = state(1);
    let ring = s.recent().remove(0);
    for name in ["a", "b", "c", "d", "e", "f"] {
        ring.note(xxh3_64(name.as_bytes()));
    }
    let mut smp = sample(10.0);
    smp.running_adapters = vec![xxh3_64(b"z")];
    s.set_local(smp);
    let b = &r.view().nodes[0].backends[0];
    // 4 slots: z (running), then f, e, d (sent last).
    for name in ["z", "f", "e", "d"] {
        assert!(b.gpu_has(xxh3_64(name.as_bytes())), "{name}");
    }
    assert!(!b.gpu_has(xxh3_64(b"c")));
    let published = s.publish(0, 0);
    assert_eq!(published.backends[0].gpu.len(), 4);
}

#[test]
fn each_local_backend_is_sampled_published_and_viewed_with_its_models() {
    let ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))];
    let me = Identity::with_local_ips("10.0.0.1:9090".parse().unwrap(), None, ips).unwrap();
    let r = Arc::new(Router::new(
        &Config::default(),
        me,
        Arc::new(Metrics::new()),
    ));
    let s = ClusterState::new(
        r.clone(),
        Arc::new(Metrics::new()),
        Duration::from_secs(1),
        2,
    );
    assert_eq!(s.backends(), 2);
    let rings = s.recent();
    assert_eq!(rings.len(), 2, "one ring per backend");
    rings[1].note(xxh3_64(b"acme/x"));
    let m2: Arc<[String]> = Arc::from(["/m/m2".to_owned(), "m2".to_owned()]);
    s.set_local(LocalSample {
        backend: 1,
        models: m2.clone(),
        waiting: 3.0,
        ..sample(10.0)
    });
    // Backend 0 not sampled yet: published as a default report, in its place.
    let published = s.publish(0, 0);
    assert_eq!(published.backends.len(), 2);
    assert_eq!(published.backends[0], BackendReport::default());
    assert_eq!(published.backends[1].models, m2.to_vec());
    assert_eq!(published.backends[1].waiting, 3.0);
    assert_eq!(published.backends[1].gpu, vec![xxh3_64(b"acme/x")]);
    let view = r.view();
    let node = &view.nodes[0];
    assert_eq!(node.backends.len(), 2);
    assert!(node.backends[1].serves(pool_hash("m2")));
    assert!(node.backends[1].serves(pool_hash("/m/m2")));
    assert!(!node.backends[1].serves(pool_hash("m1")));
    assert!(node.backends[1].serves(0), "pool 0 is any");
    assert!(!node.backends[0].serves(pool_hash("m2")), "not learnt yet");
    // A sample for a backend this node does not have is ignored.
    s.set_local(LocalSample {
        backend: 5,
        ..sample(1.0)
    });
    assert_eq!(r.view().nodes[0].backends.len(), 2);
}

#[test]
fn a_peer_with_several_backends_is_viewed_with_all_of_them() {
    let (r, s) = state(2);
    let peer = other_peers(&r).remove(0);
    let idx = r.topology().placement.index_of(&peer).unwrap();
    let mut st = peer_state(10.0, &[]);
    let mut second = report(5.0, 2.0);
    second.models = vec!["m2".into()];
    st.backends.push(second);
    s.set_peer(&peer, st);
    let view = r.view();
    let node = &view.nodes[idx];
    assert_eq!(node.backends.len(), 2);
    assert!(node.backends[1].serves(pool_hash("m2")) && !node.backends[0].serves(pool_hash("m2")));
    assert!(node.up_for(pool_hash("m2")));
    // A report without `models` (an earlier version) still parses.
    let old: BackendReport = serde_json::from_str(
        r#"{"known":true,"healthy":true,"running":1,"waiting":0,"kv":0,"max_lora":4,"lora_busy":0,
        "batch":0,"capacity":0,"started":0,"age_ms":0,"seq":1,"gpu":[]}"#,
    )
    .unwrap();
    assert!(old.models.is_empty());
}

/// Without a learnt capacity a hot key grows while *its pool's* first nodes queue: the queues
/// of nodes serving another base model say nothing of it, and it never counts more replicas
/// than nodes serving its pool.
#[test]
fn without_learnt_capacity_a_key_is_sized_on_the_nodes_of_its_pool() {
    let (r, s) = state(4);
    let topo = r.topology();
    let m1 = |i: usize| ["10.0.0.1:9090", "10.0.0.2:9090"].contains(&topo.peers[i].addr.as_str());
    // A key whose first two nodes over all are the two serving m1.
    let (key, hot) = (0..)
        .map(|i| format!("hot-{i}"))
        .map(|k| {
            let h = xxh3_64(k.as_bytes());
            (k, h)
        })
        .find(|(_, h)| {
            let mut order = [0u16; 2];
            topo.placement.top(*h, &mut order);
            order.iter().all(|&i| m1(usize::from(i)))
        })
        .unwrap();
    let m2 = pool_hash("m2");
    // m1's nodes queue or m2's do.
    let set = |m1_waiting: f32, m2_waiting: f32| {
        let models = |m: &str| Arc::from([m.to_owned()]);
        s.set_local(LocalSample {
            models: models("m1"),
            waiting: m1_waiting,
            ..sample(0.0)
        });
        for p in other_peers(&r) {
            let mut st = peer_state(0.0, &[]);
            let on_m1 = p == "10.0.0.2:9090";
            st.backends[0].models = vec![if on_m1 { "m1" } else { "m2" }.into()];
            st.backends[0].waiting = if on_m1 { m1_waiting } else { m2_waiting };
            s.set_peer(&p, st);
        }
    };
    let table = s.demand.table();
    let run = |ticks: usize| {
        for _ in 0..ticks {
            for _ in 0..20 {
                table.count(hot, m2, &key);
            }
            s.lock().last_tick = Instant::now() - Duration::from_secs(1);
            s.tick();
        }
        r.view().replicas.get(hot)
    };
    set(5.0, 0.0);
    assert_eq!(run(6), 1, "m1's queues do not grow an m2 key");
    set(0.0, 5.0);
    assert_eq!(run(6), 2, "m2's two nodes queue: both, no more");
}

/// A top key's `loraplex_key_*` series stay from tick to tick, and go once the key fades out.
#[test]
fn a_key_series_stays_while_the_key_is_on_top_and_goes_when_it_fades() {
    let (_, s) = state(1);
    let table = s.demand.table();
    let label = KeyLabel { key: "hot".into() };
    let tick = || {
        s.lock().last_tick = Instant::now() - Duration::from_secs(1);
        s.tick();
    };
    for _ in 0..3 {
        for _ in 0..20 {
            table.count(xxh3_64(b"hot"), 0, "hot");
        }
        tick();
        assert!(s.metrics.key_replicas.get(&label).is_some());
        assert!(s.metrics.key_request_rate.get(&label).is_some());
    }
    for _ in 0..40 {
        tick();
    }
    assert!(s.metrics.key_replicas.get(&label).is_none(), "faded out");
    assert!(s.metrics.key_request_rate.get(&label).is_none());
}
