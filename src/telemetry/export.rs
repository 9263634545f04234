//! Finished spans to the collector, off the data plane.
//!
//! [`Queue`] is the tracer's span processor. A span that ends on any thread (a worker, the
//! control plane) goes into a bounded queue with a `try_send`, never waiting: when the queue is
//! full the span is dropped and counted (`loraplex_trace_spans_dropped_total{reason=
//! "queue_full"}`). One task on the control plane takes the spans out in batches (every
//! [`Limits::interval`], or as soon as a batch is waiting) and hands them to the OTLP/HTTP
//! exporter, one export at a time, each bounded by [`Limits::timeout`]. A failed export drops
//! its batch (`reason="export_failed"`) without retrying: a slow or dead collector costs one
//! bounded attempt per batch and never more memory than the queue.
//!
//! The SDK's `BatchSpanProcessor` is not used: its drop count is private, and it runs the
//! exporter on a thread of its own under a plain futures executor, where the async reqwest
//! client (already in the tree, and needing tokio) cannot run.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicIsize, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::Duration,
};

use opentelemetry::Context;
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, oneshot};

use crate::{
    control::Control,
    metrics::{Metrics, SPANS_EXPORT_FAILED, SPANS_QUEUE_FULL},
};

/// One export's time limit (the HTTP client's too).
pub(super) const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sizes and times of the queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Spans waiting at most (about 1 KiB each: a few MiB).
    pub queue: usize,
    /// Spans per export.
    pub batch: usize,
    /// Longest a span waits when fewer than a batch are queued.
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue: 4096,
            batch: 512,
            interval: Duration::from_secs(1),
            timeout: EXPORT_TIMEOUT,
        }
    }
}

/// The span processor: the sending side of the queue.
pub(super) struct Queue {
    tx: SyncSender<SpanData>,
    /// Spans in the queue (about: the task subtracts what it took after taking it).
    queued: Arc<AtomicIsize>,
    wake: Arc<Notify>,
    batch: usize,
    queue_full: Counter,
    /// Tells the task to export what is left and stop; it answers on the receiver.
    stop: Mutex<Option<(oneshot::Sender<()>, Receiver<()>)>>,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Start the export task on the control plane.
    pub(super) fn start<E: SpanExporter + 'static>(
        mut exporter: E,
        resource: &Resource,
        limits: Limits,
        metrics: &Metrics,
        control: &Control,
    ) -> Queue {
        exporter.set_resource(resource);
        let (tx, rx) = mpsc::sync_channel(limits.queue);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let queued = Arc::new(AtomicIsize::new(0));
        let wake = Arc::new(Notify::new());
        let task = Task {
            exporter,
            rx,
            queued: queued.clone(),
            wake: wake.clone(),
            limits,
            exported: metrics.trace_spans_exported.clone(),
            failed: metrics
                .trace_spans_dropped
                .get_or_create(&SPANS_EXPORT_FAILED)
                .clone(),
        };
        control.spawn(async move {
            task.run(stop_rx).await;
            let _ = done_tx.send(());
        });
        Queue {
            tx,
            queued,
            wake,
            batch: limits.batch,
            queue_full: metrics
                .trace_spans_dropped
                .get_or_create(&SPANS_QUEUE_FULL)
                .clone(),
            stop: Mutex::new(Some((stop_tx, done_rx))),
        }
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _: &mut Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.tx.try_send(span) {
            Ok(()) => {
                let queued = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
                if queued >= self.batch as isize {
                    self.wake.notify_one();
                }
            }
            Err(TrySendError::Full(_)) => {
                self.queue_full.inc();
            }
            // Stopped (shutdown): nothing more goes out.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.wake.notify_one();
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((stop, done)) = stop else {
            return Ok(());
        };
        let _ = stop.send(());
        match done.recv_timeout(timeout) {
            // Done, or the control plane is gone (with the task): nothing to wait for.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
        }
    }
}

/// The receiving side, a control-plane task.
struct Task<E> {
    exporter: E,
    rx: Receiver<SpanData>,
    queued: Arc<AtomicIsize>,
    wake: Arc<Notify>,
    limits: Limits,
    exported: Counter,
    failed: Counter,
}

impl<E: SpanExporter> Task<E> {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        let mut failing = false;
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(self.limits.interval) => false,
                _ = self.wake.notified() => false,
                // Told to stop, or the processor is gone.
                _ = &mut stop => true,
            };
            loop {
                let batch: Vec<SpanData> = self.rx.try_iter().take(self.limits.batch).collect();
                let n = batch.len();
                if n == 0 {
                    break;
                }
                self.queued.fetch_sub(n as isize, Ordering::Relaxed);
                let sent = tokio::time::timeout(self.limits.timeout, self.exporter.export(batch));
                match sent.await {
                    Ok(Ok(())) => {
                        self.exported.inc_by(n as u64);
                        if failing {
                            tracing::info!("tracing: the collector takes spans again");
                            failing = false;
                        }
                    }
                    outcome => {
                        self.failed.inc_by(n as u64);
                        if !failing {
                            let why = match outcome {
                                Ok(Err(e)) => e.to_string(),
                                _ => format!("no answer within {:?}", self.limits.timeout),
                            };
                            tracing::warn!(error = %why, spans = n, "tracing: export failed, spans dropped");
                            failing = true;
                        }
                    }
                }
                if n < self.limits.batch {
                    break;
                }
            }
            if stopping {
                let _ = self.exporter.shutdown();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;
    use crate::control::ControlPlane;

    /// An exporter that counts what it gets, and answers as told.
    #[derive(Debug, Clone, Default)]
    struct Fake {
        spans: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
        /// Every export fails.
        fail: bool,
        /// Every export hangs (a collector that accepts and never answers).
        hang: bool,
    }

    impl SpanExporter for Fake {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang {
                std::future::pending::<()>().await;
            }
            if self.fail {
                return Err(OTelSdkError::InternalFailure("refused".into()));
            }
            self.spans.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    fn provider(
        fake: &Fake,
        limits: Limits,
        metrics: &Metrics,
        cp: &ControlPlane,
    ) -> SdkTracerProvider {
        let queue = Queue::start(
            fake.clone(),
            &Resource::builder_empty().build(),
            limits,
            metrics,
            &cp.control(),
        );
        SdkTracerProvider::builder()
            .with_span_processor(queue)
            .build()
    }

    fn end_spans(p: &SdkTracerProvider, n: usize) {
        let tracer = p.tracer("t");
        for _ in 0..n {
            tracer.start("s").end();
        }
    }

    fn dropped(m: &Metrics, reason: &crate::metrics::ReasonLabel) -> u64 {
        m.trace_spans_dropped.get_or_create(reason).get()
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn spans_go_out_in_batches_and_a_full_batch_does_not_wait_for_the_timer() {
        let cp = ControlPlane::start(1).unwrap();
        let m = Metrics::new();
        let fake = Fake::default();
        let limits = Limits {
            queue: 64,
            batch: 8,
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
        };
        let p = provider(&fake, limits, &m, &cp);
        // Each full batch goes at once, without the (hour-long) timer.
        end_spans(&p, 8);
        wait_until("one batch", || m.trace_spans_exported.get() == 8);
        end_spans(&p, 8);
        wait_until("two batches", || m.trace_spans_exported.get() == 16);
        // Fewer than a batch wait for the timer.
        end_spans(&p, 4);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(fake.spans.load(Ordering::SeqCst), 16);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        // Shutdown sends the rest.
        p.shutdown().unwrap();
        assert_eq!(fake.spans.load(Ordering::SeqCst), 20);
        assert_eq!(m.trace_spans_exported.get(), 20);
        assert_eq!(
            dropped(&m, &SPANS_QUEUE_FULL) + dropped(&m, &SPANS_EXPORT_FAILED),
            0
        );
    }

    #[test]
    fn a_hung_collector_fills_the_queue_and_the_rest_is_dropped_and_counted() {
        let cp = ControlPlane::start(1).unwrap();
        let m = Metrics::new();
        let fake = Fake {
            hang: true,
            ..Fake::default()
        };
        let limits = Limits {
            queue: 16,
            batch: 4,
            // Only a full batch wakes the task: it takes exactly the first 4.
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(3600),
        };
        let p = provider(&fake, limits, &m, &cp);
        end_spans(&p, 4);
        // The task took one batch and hangs on it: 16 more fit, the rest is dropped at once.
        wait_until("the hung export", || fake.calls.load(Ordering::SeqCst) == 1);
        let started = std::time::Instant::now();
        end_spans(&p, 100);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "ending a span never waits"
        );
        assert_eq!(dropped(&m, &SPANS_QUEUE_FULL), 100 - 16);
        // Shutdown gives up after its timeout instead of waiting for the collector.
        let started = std::time::Instant::now();
        let e = p
            .shutdown_with_timeout(Duration::from_millis(100))
            .unwrap_err();
        assert!(format!("{e:?}").contains("Timeout"), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn failed_exports_drop_their_batch_and_count_it() {
        let cp = ControlPlane::start(1).unwrap();
        let m = Metrics::new();
        let fake = Fake {
            fail: true,
            ..Fake::default()
        };
        let limits = Limits {
            queue: 64,
            batch: 8,
            interval: Duration::from_millis(10),
            timeout: Duration::from_secs(5),
        };
        let p = provider(&fake, limits, &m, &cp);
        end_spans(&p, 10);
        wait_until("both batches tried", || {
            dropped(&m, &SPANS_EXPORT_FAILED) == 10
        });
        assert_eq!(m.trace_spans_exported.get(), 0);
        assert_eq!(dropped(&m, &SPANS_QUEUE_FULL), 0);
        p.shutdown().unwrap();
    }
}
