//! The chaos soak's processes (`scripts/soak.sh` runs them; see its header for the whole run):
//!
//! - `ports N`: print N free loopback ports, one a line.
//! - `vllm`: one stand-in vLLM (the testkit's, re-reading weights as vLLM does after its LoRA
//!   cache evicted them), appending every partial adapter it meets and every fault under its
//!   feet to a JSON-lines file as it happens.
//! - `origin`: the stand-in HTTP origin holding every adapter of the soak, and a control port
//!   to switch its faults on and off (`POST /fault/{5xx,stall,reset,off}`) and to publish a new
//!   version of an adapter (`POST /change/NAME`).
//! - `load`: the open-loop load at a fixed rate (or `--fill`: long streams pinning many big
//!   adapters at once), every request logged as one JSON line.
//! - `report`: the figures, from the logs of a run directory, as a Markdown table.
//!
//! All of them log wall-clock times in milliseconds since the epoch, as the script does, so
//! requests and fault windows line up.

mod load;
mod report;
mod report_md;
mod snapshot;
mod standins;

use std::{
    error::Error,
    time::{SystemTime, UNIX_EPOCH},
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print N free loopback ports.
    Ports {
        n: usize,
    },
    Vllm(standins::VllmArgs),
    Origin(standins::OriginArgs),
    Load(load::LoadArgs),
    Report(report::ReportArgs),
}

/// The adapters of a soak: `soak/warm-I`, `soak/cold-I`, `soak/fill-I`, `soak/changing`.
pub struct Names;

impl Names {
    pub const CHANGING: &'static str = "soak/changing";

    pub fn warm(i: u64) -> String {
        format!("soak/warm-{i}")
    }

    pub fn cold(i: u64) -> String {
        format!("soak/cold-{i}")
    }

    pub fn fill(i: u64) -> String {
        format!("soak/fill-{i}")
    }
}

/// Milliseconds since the epoch (the time every soak log uses).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A small deterministic generator (splitmix64): the soak needs reproducible choices, not
/// cryptographic ones.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    match Cli::parse().cmd {
        Cmd::Ports { n } => {
            // Hold every listener until all are chosen, so the ports differ.
            let listeners = (0..n)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<Vec<_>, _>>()?;
            for l in &listeners {
                println!("{}", l.local_addr()?.port());
            }
            Ok(())
        }
        Cmd::Vllm(args) => standins::vllm(args),
        Cmd::Origin(args) => standins::origin(args),
        Cmd::Load(args) => load::run(args),
        Cmd::Report(args) => report::run(args),
    }
}
