//! Kubernetes discovery against a stand-in API server: an in-process axum server on
//! 127.0.0.1:0 that serves EndpointSlice lists and a watch stream (JSON lines of
//! ADDED/MODIFIED/DELETED/BOOKMARK/ERROR events), and a real kube `Client` pointed at it
//! (plain HTTP, no auth). The discovered peer set must follow the events.

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
use tokio::sync::{broadcast, watch};

const SERVICE: &str = "loraplex-headless";
const NS: &str = "inference";

/// The stand-in API server's state.
#[derive(Default)]
struct Api {
    /// The objects each successive LIST answers; the last one repeats.
    lists: Mutex<VecDeque<Vec<Value>>>,
    /// Current objects, kept in step with the events sent.
    current: Mutex<Vec<Value>>,
    resource_version: AtomicUsize,
    /// LIST requests to fail with 500 first.
    failing_lists: AtomicUsize,
    /// WATCH requests to answer with a 410 Gone event first.
    gone_watches: AtomicUsize,
    list_calls: AtomicUsize,
    watch_calls: AtomicUsize,
    selectors: Mutex<Vec<String>>,
    events: Option<broadcast::Sender<String>>,
    /// Open watch streams (the test waits for one before sending events).
    watching: Option<watch::Sender<usize>>,
}

impl Api {
    fn new(first_list: Vec<Value>) -> Api {
        Api {
            lists: Mutex::new(VecDeque::from([first_list.clone()])),
            current: Mutex::new(first_list),
            resource_version: AtomicUsize::new(100),
            events: Some(broadcast::channel(64).0),
            watching: Some(watch::channel(0).0),
            ..Api::default()
        }
    }

    fn next_rv(&self) -> String {
        (self.resource_version.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }

    /// Apply an event to the current objects and send it to the open watches.
    fn send(&self, kind: &str, mut obj: Value) {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv);
        if kind != "BOOKMARK" {
            let mut cur = self.current.lock().unwrap();
            cur.retain(|o| o["metadata"]["name"] != obj["metadata"]["name"]);
            if kind != "DELETED" {
                cur.push(obj.clone());
            }
            *self.lists.lock().unwrap() = VecDeque::from([cur.clone()]);
        }
        let line = json!({ "type": kind, "object": obj }).to_string() + "\n";
        self.events.as_ref().unwrap().send(line).unwrap();
    }

    async fn until_watching(&self) {
        let mut rx = self.watching.as_ref().unwrap().subscribe();
        let open = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|n| *n > 0)).await;
        assert!(open.is_ok(), "no watch was opened");
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
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
            let body = status(500, "InternalError").to_string();
            return (StatusCode::INTERNAL_SERVER_ERROR, body).into_response();
        }
        let items = {
            let mut lists = api.lists.lock().unwrap();
            if lists.len() > 1 {
                lists.pop_front().unwrap()
            } else {
                lists[0].clone()
            }
        };
        let rv = api.next_rv();
        let body = json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                          "metadata": {"resourceVersion": rv}, "items": items});
        return ([("content-type", "application/json")], body.to_string()).into_response();
    }
    api.watch_calls.fetch_add(1, Ordering::SeqCst);
    if take_one(&api.gone_watches) {
        let line = json!({"type": "ERROR", "object": status(410, "Expired")}).to_string() + "\n";
        return ([("content-type", "application/json")], line).into_response();
    }
    let rx = api.events.as_ref().unwrap().subscribe();
    api.watching.as_ref().unwrap().send_modify(|n| *n += 1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(line) => Some((Ok::<_, std::io::Error>(Bytes::from(line)), rx)),
            Err(_) => None,
        }
    });
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
    let addr = serve(api.clone()).await;
    let shutdown = Shutdown::new();
    let d = Discovery::start_k8s(
        client(addr),
        SERVICE,
        NS,
        &me(),
        &Control::current(),
        shutdown.clone(),
    )
    .unwrap();
    assert_eq!(d.mode(), "k8s");
    let mut rx = d.subscribe();

    // Our own endpoint is in the slice: listed once, as the slice spells it.
    until(
        &mut rx,
        &["127.0.0.1:9090", "198.51.100.1:9090", "198.51.100.2:9090"],
    )
    .await;
    assert_eq!(d.current().me(), "127.0.0.1:9090");
    api.until_watching().await;

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
    let addr = serve(api.clone()).await;
    let shutdown = Shutdown::new();
    let d = Discovery::start_k8s(
        client(addr),
        SERVICE,
        "",
        &me(),
        &Control::current(),
        shutdown.clone(),
    )
    .unwrap();
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
