//! `soak report`: the figures of a run, from its directory (see `scripts/soak.sh`).
//!
//! With `--nodes`, the nodes still run: it first takes their final state ([`crate::snapshot`]:
//! `/admin/cache/stats` and the files on disk, once idle). Without it, the saved
//! `node-I/final.json` files are used.
//!
//! The rules (also printed with the report):
//! - *answered*: a response head and its whole body (see `load.rs`); a 2xx stream ends with
//!   `[DONE]`. *success*: answered 2xx, a warm-up whose every adapter is `ok`, or an evict
//!   answered 503 "in use" (the documented answer while requests hold the adapter), or a
//!   404 for an adapter no origin has.
//! - *lost to a kill*: not answered, and a process on its path was killed while it was in
//!   flight: its own node (the client's connection died with the process), or, once the head
//!   had arrived, any loraplex or vLLM (a stream already started can only be cut). No proxy can
//!   answer these; a load balancer would give a 502.
//! - *unanswered*: every other request not answered. Must be 0.
//! - *wrong*: a 2xx answer naming another adapter, or weights the origin never served under
//!   that name (the stand-in vLLM names them in every answer). Must be 0.
//! - *stale*: a 2xx answer naming a version the origin replaced more than the TTL + 15 s
//!   before the request: not a success.
//! - A non-success *matches* a fault window when it was in flight during the window or the
//!   window's grace after it (the time the fault's effects may last, per kind).

use std::{
    collections::{BTreeMap, BTreeSet},
    error::Error,
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::Value;

use crate::report_md as md;

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The run directory.
    #[arg(long)]
    pub work: PathBuf,
    /// The nodes' base URLs, comma-separated: take their final state first.
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    #[arg(long, default_value = "")]
    pub admin_token: String,
    /// Where the Markdown goes (also printed).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rec {
    pub src: String,
    pub kind: String,
    pub model: String,
    pub node: usize,
    pub tries: u32,
    pub start_ms: u64,
    pub head_ms: Option<u64>,
    pub end_ms: u64,
    pub status: u16,
    pub complete: bool,
    pub error: Option<String>,
    pub answer_adapter: Option<String>,
    pub weights: Option<String>,
    pub warmup_errors: u64,
    pub detail: Option<String>,
}

impl Rec {
    pub fn answered(&self) -> bool {
        self.complete && self.status != 0
    }

    pub fn success(&self) -> bool {
        let busy_evict = self.kind == "evict"
            && self.status == 503
            && self.detail.as_deref().is_some_and(|d| d.contains("in use"));
        let not_found = self.kind == "missing" && self.status == 404;
        self.answered()
            && (((200..300).contains(&self.status)
                && self.kind != "missing"
                && self.warmup_errors == 0)
                || busy_evict
                || not_found)
    }

    /// The outcome as a table column: `2xx`, the status, `warm-up error`.
    pub fn outcome(&self) -> String {
        match self.status {
            200..=299 if self.warmup_errors > 0 => "warm-up error".into(),
            200..=299 => "2xx".into(),
            503 if self.success() => "503 busy (evict)".into(),
            404 if self.success() => "404 (missing adapter)".into(),
            s => s.to_string(),
        }
    }
}

/// A fault window from `events.log`.
#[derive(Debug, Clone)]
pub struct Window {
    pub id: u64,
    pub kind: String,
    pub node: Option<usize>,
    pub begin: u64,
    pub end: u64,
    pub grace: u64,
}

impl Window {
    /// Whether `[start, end]` meets the window or its grace.
    pub fn touches(&self, start: u64, end: u64) -> bool {
        start <= self.end + self.grace && end >= self.begin
    }
}

/// A `kill -9` from `events.log`: between `before` and `after`.
#[derive(Debug, Clone)]
pub struct Kill {
    pub target: String,
    pub node: usize,
    pub before: u64,
    pub after: u64,
}

/// How long each kind of fault may show after its window, in ms: node and vLLM restarts a
/// few health checks (2 s here); origin 5xx and resets the retries with backoff of fetches
/// begun in the window; a stall the origin's 45 s pause (the resumed transfer ends after it);
/// the disk fill the time the last pinning stream takes to release its adapter.
pub fn grace(kind: &str) -> u64 {
    match kind {
        "origin_stall" => 60_000,
        "origin_5xx" | "origin_reset" => 20_000,
        _ => 10_000,
    }
}

/// Everything the run left, parsed.
pub struct Run {
    pub t0: u64,
    pub nodes: usize,
    pub recs: Vec<Rec>,
    pub windows: Vec<Window>,
    pub kills: Vec<Kill>,
    /// Per node: lines of `vllm-events.jsonl`.
    pub vllm_events: Vec<Vec<Value>>,
    /// Per node: `final.json`.
    pub finals: Vec<Value>,
    /// `proc.log` lines: (node, phase, pid, rss_kb, fds).
    pub procs: Vec<(usize, String, u64, u64, u64)>,
    pub restarts: BTreeMap<(String, usize), u64>,
    /// Per node: the ERROR lines and panics of `loraplex.log` (all its processes).
    pub log_errors: Vec<Vec<String>>,
    /// Every version the origin ever served for each adapter, oldest first: (weights hash,
    /// published at) (`adapters.manifest`).
    pub manifest: BTreeMap<String, Vec<(String, u64)>>,
    /// `invalidation.ttl` of the nodes, in ms.
    pub ttl_ms: u64,
}

/// How much older than the TTL an answer may be before it counts as stale: the revalidation
/// starts at the first request after the TTL and takes a download and an unload.
pub const STALE_SLACK_MS: u64 = 15_000;

pub fn run(args: ReportArgs) -> Result<(), Box<dyn Error>> {
    if !args.nodes.is_empty() {
        crate::snapshot::take(&args)?;
    }
    let run = load(&args.work)?;
    let (text, pass) = md::render(&run);
    print!("{text}");
    if let Some(parent) = args.out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&args.out, &text)?;
    if !pass {
        std::process::exit(1);
    }
    Ok(())
}

fn kv(line: &str) -> (u64, String, BTreeMap<String, String>) {
    let mut words = line.split_whitespace();
    let t = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let word = words.next().unwrap_or("").to_owned();
    let map = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (t, word, map)
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

pub fn load(work: &Path) -> Result<Run, Box<dyn Error>> {
    let mut recs = Vec::new();
    let mut logs: Vec<_> = fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    logs.sort();
    for path in logs {
        for line in read_lines(&path) {
            recs.push(serde_json::from_str::<Rec>(&line).map_err(|e| format!("{path:?}: {e}"))?);
        }
    }
    let (mut t0, mut nodes, mut ttl_ms) = (0, 0, 15_000);
    let mut windows: Vec<Window> = Vec::new();
    let mut kills: Vec<Kill> = Vec::new();
    let mut restarts = BTreeMap::new();
    for line in read_lines(&work.join("events.log")) {
        let (t, word, m) = kv(&line);
        let get = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
        match word.as_str() {
            "start" => {
                t0 = t;
                nodes = get("nodes").unwrap_or(0) as usize;
                ttl_ms = get("ttl_s").unwrap_or(15) * 1000;
            }
            "begin" => windows.push(Window {
                id: get("id").unwrap_or(0),
                kind: m.get("kind").cloned().unwrap_or_default(),
                node: get("node").map(|n| n as usize),
                begin: t,
                end: u64::MAX / 2,
                grace: grace(m.get("kind").map_or("", String::as_str)),
            }),
            "end" => {
                if let Some(w) = windows.iter_mut().find(|w| Some(w.id) == get("id")) {
                    w.end = t;
                }
            }
            "kill" => kills.push(Kill {
                target: m.get("target").cloned().unwrap_or_default(),
                node: get("node").unwrap_or(0) as usize,
                before: t,
                after: u64::MAX / 2,
            }),
            "killed" => {
                if let Some(k) = kills.last_mut() {
                    k.after = t;
                }
            }
            "restarted" => {
                let key = (
                    m.get("target").cloned().unwrap_or_default(),
                    get("node").unwrap_or(0) as usize,
                );
                *restarts.entry(key).or_default() += 1;
            }
            _ => {}
        }
    }
    let mut vllm_events = Vec::new();
    let mut finals = Vec::new();
    let mut log_errors = Vec::new();
    for i in 0..nodes {
        let dir = work.join(format!("node-{i}"));
        let bad = read_lines(&dir.join("loraplex.log"))
            .into_iter()
            .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
            .collect();
        log_errors.push(bad);
        let events = read_lines(&dir.join("vllm-events.jsonl"))
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        vllm_events.push(events);
        let f = fs::read(dir.join("final.json")).unwrap_or_default();
        finals.push(serde_json::from_slice(&f).unwrap_or(Value::Null));
    }
    let procs = read_lines(&work.join("proc.log"))
        .iter()
        .map(|l| {
            let (_, _, m) = kv(l);
            let get = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let phase = m.get("phase").cloned().unwrap_or_default();
            (
                get("node") as usize,
                phase,
                get("pid"),
                get("rss_kb"),
                get("fds"),
            )
        })
        .collect();
    let mut manifest: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for line in read_lines(&work.join("adapters.manifest")) {
        let v: Value = serde_json::from_str(&line)?;
        if let (Some(a), Some(w)) = (v["adapter"].as_str(), v["weights"].as_str()) {
            let t = v["t"].as_u64().unwrap_or(0);
            manifest
                .entry(a.to_owned())
                .or_default()
                .push((w.to_owned(), t));
        }
    }
    Ok(Run {
        manifest,
        ttl_ms,
        t0,
        nodes,
        recs,
        windows,
        kills,
        vllm_events,
        finals,
        procs,
        restarts,
        log_errors,
    })
}

impl Run {
    /// A 2xx inference answer that names another adapter than asked, or weights the origin
    /// never served under that name (the base model: `adapter=none weights=base`).
    pub fn wrong(&self, r: &Rec) -> bool {
        let inference = !matches!(r.kind.as_str(), "warmup" | "evict");
        if !inference || !r.answered() || !(200..300).contains(&r.status) {
            return false;
        }
        let (adapter, weights) = (r.answer_adapter.as_deref(), r.weights.as_deref());
        match self.manifest.get(&r.model) {
            Some(versions) => {
                adapter != Some(r.model.as_str())
                    || !weights.is_some_and(|w| versions.iter().any(|(v, _)| v == w))
            }
            None => adapter != Some("none") || weights != Some("base"),
        }
    }

    /// For a 2xx answer naming an old version: when the next version was published, if that
    /// was more than the TTL (and [`STALE_SLACK_MS`]) before the request.
    pub fn stale_since(&self, r: &Rec) -> Option<u64> {
        if !(200..300).contains(&r.status) || !r.answered() {
            return None;
        }
        let versions = self.manifest.get(&r.model)?;
        let at = versions
            .iter()
            .position(|(w, _)| Some(w.as_str()) == r.weights.as_deref())?;
        let (_, next) = versions.get(at + 1)?;
        // 0: a manifest without times (an older run).
        (*next > 0 && next + self.ttl_ms + STALE_SLACK_MS < r.start_ms).then_some(*next)
    }

    /// Answered as it should be (see the module doc), with the right and fresh weights.
    pub fn success(&self, r: &Rec) -> bool {
        r.success() && !self.wrong(r) && self.stale_since(r).is_none()
    }

    /// Not answered, and a kill explains it (see the module doc).
    pub fn lost_to_kill(&self, r: &Rec) -> bool {
        !r.answered()
            && self.kills.iter().any(|k| {
                let during = k.before <= r.end_ms && k.after >= r.start_ms;
                let on_path = (k.target == "loraplex" && k.node == r.node) || r.head_ms.is_some();
                during && on_path
            })
    }

    pub fn unanswered(&self, r: &Rec) -> bool {
        !r.answered() && !self.lost_to_kill(r)
    }

    /// The windows a request met.
    pub fn windows_of(&self, r: &Rec) -> Vec<u64> {
        self.windows
            .iter()
            .filter(|w| w.touches(r.start_ms, r.end_ms))
            .map(|w| w.id)
            .collect()
    }

    /// Seconds since the start of the run.
    pub fn secs(&self, t: u64) -> f64 {
        t.saturating_sub(self.t0) as f64 / 1000.0
    }

    pub fn statuses(&self) -> BTreeSet<String> {
        self.recs
            .iter()
            .filter(|r| r.answered())
            .map(Rec::outcome)
            .collect()
    }
}
