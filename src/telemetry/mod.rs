//! OpenTelemetry tracing: spans over OTLP/HTTP, off unless `tracing.otlp_endpoint` is set.
//!
//! A [`Tracer`] is either off or an SDK tracer whose finished spans go through a bounded queue
//! to the OTLP exporter on the control plane (`export.rs`), never blocking the thread that ends
//! them. Spans are values ([`Span`]) handed along the request path, never a thread-local
//! "current" context: monoio tasks interleave on one thread. With tracing off a [`Span`] is
//! empty and every call on it is one branch: no allocation, no lock.
//!
//! Propagation is W3C trace context. A request's `traceparent` (with its `tracestate`) is the
//! parent of its span ([`Tracer::server_span`]); what loraplex sends on names its own client
//! span instead ([`Span::traceparent`]). Sampling is parent-based: a request with a parent
//! follows the parent's decision, a new trace is kept with probability `tracing.sample_ratio`
//! (by trace id, so every node decides alike).

mod export;

use std::{borrow::Cow, fmt, io::Write, sync::Arc, time::Duration};

use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator},
    trace::{Span as _, SpanContext, Status, TraceContextExt, Tracer as _, TracerProvider as _},
};
pub use opentelemetry::{KeyValue, Value, trace::SpanKind};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
};

use crate::{config::TracingConfig, control::Control, error::Error, metrics::Metrics};

/// The W3C header naming a span's parent.
pub const TRACEPARENT: &str = "traceparent";

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_AT_SHUTDOWN: Duration = Duration::from_secs(5);

/// The process's tracer; cheap to clone. [`Tracer::default`] is off.
#[derive(Clone, Default)]
pub struct Tracer(Option<Arc<On>>);

struct On {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_on() {
            "Tracer(on)"
        } else {
            "Tracer(off)"
        })
    }
}

impl Tracer {
    /// Tracing as configured: off without an endpoint. `instance` names this node
    /// (`service.instance.id`, its address as peers know it).
    pub fn start(
        cfg: &TracingConfig,
        instance: &str,
        metrics: &Metrics,
        control: &Control,
    ) -> Result<Tracer, Error> {
        let Some(endpoint) = &cfg.otlp_endpoint else {
            return Ok(Tracer::default());
        };
        // `OTEL_RESOURCE_ATTRIBUTES` is honoured (the detectors of `builder`); the service name
        // is the config's.
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", instance.to_owned()),
            ])
            .build();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.as_str())
            .with_timeout(export::EXPORT_TIMEOUT)
            .build()
            .map_err(|e| Error::internal(format!("tracing.otlp_endpoint {endpoint}: {e}")))?;
        let queue = export::Queue::start(
            exporter,
            &resource,
            export::Limits::default(),
            metrics,
            control,
        );
        let ratio = Sampler::TraceIdRatioBased(cfg.sample_ratio);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .with_sampler(Sampler::ParentBased(Box::new(ratio)))
            .with_resource(resource)
            .build();
        tracing::info!(endpoint = %endpoint, sample_ratio = cfg.sample_ratio, "tracing on");
        Ok(Tracer::with_provider(provider))
    }

    fn with_provider(provider: SdkTracerProvider) -> Tracer {
        Tracer(Some(Arc::new(On {
            tracer: provider.tracer("loraplex"),
            provider,
            propagator: TraceContextPropagator::new(),
        })))
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The span of a request that came in: its parent is the trace context of its headers
    /// (`header` looks one up by name), or none (a new trace). `name` and `attributes` are only
    /// built when tracing is on.
    pub fn server_span<'h>(
        &self,
        name: impl FnOnce() -> Cow<'static, str>,
        header: impl Fn(&str) -> Option<&'h str>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Span {
        let Some(on) = &self.0 else {
            return Span::OFF;
        };
        let parent = on
            .propagator
            .extract(&Headers(header, std::marker::PhantomData));
        let span = on
            .tracer
            .span_builder(name())
            .with_kind(SpanKind::Server)
            .with_attributes(attributes())
            .start_with_context(&on.tracer, &parent);
        Span(Some(Box::new(Live {
            span,
            tracer: on.tracer.clone(),
        })))
    }

    /// Export what is queued and stop (at node shutdown; bounded by a few seconds).
    pub fn shutdown(&self) {
        if let Some(on) = &self.0
            && let Err(e) = on.provider.shutdown_with_timeout(FLUSH_AT_SHUTDOWN)
        {
            tracing::warn!(error = %e, "tracing: the last spans may be lost");
        }
    }
}

/// Request headers as the propagator reads them.
struct Headers<'h, F>(F, std::marker::PhantomData<&'h ()>);

impl<'h, F: Fn(&str) -> Option<&'h str>> Extractor for Headers<'h, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }

    fn keys(&self) -> Vec<&str> {
        // Only `get` is used by the W3C propagator.
        Vec::new()
    }
}

/// A span in progress, or nothing (tracing off, or a probe that is not traced). It ends when
/// dropped (or at [`Span::end`]).
#[derive(Default)]
pub struct Span(Option<Box<Live>>);

struct Live {
    span: opentelemetry_sdk::trace::Span,
    /// For children.
    tracer: SdkTracer,
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("Span(off)"),
            Some(l) => write!(f, "Span({:?})", l.span.span_context()),
        }
    }
}

impl Span {
    /// No span.
    pub const OFF: Span = Span(None);

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// A child of this span (nothing when this is nothing).
    pub fn child(&self, name: &'static str, kind: SpanKind) -> Span {
        let Some(live) = &self.0 else {
            return Span::OFF;
        };
        let parent = Context::new().with_remote_span_context(live.span.span_context().clone());
        let span = live
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&live.tracer, &parent);
        Span(Some(Box::new(Live {
            span,
            tracer: live.tracer.clone(),
        })))
    }

    /// Set an attribute whose value is cheap to make (numbers, booleans, `&'static str`).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(live) = &mut self.0 {
            live.span.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Set a string attribute (copied only when tracing is on).
    pub fn set_str(&mut self, key: &'static str, value: &str) {
        if let Some(live) = &mut self.0 {
            live.span
                .set_attribute(KeyValue::new(key, value.to_owned()));
        }
    }

    /// Set an attribute whose value costs something to build.
    pub fn set_with<V: Into<Value>>(&mut self, key: &'static str, value: impl FnOnce() -> V) {
        if let Some(live) = &mut self.0 {
            live.span.set_attribute(KeyValue::new(key, value()));
        }
    }

    /// Mark the span failed, saying why.
    pub fn fail(&mut self, why: impl FnOnce() -> String) {
        if let Some(live) = &mut self.0 {
            live.span.set_status(Status::error(why()));
        }
    }

    /// Something that happened at a point in time, with its attributes.
    pub fn event(&mut self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(live) = &mut self.0 {
            live.span.add_event(name, attributes());
        }
    }

    /// A handle others can link to (another thread may hold it).
    pub fn link(&self) -> SpanLink {
        SpanLink(self.0.as_ref().map(|l| l.span.span_context().clone()))
    }

    /// Link this span to another one (a request that joined a download another request
    /// started links to the download's span).
    pub fn add_link(&mut self, to: &SpanLink) {
        if let (Some(live), Some(cx)) = (&mut self.0, &to.0) {
            live.span.add_link(cx.clone(), Vec::new());
        }
    }

    /// The `traceparent` that makes this span the parent of the next hop's.
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.0
            .as_ref()
            .map(|l| TraceParent::of(l.span.span_context()))
    }

    /// End now (dropping ends too).
    pub fn end(&mut self) {
        if let Some(live) = &mut self.0 {
            live.span.end();
        }
    }
}

/// A span's identity, to link to from elsewhere; empty when the span was nothing.
#[derive(Clone, Default, Debug)]
pub struct SpanLink(Option<SpanContext>);

/// A `traceparent` header value: `00-{trace id}-{span id}-{flags}`.
#[derive(Clone, Copy)]
pub struct TraceParent([u8; 55]);

impl TraceParent {
    fn of(cx: &SpanContext) -> TraceParent {
        let mut buf = [0u8; 55];
        let mut w = &mut buf[..];
        write!(
            w,
            "00-{}-{}-{:02x}",
            cx.trace_id(),
            cx.span_id(),
            cx.trace_flags().to_u8()
        )
        .expect("55 bytes hold a traceparent");
        TraceParent(buf)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a traceparent is ASCII")
    }
}

tokio::task_local! {
    /// The `traceparent` for what a control-plane task sends on (a fetch's peer copies).
    static OUTGOING: TraceParent;
}

/// Run `fut` (on the control plane) with `parent` as the `traceparent` of the requests it
/// makes to peers ([`outgoing`]); nothing when `parent` is `None`.
pub async fn with_parent<F: Future>(parent: Option<TraceParent>, fut: F) -> F::Output {
    match parent {
        Some(tp) => OUTGOING.scope(tp, fut).await,
        None => fut.await,
    }
}

/// The `traceparent` to send from the current control-plane task, if it runs under a span.
pub fn outgoing() -> Option<TraceParent> {
    OUTGOING.try_with(|tp| *tp).ok()
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).unwrap_or("?"))
    }
}

#[cfg(test)]
mod tests;
