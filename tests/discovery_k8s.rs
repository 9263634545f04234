//! Kubernetes discovery against a stand-in API server: an in-process axum server on
//! 127.0.0.1:0 that serves EndpointSlice lists and watches (JSON lines of
//! ADDED/MODIFIED/DELETED/BOOKMARK/ERROR events), and a real kube `Client` pointed at it
//! (plain HTTP, no auth). The discovered peer set must follow the events.
//!
//! The stand-in keeps resource versions as the API server does: a LIST answers the current
//! one; a watch from version V replays the events after V and then follows new ones (no V, or
//! "0": synthetic ADDED events for the current objects first); a V older than the compacted
//! history gets the `410 Expired` ERROR event; a watch ends after its `timeoutSeconds` (or
//! sooner, as an API server restarting or a load balancer's idle timeout ends it).

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
};
use loraplex::{
    cluster::{
        discovery::{Discovery, PeerSet},
        identity::Identity,
    },
    control::Control,
    shutdown::Shutdown,
};
use serde_json::{Value, json};
use tokio::{
    sync::{broadcast, watch},
    time::Instant,
};

const SERVICE: &str = "loraplex-headless";
const NS: &str = "inference";

/// Events, in order: the history a watch replays from its resource version.
#[derive(Default)]
struct Log {
    /// `(resource version, event line)`.
    events: Vec<(u64, String)>,
    /// The current resource version (of the last change).
    rv: u64,
    /// Versions up to this one are compacted away: a watch from an older one gets 410.
    compacted: u64,
}

/// What one watch request asked for.
#[derive(Debug, Clone, PartialEq)]
struct WatchAsk {
    resource_version: Option<String>,
    timeout_seconds: Option<u64>,
}

/// The stand-in API server's state.
struct Api {
    /// The objects each successive LIST answers after this one (scripted state jumps that
    /// no watch could follow); the current objects otherwise.
    lists: Mutex<VecDeque<Vec<Value>>>,
    /// Current objects, kept in step with the events sent.
    current: Mutex<Vec<Value>>,
    log: Mutex<Log>,
    /// LIST requests to fail with 500 first.
    failing_lists: AtomicUsize,
    /// WATCH requests to answer with a 410 Gone event first.
    gone_watches: AtomicUsize,
    /// Watches answered 410 because their version was compacted.
    expired_watches: AtomicUsize,
    list_calls: AtomicUsize,
    watch_calls: AtomicUsize,
    watches: Mutex<Vec<WatchAsk>>,
    selectors: Mutex<Vec<String>>,
    events: broadcast::Sender<(u64, String)>,
    /// Watch streams open now.
    watching: watch::Sender<usize>,
    /// Ends every open watch when bumped (an API server restart).
    restarts: watch::Sender<u64>,
    /// New watch requests wait while this is false.
    accepting: watch::Sender<bool>,
    /// Watches last at most this long, whatever their `timeoutSeconds`.
    max_watch: Mutex<Option<Duration>>,
}

impl Api {
    fn new(first_list: Vec<Value>) -> Api {
        Api {
            lists: Mutex::new(VecDeque::new()),
            current: Mutex::new(first_list),
            log: Mutex::new(Log {
                rv: 100,
                ..Log::default()
            }),
            failing_lists: AtomicUsize::new(0),
            gone_watches: AtomicUsize::new(0),
            expired_watches: AtomicUsize::new(0),
            list_calls: AtomicUsize::new(0),
            watch_calls: AtomicUsize::new(0),
            watches: Mutex::new(Vec::new()),
            selectors: Mutex::new(Vec::new()),
            events: broadcast::channel(256).0,
            watching: watch::channel(0).0,
            restarts: watch::channel(0).0,
            accepting: watch::channel(true).0,
            max_watch: Mutex::new(None),
        }
    }

    /// Apply an event to the current objects, log it and send it to the open watches.
    fn send(&self, kind: &str, mut obj: Value) {
        let mut log = self.log.lock().unwrap();
        log.rv += 1;
        let rv = log.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if kind != "BOOKMARK" {
            let mut cur = self.current.lock().unwrap();
            cur.retain(|o| o["metadata"]["name"] != obj["metadata"]["name"]);
            if kind != "DELETED" {
                cur.push(obj.clone());
            }
        }
        let line = json!({ "type": kind, "object": obj }).to_string() + "\n";
        log.events.push((rv, line.clone()));
        // No watch open is fine: the next one replays it from the log.
        let _ = self.events.send((rv, line));
    }

    /// Forget the history up to now (etcd compaction).
    fn compact(&self) {
        let mut log = self.log.lock().unwrap();
        log.compacted = log.rv;
        log.events.clear();
    }

    /// End every open watch, as an API server restart does.
    fn restart(&self) {
        self.restarts.send_modify(|n| *n += 1);
    }

    /// Wait until `n` watches are open.
    async fn until_watches(&self, n: usize) {
        let mut rx = self.watching.subscribe();
        let open = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|o| *o == n))
            .await
            .is_ok();
        assert!(open, "never {n} open watches, {}", *rx.borrow());
    }
}

/// Counts a watch stream as open until it is dropped.
struct Open(watch::Sender<usize>);

impl Open {
    fn new(count: &watch::Sender<usize>) -> Open {
        count.send_modify(|n| *n += 1);
        Open(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn expired(message: &str) -> Response {
    let line =
        json!({"type": "ERROR", "object": status(410, "Expired", message)}).to_string() + "\n";
    ([("content-type", "application/json")], line).into_response()
}

async fn endpointslices(State(api): State<Arc<Api>>, Path(ns): Path<String>, uri: Uri) -> Response {
    let q = query(&uri);
    assert_eq!(ns, NS, "watched the wrong namespace");
    api.selectors
        .lock()
        .unwrap()
        .push(q.get("labelSelector").cloned().unwrap_or_default());
    let is_watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !is_watch {
        api.list_calls.fetch_add(1, Ordering::SeqCst);
        if take_one(&api.failing_lists) {
            let body = status(500, "InternalError", "etcd unavailable").to_string();
            return (StatusCode::INTERNAL_SERVER_ERROR, body).into_response();
        }
        let scripted = api.lists.lock().unwrap().pop_front();
        let mut log = api.log.lock().unwrap();
        if let Some(items) = scripted {
            // A change no watch saw: it happened in a compacted past.
            *api.current.lock().unwrap() = items;
            log.rv += 1;
            log.compacted = log.rv;
            log.events.clear();
        }
        let items = api.current.lock().unwrap().clone();
        let body = json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                          "metadata": {"resourceVersion": log.rv.to_string()}, "items": items});
        return ([("content-type", "application/json")], body.to_string()).into_response();
    }
    watch_slices(api, &q).await
}

/// A watch: the events after the asked version, live ones, until the timeout or a restart.
async fn watch_slices(api: Arc<Api>, q: &HashMap<String, String>) -> Response {
    api.watch_calls.fetch_add(1, Ordering::SeqCst);
    let ask = WatchAsk {
        resource_version: q.get("resourceVersion").cloned(),
        timeout_seconds: q.get("timeoutSeconds").and_then(|t| t.parse().ok()),
    };
    api.watches.lock().unwrap().push(ask.clone());
    let _ = api.accepting.subscribe().wait_for(|open| *open).await;
    if take_one(&api.gone_watches) {
        return expired("too old resource version (armed)");
    }
    // The API server's default for a watch without timeoutSeconds is 30 to 60 minutes.
    let mut lasts = Duration::from_secs(ask.timeout_seconds.unwrap_or(1800));
    if let Some(max) = *api.max_watch.lock().unwrap() {
        lasts = lasts.min(max);
    }
    let deadline = Instant::now() + lasts;
    let (replay, seen, rx) = {
        let log = api.log.lock().unwrap();
        let since = match ask.resource_version.as_deref() {
            None | Some("" | "0") => None,
            Some(v) => Some(v.parse::<u64>().expect("a resourceVersion we gave")),
        };
        let replay: VecDeque<String> = match since {
            Some(v) if v < log.compacted => {
                drop(log);
                api.expired_watches.fetch_add(1, Ordering::SeqCst);
                return expired(&format!("too old resource version: {v}"));
            }
            Some(v) => log
                .events
                .iter()
                .filter(|(rv, _)| *rv > v)
                .map(|(_, l)| l.clone())
                .collect(),
            // "Start at most recent": the current objects as ADDED events first.
            None => api
                .current
                .lock()
                .unwrap()
                .iter()
                .map(|o| json!({"type": "ADDED", "object": o}).to_string() + "\n")
                .collect(),
        };
        // Subscribed under the log's lock: no event falls between the replay and the live.
        (replay, log.rv, api.events.subscribe())
    };
    let restarts = api.restarts.subscribe();
    let open = Open::new(&api.watching);
    let state = (replay, seen, rx, restarts, open);
    let stream = futures_util::stream::unfold(
        state,
        move |(mut replay, seen, mut rx, mut restarts, open)| async move {
            if let Some(line) = replay.pop_front() {
                let next = (replay, seen, rx, restarts, open);
                return Some((Ok::<_, std::io::Error>(Bytes::from(line)), next));
            }
            loop {
                tokio::select! {
                    biased;
                    _ = restarts.changed() => return None,
                    _ = tokio::time::sleep_until(deadline) => return None,
                    event = rx.recv() => match event {
                        Ok((rv, line)) if rv > seen => {
                            let next = (replay, rv, rx, restarts, open);
                            return Some((Ok(Bytes::from(line)), next));
                        }
                        Ok(_) => {}
                        Err(_) => return None,
                    },
                }
            }
        },
    );
    (
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The query parameters of `uri`, percent-decoded.
fn query(uri: &Uri) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let (b, mut out, mut i) = (s.as_bytes(), Vec::new(), 0);
        while i < b.len() {
            match b[i] {
                b'%' if i + 2 < b.len() => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("bad escape"));
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).expect("utf-8 query")
    }
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

async fn serve(api: Arc<Api>) -> SocketAddr {
    let app = Router::new()
        .route(
            "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
            get(endpointslices),
        )
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client(addr: SocketAddr) -> kube::Client {
    let mut cfg = kube::Config::new(format!("http://{addr}").parse().unwrap());
    cfg.default_namespace = NS.into();
    kube::Client::try_from(cfg).unwrap()
}

/// An EndpointSlice of the Service; `eps` are (address, ready).
fn slice(name: &str, eps: &[(&str, Option<bool>)]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, ready)| match ready {
            Some(r) => json!({"addresses": [ip], "conditions": {"ready": r}}),
            None => json!({"addresses": [ip]}),
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9100, "protocol": "TCP"},
                  {"name": "http", "port": 9090, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
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

/// Discovery of the Service's peers in `ns` through the stand-in serving `api`.
async fn discover(api: &Arc<Api>, ns: &str) -> (Discovery, Shutdown) {
    let addr = serve(api.clone()).await;
    let shutdown = Shutdown::new();
    let d = Discovery::start_k8s(
        client(addr),
        SERVICE,
        ns,
        &me(),
        &Control::current(),
        shutdown.clone(),
    )
    .unwrap();
    (d, shutdown)
}

fn me() -> Identity {
    // This "pod" listens on 127.0.0.1:9090; the others are documentation addresses (never
    // contacted: discovery only lists them).
    Identity::new("127.0.0.1:9090".parse().unwrap(), None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_set_follows_endpointslice_events() {
    let api = Arc::new(Api::new(vec![slice(
        "svc-a",
        &[
            ("198.51.100.1", Some(true)),
            ("198.51.100.2", None),
            ("127.0.0.1", Some(true)),
        ],
    )]));
    // Watches end after 1 s here (as on an API server restart): events are sent into watches
    // that have just ended, and re-watches must pick them up from their resource version.
    *api.max_watch.lock().unwrap() = Some(Duration::from_secs(1));
    let (d, shutdown) = discover(&api, NS).await;
    assert_eq!(d.mode(), "k8s");
    let mut rx = d.subscribe();

    // Our own endpoint is in the slice: listed once, as the slice spells it.
    until(
        &mut rx,
        &["127.0.0.1:9090", "198.51.100.1:9090", "198.51.100.2:9090"],
    )
    .await;
    assert_eq!(d.current().me(), "127.0.0.1:9090");
    api.until_watches(1).await;

    // A new pod becomes ready in a second slice.
    api.send("ADDED", slice("svc-b", &[("198.51.100.3", Some(true))]));
    until(
        &mut rx,
        &[
            "127.0.0.1:9090",
            "198.51.100.1:9090",
            "198.51.100.2:9090",
            "198.51.100.3:9090",
        ],
    )
    .await;

    // One pod turns not ready; our own pod too (it stays in the set: we are always a member).
    // Sent after a few watches have come and gone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    api.send(
        "MODIFIED",
        slice(
            "svc-a",
            &[
                ("198.51.100.1", Some(true)),
                ("198.51.100.2", Some(false)),
                ("127.0.0.1", Some(false)),
            ],
        ),
    );
    until(
        &mut rx,
        &["127.0.0.1:9090", "198.51.100.1:9090", "198.51.100.3:9090"],
    )
    .await;

    // A bookmark changes nothing and the stream goes on.
    api.send(
        "BOOKMARK",
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                "metadata": {}}),
    );
    api.send("DELETED", slice("svc-b", &[("198.51.100.3", Some(true))]));
    until(&mut rx, &["127.0.0.1:9090", "198.51.100.1:9090"]).await;

    // Every watch resumed from a resource version (never from scratch: one LIST in all) and
    // carried a timeout.
    let watches = api.watches.lock().unwrap().clone();
    assert!(watches.len() >= 3, "{watches:?}");
    let versions: Vec<u64> = watches
        .iter()
        .map(|w| {
            assert!(w.timeout_seconds.is_some_and(|t| t > 0), "{w:?}");
            w.resource_version
                .as_deref()
                .expect("a resourceVersion")
                .parse()
                .unwrap()
        })
        .collect();
    assert!(versions.windows(2).all(|v| v[0] <= v[1]), "{versions:?}");
    assert_eq!(api.list_calls.load(Ordering::SeqCst), 1);
    assert_eq!(api.expired_watches.load(Ordering::SeqCst), 0);

    let selectors = api.selectors.lock().unwrap().clone();
    assert!(!selectors.is_empty());
    assert!(
        selectors
            .iter()
            .all(|s| s == "kubernetes.io/service-name=loraplex-headless"),
        "{selectors:?}"
    );
    shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_a_failed_list_and_a_gone_watch() {
    // LIST 1 fails (500); LIST 2 answers one pod; WATCH 1 answers 410 Gone, which forces a
    // re-list: LIST 3 answers two pods. Reaching the two-pod set proves the whole path.
    let api = Arc::new(Api::new(vec![]));
    *api.lists.lock().unwrap() = VecDeque::from([
        vec![slice("svc-a", &[("198.51.100.1", Some(true))])],
        vec![slice(
            "svc-a",
            &[("198.51.100.1", Some(true)), ("198.51.100.4", Some(true))],
        )],
    ]);
    api.failing_lists.store(1, Ordering::SeqCst);
    api.gone_watches.store(1, Ordering::SeqCst);
    let (d, shutdown) = discover(&api, "").await;
    // Before the first successful list this node is alone.
    assert_eq!(d.current().peers(), ["127.0.0.1:9090"]);
    let mut rx = d.subscribe();
    until(
        &mut rx,
        &["127.0.0.1:9090", "198.51.100.1:9090", "198.51.100.4:9090"],
    )
    .await;
    assert_eq!(api.list_calls.load(Ordering::SeqCst), 3);
    assert!(api.watch_calls.load(Ordering::SeqCst) >= 1);
    shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_resource_version_forces_a_relist_that_catches_up() {
    let api = Arc::new(Api::new(vec![slice(
        "svc-a",
        &[("198.51.100.1", Some(true))],
    )]));
    let (d, shutdown) = discover(&api, NS).await;
    let mut rx = d.subscribe();
    until(&mut rx, &["127.0.0.1:9090", "198.51.100.1:9090"]).await;
    api.until_watches(1).await;
    // The API server restarts; while it is away a pod is added and the history compacted.
    api.accepting.send_replace(false);
    api.restart();
    api.until_watches(0).await;
    api.send("ADDED", slice("svc-c", &[("198.51.100.7", Some(true))]));
    api.compact();
    api.accepting.send_replace(true);
    // The re-watch from the old version gets 410 Expired; the re-list sees the new pod.
    until(
        &mut rx,
        &["127.0.0.1:9090", "198.51.100.1:9090", "198.51.100.7:9090"],
    )
    .await;
    assert!(api.expired_watches.load(Ordering::SeqCst) >= 1);
    assert_eq!(api.list_calls.load(Ordering::SeqCst), 2);
    shutdown.trigger();
}

/// The stand-in itself: a watch ends after its `timeoutSeconds`, replays only what is newer
/// than its `resourceVersion`, and answers 410 for a compacted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_in_api_server_honours_resource_version_and_timeout_seconds() {
    let api = Arc::new(Api::new(vec![slice("svc-a", &[("198.51.100.1", None)])]));
    let addr = serve(api.clone()).await;
    let url = format!("http://{addr}/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices");
    let http = reqwest::Client::new();
    let list: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    let listed: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    api.send("ADDED", slice("svc-b", &[("198.51.100.2", None)]));
    api.send("ADDED", slice("svc-c", &[("198.51.100.3", None)]));
    let watch = |query: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let started = std::time::Instant::now();
            let body = http
                .get(format!("{url}?watch=true&{query}"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let events: Vec<Value> = body
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (events, started.elapsed())
        }
    };
    let names = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["type"].as_str().unwrap(),
                    e["object"]["metadata"]["name"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    // From the listed version: the two events after it, then the end at the timeout.
    let (events, took) = watch(format!("resourceVersion={listed}&timeoutSeconds=1")).await;
    assert_eq!(names(&events), ["ADDED svc-b", "ADDED svc-c"]);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // From the version of the first event: only the second.
    let first: u64 = events[0]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (events, _) = watch(format!("resourceVersion={first}&timeoutSeconds=1")).await;
    assert_eq!(names(&events), ["ADDED svc-c"]);
    // Without a version: the current objects as ADDED.
    let (events, _) = watch("timeoutSeconds=1".into()).await;
    assert_eq!(
        names(&events),
        ["ADDED svc-a", "ADDED svc-b", "ADDED svc-c"]
    );
    // A compacted version: 410 Expired, at once.
    api.compact();
    let (events, took) = watch(format!("resourceVersion={listed}&timeoutSeconds=30")).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);
    assert!(took < Duration::from_secs(10), "{took:?}");
}
