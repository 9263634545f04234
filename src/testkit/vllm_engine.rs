//! The engine model of the stand-in vLLM: continuous batching, LoRA slots and the queue, with
//! the numbers vLLM exports about them.
//!
//! What it models (vLLM 0.32's V1 scheduler, simplified to what routing sees):
//! - At most [`EngineConfig::max_running`] requests run at once (`--max-num-seqs`); the others
//!   wait in arrival order.
//! - At most [`EngineConfig::max_loras`] distinct adapters in the running batch (`--max-loras`),
//!   held in as many GPU slots, least recently used first out. A waiting request whose adapter
//!   would need a slot while every slot serves a running request is skipped, and later ones are
//!   tried (as vLLM's scheduler does).
//! - An adapter entering a slot costs [`EngineConfig::slot_load`], during which the whole engine
//!   stalls: the new request starts after it, and every running request finishes that much later.
//! - A request's first token comes [`EngineConfig::prefill`] after it starts, its last one
//!   `max_tokens × per_token` later.
//!
//! The default ([`EngineConfig::unbounded`]) runs everything at once at no cost, so the
//! stand-in answers as fast as it always did; benchmarks and routing tests set real numbers.
//!
//! Exported ([`Engine::metrics_text`]) in vLLM's exact format: `vllm:num_requests_running`,
//! `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (running over `max_running`),
//! `vllm:request_success_total`, `vllm:lora_requests_info` (every label set seen stays exported,
//! valued with the time it was last current; as vLLM 0.32 does, both adapter labels carry the
//! running adapters) and `process_start_time_seconds`. Unlike vLLM, which keeps every label set
//! forever, the newest [`MAX_LORA_INFO_SERIES`] are kept.

use std::{
    collections::{HashMap, VecDeque},
    fmt::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::oneshot;

use super::server::lock;

/// `vllm:lora_requests_info` label sets kept (vLLM keeps all of them).
pub const MAX_LORA_INFO_SERIES: usize = 256;

/// The engine's limits and costs.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Requests in the running batch at most (`--max-num-seqs`).
    pub max_running: usize,
    /// Distinct adapters in the running batch, and GPU slots (`--max-loras`).
    pub max_loras: usize,
    /// Engine stall when an adapter enters a slot.
    pub slot_load: Duration,
    /// Start to first token.
    pub prefill: Duration,
    /// First token to last, per output token.
    pub per_token: Duration,
}

impl EngineConfig {
    /// No limits, no costs: every request runs at once and answers at once.
    pub fn unbounded() -> EngineConfig {
        EngineConfig {
            max_running: 1 << 20,
            max_loras: 1 << 10,
            slot_load: Duration::ZERO,
            prefill: Duration::ZERO,
            per_token: Duration::ZERO,
        }
    }
}

/// When an admitted request runs.
struct Admission {
    start: Instant,
}

struct Waiter {
    adapter: Option<String>,
    tx: oneshot::Sender<Admission>,
}

#[derive(Default)]
struct Inner {
    running: usize,
    /// Running requests per adapter, in first-admission order.
    running_adapters: Vec<(String, usize)>,
    waiting: VecDeque<Waiter>,
    /// Adapters in GPU slots, most recently used first.
    slots: VecDeque<String>,
    stall_until: Option<Instant>,
    /// Stall time so far (a request finishes later by what accrued while it ran).
    stalled: Duration,
    slot_loads: u64,
    loads_by_adapter: HashMap<String, u64>,
    finished: u64,
    /// `(running label, seconds since the epoch it was last current)`, oldest first.
    lora_info: VecDeque<(String, f64)>,
    started_at: f64,
}

/// The engine of one stand-in vLLM.
pub struct Engine {
    config: EngineConfig,
    inner: Mutex<Inner>,
}

/// A running request; dropping it frees its place in the batch.
pub struct Ticket {
    engine: Arc<Engine>,
    adapter: Option<String>,
    start: Instant,
    stalled_at_start: Duration,
    done: bool,
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Engine {
    pub fn new(config: EngineConfig) -> Arc<Engine> {
        Arc::new(Engine {
            config,
            inner: Mutex::new(Inner {
                started_at: epoch_secs(),
                ..Inner::default()
            }),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queue a request for `adapter` (`None`: the base model) and wait for its turn.
    pub async fn admit(self: &Arc<Self>, adapter: Option<&str>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = lock(&self.inner);
            inner.waiting.push_back(Waiter {
                adapter: adapter.map(str::to_owned),
                tx,
            });
            self.schedule(&mut inner);
        }
        // The sender is only dropped after sending, or with the engine (never while we wait).
        let admission = rx.await.unwrap_or(Admission {
            start: Instant::now(),
        });
        let stalled_at_start = lock(&self.inner).stalled;
        Ticket {
            engine: self.clone(),
            adapter: adapter.map(str::to_owned),
            start: admission.start,
            stalled_at_start,
            done: false,
        }
    }

    /// Admit waiting requests while the batch and the slots allow.
    fn schedule(&self, inner: &mut Inner) {
        let mut skipped = VecDeque::new();
        while inner.running < self.config.max_running {
            let Some(waiter) = inner.waiting.pop_front() else {
                break;
            };
            if waiter.tx.is_closed() {
                continue;
            }
            let now = Instant::now();
            let mut start = inner.stall_until.filter(|t| *t > now).unwrap_or(now);
            if let Some(name) = &waiter.adapter {
                let in_batch = inner.running_adapters.iter().any(|(a, _)| a == name);
                if !in_batch && inner.running_adapters.len() >= self.config.max_loras {
                    skipped.push_back(waiter);
                    continue;
                }
                if let Some(pos) = inner.slots.iter().position(|s| s == name) {
                    let slot = inner.slots.remove(pos).expect("found");
                    inner.slots.push_front(slot);
                } else {
                    // Load into a free slot, or the least recently used one no running request
                    // uses (one exists: fewer distinct adapters run than there are slots).
                    if inner.slots.len() >= self.config.max_loras {
                        let victim = inner
                            .slots
                            .iter()
                            .rposition(|s| !inner.running_adapters.iter().any(|(a, _)| a == s));
                        if let Some(v) = victim {
                            inner.slots.remove(v);
                        }
                    }
                    inner.slots.push_front(name.clone());
                    inner.slot_loads += 1;
                    *inner.loads_by_adapter.entry(name.clone()).or_default() += 1;
                    if !self.config.slot_load.is_zero() {
                        start += self.config.slot_load;
                        inner.stall_until = Some(start);
                        inner.stalled += self.config.slot_load;
                    }
                }
                match inner.running_adapters.iter_mut().find(|(a, _)| a == name) {
                    Some((_, n)) => *n += 1,
                    None => inner.running_adapters.push((name.clone(), 1)),
                }
            }
            inner.running += 1;
            if waiter.tx.send(Admission { start }).is_err() {
                // The request went away between the check and now: undo.
                Self::release(inner, waiter.adapter.as_deref());
            }
        }
        while let Some(w) = skipped.pop_back() {
            inner.waiting.push_front(w);
        }
        self.note_lora_info(inner);
    }

    fn release(inner: &mut Inner, adapter: Option<&str>) {
        inner.running -= 1;
        if let Some(name) = adapter
            && let Some(pos) = inner.running_adapters.iter().position(|(a, _)| a == name)
        {
            inner.running_adapters[pos].1 -= 1;
            if inner.running_adapters[pos].1 == 0 {
                inner.running_adapters.remove(pos);
            }
        }
    }

    fn finish(&self, adapter: Option<&str>) {
        let mut inner = lock(&self.inner);
        Self::release(&mut inner, adapter);
        inner.finished += 1;
        self.schedule(&mut inner);
    }

    /// Record the current `vllm:lora_requests_info` label set as current now.
    fn note_lora_info(&self, inner: &mut Inner) {
        let label = inner
            .running_adapters
            .iter()
            .map(|(a, _)| a.as_str())
            .collect::<Vec<_>>()
            .join(",");
        // Strictly after the last one, so the newest set is always the largest value.
        let last = inner.lora_info.back().map_or(0.0, |l| l.1);
        let now = epoch_secs().max(last + 1e-6);
        if let Some(pos) = inner.lora_info.iter().position(|(l, _)| *l == label) {
            inner.lora_info.remove(pos);
        }
        inner.lora_info.push_back((label, now));
        if inner.lora_info.len() > MAX_LORA_INFO_SERIES {
            inner.lora_info.pop_front();
        }
    }

    /// Slot loads so far (adapters entering a GPU slot).
    pub fn slot_loads(&self) -> u64 {
        lock(&self.inner).slot_loads
    }

    /// Slot loads of one adapter.
    pub fn slot_loads_of(&self, adapter: &str) -> u64 {
        lock(&self.inner)
            .loads_by_adapter
            .get(adapter)
            .copied()
            .unwrap_or(0)
    }

    /// Requests running and waiting now.
    pub fn queue(&self) -> (usize, usize) {
        let inner = lock(&self.inner);
        (inner.running, inner.waiting.len())
    }

    /// Adapters in GPU slots, most recently used first.
    pub fn slots(&self) -> Vec<String> {
        lock(&self.inner).slots.iter().cloned().collect()
    }

    /// Finished requests.
    pub fn finished(&self) -> u64 {
        lock(&self.inner).finished
    }

    /// A restart: slots emptied, counters and label sets of the old process gone, a new start
    /// time. Requests in flight finish as if nothing happened (tests restart an idle engine).
    pub fn restart(&self) {
        let mut inner = lock(&self.inner);
        inner.slots.clear();
        inner.lora_info.clear();
        inner.finished = 0;
        // A new process starts later than the old one, always.
        inner.started_at = epoch_secs().max(inner.started_at + 0.001);
    }

    /// Process start time (seconds since the epoch).
    pub fn started_at(&self) -> f64 {
        lock(&self.inner).started_at
    }

    /// vLLM's `/metrics` lines for this engine (the served model is `model_name`).
    pub fn metrics_text(&self, model_name: &str) -> String {
        let inner = lock(&self.inner);
        let labels = format!("engine=\"0\",model_name=\"{}\"", escape(model_name));
        let kv = inner.running as f64 / self.config.max_running.max(1) as f64;
        let mut out = String::with_capacity(1024 + inner.lora_info.len() * 96);
        let _ = write!(
            out,
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n\
             # TYPE process_start_time_seconds gauge\n\
             process_start_time_seconds {}\n\
             # HELP vllm:num_requests_running Number of requests in model execution batches.\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{{labels}}} {:.1}\n\
             # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{{labels}}} {:.1}\n\
             # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{{{labels}}} {kv:?}\n\
             # HELP vllm:request_success_total Count of successfully processed requests.\n\
             # TYPE vllm:request_success_total counter\n",
            float(inner.started_at),
            inner.running as f64,
            inner.waiting.len() as f64,
        );
        for reason in ["stop", "length", "abort", "error", "repetition"] {
            let n = if reason == "length" {
                inner.finished
            } else {
                0
            };
            let _ = writeln!(
                out,
                "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"{}\"}} {:.1}",
                escape(model_name),
                n as f64
            );
        }
        if !inner.lora_info.is_empty() {
            out.push_str(
                "# HELP vllm:lora_requests_info Running stats on lora requests.\n\
                 # TYPE vllm:lora_requests_info gauge\n",
            );
            for (label, at) in &inner.lora_info {
                let l = escape(label);
                let _ = writeln!(
                    out,
                    "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{l}\",waiting_lora_adapters=\"{l}\"}} {}",
                    self.config.max_loras,
                    float(*at)
                );
            }
        }
        out
    }
}

/// A float as Python's `repr` prints large ones (`1.7961368319e+09`).
fn float(v: f64) -> String {
    let s = format!("{v:e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let exp: i32 = e.parse().unwrap_or(0);
            format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
        }
        None => s,
    }
}

/// A label value in the text format (`\`, `"` and newlines escaped).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Ticket {
    /// Wait for the first token: the start (after any slot load), then the prefill, stretched
    /// by stalls from loads of other adapters meanwhile.
    pub async fn first_token(&self) {
        let prefill = self.engine.config.prefill;
        tokio::time::sleep_until((self.start + prefill).into()).await;
        self.wait_stalls().await;
    }

    /// Generate `tokens` more tokens (after the first), then leave the batch.
    pub async fn finish(mut self, tokens: u64) {
        let decode = self.engine.config.per_token * u32::try_from(tokens).unwrap_or(u32::MAX);
        if !decode.is_zero() {
            tokio::time::sleep(decode).await;
        }
        self.wait_stalls().await;
        self.engine.finish(self.adapter.as_deref());
        self.done = true;
    }

    /// Sleep for the stall time that accrued since this request started, until none is new.
    async fn wait_stalls(&self) {
        let mut owed = Duration::ZERO;
        loop {
            let stalled = lock(&self.engine.inner).stalled;
            let new = stalled.saturating_sub(self.stalled_at_start + owed);
            if new.is_zero() {
                return;
            }
            tokio::time::sleep(new).await;
            owed += new;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.engine.finish(self.adapter.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(max_running: usize, max_loras: usize) -> Arc<Engine> {
        Engine::new(EngineConfig {
            max_running,
            max_loras,
            ..EngineConfig::unbounded()
        })
    }

    /// Let spawned requests run until `n` wait.
    async fn until_waiting(e: &Engine, n: usize) {
        while e.queue().1 != n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn the_batch_is_bounded_and_the_rest_waits() {
        let e = engine(2, 4);
        let a = e.admit(None).await;
        let _b = e.admit(Some("x")).await;
        let e2 = e.clone();
        let third = tokio::spawn(async move { e2.admit(None).await });
        until_waiting(&e, 1).await;
        assert_eq!(e.queue(), (2, 1));
        drop(a);
        let _c = third.await.unwrap();
        assert_eq!(e.queue(), (2, 0));
        assert_eq!(e.finished(), 1);
    }

    #[tokio::test]
    async fn slots_are_lru_and_a_busy_batch_skips_a_new_adapter() {
        let e = engine(8, 2);
        let a = e.admit(Some("a")).await;
        let b = e.admit(Some("b")).await;
        assert_eq!(e.slot_loads(), 2);
        // Two distinct adapters run: a third waits, while more of `a` still gets in.
        let e2 = e.clone();
        let c = tokio::spawn(async move { e2.admit(Some("c")).await });
        until_waiting(&e, 1).await;
        let a2 = e.admit(Some("a")).await;
        assert_eq!(e.queue(), (3, 1));
        drop(b);
        let c = c.await.unwrap();
        assert_eq!(e.slots(), ["c", "a"], "b was least recently used");
        assert_eq!(e.slot_loads(), 3);
        drop((a, a2, c));
        // `a` is still in a slot: no load.
        let _a3 = e.admit(Some("a")).await;
        assert_eq!(e.slot_loads_of("a"), 1);
    }

    #[tokio::test]
    async fn a_slot_load_stalls_the_engine() {
        let e = Engine::new(EngineConfig {
            max_running: 8,
            max_loras: 2,
            slot_load: Duration::from_millis(150),
            ..EngineConfig::unbounded()
        });
        let t0 = Instant::now();
        let base = e.admit(None).await;
        let a = e.admit(Some("a")).await;
        a.first_token().await;
        assert!(t0.elapsed() >= Duration::from_millis(150));
        // The base request, admitted before the load, finishes late by the stall.
        let t1 = Instant::now();
        base.finish(0).await;
        assert!(
            t1.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t1.elapsed()
        );
        drop(a);
    }

    #[test]
    fn metrics_are_in_vllm_format() {
        let e = engine(4, 4);
        {
            let mut inner = lock(&e.inner);
            inner.running = 1;
            inner.running_adapters.push(("acme/x".into(), 1));
        }
        e.note_lora_info(&mut lock(&e.inner));
        let text = e.metrics_text("base");
        for line in [
            "# TYPE vllm:num_requests_running gauge",
            "vllm:num_requests_running{engine=\"0\",model_name=\"base\"} 1.0",
            "vllm:num_requests_waiting{engine=\"0\",model_name=\"base\"} 0.0",
            "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"base\"} 0.25",
            "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"acme/x\",waiting_lora_adapters=\"acme/x\"} 1.",
            "process_start_time_seconds 1.",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(float(1.7961368319e9).ends_with("e+09"));
    }

    #[test]
    fn the_stand_in_exports_what_the_parser_reads() {
        use crate::vllm::metrics::VllmMetrics;
        let e = Engine::new(EngineConfig {
            max_loras: 3,
            ..EngineConfig::unbounded()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tickets = rt.block_on(async {
            vec![
                e.admit(Some("acme/a")).await,
                e.admit(Some("acme/b")).await,
                e.admit(None).await,
            ]
        });
        let m = VllmMetrics::parse(&e.metrics_text("base")).unwrap();
        assert_eq!((m.running, m.waiting, m.max_lora), (3.0, 0.0, Some(3)));
        assert_eq!(m.adapters, ["acme/a", "acme/b"]);
        assert_eq!(m.started, Some(e.started_at()));
        drop(tickets);
        let m = VllmMetrics::parse(&e.metrics_text("base")).unwrap();
        assert_eq!((m.running, m.success_total), (0.0, 3.0));
        assert!(
            m.adapters.is_empty(),
            "the newest label set is the empty one"
        );
    }
}
