//! `soak vllm` and `soak origin`: the testkit's stand-ins as processes of their own, so the soak
//! can kill and restart them.

use std::{
    error::Error,
    fs::OpenOptions,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use loraplex::testkit::{
    AdapterSpec, Fault, FaultKind, OriginConfig, OriginStandIn, VllmConfig, VllmFault, VllmStandIn,
    adapters::{SAFETENSORS_FILE, hash16},
    server::{Response, Server, handler},
};
use serde_json::json;

use crate::{Names, now_ms};

#[derive(clap::Args)]
pub struct VllmArgs {
    #[arg(long)]
    port: u16,
    /// The directory the resolver reads (the node's `storage.dir`).
    #[arg(long)]
    dir: PathBuf,
    /// `--model`.
    #[arg(long)]
    base: String,
    /// Partial adapters met and faults, appended as JSON lines.
    #[arg(long)]
    events: PathBuf,
    #[arg(long, default_value_t = 5)]
    event_gap_ms: u64,
}

/// Run a stand-in vLLM until SIGTERM (or SIGKILL: events are written within 50 ms of happening).
pub fn vllm(args: VllmArgs) -> Result<(), Box<dyn Error>> {
    let rt = runtime()?;
    let config = VllmConfig::new(&args.base)
        .bind(SocketAddr::from(([127, 0, 0, 1], args.port)))
        .lora_dir(&args.dir)
        .event_gap(Duration::from_millis(args.event_gap_ms))
        .reread_weights(true);
    // The port of a killed predecessor can take a moment to free.
    let mut tries = 0;
    let vllm = loop {
        match VllmStandIn::start_on(rt.handle(), config.clone()) {
            Ok(v) => break v,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("bind {}: {e}; retrying", args.port);
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    };
    println!("vllm {} ready", vllm.url());
    let mut events = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.events)?;
    let (mut refusals_seen, mut faults_seen) = (0, 0);
    let mut flush = |vllm: &VllmStandIn| -> std::io::Result<()> {
        let refusals = vllm.refusals();
        for r in &refusals[refusals_seen..] {
            let line = json!({"t": now_ms(), "kind": "partial", "adapter": r.name,
                "status": r.status, "why": r.why});
            writeln!(events, "{line}")?;
        }
        refusals_seen = refusals.len();
        let faults = vllm.faults();
        for f in &faults[faults_seen..] {
            let line = match f {
                VllmFault::WeightsGoneWhileLoaded { name, path } => {
                    json!({"t": now_ms(), "kind": "weights_gone", "adapter": name,
                        "why": path.display().to_string()})
                }
                VllmFault::WeightsChangedWhileLoaded { name, old, new } => {
                    json!({"t": now_ms(), "kind": "weights_changed", "adapter": name,
                        "why": format!("{old:016x} -> {new:016x}")})
                }
            };
            writeln!(events, "{line}")?;
        }
        faults_seen = faults.len();
        events.flush()
    };
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => flush(&vllm)?,
            }
        }
        flush(&vllm)
    })?;
    // Like a crash for the requests in flight: the process ends with them.
    std::process::exit(0)
}

#[derive(clap::Args)]
pub struct OriginArgs {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    control_port: u16,
    /// `base_model_name_or_path` of every adapter.
    #[arg(long)]
    base: String,
    #[arg(long, default_value_t = 8)]
    warm: u64,
    #[arg(long, default_value_t = 300)]
    cold: u64,
    #[arg(long, default_value_t = 48)]
    fill: u64,
    /// Weights size of the warm, cold and changing adapters.
    #[arg(long, default_value_t = 128 * 1024)]
    size: u64,
    /// Weights size of the fill adapters.
    #[arg(long, default_value_t = 1024 * 1024)]
    fill_size: u64,
    /// `stall`: each weights transfer pauses this long after 16 KiB (longer than loraplex's
    /// default `idle_timeout`, 30 s, so the stall is detected and the file resumed).
    #[arg(long, default_value_t = 45_000)]
    stall_ms: u64,
    /// `reset`: each weights transfer is cut (the connection closed) after this many bytes.
    #[arg(long, default_value_t = 8 * 1024)]
    cut_after: u64,
    /// Every version of every adapter served, with its weights hash (JSON lines), for the
    /// report to check each answer names the right weights.
    #[arg(long)]
    manifest: PathBuf,
}

/// Appends `{"adapter", "version", "weights"}` for each adapter put.
struct Manifest(std::sync::Mutex<std::fs::File>);

impl Manifest {
    fn record(&self, origin: &OriginStandIn, name: &str, version: u64) {
        let weights = origin
            .file(name, SAFETENSORS_FILE)
            .map(|b| hash16(xxhash_rust::xxh3::xxh3_64(&b)));
        let line = json!({"t": now_ms(), "adapter": name, "version": version, "weights": weights});
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // The report reads it afterwards; a failed write shows there as an unknown version.
        let _ = writeln!(f, "{line}").and_then(|()| f.flush());
    }
}

/// Run the origin and its control port until killed.
pub fn origin(args: OriginArgs) -> Result<(), Box<dyn Error>> {
    let rt = runtime()?;
    let config = OriginConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], args.port)),
        ..OriginConfig::default()
    };
    let origin = Arc::new(OriginStandIn::start_on(rt.handle(), config)?);
    let manifest = Arc::new(Manifest(std::sync::Mutex::new(std::fs::File::create(
        &args.manifest,
    )?)));
    let put = |name: &str, size, seed| {
        origin.put_adapter(name, &AdapterSpec::new(&args.base, size, seed));
        manifest.record(&origin, name, 0);
    };
    for i in 0..args.warm {
        put(&Names::warm(i), args.size, i);
    }
    for i in 0..args.cold {
        put(&Names::cold(i), args.size, 10_000 + i);
    }
    for i in 0..args.fill {
        put(&Names::fill(i), args.fill_size, 20_000 + i);
    }
    put(Names::CHANGING, args.size, 30_000);
    let version = Arc::new(AtomicU64::new(0));
    let control = {
        let (origin, base, size) = (origin.clone(), args.base.clone(), args.size);
        let (stall, cut) = (Duration::from_millis(args.stall_ms), args.cut_after);
        handler(move |req| {
            let (origin, version, base) = (origin.clone(), version.clone(), base.clone());
            let manifest = manifest.clone();
            async move {
                let path = req.head.path().to_owned();
                let fault = |kind| Fault::new(kind).always();
                let answer = match (req.head.method.as_str(), path.as_str()) {
                    ("POST", "/fault/5xx") => Some(fault(FaultKind::Status(503))),
                    ("POST", "/fault/stall") => Some(fault(FaultKind::StallAfter {
                        bytes: 16 * 1024,
                        pause: stall,
                    })),
                    ("POST", "/fault/reset") => Some(fault(FaultKind::CutAfter(cut))),
                    ("POST", "/fault/off") => None,
                    ("POST", p) if p.starts_with("/change/") => {
                        let name = &p["/change/".len()..];
                        let v = version.fetch_add(1, Ordering::SeqCst) + 1;
                        origin.put_adapter(name, &AdapterSpec::new(&base, size, 30_000 + v));
                        manifest.record(&origin, name, v);
                        println!("{} change {name} version {v}", now_ms());
                        return Response::json(200, &json!({"adapter": name, "version": v}));
                    }
                    ("GET", "/stats") => {
                        return Response::json(
                            200,
                            &json!({"requests": origin.requests(),
                                "connections": origin.connections(),
                                "cancelled": origin.cancelled()}),
                        );
                    }
                    _ => return Response::text(404, "no such control"),
                };
                origin.clear_faults();
                if let Some(f) = answer {
                    origin.inject(f);
                }
                println!("{} {path}", now_ms());
                Response::json(200, &json!({"ok": path}))
            }
        })
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], args.control_port));
    let _control = Server::start_on(rt.handle(), addr, 0, control)?;
    println!("origin {} control http://{addr} ready", origin.base_url());
    rt.block_on(std::future::pending::<()>());
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
