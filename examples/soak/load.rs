//! `soak load`: an open-loop load at a fixed rate against the nodes, as clients behind a load
//! balancer: each request goes to a node picked at random; a connection refused (nothing was
//! sent) is retried on another node, as a balancer does with a dead backend. Nothing else is
//! retried. Every request is logged as one JSON line when it ends ([`Record`]).
//!
//! `--fill N`: instead, N long streams at once, one per fill adapter (big ones), pinning them
//! all for the length of the streams: the disk budget fills with adapters in use.
//!
//! What "complete" means (the report's "answered"): a response head arrived and its body
//! arrived whole (the whole `Content-Length`, or the chunked body up to its last chunk); a 2xx
//! stream also ends with `data: [DONE]`, a 2xx JSON answer parses. Anything else (connection
//! reset or closed early, a truncated body or stream, the client's timeout) is not complete.

use std::{
    error::Error,
    io::{BufWriter, Write},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{Names, Rng, now_ms};

#[derive(clap::Args)]
pub struct LoadArgs {
    /// The nodes' base URLs, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// JSON lines, one per request.
    #[arg(long)]
    log: PathBuf,
    /// Requests per second (open loop: a slow answer never delays the next request).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// The base model's name.
    #[arg(long)]
    base: String,
    #[arg(long, default_value_t = 8)]
    warm: u64,
    #[arg(long, default_value_t = 300)]
    cold: u64,
    #[arg(long, default_value = "")]
    admin_token: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Written into every record (`load`, `fill-3`, ...).
    #[arg(long, default_value = "load")]
    tag: String,
    /// Fill mode: this many long streams at once, on `soak/fill-0..N`.
    #[arg(long)]
    fill: Option<u64>,
    /// Fill mode: tokens per stream, and the gap between them.
    #[arg(long, default_value_t = 60)]
    fill_tokens: u64,
    #[arg(long, default_value_t = 250)]
    fill_gap_ms: u64,
    /// The client gives up on a request after this many seconds (counted unanswered).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// What a request was for.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Base,
    Warm,
    Cold,
    Sse,
    Changing,
    Warmup,
    Evict,
    /// An adapter no origin has: vLLM's 404 is the right answer.
    Missing,
    Fill,
}

/// One request to make.
struct Plan {
    kind: Kind,
    path: &'static str,
    model: String,
    body: String,
    stream: bool,
    event_gap_ms: Option<u64>,
}

/// One request as it went: the log line.
#[derive(Debug, Serialize)]
pub struct Record {
    pub src: String,
    pub id: u64,
    pub kind: Kind,
    pub model: String,
    /// Index of the node that took the request (the last one tried).
    pub node: usize,
    /// Connection attempts (refused ones included).
    pub tries: u32,
    pub start_ms: u64,
    pub head_ms: Option<u64>,
    pub end_ms: u64,
    /// 0: no response head.
    pub status: u16,
    pub bytes: u64,
    pub complete: bool,
    pub error: Option<String>,
    /// The adapter (`none`: the base model) and weights hash an answer names.
    pub answer_adapter: Option<String>,
    pub weights: Option<String>,
    /// `x-loraplex-fallback` was set.
    pub fallback: bool,
    /// Warm-up: adapters whose result was an error.
    pub warmup_errors: u64,
    /// The start of the body of a non-2xx or incomplete answer, or of a failed warm-up.
    pub detail: Option<String>,
}

/// The mix of the steady load, in percent.
const MIX: [(Kind, u64); 8] = [
    (Kind::Base, 12),
    (Kind::Warm, 25),
    (Kind::Cold, 15),
    (Kind::Sse, 25),
    (Kind::Changing, 10),
    (Kind::Warmup, 6),
    (Kind::Evict, 5),
    (Kind::Missing, 2),
];

fn plan(args: &LoadArgs, rng: &mut Rng, id: u64) -> Plan {
    let mut roll = rng.below(MIX.iter().map(|(_, w)| w).sum());
    let kind = MIX
        .iter()
        .find(|(_, w)| {
            let hit = roll < *w;
            roll = roll.saturating_sub(*w);
            hit
        })
        .map_or(Kind::Base, |(k, _)| *k);
    let warm = Names::warm(rng.below(args.warm));
    let cold = Names::cold(rng.below(args.cold));
    let chat = |model: &str, stream: bool, tokens: u64| {
        json!({"model": model, "stream": stream, "max_tokens": tokens,
            "messages": [{"role": "user", "content": format!("soak request {id}")}]})
        .to_string()
    };
    let inference = |kind, path, model: String, body| Plan {
        kind,
        path,
        model,
        body,
        stream: false,
        event_gap_ms: None,
    };
    match kind {
        Kind::Base => inference(kind, CHAT, args.base.clone(), chat(&args.base, false, 8)),
        Kind::Warm => inference(kind, CHAT, warm.clone(), chat(&warm, false, 8)),
        Kind::Cold => {
            let body = json!({"model": cold, "prompt": format!("soak {id}"), "max_tokens": 8});
            inference(kind, "/v1/completions", cold, body.to_string())
        }
        Kind::Changing => {
            let m = Names::CHANGING.to_owned();
            inference(kind, CHAT, m.clone(), chat(&m, false, 8))
        }
        Kind::Sse => {
            let model = match rng.below(10) {
                0..6 => warm,
                6..8 => cold,
                _ => args.base.clone(),
            };
            Plan {
                body: chat(&model, true, 16),
                stream: true,
                event_gap_ms: Some(20),
                ..inference(kind, CHAT, model, String::new())
            }
        }
        Kind::Warmup => {
            let body = json!({"adapters": [cold]}).to_string();
            inference(kind, "/admin/cache/warmup", cold, body)
        }
        Kind::Evict => {
            let target = if rng.below(2) == 0 { warm } else { cold };
            let body = json!({"adapter": target}).to_string();
            inference(kind, "/admin/cache/evict", target, body)
        }
        Kind::Missing => {
            let m = format!("soak/missing-{}", rng.below(1000));
            inference(kind, CHAT, m.clone(), chat(&m, false, 8))
        }
        Kind::Fill => unreachable!("fill requests are planned by fill_plan"),
    }
}

const CHAT: &str = "/v1/chat/completions";

fn fill_plan(args: &LoadArgs, i: u64) -> Plan {
    let model = Names::fill(i);
    let body = json!({"model": model, "stream": true, "max_tokens": args.fill_tokens,
        "messages": [{"role": "user", "content": "fill"}]});
    Plan {
        kind: Kind::Fill,
        path: CHAT,
        model,
        body: body.to_string(),
        stream: true,
        event_gap_ms: Some(args.fill_gap_ms),
    }
}

struct Ctx {
    client: reqwest::Client,
    nodes: Vec<String>,
    admin_token: String,
    timeout: Duration,
    src: String,
    done: AtomicU64,
    bad: AtomicU64,
}

pub fn run(args: LoadArgs) -> Result<(), Box<dyn Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: LoadArgs) -> Result<(), Box<dyn Error>> {
    // No pooled connections: a connection error then always means "before anything was sent"
    // or "the node went away", never a stale keep-alive connection.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let ctx = Arc::new(Ctx {
        client,
        nodes: args.nodes.clone(),
        admin_token: args.admin_token.clone(),
        timeout: Duration::from_secs(args.timeout),
        src: args.tag.clone(),
        done: AtomicU64::new(0),
        bad: AtomicU64::new(0),
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    let mut out = BufWriter::new(std::fs::File::create(&args.log)?);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        while let Some(rec) = rx.blocking_recv() {
            serde_json::to_writer(&mut out, &rec)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    });
    let mut tasks = JoinSet::new();
    let mut rng = Rng::new(args.seed);
    let mut sent = 0u64;
    if let Some(n) = args.fill {
        for i in 0..n {
            let (ctx, tx, plan) = (ctx.clone(), tx.clone(), fill_plan(&args, i));
            let seed = rng.next_u64();
            tasks.spawn(async move { tx.send(execute(&ctx, i, plan, seed).await) });
        }
        sent = n;
    } else {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let start = Instant::now();
        let end = start + Duration::from_secs(args.duration);
        let mut next_report = start + Duration::from_secs(10);
        while Instant::now() < end {
            tick.tick().await;
            sent += 1;
            let (task_ctx, tx, plan) = (ctx.clone(), tx.clone(), plan(&args, &mut rng, sent));
            let seed = rng.next_u64();
            tasks.spawn(async move { tx.send(execute(&task_ctx, sent, plan, seed).await) });
            while tasks.try_join_next().is_some() {}
            if Instant::now() >= next_report {
                next_report += Duration::from_secs(10);
                progress(&ctx, sent);
            }
        }
    }
    drop(tx);
    while tasks.join_next().await.is_some() {}
    progress(&ctx, sent);
    writer.await??;
    Ok(())
}

fn progress(ctx: &Ctx, sent: u64) {
    let done = ctx.done.load(Ordering::Relaxed);
    println!(
        "{} {}: sent {sent}, done {done}, in flight {}, not 2xx or incomplete {}",
        now_ms(),
        ctx.src,
        sent - done,
        ctx.bad.load(Ordering::Relaxed)
    );
}

/// Make one request, trying the nodes in a random order while they refuse connections.
async fn execute(ctx: &Ctx, id: u64, plan: Plan, seed: u64) -> Record {
    let mut rng = Rng::new(seed);
    let n = ctx.nodes.len();
    let first = rng.below(n as u64) as usize;
    let mut rec = Record {
        src: ctx.src.clone(),
        id,
        kind: plan.kind,
        model: plan.model.clone(),
        node: first,
        tries: 0,
        start_ms: now_ms(),
        head_ms: None,
        end_ms: 0,
        status: 0,
        bytes: 0,
        complete: false,
        error: None,
        answer_adapter: None,
        weights: None,
        fallback: false,
        warmup_errors: 0,
        detail: None,
    };
    // Up to 20 rounds over the nodes, 250 ms apart: a node restarts in a few seconds and only
    // one is down at a time.
    let deadline = Instant::now() + ctx.timeout;
    'rounds: for round in 0..20 {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for k in 0..n {
            rec.node = (first + k) % n;
            rec.tries += 1;
            rec.error = None;
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, attempt(ctx, &plan, &mut rec)).await {
                Ok(Err(e)) if e.is_connect() => continue,
                Ok(Err(e)) => rec.error = Some(chain(&e)),
                Ok(Ok(())) => {}
                Err(_) => rec.error = Some(format!("client timeout after {:?}", ctx.timeout)),
            }
            break 'rounds;
        }
        rec.error = Some("every node refused the connection".into());
    }
    rec.end_ms = now_ms();
    let ok = rec.complete && (200..300).contains(&rec.status) && rec.warmup_errors == 0;
    if !ok {
        ctx.bad.fetch_add(1, Ordering::Relaxed);
    }
    ctx.done.fetch_add(1, Ordering::Relaxed);
    rec
}

/// One try on `rec.node`; `Err` only for an error before a response head.
async fn attempt(ctx: &Ctx, plan: &Plan, rec: &mut Record) -> Result<(), reqwest::Error> {
    let url = format!("{}{}", ctx.nodes[rec.node], plan.path);
    let mut req = ctx
        .client
        .post(url)
        .header("content-type", "application/json")
        .body(plan.body.clone());
    if plan.path.starts_with("/admin/") && !ctx.admin_token.is_empty() {
        req = req.bearer_auth(&ctx.admin_token);
    }
    if let Some(gap) = plan.event_gap_ms {
        req = req.header("x-test-event-gap-ms", gap.to_string());
    }
    let resp = req.send().await?;
    rec.head_ms = Some(now_ms());
    rec.status = resp.status().as_u16();
    rec.fallback = resp.headers().contains_key("x-loraplex-fallback");
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(e) => {
                rec.error = Some(chain(&e));
                break;
            }
        }
    }
    rec.bytes = body.len() as u64;
    let whole = rec.error.is_none();
    let ok = (200..300).contains(&rec.status);
    rec.complete = whole
        && match (ok, plan.stream) {
            (true, true) => body.ends_with(b"data: [DONE]\n\n"),
            (true, false) => serde_json::from_slice::<Value>(&body).is_ok(),
            (false, _) => true,
        };
    let text = String::from_utf8_lossy(&body);
    // The stand-in's first token: `adapter=NAME weights=HASH16 prompt_tokens=N`.
    let word = |key: &str| {
        text.find(key).map(|at| {
            let rest = &text[at + key.len()..];
            rest.split([' ', '"']).next().unwrap_or("").to_owned()
        })
    };
    rec.answer_adapter = word("adapter=");
    rec.weights = word("weights=");
    if plan.kind == Kind::Warmup && ok {
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let results = v["results"].as_array().cloned().unwrap_or_default();
        let errors: Vec<_> = results.iter().filter(|r| r["status"] != "ok").collect();
        rec.warmup_errors = errors.len() as u64;
        if let Some(e) = errors.first() {
            rec.detail = Some(e["status"].to_string());
        }
    }
    if !ok || !rec.complete {
        rec.detail = Some(text.chars().take(300).collect());
    }
    Ok(())
}

/// An error with its causes: reqwest's own message alone ("error sending request") hides them.
fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
