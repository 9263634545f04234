//! The command line: the Go loraplex's flags (`--config`, `--listen`, `--self`, `--vllm-url`,
//! `--dir`, `--discovery`, `--peers`, `--version`), ours (`--workers`, `--model`), and the
//! subcommands `demo` and `check-config FILE`. No subcommand means: serve.
//!
//! Go's `flag` package also takes long flags with one dash (`-config x.yaml`, `-listen=:9090`);
//! scripts written for the Go binary use them, so known long flags with one dash are rewritten
//! to two before clap sees them.
//!
//! Nothing here exits the process or prints: [`parse_from`] returns a [`Command`] or a
//! [`CliError`] that knows its exit code, so `main` stays a `match` and all of it is testable.

use std::{
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
};

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, ConfigError, Overrides, Redact};

/// `loraplex <version> (commit=<short sha or "none">)`, as the Go binary prints it.
pub fn version_line() -> String {
    format!(
        "loraplex {} (commit={})",
        env!("CARGO_PKG_VERSION"),
        option_env!("LORAPLEX_GIT_SHA").unwrap_or("none")
    )
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the proxy with this config (file, then flags, then defaults). `warnings` are for the
    /// log once it is set up (unknown keys and the like).
    Serve {
        config: Box<Config>,
        warnings: Vec<String>,
    },
    /// The built-in demo.
    Demo(DemoArgs),
    /// Load and check a config file, print the effective settings: see [`check_config`].
    CheckConfig { path: PathBuf },
    /// Print [`version_line`].
    Version,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct DemoArgs {
    /// Keep the demo's temporary directory (adapters, config, logs) when it ends.
    #[arg(long)]
    pub keep: bool,
}

/// Why the command line was not run.
#[derive(Debug)]
pub enum CliError {
    /// `--help` or `help`: this text goes to stdout, exit 0.
    Help(String),
    /// A usage error (unknown flag, bad flag value): stderr, exit 2.
    Usage(String),
    /// The config was refused: stderr, exit 1.
    Config {
        path: Option<PathBuf>,
        error: ConfigError,
    },
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Help(_) => 0,
            CliError::Usage(_) => 2,
            CliError::Config { .. } => 1,
        }
    }

    /// Print where it belongs (stdout for help, stderr otherwise).
    pub fn print(&self) {
        match self {
            CliError::Help(text) => println!("{}", text.trim_end()),
            other => eprintln!("{other}"),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Help(text) | CliError::Usage(text) => f.write_str(text.trim_end()),
            // A read error already names the file.
            CliError::Config {
                error: e @ ConfigError::Read { .. },
                ..
            } => write!(f, "{e}"),
            CliError::Config {
                path: Some(path),
                error,
            } => write!(f, "config {}: {error}", path.display()),
            CliError::Config { path: None, error } => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for CliError {}

/// loraplex: an L7 proxy in front of vLLM for many LoRA adapters. It fetches each requested
/// adapter on demand into the directory vLLM's filesystem resolver reads, and routes each
/// request to the node of the cluster that owns it.
///
/// Flags override the config file; the file overrides the defaults. Long flags also work with
/// one dash (`-config x.yaml`), as with the Go loraplex.
#[derive(Debug, Parser)]
#[command(name = "loraplex", disable_version_flag = true)]
struct Cli {
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
    /// YAML config file (the Go loraplex's keys; `${VAR}` is expanded from the environment).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: the file's `listen`, else :8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// This node's address as its peers know it, e.g. 10.0.0.1:9090 [default: the listen
    /// address].
    #[arg(long = "self", value_name = "ADDR")]
    self_addr: Option<String>,
    /// vLLM's base URL [default: the file's `vllm_url`/`vllm_urls`, else
    /// http://localhost:8000]. Repeat it for a node fronting several vLLMs.
    #[arg(long, value_name = "URL")]
    vllm_url: Vec<String>,
    /// Adapter directory, the one vLLM's resolver reads (VLLM_LORA_RESOLVER_CACHE_DIR)
    /// [default: the file's `storage.dir`, else /mnt/nvme/loraplex].
    #[arg(long, value_name = "DIR")]
    dir: Option<String>,
    /// Peer discovery: static, file or k8s [default: the file's `discovery.mode`, else
    /// static].
    #[arg(long, value_name = "MODE")]
    discovery: Option<String>,
    /// Comma-separated peers for static discovery, e.g. 10.0.0.1:9090,10.0.0.2:9090.
    #[arg(long, value_name = "LIST")]
    peers: Option<String>,
    /// Data-plane worker threads [default: the file's `server.workers`, else one per core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=4096))]
    workers: Option<u16>,
    /// The base model vLLM serves (`vllm.model_name`) [default: asked from vLLM].
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Run a self-contained demo: a stand-in vLLM and adapter origin, and loraplex in front.
    Demo(DemoArgs),
    /// Load and check a config file, print the effective settings (every key) and exit.
    CheckConfig {
        /// The YAML config file.
        #[arg(value_name = "FILE")]
        path: PathBuf,
    },
}

/// Long flags, and whether each takes a value (for the one-dash rewrite).
const LONG_FLAGS: &[(&str, bool)] = &[
    ("help", false),
    ("version", false),
    ("keep", false),
    ("config", true),
    ("listen", true),
    ("self", true),
    ("vllm-url", true),
    ("dir", true),
    ("discovery", true),
    ("peers", true),
    ("workers", true),
    ("model", true),
];

/// Rewrite `-config x` / `-listen=:9090` to two dashes, and join a known flag to its value
/// (`--dir=-x`): the word after a flag that takes a value is that value whatever it looks like
/// (`-dir -x` is a directory named `-x`, as in Go). Nothing after `--` is touched.
fn go_style_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    out.extend(it.next());
    while let Some(arg) = it.next() {
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            out.push(arg);
            out.extend(it);
            break;
        }
        let body = match s.strip_prefix("--") {
            Some(body) => Some((body, false)),
            None => s.strip_prefix('-').map(|body| (body, true)),
        };
        let Some((body, one_dash)) = body else {
            out.push(arg);
            continue;
        };
        let (name, inline_value) = match body.split_once('=') {
            Some((name, _)) => (name, true),
            None => (body, false),
        };
        match LONG_FLAGS.iter().find(|(n, _)| *n == name) {
            // `--name=value`: clap then takes the value as it is, even one that starts with
            // a dash, as Go's flag package does.
            Some(&(_, true)) if !inline_value => match it.next() {
                Some(value) => {
                    let mut joined = OsString::from(format!("--{name}="));
                    joined.push(value);
                    out.push(joined);
                }
                None => out.push(format!("--{name}").into()),
            },
            Some(_) if one_dash => out.push(format!("-{s}").into()),
            _ => out.push(arg),
        }
    }
    out
}

/// Parse a command line (`args[0]` is the program name) with the process environment.
pub fn parse_from<I, T>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    parse_with_env(args, config::process_env)
}

/// [`parse_from`] with the environment given (`${VAR}` in the file, `HF_ENDPOINT`).
pub fn parse_with_env<I, T>(
    args: I,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = go_style_flags(args.into_iter().map(Into::into).collect());
    let cli = Cli::try_parse_from(args).map_err(|e| {
        use clap::error::ErrorKind as K;
        match e.kind() {
            K::DisplayHelp | K::DisplayHelpOnMissingArgumentOrSubcommand | K::DisplayVersion => {
                CliError::Help(e.to_string())
            }
            _ => CliError::Usage(e.to_string()),
        }
    })?;
    if cli.version {
        return Ok(Command::Version);
    }
    match cli.command {
        Some(Sub::Demo(args)) => return Ok(Command::Demo(args)),
        Some(Sub::CheckConfig { path }) => return Ok(Command::CheckConfig { path }),
        None => {}
    }
    let overrides = Overrides {
        listen: cli.listen,
        self_addr: cli.self_addr,
        vllm_urls: cli.vllm_url,
        dir: cli.dir,
        discovery: cli.discovery,
        // As Go's splitPeers: empty items are dropped, an empty list overrides nothing.
        peers: cli
            .peers
            .map(|p| {
                p.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter(|p| !p.is_empty()),
        workers: cli.workers.map(usize::from),
        model: cli.model,
    };
    let path = cli.config;
    let config_err = |error| CliError::Config {
        path: path.clone(),
        error,
    };
    let text = match &path {
        Some(p) => Some(config::read_file(p).map_err(config_err)?),
        None => None,
    };
    let loaded = Config::resolve(text.as_deref(), &overrides, env).map_err(config_err)?;
    Ok(Command::Serve {
        config: Box::new(loaded.config),
        warnings: loaded.warnings,
    })
}

/// The effective settings as YAML, every key under its config-file name, tokens hidden.
/// For `check-config` and the startup log.
pub fn render_effective(cfg: &Config) -> String {
    cfg.to_yaml(Redact::Secrets)
}

/// `check-config FILE`: load and check the file (with the process environment); on success
/// the text to print: warnings as `#` comments, then [`render_effective`].
pub fn check_config(path: &Path) -> Result<String, CliError> {
    check_config_with_env(path, config::process_env)
}

/// [`check_config`] with the environment given.
pub fn check_config_with_env(
    path: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, CliError> {
    let err = |error| CliError::Config {
        path: Some(path.to_owned()),
        error,
    };
    let text = config::read_file(path).map_err(err)?;
    let loaded = Config::resolve(Some(&text), &Overrides::default(), env).map_err(err)?;
    // The TLS files too, as the node would read them at start.
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    crate::tls::Tls::from_config(&loaded.config, metrics).map_err(err)?;
    let mut out = format!("# {}: OK\n", path.display());
    for w in &loaded.warnings {
        out.push_str(&format!("# warning: {w}\n"));
    }
    out.push_str(&render_effective(&loaded.config));
    Ok(out)
}

#[cfg(test)]
mod tests;
