//! The load side of `scripts/bench-routing.sh`: the stand-in vLLMs (engine model: batch, LoRA
//! slots, load stalls), a stand-in HTTP origin with the adapters, and an open-loop load
//! generator replaying one seeded trace against loraplex nodes, entering them in turn as a plain
//! load balancer would. Writes one JSON result file.
//!
//! Workload: `--adapters` adapters with Zipf popularity (`--zipf`), plus one flash-crowd adapter
//! taking `--flash-share` of the traffic from `--flash-start` for `--flash-secs`; Poisson
//! arrivals at `--rate` requests/s for `--secs`; each request streams `1 + Exp(--tokens - 1)`
//! tokens. Time to first byte (TTFB) is to the first SSE event.
//!
//! Protocol with the script: prints `ready` once the stand-ins listen, then waits until every
//! node in `--nodes` answers and sees its peers, runs the trace, reads the nodes' and the
//! stand-ins' counters, writes `--out`, exits.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Parser;
use loraplex::testkit::{
    adapters::AdapterSpec,
    origin::{OriginConfig, OriginStandIn},
    vllm::{VllmConfig, VllmStandIn},
    vllm_engine::EngineConfig,
};
use serde_json::{Value, json};

const BASE: &str = "bench-base";

#[derive(Parser, Clone)]
struct Args {
    /// Ports of the stand-in vLLMs, one per node (127.0.0.1).
    #[arg(long, value_delimiter = ',')]
    vllm_ports: Vec<u16>,
    /// Each node's storage directory (its vLLM's resolver directory), in node order.
    #[arg(long, value_delimiter = ',')]
    stores: Vec<PathBuf>,
    #[arg(long)]
    origin_port: u16,
    /// The loraplex nodes (host:port), entered in turn.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Whether the nodes form one cluster (false: each alone, the plain load balancer).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    clustered: bool,
    #[arg(long, default_value = "run")]
    label: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value_t = 90.0)]
    secs: f64,
    #[arg(long, default_value_t = 1000)]
    adapters: usize,
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    #[arg(long, default_value_t = 30.0)]
    flash_start: f64,
    #[arg(long, default_value_t = 30.0)]
    flash_secs: f64,
    #[arg(long, default_value_t = 0.5)]
    flash_share: f64,
    /// Mean output tokens per request.
    #[arg(long, default_value_t = 15.0)]
    tokens: f64,
    #[arg(long, default_value_t = 32)]
    max_running: usize,
    #[arg(long, default_value_t = 16)]
    max_loras: usize,
    #[arg(long, default_value_t = 150)]
    slot_load_ms: u64,
    #[arg(long, default_value_t = 200)]
    prefill_ms: u64,
    #[arg(long, default_value_t = 200)]
    per_token_ms: u64,
    /// A request without its first byte after this long counts as failed, at this TTFB.
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    /// Adapter weights size in bytes.
    #[arg(long, default_value_t = 16384)]
    adapter_bytes: u64,
    /// A file the script writes the loraplex nodes' process ids into (comma-separated) once
    /// they run: their CPU time is reported.
    #[arg(long)]
    pids_file: Option<PathBuf>,
}

/// SplitMix64: a small seeded generator, so the trace is the same for every policy.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

struct Request {
    at: f64,
    adapter: String,
    tokens: u64,
    node: usize,
}

fn adapter_name(i: usize) -> String {
    format!("bench/lora-{i:04}")
}

const FLASH: &str = "bench/flash-lora";

/// The seeded trace.
fn trace(a: &Args) -> Vec<Request> {
    let mut rng = Rng(a.seed);
    // Popularity rank -> adapter index, shuffled so hot adapters land on any node.
    let mut perm: Vec<usize> = (0..a.adapters).collect();
    for i in (1..perm.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    let weights: Vec<f64> = (1..=a.adapters).map(|r| (r as f64).powf(-a.zipf)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let (mut t, mut out) = (0.0, Vec::new());
    loop {
        t += -rng.unit().ln() / a.rate;
        if t >= a.secs {
            break;
        }
        let flash = t >= a.flash_start && t < a.flash_start + a.flash_secs;
        let adapter = if flash && rng.unit() < a.flash_share {
            FLASH.to_owned()
        } else {
            let u = rng.unit();
            let rank = cdf.partition_point(|&c| c < u).min(a.adapters - 1);
            adapter_name(perm[rank])
        };
        let extra = (-rng.unit().ln() * (a.tokens - 1.0).max(0.0)).round() as u64;
        let node = out.len() % a.nodes.len();
        out.push(Request {
            at: t,
            adapter,
            tokens: 1 + extra,
            node,
        });
    }
    out
}

#[derive(Clone, Copy)]
struct Outcome {
    at: f64,
    ttfb: Option<f64>,
}

/// Send one request; its TTFB in seconds, `None` when it failed. The rest of the stream is
/// read in the background (the request keeps its place in the batch until its last token).
async fn send(client: &reqwest::Client, node: &str, r: &Request) -> Option<f64> {
    let body = json!({
        "model": r.adapter,
        "prompt": "route me",
        "max_tokens": r.tokens,
        "stream": true,
    });
    let started = Instant::now();
    let mut resp = client
        .post(format!("http://{node}/v1/completions"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        eprintln!("{}: HTTP {}", r.adapter, resp.status());
        return None;
    }
    let first = resp.chunk().await.ok()??;
    let ttfb = started.elapsed().as_secs_f64();
    drop(first);
    tokio::spawn(async move { while let Ok(Some(_)) = resp.chunk().await {} });
    Some(ttfb)
}

/// Busy share of the machine's CPUs between two reads of /proc/stat.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (v.iter().sum(), idle)
}

/// CPU seconds used by a process so far.
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |s| s.1);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sum of a metric family's samples in a Prometheus text, per label value of `by`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            rest.starts_with('{') || rest.starts_with(' ')
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with(&format!("{name}{{"))) {
        let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let key = l
            .split(&format!("{label}=\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_owned();
        *out.entry(key).or_default() += v;
    }
    out
}

async fn wait_ready(client: &reqwest::Client, nodes: &[String], clustered: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in nodes {
        loop {
            let ok = async {
                let peers: Value = client
                    .get(format!("http://{n}/admin/peers"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let list = peers["peers"].as_array()?;
                let want = if clustered { nodes.len() } else { 1 };
                let all = list.len() == want
                    && list.iter().all(|p| {
                        p["self"] == true
                            || (p["healthy"] == true && p["checks_ok"].as_u64() > Some(0))
                    });
                let ready = client
                    .get(format!("http://{n}/readyz"))
                    .send()
                    .await
                    .ok()?
                    .status()
                    .is_success();
                Some(all && ready)
            }
            .await
            .unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "node {n} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A few state polls, so every node has seen every vLLM's metrics.
    tokio::time::sleep(Duration::from_secs(3)).await;
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    assert_eq!(a.vllm_ports.len(), a.stores.len());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let engine = EngineConfig {
        max_running: a.max_running,
        max_loras: a.max_loras,
        slot_load: Duration::from_millis(a.slot_load_ms),
        prefill: Duration::from_millis(a.prefill_ms),
        per_token: Duration::from_millis(a.per_token_ms),
    };
    let _guard = rt.enter();
    let vllms: Vec<VllmStandIn> = a
        .vllm_ports
        .iter()
        .zip(&a.stores)
        .map(|(&port, store)| {
            std::fs::create_dir_all(store).unwrap();
            let cfg = VllmConfig::new(BASE)
                .lora_dir(store)
                .bind(SocketAddr::from(([127, 0, 0, 1], port)))
                .engine(engine.clone());
            VllmStandIn::start_on(rt.handle(), cfg).unwrap()
        })
        .collect();
    let origin = OriginStandIn::start_on(
        rt.handle(),
        OriginConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], a.origin_port)),
            ..OriginConfig::default()
        },
    )?;
    let requests = trace(&a);
    let mut names: HashSet<String> = requests.iter().map(|r| r.adapter.clone()).collect();
    names.insert(FLASH.to_owned());
    for (i, name) in names.iter().enumerate() {
        origin.put_adapter(name, &AdapterSpec::new(BASE, a.adapter_bytes, i as u64));
    }
    println!("ready {}", origin.base_url());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()?;
    let timeout = Duration::from_secs_f64(a.timeout_secs);
    rt.block_on(wait_ready(&client, &a.nodes, a.clustered));
    eprintln!(
        "{}: {} requests over {} s, {} adapters",
        a.label,
        requests.len(),
        a.secs,
        names.len()
    );

    // CPU sampling, once a second, while the trace runs.
    let busy: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (busy, stop) = (busy.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = cpu_times();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let now = cpu_times();
                let (dt, di) = (now.0 - last.0, now.1 - last.1);
                if dt > 0 {
                    busy.lock()
                        .unwrap()
                        .push(100.0 * (dt - di) as f64 / dt as f64);
                }
                last = now;
            }
        })
    };
    let pids: Vec<u32> = a
        .pids_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().split(',').filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default();
    let cpu_before: Vec<f64> = pids.iter().map(|&p| process_cpu(p)).collect();
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(requests.len());
        for r in requests {
            let (client, node, outcomes) =
                (client.clone(), a.nodes[r.node].clone(), outcomes.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until((start + Duration::from_secs_f64(r.at)).into()).await;
                let ttfb = tokio::time::timeout(timeout, send(&client, &node, &r))
                    .await
                    .ok()
                    .flatten();
                outcomes.lock().unwrap().push(Outcome { at: r.at, ttfb });
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let wall = start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    let cpu_used: f64 = pids
        .iter()
        .zip(&cpu_before)
        .map(|(&p, b)| process_cpu(p) - b)
        .sum();

    // Counters of the nodes and the stand-ins.
    let (mut forwards, mut stored, mut fetches) = (0.0, 0.0, 0.0);
    let mut capacity = Vec::new();
    let mut reasons: BTreeMap<String, f64> = BTreeMap::new();
    rt.block_on(async {
        for n in &a.nodes {
            let text = client
                .get(format!("http://{n}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            forwards += metric_sum(&text, "loraplex_peer_forwards_total");
            fetches += metric_sum(&text, "loraplex_fetches_total");
            // What each node learnt its vLLM completes while requests wait (0 for a vLLM
            // that never queued): the capacity the offered rate is set against.
            capacity.push(metric_sum(
                &text,
                "loraplex_vllm_capacity_requests_per_second",
            ));
            for (k, v) in metric_by_label(&text, "loraplex_route_decisions_total", "reason") {
                *reasons.entry(k).or_default() += v;
            }
            let stats: Value = client
                .get(format!("http://{n}/admin/cache/stats"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            stored += stats["items"].as_f64().unwrap_or(0.0);
        }
    });
    let slot_loads: u64 = vllms.iter().map(|v| v.engine().slot_loads()).sum();
    let mut outs = outcomes.lock().unwrap().clone();
    outs.sort_by(|x, y| x.at.total_cmp(&y.at));
    let total = outs.len();
    // Failed requests count at the timeout: a policy cannot improve its p99 by failing.
    let ok = outs.iter().filter(|o| o.ttfb.is_some()).count();
    let mut ttfbs: Vec<f64> = outs
        .iter()
        .map(|o| o.ttfb.unwrap_or(a.timeout_secs))
        .collect();
    ttfbs.sort_by(f64::total_cmp);
    // Per-second p50/p99 for the plot.
    let mut timeline = Vec::new();
    for s in 0..a.secs.ceil() as usize {
        let mut w: Vec<f64> = outs
            .iter()
            .filter(|o| o.at >= s as f64 && o.at < (s + 1) as f64)
            .map(|o| o.ttfb.unwrap_or(a.timeout_secs))
            .collect();
        w.sort_by(f64::total_cmp);
        timeline.push(
            json!({"t": s, "n": w.len(), "p50": percentile(&w, 0.5), "p99": percentile(&w, 0.99)}),
        );
    }
    let busy = busy.lock().unwrap().clone();
    let distinct = names.len() as f64;
    let result = json!({
        "label": a.label,
        "requests": total,
        "ok": ok,
        "errors": total - ok,
        "wall_secs": wall,
        "throughput": ok as f64 / wall,
        "ttfb_p50_ms": 1000.0 * percentile(&ttfbs, 0.5),
        "ttfb_p90_ms": 1000.0 * percentile(&ttfbs, 0.9),
        "ttfb_p99_ms": 1000.0 * percentile(&ttfbs, 0.99),
        "ttfb_max_ms": 1000.0 * ttfbs.last().copied().unwrap_or(f64::NAN),
        "slot_loads": slot_loads,
        "slot_loads_per_1k": 1000.0 * slot_loads as f64 / total.max(1) as f64,
        "adapters_requested": distinct,
        "disk_copies": stored,
        "copies_per_adapter": stored / distinct,
        "fetches": fetches,
        "forwards": forwards,
        "learnt_capacity_rps": capacity,
        "forwards_per_request": forwards / total.max(1) as f64,
        "reasons": reasons,
        "cpu_busy_avg_pct": busy.iter().sum::<f64>() / busy.len().max(1) as f64,
        "cpu_busy_max_pct": busy.iter().copied().fold(0.0, f64::max),
        "cpu_saturated_secs": busy.iter().filter(|&&b| b >= 95.0).count(),
        "loraplex_cpu_ms_per_request": 1000.0 * cpu_used / total.max(1) as f64,
        "timeline": timeline,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&result)?)?;
    eprintln!(
        "{}: p50 {:.0} ms, p99 {:.0} ms, {:.1} req/s, {} errors, slot loads/1k {:.0}, copies/adapter {:.2}, forwards/req {:.2}, CPU avg {:.0}%",
        a.label,
        result["ttfb_p50_ms"].as_f64().unwrap_or(0.0),
        result["ttfb_p99_ms"].as_f64().unwrap_or(0.0),
        result["throughput"].as_f64().unwrap_or(0.0),
        total - ok,
        result["slot_loads_per_1k"].as_f64().unwrap_or(0.0),
        result["copies_per_adapter"].as_f64().unwrap_or(0.0),
        result["forwards_per_request"].as_f64().unwrap_or(0.0),
        result["cpu_busy_avg_pct"].as_f64().unwrap_or(0.0),
    );
    drop(origin);
    drop(vllms);
    Ok(())
}
