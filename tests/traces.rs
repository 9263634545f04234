//! Tracing end to end: two real nodes export their spans over OTLP/HTTP (protobuf) to an
//! in-process collector that decodes what arrives. A client's `traceparent` is the parent of
//! the entry node's span; the forward to the owner, the owner's span, its fetch (origin,
//! verify, publish) and what reaches vLLM are one trace across both nodes; a peer copy
//! continues it on the node that serves the copy. Tracing off passes the client's
//! `traceparent` through untouched; a dead collector costs the requests nothing and its spans
//! are counted as dropped.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, routing::post as route_post};
use common::{
    Driver, Node, Raw, RawResponse,
    cluster::{BASE, Cluster, Spec},
    metric_sum, post, post_json,
};
use loraplex::testkit::{
    adapters::AdapterSpec,
    origin::{OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmStandIn},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value},
};
use prost::Message;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A span as the collector got it.
#[derive(Debug, Clone)]
struct Got {
    /// `service.instance.id` of the node that sent it.
    node: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    kind: i32,
    attrs: HashMap<String, String>,
    /// Status code (2: error).
    status: i32,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

/// An OTLP/HTTP collector on loopback: `POST /v1/traces` with a protobuf body.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    /// Content types of the exports received.
    content_types: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let content_types = Arc::new(Mutex::new(Vec::new()));
        let (s, ct) = (spans.clone(), content_types.clone());
        let app = Router::new().route(
            "/v1/traces",
            route_post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let (s, ct) = (s.clone(), ct.clone());
                async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    ct.lock().unwrap().push(content_type);
                    let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut got = s.lock().unwrap();
                    for rs in req.resource_spans {
                        let res = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
                        let node = res.get("service.instance.id").cloned().unwrap_or_default();
                        assert_eq!(res.get("service.name").map(String::as_str), Some("lp-test"));
                        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                            got.push(Got {
                                node: node.clone(),
                                name: span.name,
                                trace: hex(&span.trace_id),
                                id: hex(&span.span_id),
                                parent: hex(&span.parent_span_id),
                                kind: span.kind,
                                attrs: attrs(&span.attributes),
                                status: span.status.map_or(0, |s| s.code),
                            });
                        }
                    }
                    // An empty ExportTraceServiceResponse.
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector {
            addr,
            spans,
            content_types,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Wait until a span matching `what` has arrived; return it.
    async fn wait_for(&self, desc: &str, what: impl Fn(&Got) -> bool) -> Got {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.spans().into_iter().find(|s| what(s)) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no span {desc} arrived; got: {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// OTLP span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const INTERNAL: i32 = 1;
const STATUS_ERROR: i32 = 2;

/// Two nodes, each with its own stand-in vLLM, `origin` as their http origin, both tracing to
/// `collector`.
async fn pair(driver: Driver, origin: &OriginStandIn, collector: &Collector) -> Cluster {
    let spec = Spec {
        origin: Some(origin),
        extra: format!(
            "tracing:\n  otlp_endpoint: \"{}\"\n  service_name: lp-test\n",
            collector.url()
        ),
        ..Spec::new(2)
    };
    Cluster::start(driver, spec).await
}

async fn chat(addr: SocketAddr, model: &str, extra: &str) -> RawResponse {
    let body = serde_json::json!({"model": model, "messages": []}).to_string();
    post_json(addr, "/v1/chat/completions", &body, extra).await
}

/// The id in a `traceparent` (`00-{trace}-{span}-{flags}`): (trace, span).
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

async fn a_trace_crosses_two_nodes(driver: Driver) {
    let collector = Collector::start().await;
    let origin = OriginStandIn::start(OriginConfig::default()).unwrap();
    let p = pair(driver, &origin, &collector).await;
    let (a, b) = (&p.peers[0], &p.peers[1]);
    let adapter = p.key_owned_by(1, "org/traced");
    origin.put_adapter(&adapter, &AdapterSpec::new(BASE, 60_000, 3));

    // Enter through node 0, which forwards to the owner, node 1, which fetches the adapter.
    let tp = format!("traceparent: 00-{TRACE}-{CLIENT_SPAN}-01\r\ntracestate: vendor=abc\r\n");
    let r = chat(p.node(0).addr, &adapter, &tp).await;
    assert_eq!(r.status, 200, "{r:?}");

    let in_trace = |s: &Got| s.trace == TRACE;
    // Node 0: the request's span, child of the client's.
    let entry = collector
        .wait_for("server on node 0", |s| {
            in_trace(s) && s.node == *a && s.name == "POST /v1/chat/completions"
        })
        .await;
    assert_eq!((entry.parent.as_str(), entry.kind), (CLIENT_SPAN, SERVER));
    assert_eq!(entry.attr("loraplex.adapter"), Some(adapter.as_str()));
    assert_eq!(entry.attr("loraplex.hash_key.kind"), Some("model"));
    assert_eq!(entry.attr("loraplex.route"), Some("forward"));
    assert_eq!(entry.attr("loraplex.route.target"), Some(b.as_str()));
    assert_eq!(entry.attr("loraplex.cache_tier"), Some("forwarded"));
    assert_eq!(entry.attr("http.response.status_code"), Some("200"));
    let forward = collector
        .wait_for("forward on node 0", |s| in_trace(s) && s.name == "forward")
        .await;
    assert_eq!((forward.node.as_str(), forward.kind), (a.as_str(), CLIENT));
    assert_eq!(forward.parent, entry.id);
    assert_eq!(forward.attr("server.address"), Some(b.as_str()));
    assert_eq!(forward.attr("http.response.status_code"), Some("200"));

    // Node 1: the request's span, child of node 0's forward.
    let owner = collector
        .wait_for("server on node 1", |s| {
            in_trace(s) && s.node == *b && s.name == "POST /v1/chat/completions"
        })
        .await;
    assert_eq!(
        (owner.parent.as_str(), owner.kind),
        (forward.id.as_str(), SERVER)
    );
    assert_eq!(owner.attr("loraplex.route"), Some("from_peer"));
    assert_eq!(owner.attr("loraplex.route.target"), Some(b.as_str()));
    assert_eq!(owner.attr("loraplex.cache_tier"), Some("origin"));
    assert_eq!(owner.attr("loraplex.fetch"), Some("led"));
    // Its fetch: the peers first (none has it), then the http origin, verified, published.
    let fetch = collector
        .wait_for("fetch", |s| in_trace(s) && s.name == "fetch")
        .await;
    assert_eq!((fetch.node.as_str(), fetch.kind), (b.as_str(), INTERNAL));
    assert_eq!(fetch.parent, owner.id);
    assert_eq!(fetch.attr("loraplex.adapter"), Some(adapter.as_str()));
    assert_eq!(fetch.attr("loraplex.origin"), Some("http"));
    let stored = origin.adapter_gets(&adapter);
    assert!(stored > 0);
    let bytes: u64 = fetch.attr("loraplex.fetch.bytes").unwrap().parse().unwrap();
    assert!(bytes > 60_000, "{fetch:?}");
    let attempts = |o: &'static str| {
        let fetch_id = fetch.id.clone();
        move |s: &Got| {
            s.name == "fetch.origin" && s.parent == fetch_id && s.attr("loraplex.origin") == Some(o)
        }
    };
    let from_peer = collector.wait_for("peer attempt", attempts("peer")).await;
    assert_eq!(from_peer.attr("loraplex.fetch.result"), Some("error"));
    assert_eq!(from_peer.attr("error.type"), Some("not_found"));
    let from_http = collector.wait_for("http attempt", attempts("http")).await;
    assert_eq!(from_http.attr("loraplex.fetch.result"), Some("ok"));
    assert_ne!(from_http.status, STATUS_ERROR);
    let verify = collector
        .wait_for("verify", |s| in_trace(s) && s.name == "verify")
        .await;
    assert_eq!(verify.parent, from_http.id);
    let publish = collector
        .wait_for("publish", |s| in_trace(s) && s.name == "publish")
        .await;
    assert_eq!(publish.parent, from_http.id);

    // vLLM on node 1 got a traceparent naming node 1's `vllm` span, in the client's trace.
    let to_vllm = collector
        .wait_for("vllm", |s| in_trace(s) && s.name == "vllm")
        .await;
    assert_eq!(
        (to_vllm.node.as_str(), to_vllm.parent.as_str()),
        (b.as_str(), owner.id.as_str())
    );
    let heads = p.vllms[1].recent_heads();
    let seen = heads
        .iter()
        .filter(|h| h.target == "/v1/chat/completions")
        .map(|h| {
            (
                h.header("traceparent").unwrap().to_owned(),
                h.header("tracestate"),
            )
        })
        .collect::<Vec<_>>();
    let [(seen_tp, seen_state)] = &seen[..] else {
        panic!("one chat request reached vLLM 1: {seen:?}")
    };
    assert_eq!(ids(seen_tp), (TRACE.to_owned(), to_vllm.id.clone()));
    assert_eq!(
        *seen_state,
        Some("vendor=abc"),
        "tracestate passes as it came"
    );
    assert!(
        p.vllms[0]
            .recent_heads()
            .iter()
            .all(|h| h.target != "/v1/chat/completions")
    );

    // A peer copy: a request node 0 serves itself (it comes marked from node 1's address, so it
    // is trusted and not routed) copies the adapter from node 1; node 1's spans for the copy
    // are children of node 0's attempt at the `peer` origin.
    const COPY_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(
        format!("{}:0", b.split(':').next().unwrap())
            .parse()
            .unwrap(),
    )
    .unwrap();
    let mut c = Raw::from_stream(sock.connect(p.node(0).addr).await.unwrap());
    let body = serde_json::json!({"model": adapter, "messages": []}).to_string();
    let extra =
        format!("x-loraplex-forwarded: 1\r\ntraceparent: 00-{COPY_TRACE}-{CLIENT_SPAN}-01\r\n");
    c.send(&post("/v1/chat/completions", &body, &extra)).await;
    assert_eq!(c.response(false).await.status, 200);
    assert_eq!(
        origin.adapter_gets(&adapter),
        stored,
        "copied, not refetched"
    );
    let copied = collector
        .wait_for("the peer attempt on node 0", |s| {
            s.trace == COPY_TRACE
                && s.name == "fetch.origin"
                && s.attr("loraplex.origin") == Some("peer")
        })
        .await;
    assert_eq!(copied.node, *a);
    assert_eq!(copied.attr("loraplex.fetch.result"), Some("ok"));
    let served = collector
        .wait_for("the copy served by node 1", |s| {
            s.trace == COPY_TRACE && s.node == *b && s.kind == SERVER
        })
        .await;
    assert_eq!(served.parent, copied.id);
    assert!(
        served.name.starts_with("GET /_loraplex/adapters/"),
        "{served:?}"
    );
    // Health probes between the nodes are not traced.
    assert!(
        collector
            .spans()
            .iter()
            .all(|s| !s.name.contains("healthz")),
        "{:#?}",
        collector.spans()
    );
    assert!(
        collector
            .content_types
            .lock()
            .unwrap()
            .iter()
            .all(|ct| ct == "application/x-protobuf")
    );
}

/// A node alone, tracing to `endpoint` or not at all.
fn single(driver: Driver, vllm: &VllmStandIn, tracing: &str) -> Node {
    let yaml = format!(
        "vllm_url: \"{}\"\nvllm:\n  model_name: \"{BASE}\"\n{tracing}",
        vllm.url()
    );
    Node::start_on(driver, &yaml)
}

async fn off_passes_the_clients_traceparent_through(driver: Driver) {
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let node = single(driver, &vllm, "");
    node.wait_ready().await;
    let tp = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let r = chat(node.addr, BASE, &format!("TraceParent: {tp}\r\n")).await;
    assert_eq!(r.status, 200);
    let heads = vllm.recent_heads();
    let chat_head = heads
        .iter()
        .find(|h| h.target == "/v1/chat/completions")
        .unwrap();
    assert_eq!(chat_head.header("traceparent"), Some(tp.as_str()));
}

async fn a_dead_collector_costs_requests_nothing(driver: Driver) {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let vllm = VllmStandIn::start(VllmConfig::new(BASE)).unwrap();
    let node = single(
        driver,
        &vllm,
        &format!("tracing:\n  otlp_endpoint: \"{url}\"\n"),
    );
    node.wait_ready().await;
    for _ in 0..5 {
        assert_eq!(chat(node.addr, BASE, "").await.status, 200);
    }
    // The traceparent vLLM got is the node's own span's, in a new trace.
    let heads = vllm.recent_heads();
    let tps: Vec<&str> = heads
        .iter()
        .filter(|h| h.target == "/v1/chat/completions")
        .filter_map(|h| h.header("traceparent"))
        .collect();
    assert_eq!(tps.len(), 5, "{tps:?}");
    // The spans are dropped (after one bounded attempt per batch) and counted.
    let dropped = |text: &str| {
        metric_sum(
            text,
            "loraplex_trace_spans_dropped_total{reason=\"export_failed\"}",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut raw = Raw::connect(node.addr).await;
        raw.send(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let text = String::from_utf8(raw.response(false).await.body).unwrap();
        if dropped(&text) >= 5.0 {
            assert!(
                text.contains("loraplex_trace_spans_exported_total 0"),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no drop counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(node.log_contains("tracing: export failed, spans dropped"));
}

on_both_drivers!(
    a_trace_crosses_two_nodes,
    off_passes_the_clients_traceparent_through,
    a_dead_collector_costs_requests_nothing,
);
