//! The scrape of each local vLLM's `/metrics` every `vllm.metrics_interval`: each sample goes
//! to the cluster state (what routing reads, one sample per backend), to its backend's
//! `loraplex_vllm_backend_*` gauges and to the node-wide `loraplex_vllm_*` gauges (the sums
//! over the backends; KV-cache use: the highest).
//!
//! Learnt on the way: the capacity (requests per second vLLM completes while requests wait,
//! an exponential moving average of `vllm:request_success_total`'s rate over intervals that
//! start and end with a queue) and the batch (the largest running batch seen with a queue). A
//! new `process_start_time_seconds` means vLLM restarted: the batch is learnt again and the
//! restart is announced (preloaded adapters are loaded again). A vLLM that exports no `vllm:`
//! metric (an old one, or a scrape failing) gives an unknown sample: peers route to this node
//! by hash.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use xxhash_rust::xxh3::xxh3_64;

use super::{Vllm, metrics::VllmMetrics};
use crate::{
    cluster::state::{ClusterState, LocalSample},
    control::Control,
    metrics::ResultLabel,
    shutdown::Shutdown,
};

/// Weight of the newest interval in the capacity.
const CAPACITY_ALPHA: f64 = 0.3;

/// What the scrape learns over time.
#[derive(Debug, Default)]
pub struct Learner {
    last: Option<(Instant, f64, f64)>,
    capacity: f64,
    batch: f64,
    started: Option<f64>,
}

impl Learner {
    /// Take one sample read at `now`; returns whether vLLM restarted since the last one.
    pub fn observe(&mut self, now: Instant, m: &VllmMetrics) -> bool {
        let restarted = matches!((self.started, m.started), (Some(a), Some(b)) if a != b);
        if m.started.is_some() {
            self.started = m.started;
        }
        if restarted {
            self.last = None;
            self.batch = 0.0;
        }
        if let Some((at, done, waited)) = self.last {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 && m.success_total >= done && waited > 0.0 && m.waiting > 0.0 {
                let rate = (m.success_total - done) / secs;
                self.capacity = if self.capacity == 0.0 {
                    rate
                } else {
                    CAPACITY_ALPHA * rate + (1.0 - CAPACITY_ALPHA) * self.capacity
                };
            }
        }
        if m.waiting > 0.0 {
            self.batch = self.batch.max(m.running);
        }
        self.last = Some((now, m.success_total, m.waiting));
        restarted
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    pub fn batch(&self) -> f64 {
        self.batch
    }
}

impl Vllm {
    /// `GET /metrics`.
    async fn read_metrics(&self) -> Result<VllmMetrics, String> {
        let text = self
            .client
            .get(format!("{}/metrics", self.url))
            .timeout(scrape_timeout(self.metrics_interval))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        VllmMetrics::parse(&text).map_err(|e| format!("/metrics: {e}"))
    }

    /// Scrape now and every `vllm.metrics_interval` until shutdown.
    pub(super) fn spawn_metrics_scrape(
        self: &Arc<Self>,
        all: Arc<[Arc<Vllm>]>,
        cluster: Arc<ClusterState>,
        control: &Control,
        shutdown: Shutdown,
    ) {
        let this = self.clone();
        control.spawn(async move {
            let mut tick = tokio::time::interval(this.metrics_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut learner = Learner::default();
            let mut warned = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait() => return,
                }
                let read = this.read_metrics().await;
                let sample = this.sample(&mut learner, read, &mut warned);
                *this.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(sample.clone());
                this.publish_gauges(&sample, &all);
                cluster.set_local(sample);
            }
        });
    }

    fn sample(
        &self,
        learner: &mut Learner,
        read: Result<VllmMetrics, String>,
        warned: &mut bool,
    ) -> LocalSample {
        // Until the first health check is back, vLLM answering its metrics counts as healthy.
        let healthy = if self.checked.load(std::sync::atomic::Ordering::Relaxed) {
            self.is_healthy()
        } else {
            read.is_ok()
        };
        let result = match &read {
            Ok(m) if m.is_vllm => "ok",
            Ok(_) => "no_metrics",
            Err(_) => "error",
        };
        self.metrics
            .vllm_scrapes
            .get_or_create(&ResultLabel { result })
            .inc();
        let m = match read {
            Ok(m) if m.is_vllm => {
                *warned = false;
                m
            }
            other => {
                if !*warned && healthy {
                    let why = other.err().unwrap_or_else(|| "no vllm: metrics".into());
                    tracing::warn!(url = %self.url, error = %why, "cannot read vLLM's metrics: peers route to this node by hash");
                    *warned = true;
                }
                return LocalSample {
                    backend: self.id,
                    models: self.model_names(),
                    healthy,
                    max_lora: self.fallback_max_loras,
                    ..LocalSample::default()
                };
            }
        };
        if learner.observe(Instant::now(), &m) {
            tracing::info!(url = %self.url, "vLLM restarted (new process_start_time_seconds)");
            self.announce_restart();
        }
        let max_lora = m.max_lora.map_or(self.fallback_max_loras, |n| {
            n.min(u32::from(u16::MAX)) as u16
        });
        LocalSample {
            backend: self.id,
            models: self.model_names(),
            healthy,
            known: true,
            running: m.running as f32,
            waiting: m.waiting as f32,
            kv: m.kv.unwrap_or(0.0) as f32,
            max_lora,
            running_adapters: m.adapters.iter().map(|a| xxh3_64(a.as_bytes())).collect(),
            batch: learner.batch() as f32,
            capacity: learner.capacity() as f32,
            started: m.started.unwrap_or(0.0),
        }
    }

    fn publish_gauges(&self, s: &LocalSample, all: &[Arc<Vllm>]) {
        let m = &self.metrics;
        let label = self.label();
        m.backend_requests_running
            .get_or_create(&label)
            .set(f64::from(s.running));
        m.backend_requests_waiting
            .get_or_create(&label)
            .set(f64::from(s.waiting));
        m.backend_kv_cache_usage
            .get_or_create(&label)
            .set(f64::from(s.kv));
        let (mut running, mut waiting, mut kv, mut slots, mut capacity) =
            (0.0, 0.0, 0.0f32, 0, 0.0);
        for b in all {
            let last = b.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = last.as_ref() {
                running += f64::from(s.running);
                waiting += f64::from(s.waiting);
                kv = kv.max(s.kv);
                slots += i64::from(s.max_lora);
                capacity += f64::from(s.capacity);
            }
        }
        m.vllm_requests_running.set(running);
        m.vllm_requests_waiting.set(waiting);
        m.vllm_kv_cache_usage.set(f64::from(kv));
        m.vllm_lora_slots.set(slots);
        m.vllm_capacity.set(capacity);
    }
}

/// The interval a scrape's answer must come back within (a slow answer is a failed sample).
pub fn scrape_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_millis(500), Duration::from_secs(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(running: f64, waiting: f64, done: f64, started: f64) -> VllmMetrics {
        VllmMetrics {
            is_vllm: true,
            running,
            waiting,
            success_total: done,
            started: Some(started),
            ..VllmMetrics::default()
        }
    }

    #[test]
    fn capacity_is_learnt_while_requests_wait_and_batch_is_the_largest_full_one() {
        let mut l = Learner::default();
        let t0 = Instant::now();
        let s = |i: u64| t0 + Duration::from_secs(i);
        assert!(!l.observe(s(0), &m(2.0, 0.0, 0.0, 1.0)));
        // Not saturated: the completion rate is not the capacity.
        l.observe(s(1), &m(3.0, 0.0, 5.0, 1.0));
        assert_eq!((l.capacity(), l.batch()), (0.0, 0.0));
        l.observe(s(2), &m(8.0, 3.0, 10.0, 1.0));
        l.observe(s(3), &m(8.0, 4.0, 26.0, 1.0));
        assert_eq!((l.capacity(), l.batch()), (16.0, 8.0));
        l.observe(s(4), &m(8.0, 2.0, 36.0, 1.0));
        assert!((l.capacity() - (0.3 * 10.0 + 0.7 * 16.0)).abs() < 1e-9);
        // A restart: announced; the batch is learnt again, the counter starts over.
        assert!(l.observe(s(5), &m(0.0, 0.0, 0.0, 2.0)));
        assert_eq!(l.batch(), 0.0);
        assert!(l.capacity() > 0.0);
    }
}
