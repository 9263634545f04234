//! Stand-in origins for the end-to-end test against a real vLLM (`scripts/e2e-vllm.sh`): the
//! stand-in Hugging Face Hub and an S3 wire-protocol server, in one process on 127.0.0.1.
//!
//! - Hub: every directory under `--hub-dir` holding an `adapter_config.json` becomes the repo
//!   named by its relative path (`org/name`), one commit on `main` whose sha is a hash of its
//!   files; `*.safetensors` and `*.bin` are LFS files (served through the CDN redirect).
//! - S3: `s3s` over `s3s-fs` on `--s3-dir`, each subdirectory a bucket, with fixed test
//!   credentials. Objects are read from disk on every request, and s3s-fs computes the ETag of a
//!   file written behind its back from its content (MD5), so overwriting a file changes it.
//!
//! Prints `hub URL repos=...`, `s3 URL access_key=.. secret_key=..`, then `ready`, and serves
//! until killed.
//!
//!     cargo run --release --example standins -- --hub-dir HUB --s3-dir S3 [--s3-port 0]

use std::{
    error::Error,
    fs,
    path::{Path, PathBuf},
};

use clap::Parser;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder as ConnBuilder,
};
use loraplex::{
    origin::transfer::hex,
    testkit::hub::{CdnHost, HubFile, StandInHub},
};
use s3s::{auth::SimpleAuth, service::S3ServiceBuilder};
use sha2::{Digest, Sha256};

const ACCESS_KEY: &str = "AKIALORAPLEXE2E";
const SECRET_KEY: &str = "loraplex-e2e-secret";

#[derive(Parser)]
struct Args {
    /// Repos: every directory with an `adapter_config.json` (name = relative path).
    #[arg(long)]
    hub_dir: PathBuf,
    /// Buckets: every subdirectory.
    #[arg(long)]
    s3_dir: PathBuf,
    /// Port of the S3 server (0: any). The Hub always takes a free port.
    #[arg(long, default_value_t = 0)]
    s3_port: u16,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let hub = StandInHub::start_on(rt.handle(), None, CdnHost::Other)?;
    let mut repos = Vec::new();
    load_repos(&hub, &args.hub_dir, &args.hub_dir, &mut repos)?;
    println!("hub {} repos={}", hub.url(), repos.join(","));
    let s3 = rt.block_on(start_s3(&args.s3_dir, args.s3_port))?;
    println!("s3 {s3} access_key={ACCESS_KEY} secret_key={SECRET_KEY}");
    println!("ready");
    rt.block_on(std::future::pending::<()>());
    Ok(())
}

/// Add a commit for every adapter directory under `dir`.
fn load_repos(
    hub: &StandInHub,
    root: &Path,
    dir: &Path,
    repos: &mut Vec<String>,
) -> Result<(), Box<dyn Error>> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    if dir.join("adapter_config.json").is_file() {
        let repo = dir.strip_prefix(root)?.to_string_lossy().into_owned();
        let mut files = Vec::new();
        let mut commit = Sha256::new();
        for e in entries.iter().filter(|e| e.path().is_file()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = fs::read(e.path())?;
            commit.update(name.as_bytes());
            commit.update(Sha256::digest(&bytes));
            let lfs = name.ends_with(".safetensors") || name.ends_with(".bin");
            files.push(match lfs {
                true => HubFile::lfs(&name, bytes),
                false => HubFile::small(&name, bytes),
            });
        }
        let sha = hex(&commit.finalize())[..40].to_owned();
        hub.add_commit(&repo, &sha, &["main"], files);
        repos.push(repo);
    }
    for e in entries.iter().filter(|e| e.path().is_dir()) {
        load_repos(hub, root, &e.path(), repos)?;
    }
    Ok(())
}

/// Serve `root` over the S3 protocol; returns the base URL.
async fn start_s3(root: &Path, port: u16) -> Result<String, Box<dyn Error>> {
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("s3s-fs on {root:?}: {e:?}"))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        while let Ok((socket, _)) = listener.accept().await {
            let conn = http.serve_connection(TokioIo::new(socket), service.clone());
            let conn = conn.into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Ok(url)
}
