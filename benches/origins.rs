//! Origin throughput: one adapter with a 1 GiB weights file fetched through each remote
//! origin type from loopback servers, into a sink, against `curl` fetching the same bytes from
//! the same server; and the cost of the SHA-256 check (verification on vs off).
//!
//! Run with `scripts/bench-origins.sh` (or
//! `cargo bench --bench origins -- [repeats] [MiB] [paced link MB/s]`).
//! The client runs on a 2-thread tokio runtime, as the control plane would; the servers run
//! on a runtime of their own, and curl is a separate
//! process. Every figure is the median of the repeats; MB/s is 10^6 bytes/s.

#[path = "../tests/common/s3.rs"]
mod s3_server;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use aws_sdk_s3::primitives::ByteStream;
use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use futures_util::{FutureExt, future::BoxFuture};
use loraplex::{
    adapter::AdapterName,
    config::TransferConfig,
    origin::{
        CrcAlgorithm, FileSpec, FileStream, Manifest, Origin, OriginError,
        huggingface::HuggingFace,
        s3::{S3, S3Settings},
        transfer::{ChunkSink, TransferError, pull_file},
    },
    testkit::hub::{CdnHost, HubFile, StandInHub},
};
use s3_server::{ACCESS_KEY, S3Server, SECRET_KEY, credentials};
use sha2::{Digest, Sha256};

const CONFIG: &[u8] = br#"{"peft_type":"LORA","base_model_name_or_path":"base","r":8}"#;

/// Incompressible-looking bytes, fast to make (xorshift).
fn weights(len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    v.into()
}

/// Counts the bytes, keeps none.
struct Sink(u64);

impl ChunkSink for Sink {
    async fn accept(&mut self, chunk: Bytes) -> Result<(), TransferError> {
        self.0 += chunk.len() as u64;
        Ok(())
    }
}

/// An origin with its checksums hidden, for the rows with the check off: its manifest lists
/// none and its answers announce none, so the transfer hashes nothing. (Dropping the
/// manifest's alone is not enough: the transfer adopts the SHA-256 an answer announces, as
/// the Hub's `X-Linked-Etag` does.)
struct Unverified<O>(O);

impl<O: Origin> Origin for Unverified<O> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn describe(&self) -> String {
        self.0.describe()
    }

    fn transfer(&self) -> TransferConfig {
        self.0.transfer()
    }

    fn head<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Option<String>, OriginError>> {
        self.0.head(name)
    }

    fn manifest<'a>(
        &'a self,
        name: &'a AdapterName,
    ) -> BoxFuture<'a, Result<Manifest, OriginError>> {
        async move {
            let mut manifest = self.0.manifest(name).await?;
            manifest.files.iter_mut().for_each(|f| {
                f.sha256 = None;
                f.crc = None;
            });
            Ok(manifest)
        }
        .boxed()
    }

    fn open<'a>(
        &'a self,
        name: &'a AdapterName,
        manifest: &'a Manifest,
        file: &'a FileSpec,
        offset: u64,
    ) -> BoxFuture<'a, Result<FileStream, OriginError>> {
        async move {
            let mut stream = self.0.open(name, manifest, file, offset).await?;
            stream.sha256 = None;
            Ok(stream)
        }
        .boxed()
    }
}

/// Fetch every file of `name` the way the store does (manifest, then `pull_file` per file)
/// into a counting sink; bytes read.
async fn fetch(origin: &dyn Origin, name: &AdapterName) -> u64 {
    let manifest = origin.manifest(name).await.expect("manifest");
    let mut sink = Sink(0);
    for file in &manifest.files {
        pull_file(origin, name, &manifest, file, &mut sink)
            .await
            .unwrap_or_else(|e| panic!("fetch {}: {e:?}", file.path));
    }
    sink.0
}

/// [`fetch`] timed: MB/s.
async fn timed_fetch(origin: &dyn Origin, name: &AdapterName) -> f64 {
    let t = Instant::now();
    let n = fetch(origin, name).await;
    mbps(n, t.elapsed())
}

fn mbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// curl the URL into /dev/null; MB/s from its own byte count and total time.
fn curl(args: &[&str]) -> f64 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-f",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let bytes: f64 = it.next().unwrap().parse().unwrap();
    let secs: f64 = it.next().unwrap().parse().unwrap();
    bytes / secs / 1e6
}

async fn curl_async(args: Vec<String>) -> f64 {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args)
    })
    .await
    .unwrap()
}

struct Row {
    what: &'static str,
    samples: Vec<f64>,
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this target without it, as a
/// quick smoke run of the same code on small inputs.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (repeats, mib) = if smoke() { (1, 2) } else { (5, 1024) };
    let repeats: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(repeats);
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(mib);
    let link_mbps: u64 = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(LINK_MBPS);
    // The servers get their own runtime (threads), as a remote origin would be its own
    // process: sharing the client's two workers, the server tasks cost the client a task
    // switch per chunk, which is not what a node fetching from Hugging Face or S3 pays.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("origin-server")
        .enable_all()
        .build()
        .unwrap();
    let (hub, s3_server) = servers.block_on(async {
        let hub = StandInHub::start(None, CdnHost::Same).await.unwrap();
        (hub, S3Server::start(&["bench"]).await)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(repeats, mib, link_mbps, &hub, &s3_server));
}

/// The paced Hub rows: a link of this many MB/s (10^6 B/s), about what one node gets from a
/// CDN or S3 (4 Gbit/s), as against loopback, which here outruns SHA-256 on one core.
const LINK_MBPS: u64 = 500;

async fn run(repeats: usize, mib: usize, link_mbps: u64, hub: &StandInHub, s3_server: &S3Server) {
    let data = weights(mib << 20);
    let size = data.len() as u64;
    let name = AdapterName::parse("bench/big").unwrap();
    let transfer = TransferConfig::default();
    println!("adapter: {mib} MiB weights + config; {repeats} repeats; median MB/s (10^6 B/s)");

    // Reference: SHA-256 alone over the same bytes, in memory.
    let mut sha_alone = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        std::hint::black_box(Sha256::digest(&data));
        sha_alone.push(mbps(size, t.elapsed()));
    }

    // Hugging Face stand-in: /resolve/ redirects to /cdn/ on the same server.
    let lfs = HubFile::lfs("adapter_model.safetensors", data.clone());
    let files = vec![HubFile::small("adapter_config.json", CONFIG), lfs];
    hub.add_commit("bench/big", "be9c4000", &["main"], files);
    let hf = HuggingFace::new(&hub.url(), None, transfer.clone()).unwrap();
    let hf_off = Unverified(HuggingFace::new(&hub.url(), None, transfer.clone()).unwrap());

    // S3: s3s-fs over a temporary directory; the object carries x-amz-checksum-sha256.
    let settings = S3Settings {
        bucket: "bench".into(),
        region: Some("us-east-1".into()),
        prefix: String::new(),
        endpoint: Some(s3_server.url.clone()),
    };
    let s3 = S3::with_credentials(settings.clone(), transfer.clone(), Some(credentials()));
    let s3_off = Unverified(S3::with_credentials(
        settings,
        transfer,
        Some(credentials()),
    ));
    let sum = STANDARD.encode(Sha256::digest(&data));
    // The same weights again as `bench/crc`, carrying a CRC64NVME (S3's default checksum).
    let crc_name = AdapterName::parse("bench/crc").unwrap();
    let mut crc = CrcAlgorithm::Crc64Nvme.smithy().into_impl();
    crc.update(&data);
    let crc = STANDARD.encode(crc.finalize());
    let s3_sdk = s3.client().await.sdk();
    for key in [
        "bench/crc/adapter_config.json",
        "bench/crc/adapter_model.safetensors",
    ] {
        let weights = key.ends_with(".safetensors");
        s3_sdk
            .put_object()
            .bucket("bench")
            .key(key)
            .set_checksum_crc64_nvme(weights.then(|| crc.clone()))
            .body(ByteStream::from(match weights {
                true => data.clone(),
                false => Bytes::from_static(CONFIG),
            }))
            .send()
            .await
            .unwrap();
    }
    for (key, body, sum) in [
        (
            "bench/big/adapter_config.json",
            Bytes::from_static(CONFIG),
            None,
        ),
        (
            "bench/big/adapter_model.safetensors",
            data.clone(),
            Some(sum),
        ),
    ] {
        let put = s3
            .client()
            .await
            .sdk()
            .put_object()
            .bucket("bench")
            .key(key);
        put.set_checksum_sha256(sum)
            .body(ByteStream::from(body))
            .send()
            .await
            .unwrap();
    }
    let s3_url = format!(
        "{}/bench/bench/big/adapter_model.safetensors",
        s3_server.url
    );
    let sigv4 = |url: &str| -> Vec<String> {
        [
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            &format!("{ACCESS_KEY}:{SECRET_KEY}"),
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            url,
        ]
        .map(str::to_owned)
        .to_vec()
    };

    let mut rows = vec![
        Row {
            what: "sha256 alone (in memory)",
            samples: sha_alone,
        },
        Row {
            what: "huggingface: curl -L /resolve/ (same bytes)",
            samples: vec![],
        },
        Row {
            what: "huggingface: origin, sha256 on",
            samples: vec![],
        },
        Row {
            what: "huggingface: origin, sha256 off",
            samples: vec![],
        },
        Row {
            what: "huggingface, paced link: curl -L /resolve/",
            samples: vec![],
        },
        Row {
            what: "huggingface, paced link: origin, sha256 on",
            samples: vec![],
        },
        Row {
            what: "huggingface, paced link: origin, sha256 off",
            samples: vec![],
        },
        Row {
            what: "s3 (s3s-fs): curl --aws-sigv4 (same bytes)",
            samples: vec![],
        },
        Row {
            what: "s3 (s3s-fs): origin, sha256 on",
            samples: vec![],
        },
        Row {
            what: "s3 (s3s-fs): origin, sha256 off",
            samples: vec![],
        },
        Row {
            what: "s3 (s3s-fs), CRC64NVME object: origin, crc on",
            samples: vec![],
        },
        Row {
            what: "s3 (s3s-fs), CRC64NVME object: origin, crc off",
            samples: vec![],
        },
    ];
    let resolve = format!(
        "{}/bench/big/resolve/main/adapter_model.safetensors",
        hub.url()
    );
    // One group per origin: curl, then the origin verifying, then not; the order within a
    // group flips every repeat, so no contender always runs first (or right after another).
    for i in 0..repeats {
        let order = |n: usize| -> Vec<usize> {
            if i % 2 == 0 {
                (0..n).collect()
            } else {
                (0..n).rev().collect()
            }
        };
        for k in order(3) {
            match k {
                0 => rows[1]
                    .samples
                    .push(curl_async(vec!["-L".into(), resolve.clone()]).await),
                _ => rows[1 + k]
                    .samples
                    .push(timed_fetch(if k == 1 { &hf } else { &hf_off }, &name).await),
            }
        }
        hub.set_link_rate(Some(link_mbps * 1_000_000));
        for k in order(3) {
            match k {
                0 => rows[4]
                    .samples
                    .push(curl_async(vec!["-L".into(), resolve.clone()]).await),
                _ => rows[4 + k]
                    .samples
                    .push(timed_fetch(if k == 1 { &hf } else { &hf_off }, &name).await),
            }
        }
        hub.set_link_rate(None);
        for k in order(3) {
            match k {
                0 => rows[7].samples.push(curl_async(sigv4(&s3_url)).await),
                _ => rows[7 + k]
                    .samples
                    .push(timed_fetch(if k == 1 { &s3 } else { &s3_off }, &name).await),
            }
        }
        for k in order(2) {
            rows[10 + k]
                .samples
                .push(timed_fetch(if k == 0 { &s3 } else { &s3_off }, &crc_name).await);
        }
    }
    for r in &rows {
        let all: Vec<String> = r.samples.iter().map(|s| format!("{s:.0}")).collect();
        println!(
            "{:<46} {:>7.0}   [{}]",
            r.what,
            median(r.samples.clone()),
            all.join(" ")
        );
    }
    println!("paced link: {link_mbps} MB/s asked (curl's row is what it delivers)");
    for (name, on, off) in [
        ("huggingface", 2, 3),
        ("huggingface, paced link", 5, 6),
        ("s3", 8, 9),
        ("s3, CRC64NVME object", 10, 11),
    ] {
        let (on, off) = (
            median(rows[on].samples.clone()),
            median(rows[off].samples.clone()),
        );
        println!(
            "{name}: the checksum costs {:.1}% of throughput",
            (1.0 - on / off) * 100.0
        );
    }
}
