//! The built-in demo (`loraplex demo`): the whole thing in one process, on loopback, with no
//! GPU and no network.
//!
//! It starts a stand-in vLLM (which resolves adapters from the storage directory exactly like
//! vLLM's `lora_filesystem_resolver`), a local HTTP origin holding generated PEFT adapters, and
//! loraplex between them; then sends requests a user would send and prints what happened: a
//! base-model request passing through, a cold adapter request that fetches the adapter, warm
//! hits, a streamed answer, an unknown adapter, and the cache stats.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    cli::DemoArgs,
    config::{Config, OriginConfig as OriginSettings, TransferConfig},
    error::Error,
    node::Node,
    testkit::{
        adapters::AdapterSpec,
        origin::{OriginConfig, OriginStandIn},
        vllm::{VllmConfig, VllmStandIn},
    },
};

const BASE: &str = "demo/base-model";
const ADAPTERS: [(&str, u64); 2] = [
    ("acme/summarizer-lora", 24 << 20),
    ("acme/translator-lora", 6 << 20),
];

/// Run the demo; prints to stdout.
pub fn run(args: &DemoArgs) -> Result<(), Error> {
    let tmp = tempfile::Builder::new()
        .prefix("loraplex-demo-")
        .tempdir()?;
    let dir = tmp.path().to_owned();
    let store = dir.join("adapters");
    std::fs::create_dir_all(&store)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let vllm = VllmStandIn::start_on(rt.handle(), VllmConfig::new(BASE).lora_dir(&store))?;
    let origin = OriginStandIn::start_on(rt.handle(), OriginConfig::default())?;
    for (i, (name, size)) in ADAPTERS.iter().enumerate() {
        origin.put_adapter(name, &AdapterSpec::new(BASE, *size, 7 + i as u64));
    }
    // A modest link, so the cold fetch is visible next to the warm hits.
    origin.set_throttle(Some(400 << 20));

    let defaults = Config::default();
    let cfg = Config {
        listen: "127.0.0.1:0".into(),
        vllm_urls: vec![vllm.url()],
        vllm: crate::config::VllmConfig {
            model_name: Some(BASE.into()),
            ..defaults.vllm.clone()
        },
        storage: crate::config::StorageConfig {
            dir: store.clone(),
            max_size: 1 << 30,
            ..defaults.storage.clone()
        },
        origins: vec![OriginSettings::Http {
            base_url: origin.base_url(),
            token: None,
            transfer: TransferConfig::default(),
        }],
        ..defaults
    };
    let node = Node::start(cfg)?;
    let url = format!("http://{}", node.local_addr());

    println!("loraplex demo: one process, loopback only, no GPU, no network.\n");
    println!(
        "  stand-in vLLM  {} (serves {BASE:?}, resolves adapters from the store)",
        vllm.url()
    );
    println!(
        "  local origin   {} ({} adapters)",
        origin.base_url(),
        ADAPTERS.len()
    );
    println!("  loraplex       {url} (store {})\n", store.display());

    let report = rt.block_on(scenario(&url));
    node.shutdown_handle().trigger();
    node.wait();
    match report {
        Ok(text) => print!("{text}"),
        Err(e) => return Err(Error::internal(format!("demo request failed: {e}"))),
    }
    if args.keep {
        let kept = tmp.keep();
        println!(
            "\nkept {} (adapters as vLLM sees them, under adapters/)",
            kept.display()
        );
    } else {
        print_tree(&store);
    }
    Ok(())
}

async fn scenario(url: &str) -> Result<String, reqwest::Error> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let chat = |model: &str, stream: bool| {
        client
            .post(format!("{url}/v1/chat/completions"))
            .json(&json!({"model": model, "stream": stream, "max_tokens": 6,
                          "messages": [{"role": "user", "content": "Say hello"}]}))
            .send()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<38} {:>6} {:>10}  what happened",
        "request", "status", "time"
    );
    let mut row = |what: &str, status: u16, took: Duration, note: &str| {
        let ms = took.as_secs_f64() * 1000.0;
        let _ = writeln!(out, "  {what:<38} {status:>6} {ms:>8.1}ms  {note}");
    };

    let t = Instant::now();
    let r = chat(BASE, false).await?;
    row(
        "base model",
        r.status().as_u16(),
        t.elapsed(),
        "passed straight to vLLM",
    );

    for (name, size) in ADAPTERS {
        let t = Instant::now();
        let r = chat(name, false).await?;
        let (status, took) = (r.status().as_u16(), t.elapsed());
        let text = answer_text(r.json().await?);
        let note = format!("fetched {} MiB, verified, published; {text}", size >> 20);
        row(&format!("{name} (cold)"), status, took, &note);
        let mut warm = Duration::ZERO;
        for _ in 0..5 {
            let t = Instant::now();
            chat(name, false).await?.bytes().await?;
            warm += t.elapsed();
        }
        row(
            &format!("{name} (warm, mean of 5)"),
            200,
            warm / 5,
            "already on disk: no fetch",
        );
    }

    let t = Instant::now();
    let r = chat(ADAPTERS[0].0, true).await?;
    let status = r.status().as_u16();
    let body = r.text().await?;
    let events = body.matches("data: ").count();
    row(
        "stream (SSE)",
        status,
        t.elapsed(),
        &format!("{events} events, last `data: [DONE]`"),
    );

    let t = Instant::now();
    let r = chat("acme/no-such-adapter", false).await?;
    let status = r.status().as_u16();
    let v: Value = r.json().await?;
    row(
        "unknown adapter",
        status,
        t.elapsed(),
        v["error"]["message"].as_str().unwrap_or(""),
    );

    let stats: Value = client
        .get(format!("{url}/admin/cache/stats"))
        .send()
        .await?
        .json()
        .await?;
    let _ = writeln!(
        out,
        "\n  cache: {} adapters, {:.1} MiB of {:.0} MiB, write mode {}, {} hits, {} misses",
        stats["items"],
        stats["size"].as_f64().unwrap_or(0.0) / 1048576.0,
        stats["max_size"].as_f64().unwrap_or(0.0) / 1048576.0,
        stats["write_mode"].as_str().unwrap_or("?"),
        stats["hits"],
        stats["misses"],
    );
    Ok(out)
}

fn answer_text(v: Value) -> String {
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    // "adapter=NAME weights=HASH ...": show which weights vLLM loaded.
    let weights = text
        .split_whitespace()
        .find(|w| w.starts_with("weights="))
        .unwrap_or("");
    format!("vLLM loaded {weights}")
}

fn print_tree(store: &Path) {
    println!("\n  what vLLM's resolver sees in the store:");
    for (name, _) in ADAPTERS {
        let dir = store.join(name);
        let files: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        format!("{} ({len} B)", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!("    {name}/: {}", files.join(", "));
    }
}
