//! Spans, parents and `traceparent`s, against an SDK provider that keeps what ends.

use std::sync::Mutex;

use opentelemetry::trace::{SpanId, TraceId, TraceState};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SpanData, SpanProcessor},
};

use super::*;

/// Keeps every ended span.
#[derive(Debug, Clone, Default)]
struct Keep(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Keep {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

fn tracer(ratio: f64) -> (Tracer, Keep) {
    let keep = Keep::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(keep.clone())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .build();
    (Tracer::with_provider(provider), keep)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn headers(h: &[(&'static str, &'static str)]) -> impl Fn(&str) -> Option<&'static str> {
    let h = h.to_vec();
    move |name| h.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

fn name() -> Cow<'static, str> {
    "POST /v1/chat/completions".into()
}

#[test]
fn off_is_nothing_at_all() {
    let t = Tracer::default();
    assert!(!t.is_on());
    let mut span = t.server_span(
        || unreachable!("no name is built when off"),
        |_| unreachable!("no header is read when off"),
        || unreachable!("no attribute is built when off"),
    );
    assert!(!span.is_on());
    span.set_with("k", || -> String { unreachable!() });
    span.fail(|| unreachable!());
    assert!(span.traceparent().is_none());
    assert!(!span.child("c", SpanKind::Client).is_on());
    t.shutdown();
}

#[test]
fn the_clients_traceparent_is_the_parent_and_children_go_on_under_the_span() {
    let (t, keep) = tracer(1.0);
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let tp: &'static str = Box::leak(tp.into_boxed_str());
    let mut span = t.server_span(
        name,
        headers(&[(TRACEPARENT, tp), ("tracestate", "vendor=abc,other=1")]),
        || vec![KeyValue::new("url.path", "/v1/chat/completions")],
    );
    span.set("http.response.status_code", 200i64);
    let mut up = span.child("vllm", SpanKind::Client);
    let sent = up.traceparent().unwrap();
    up.end();
    span.end();

    let spans = keep.0.lock().unwrap().clone();
    let [vllm, server] = &spans[..] else {
        panic!("{spans:#?}")
    };
    assert_eq!(
        server.span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    assert_eq!(server.parent_span_id, SpanId::from_hex(PARENT).unwrap());
    assert!(server.parent_span_is_remote);
    assert_eq!(server.span_kind, SpanKind::Server);
    assert_eq!(server.name, "POST /v1/chat/completions");
    assert_eq!(
        server.span_context.trace_state(),
        &TraceState::from_key_value([("vendor", "abc"), ("other", "1")]).unwrap()
    );
    assert_eq!(vllm.parent_span_id, server.span_context.span_id());
    assert_eq!(vllm.span_context.trace_id(), server.span_context.trace_id());
    // What the next hop gets names the child span, in the same trace, sampled.
    let want = format!("00-{TRACE}-{}-01", vllm.span_context.span_id());
    assert_eq!(std::str::from_utf8(sent.as_bytes()).unwrap(), want);
    assert!(
        server
            .attributes
            .contains(&KeyValue::new("http.response.status_code", 200i64))
    );
}

#[test]
fn a_bad_traceparent_starts_a_new_trace() {
    let (t, keep) = tracer(1.0);
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "zz",
        "",
    ] {
        let bad: &'static str = Box::leak(bad.to_owned().into_boxed_str());
        drop(t.server_span(name, headers(&[(TRACEPARENT, bad)]), Vec::new));
    }
    let spans = keep.0.lock().unwrap().clone();
    assert_eq!(spans.len(), 4);
    for s in &spans {
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert!(s.span_context.is_valid());
        assert_ne!(s.span_context.trace_id(), TraceId::from_hex(TRACE).unwrap());
    }
}

#[test]
fn sampling_follows_the_parent_and_the_ratio_decides_new_traces() {
    let (t, keep) = tracer(0.0);
    // No parent, ratio 0: not recorded, but the next hop still learns the trace (not sampled).
    let span = t.server_span(name, headers(&[]), Vec::new);
    let child = span.child("vllm", SpanKind::Client);
    let tp = child.traceparent().unwrap();
    assert!(tp.as_bytes().ends_with(b"-00"), "{tp:?}");
    drop((child, span));
    assert!(keep.0.lock().unwrap().is_empty());
    // A sampled parent is followed whatever the ratio.
    let sampled: &'static str = Box::leak(format!("00-{TRACE}-{PARENT}-01").into_boxed_str());
    drop(t.server_span(name, headers(&[(TRACEPARENT, sampled)]), Vec::new));
    assert_eq!(keep.0.lock().unwrap().len(), 1);

    let (t, keep) = tracer(1.0);
    // And an unsampled parent too.
    let unsampled: &'static str = Box::leak(format!("00-{TRACE}-{PARENT}-00").into_boxed_str());
    drop(t.server_span(name, headers(&[(TRACEPARENT, unsampled)]), Vec::new));
    assert!(keep.0.lock().unwrap().is_empty());
}

#[test]
fn links_point_at_another_span() {
    let (t, keep) = tracer(1.0);
    let fetch = t.server_span(name, headers(&[]), Vec::new);
    let mut joined = t.server_span(name, headers(&[]), Vec::new);
    joined.add_link(&fetch.link());
    joined.add_link(&Span::OFF.link());
    let want = fetch.link().0.unwrap();
    drop((joined, fetch));
    let spans = keep.0.lock().unwrap().clone();
    let links = &spans[0].links.links;
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].span_context, want);
}
