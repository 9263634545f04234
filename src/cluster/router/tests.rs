use std::net::{IpAddr, Ipv4Addr};

use xxhash_rust::xxh3::xxh3_64;

use super::*;
use crate::cluster::{
    hashkey::pool_hash,
    view::{NodeState, ReplicaTable},
};

fn router(n: usize, policy: RoutingPolicy) -> (Router, Arc<Topology>) {
    let ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))];
    let me = Identity::with_local_ips("10.0.0.1:9090".parse().unwrap(), None, ips).unwrap();
    let mut cfg = Config::default();
    cfg.routing.policy = policy;
    let r = Router::new(&cfg, me, Arc::new(Metrics::new()));
    let peers: Vec<String> = (1..=n).map(|i| format!("10.0.0.{i}:9090")).collect();
    let members = Members::build(&peers, &r.me);
    r.rebuild(&members, HashMap::new());
    let t = r.topology();
    (r, t)
}

fn key_owned_by(t: &Topology, who: usize) -> u64 {
    (0..)
        .map(|i| xxh3_64(format!("adapter-{i}").as_bytes()))
        .find(|&k| t.placement.owner_of_hash(k) == Some(who))
        .unwrap()
}

fn other(t: &Topology) -> usize {
    (0..t.peers.len()).find(|&i| i != t.me).unwrap()
}

fn req(key: u64) -> RouteRequest {
    RouteRequest {
        key: Some(key),
        adapter: Some(key),
        ..RouteRequest::default()
    }
}

/// A view where every node's vLLM is known, idle, with a batch of 8 at 16 requests/s.
fn view(t: &Topology) -> View {
    let idle = NodeState {
        backends: vec![BackendState {
            known: true,
            healthy: true,
            batch: 8.0,
            capacity: 16.0,
            max_lora: 4,
            seq: 1,
            ..BackendState::default()
        }],
        disk: None,
    };
    View {
        generation: t.generation,
        nodes: vec![idle; t.peers.len()],
        replicas: ReplicaTable::default(),
        pools: Default::default(),
    }
}

fn target(d: &Decision) -> Option<usize> {
    d.peers.iter().next()
}

#[test]
fn single_node_is_always_local() {
    let (r, t) = router(1, RoutingPolicy::Auto);
    let d = r.decide(&t, &view(&t), &req(1), &Sent::default());
    assert!(d.is_local());
}

#[test]
fn a_rare_key_goes_to_its_owner_whatever_the_load_elsewhere() {
    let (r, t) = router(3, RoutingPolicy::Auto);
    let o = other(&t);
    let key = key_owned_by(&t, o);
    let mut v = view(&t);
    v.nodes[o].backends[0].waiting = 3.0;
    v.nodes[o].backends[0].running = 8.0;
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!((target(&d), d.reason), (Some(o), Reason::Owner));
    let mine = key_owned_by(&t, t.me);
    assert!(r.decide(&t, &v, &req(mine), &Sent::default()).is_local());
}

#[test]
fn an_owner_past_the_threshold_or_down_sheds_in_key_order() {
    let (r, t) = router(3, RoutingPolicy::Auto);
    let o = other(&t);
    let key = key_owned_by(&t, o);
    let mut order = [0u16; 3];
    t.placement.top(key, &mut order);
    let next = usize::from(order[1]);
    let mut v = view(&t);
    // A queue as long as the batch: load 1.0, past 0.8.
    v.nodes[o].backends[0].running = 8.0;
    v.nodes[o].backends[0].waiting = 8.0;
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!(d.reason, Reason::Fallback);
    assert_eq!(target(&d), (next != t.me).then_some(next));
    let v = view(&t);
    t.peers[o].health.mark_down();
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!(d.reason, Reason::Fallback);
    assert_eq!(target(&d), (next != t.me).then_some(next));
}

#[test]
fn with_the_first_nodes_of_a_key_down_the_next_usable_ones_in_its_order_serve() {
    // 64 nodes: the decision asks the placement for only the key's first few nodes, and for
    // more when some of those are down; the answer must be the full order's first usable ones.
    let (r, t) = router(64, RoutingPolicy::Auto);
    let v = view(&t);
    for i in 0..200u64 {
        let key = xxh3_64(format!("down-{i}").as_bytes());
        let mut all = [0u16; MAX_TOP];
        let n = t.placement.top(key, &mut all);
        let full: Vec<usize> = all[..n].iter().map(|&x| usize::from(x)).collect();
        // Its first three nodes down (this node stays up: it is the last resort).
        let down: Vec<usize> = full
            .iter()
            .copied()
            .filter(|&n| n != t.me)
            .take(3)
            .collect();
        for &n in &down {
            t.peers[n].health.mark_down();
        }
        let usable: Vec<usize> = full.iter().copied().filter(|n| !down.contains(n)).collect();
        let d = r.decide(&t, &v, &req(key), &Sent::default());
        let want: Vec<usize> = usable
            .iter()
            .copied()
            .take(SPREAD)
            .take_while(|&n| n != t.me)
            .collect();
        assert_eq!(d.peers.iter().collect::<Vec<_>>(), want, "key {i}");
        // A hot key over 4 replicas: its candidates are the first 4 usable nodes.
        let mut hot = v.clone();
        hot.replicas = ReplicaTable::build([(key, 4)]);
        let d = r.decide(&t, &hot, &req(key), &Sent::default());
        let target = target(&d).unwrap_or(t.me);
        assert!(
            usable[..4].contains(&target),
            "key {i}: {target} not in {:?}",
            &usable[..4]
        );
        for &n in &down {
            t.peers[n].health.observe(true, 0.0);
        }
    }
}

#[test]
fn a_hot_key_goes_to_the_replica_holding_it_or_the_least_busy() {
    let (r, t) = router(4, RoutingPolicy::Auto);
    let o = other(&t);
    let key = key_owned_by(&t, o);
    let mut order = [0u16; 4];
    t.placement.top(key, &mut order);
    let second = usize::from(order[1]);
    let mut v = view(&t);
    v.replicas = ReplicaTable::build([(key, 2)]);
    // Both idle, neither holds it: the owner (a tie), unless this node is the second.
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    if second == t.me {
        assert!(d.is_local());
    } else {
        assert_eq!((target(&d), d.reason), (Some(o), Reason::Owner));
    }
    // The second replica has it in a GPU slot: it wins on residency.
    v.nodes[second].backends[0].gpu = Arc::from([key]);
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!(d.reason, Reason::Residency);
    assert_eq!(target(&d), (second != t.me).then_some(second));
    // Both hold it, the owner has a queue: the second wins on load.
    v.nodes[o].backends[0].gpu = Arc::from([key]);
    v.nodes[o].backends[0].running = 8.0;
    v.nodes[o].backends[0].waiting = 6.0;
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!(d.reason, Reason::Load);
    assert_eq!(target(&d), (second != t.me).then_some(second));
    // Nodes beyond k are never candidates.
    for i in order[2..].iter().map(|&i| usize::from(i)) {
        assert!(!d.peers.iter().any(|p| p == i));
    }
}

#[test]
fn what_this_worker_sent_counts_until_the_next_sample() {
    let (r, t) = router(3, RoutingPolicy::Auto);
    let v = view(&t);
    let sent = Sent::default();
    let base = RouteRequest::default();
    assert!(r.decide(&t, &v, &base, &sent).is_local());
    // This node was sent enough to queue: the base request goes elsewhere.
    for _ in 0..8 {
        sent.add(&v, t.me);
    }
    let d = r.decide(&t, &v, &base, &sent);
    assert_eq!(d.reason, Reason::Spread);
    assert!(!d.is_local());
    // A new sample of this node resets the count.
    let mut v2 = v.clone();
    v2.nodes[t.me].backends[0].seq = 2;
    assert!(r.decide(&t, &v2, &base, &sent).is_local());
}

#[test]
fn unknown_metrics_route_by_hash() {
    let (r, t) = router(3, RoutingPolicy::Auto);
    let o = other(&t);
    let key = key_owned_by(&t, o);
    let mut v = view(&t);
    v.replicas = ReplicaTable::build([(key, 3)]);
    for n in &mut v.nodes {
        n.backends[0] = BackendState::default();
    }
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!((target(&d), d.reason), (Some(o), Reason::Owner));
    // A stale view (built for an older topology) too.
    let stale = View::default();
    let d = r.decide(&t, &stale, &req(key), &Sent::default());
    assert_eq!(target(&d), Some(o));
    // One unknown among known busy ones is neutral, not idle.
    let mut v = view(&t);
    v.replicas = ReplicaTable::build([(key, 3)]);
    for n in &mut v.nodes {
        n.backends[0].running = 8.0;
        n.backends[0].waiting = 4.0;
    }
    v.nodes[o].backends[0] = BackendState::default();
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!(
        target(&d),
        Some(o),
        "unknown = the mean: ties go to the owner"
    );
}

#[test]
fn hash_policy_is_round_one() {
    let (r, t) = router(3, RoutingPolicy::Hash);
    let o = other(&t);
    let key = key_owned_by(&t, o);
    let mut v = view(&t);
    v.replicas = ReplicaTable::build([(key, 3)]);
    v.nodes[o].backends[0].waiting = 100.0;
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!((target(&d), d.reason), (Some(o), Reason::Owner));
    t.peers[o].health.observe(true, 0.95);
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!(d.reason, Reason::Fallback);
    assert!(
        r.decide(&t, &v, &RouteRequest::default(), &Sent::default())
            .is_local()
    );
}

#[test]
fn least_load_ignores_residency() {
    let (r, t) = router(3, RoutingPolicy::LeastLoad);
    let o = other(&t);
    let key = key_owned_by(&t, t.me);
    let mut v = view(&t);
    v.nodes[t.me].backends[0].gpu = Arc::from([key]);
    v.nodes[t.me].backends[0].running = 8.0;
    v.nodes[t.me].backends[0].waiting = 2.0;
    for i in 0..3 {
        if i != t.me && i != o {
            v.nodes[i].backends[0].running = 8.0;
            v.nodes[i].backends[0].waiting = 9.0;
        }
    }
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!((target(&d), d.reason), (Some(o), Reason::Load));
}

#[test]
fn health_survives_rebuilds() {
    let (r, t) = router(3, RoutingPolicy::Auto);
    let o = other(&t);
    t.peers[o].health.observe(true, 0.5);
    let addr = t.peers[o].addr.clone();
    let peers: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}:9090")).collect();
    r.rebuild(&Members::build(&peers, &r.me), HashMap::new());
    let t2 = r.topology();
    assert_eq!(t2.generation, t.generation + 1);
    let p = t2.peers.iter().find(|p| p.addr == addr).unwrap();
    assert_eq!(p.health.load(), 0.5);
}

#[test]
fn a_base_model_request_samples_a_few_nodes_and_avoids_a_long_queue() {
    // 16 nodes: more than SAMPLED + 1, so each decision compares this node with SAMPLED drawn
    // at random instead of reading all. This node and `long` have a queue; the rest are idle.
    let (r, t) = router(16, RoutingPolicy::Auto);
    let long = other(&t);
    let mut v = view(&t);
    for i in [t.me, long] {
        v.nodes[i].backends[0].running = 8.0;
        v.nodes[i].backends[0].waiting = 40.0;
    }
    let sent = Sent::default();
    let mut chosen = vec![0u32; 16];
    for _ in 0..2000 {
        let d = r.decide(&t, &v, &RouteRequest::default(), &sent);
        assert_eq!(d.reason, Reason::Spread);
        let to = target(&d).expect("this node has a queue: the request leaves");
        chosen[to] += 1;
    }
    assert_eq!(
        chosen[long], 0,
        "the node with a long queue got work: {chosen:?}"
    );
    // Idle nodes tie; the draws spread the requests over them (reading every node sent every
    // tie to the same one).
    let used = chosen.iter().filter(|&&c| c > 0).count();
    assert_eq!(used, 14, "{chosen:?}");
    assert!(chosen.iter().all(|&c| c < 400), "{chosen:?}");
    // With every other node down but one, the draws may miss it: then every node is read.
    let idle = (0..16).find(|&i| i != t.me && i != long).unwrap();
    for i in (0..16).filter(|&i| i != t.me && i != idle) {
        t.peers[i].health.mark_down();
    }
    for _ in 0..200 {
        let d = r.decide(&t, &v, &RouteRequest::default(), &sent);
        assert_eq!(target(&d), Some(idle));
    }
}

/// `v` with node `i`'s one backend replaced by backends serving `models` (pool names), each
/// idle and known.
fn with_backends(v: &mut View, i: usize, models: &[&str]) {
    let template = v.nodes[i].backends[0].clone();
    v.nodes[i].backends = models
        .iter()
        .map(|m| BackendState {
            models: Arc::from([pool_hash(m)]),
            ..template.clone()
        })
        .collect();
}

#[test]
fn only_backends_serving_the_pool_are_candidates() {
    let (r, t) = router(3, RoutingPolicy::LeastLoad);
    let mut v = view(&t);
    with_backends(&mut v, t.me, &["m1", "m1"]);
    let o = other(&t);
    with_backends(&mut v, o, &["m1", "m2"]);
    let third = (0..3).find(|&i| i != t.me && i != o).unwrap();
    with_backends(&mut v, third, &["m1"]);
    let sent = Sent::default();
    // M2: only the other node's second backend serves it; this node has none.
    let m2 = RouteRequest {
        pool: pool_hash("m2"),
        ..RouteRequest::default()
    };
    for _ in 0..20 {
        let d = r.decide(&t, &v, &m2, &sent);
        assert_eq!(target(&d), Some(o));
        assert_eq!(d.backend, None, "no backend here serves m2");
    }
    assert_eq!(r.local_backend(&v, &m2), None);
    // M1: this node's own backends (no hop), taking turns.
    let m1 = RouteRequest {
        pool: pool_hash("m1"),
        ..RouteRequest::default()
    };
    let mut used = [0; 2];
    for _ in 0..20 {
        let d = r.decide(&t, &v, &m1, &sent);
        assert!(d.is_local());
        let b = d.backend.expect("m1 is served here");
        sent.add_local(&v, t.me, usize::from(b));
        used[usize::from(b)] += 1;
    }
    assert_eq!(used, [10, 10], "equal backends take turns");
    // A busy backend is passed over.
    v.nodes[t.me].backends[0].running = 8.0;
    v.nodes[t.me].backends[0].waiting = 6.0;
    assert_eq!(r.local_backend(&v, &m1), Some(1));
    // Down: not a candidate; every backend of the pool down: the node is not usable.
    v.nodes[o].backends[1].healthy = false;
    let d = r.decide(&t, &v, &m2, &sent);
    assert!(d.is_local() && d.backend.is_none(), "{d:?}");
    // Pool 0 (unknown): every backend is a candidate, as before pools.
    assert!(r.local_backend(&v, &RouteRequest::default()).is_some());
}

#[test]
fn an_adapter_in_a_backends_gpu_slot_picks_that_backend() {
    let (r, t) = router(1, RoutingPolicy::Auto);
    let mut v = view(&t);
    with_backends(&mut v, t.me, &["m1", "m1", "m1"]);
    let key = xxh3_64(b"acme/x");
    v.nodes[t.me].backends[2].gpu = Arc::from([key]);
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert!(d.is_local());
    assert_eq!(d.backend, Some(2));
    // A peer's node is scored by its best backend: a slot on its second backend counts.
    let (r, t) = router(3, RoutingPolicy::Auto);
    let o = other(&t);
    let key = key_owned_by(&t, o);
    let mut v = view(&t);
    v.replicas = ReplicaTable::build([(key, 3)]);
    for i in 0..3 {
        with_backends(&mut v, i, &["m1", "m1"]);
    }
    let second = (0..3).find(|&i| i != t.me && i != o).unwrap();
    v.nodes[second].backends[1].gpu = Arc::from([key]);
    v.nodes[o].backends[0].running = 8.0;
    v.nodes[o].backends[0].waiting = 6.0;
    v.nodes[o].backends[1].running = 8.0;
    v.nodes[o].backends[1].waiting = 6.0;
    let d = r.decide(&t, &v, &req(key), &Sent::default());
    assert_eq!(target(&d), Some(second), "{d:?}");
    assert_eq!(d.reason, Reason::Residency);
}

/// Pools at the node level: an adapter's key goes to the first nodes of its order that serve
/// its pool, under every policy, however far down the order a small pool's nodes are; without
/// a pool, exactly the owner as before.
#[test]
fn a_keys_order_is_over_the_nodes_of_its_pool() {
    for policy in [
        RoutingPolicy::Auto,
        RoutingPolicy::Hash,
        RoutingPolicy::LeastLoad,
    ] {
        let (r, t) = router(64, policy);
        let mut v = view(&t);
        // m2 on two nodes (not this one), m1 everywhere else.
        let small: Vec<usize> = (0..64).filter(|&i| i != t.me).step_by(29).take(2).collect();
        for i in 0..64 {
            with_backends(
                &mut v,
                i,
                if small.contains(&i) { &["m2"] } else { &["m1"] },
            );
        }
        let sent = Sent::default();
        let m2 = pool_hash("m2");
        for k in 0..300 {
            let key = xxh3_64(format!("acme/m2-lora-{k}").as_bytes());
            let d = r.decide(
                &t,
                &v,
                &RouteRequest {
                    pool: m2,
                    ..req(key)
                },
                &sent,
            );
            let to = target(&d).expect("this node does not serve m2");
            assert!(small.contains(&to), "{policy:?}: {to} does not serve m2");
            assert!(d.peers.iter().all(|i| small.contains(&i)), "{d:?}");
            // The first of the pool in the key's order (its pool owner); under `least-load`,
            // where every node is as idle, ties stay with it too.
            let mut out = [0u16; 1];
            t.placement.top_where(key, &mut out, |i| small.contains(&i));
            assert_eq!(to, usize::from(out[0]), "{policy:?}");
            if policy == RoutingPolicy::LeastLoad {
                assert_eq!(d.reason, Reason::Owner, "{d:?}");
            }
        }
        // Pool 0: the owner of the whole order, as before pools (`least-load` ignores keys).
        let who = (0..64).find(|i| *i != t.me && !small.contains(i)).unwrap();
        let d = r.decide(&t, &v, &req(key_owned_by(&t, who)), &sent);
        if policy != RoutingPolicy::LeastLoad {
            assert_eq!(target(&d), Some(who), "{policy:?}");
        }
    }
}

#[test]
fn a_base_model_only_a_peer_serves_goes_there_under_auto() {
    let (r, t) = router(3, RoutingPolicy::Auto);
    let mut v = view(&t);
    for i in 0..3 {
        with_backends(&mut v, i, &["m1"]);
    }
    let o = other(&t);
    with_backends(&mut v, o, &["m1", "m2"]);
    assert!(v.serves(pool_hash("m2")) && !v.serves(pool_hash("m3")));
    let m2 = RouteRequest {
        pool: pool_hash("m2"),
        ..RouteRequest::default()
    };
    for _ in 0..10 {
        let d = r.decide(&t, &v, &m2, &Sent::default());
        assert_eq!(target(&d), Some(o), "{d:?}");
    }
}
