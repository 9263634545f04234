//! The command line, parsed for real (clap), over real config files in a tempdir.

use std::{path::PathBuf, time::Duration};

use super::*;
use crate::config::{DiscoveryConfig, OriginConfig};

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(args: &[&str]) -> Result<Command, CliError> {
    let mut all = vec!["loraplex"];
    all.extend_from_slice(args);
    parse_with_env(all, no_env)
}

fn serve(args: &[&str]) -> Config {
    match parse(args) {
        Ok(Command::Serve { config, warnings }) => {
            assert!(warnings.is_empty(), "{warnings:?}");
            *config
        }
        other => panic!("{args:?}: {other:?}"),
    }
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

const FILE: &str = "listen: \":9090\"\nvllm_url: http://127.0.0.1:8000\nstorage:\n  dir: /data\n\
    discovery:\n  static:\n    peers: [\"10.0.0.1:9090\"]\n\
    origins:\n  - type: huggingface\n    token: ${HF_TOKEN}\n";

#[test]
fn no_arguments_serve_the_defaults() {
    assert_eq!(serve(&[]), Config::default());
}

#[test]
fn flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "c.yaml", FILE);
    let c = serve(&["--config", &path]);
    assert_eq!(c.listen, ":9090");
    assert_eq!(c.storage.dir, PathBuf::from("/data"));

    let c = serve(&[
        "--config",
        &path,
        "--listen",
        ":7000",
        "--self=10.0.0.5:7000",
        "--vllm-url",
        "http://127.0.0.1:8001",
        "--dir",
        "/nvme",
        "--peers",
        "10.0.0.5:7000,,10.0.0.6:7000",
        "--workers",
        "3",
        "--model",
        "base/m",
    ]);
    assert_eq!(c.listen, ":7000");
    assert_eq!(c.self_addr.as_deref(), Some("10.0.0.5:7000"));
    assert_eq!(c.vllm_url(), "http://127.0.0.1:8001");
    assert_eq!(c.storage.dir, PathBuf::from("/nvme"));
    assert_eq!(c.server.workers, 3);
    assert_eq!(c.vllm.model_name.as_deref(), Some("base/m"));
    assert_eq!(
        c.discovery,
        DiscoveryConfig::Static {
            peers: vec!["10.0.0.5:7000".into(), "10.0.0.6:7000".into()]
        }
    );
    // An empty --peers overrides nothing, as in Go.
    let c = serve(&["--config", &path, "--peers", ""]);
    assert_eq!(
        c.discovery,
        DiscoveryConfig::Static {
            peers: vec!["10.0.0.1:9090".into()]
        }
    );
}

#[test]
fn discovery_flag_switches_the_files_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "c.yaml",
        "discovery:\n  file:\n    dir: /shared\n    heartbeat_interval: 2s\n",
    );
    let c = serve(&["--config", &path, "--discovery", "file"]);
    assert_eq!(
        c.discovery,
        DiscoveryConfig::File {
            dir: "/shared".into(),
            heartbeat_interval: Duration::from_secs(2),
            stale_threshold: Duration::from_secs(15),
        }
    );
}

#[test]
fn go_single_dash_flags_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "c.yaml", FILE);
    let two = serve(&[
        "--config",
        &path,
        "--listen=:9191",
        "--self",
        "10.0.0.7:9191",
        "--peers",
        "10.0.0.7:9191",
        "--vllm-url=http://127.0.0.1:1",
        "--dir",
        "/d",
        "--discovery",
        "static",
        "--workers",
        "2",
    ]);
    let one = serve(&[
        "-config",
        &path,
        "-listen=:9191",
        "-self",
        "10.0.0.7:9191",
        "-peers",
        "10.0.0.7:9191",
        "-vllm-url=http://127.0.0.1:1",
        "-dir",
        "/d",
        "-discovery",
        "static",
        "-workers",
        "2",
    ]);
    assert_eq!(one, two);
    assert_eq!(one.listen, ":9191");
    assert!(matches!(parse(&["-version"]), Ok(Command::Version)));
    assert!(matches!(parse(&["-help"]), Err(CliError::Help(_))));
    // The value of a flag is never rewritten: this is a directory named "-listen".
    assert_eq!(
        serve(&["-dir", "-listen"]).storage.dir,
        PathBuf::from("-listen")
    );
    // Unknown one-dash words are left to clap, which refuses them.
    assert!(matches!(parse(&["-bogus"]), Err(CliError::Usage(_))));
}

#[test]
fn rewrite_stops_at_double_dash() {
    let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
    assert_eq!(
        go_style_flags(args(&["lp", "-listen", "-dir", "-keep", "--", "-config"])),
        args(&["lp", "--listen=-dir", "--keep", "--", "-config"])
    );
    assert_eq!(
        go_style_flags(args(&[
            "lp", "-h", "-x", "x", "--keep", "--self", "a:1", "-peers"
        ])),
        args(&["lp", "-h", "-x", "x", "--keep", "--self=a:1", "--peers"])
    );
}

#[test]
fn version() {
    assert!(matches!(parse(&["--version"]), Ok(Command::Version)));
    assert!(matches!(
        parse(&["--config", "/nonexistent", "--version"]),
        Ok(Command::Version)
    ));
    let line = version_line();
    let rest = line
        .strip_prefix(&format!("loraplex {} (commit=", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("{line}"));
    let sha = rest.strip_suffix(')').unwrap();
    assert!(
        sha == "none" || (sha.len() >= 7 && sha.bytes().all(|b| b.is_ascii_hexdigit())),
        "{line}"
    );
}

#[test]
fn help_documents_every_flag() {
    let Err(e @ CliError::Help(_)) = parse(&["--help"]) else {
        panic!("no help")
    };
    assert_eq!(e.exit_code(), 0);
    let text = e.to_string();
    for flag in [
        "--version",
        "--config <FILE>",
        "--listen <ADDR>",
        "--self <ADDR>",
        "--vllm-url <URL>",
        "--dir <DIR>",
        "--discovery <MODE>",
        "--peers <LIST>",
        "--workers <N>",
        "--model <NAME>",
        "demo",
        "check-config",
        ":8080",
        "http://localhost:8000",
        "/mnt/nvme/loraplex",
        "one per core",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}

#[test]
fn usage_errors() {
    for args in [
        &["--bogus"][..],
        &["--workers", "0"],
        &["--workers", "many"],
        &["--listen"],
        &["check-config"],
        &["demo", "--nope"],
    ] {
        let e = parse(args).unwrap_err();
        assert!(matches!(e, CliError::Usage(_)), "{args:?}: {e:?}");
        assert_eq!(e.exit_code(), 2);
    }
}

#[test]
fn subcommands() {
    assert_eq!(
        parse(&["check-config", "/etc/lp.yaml"]).unwrap(),
        Command::CheckConfig {
            path: "/etc/lp.yaml".into()
        }
    );
    assert_eq!(
        parse(&["demo"]).unwrap(),
        Command::Demo(DemoArgs { keep: false })
    );
    assert_eq!(
        parse(&["demo", "-keep"]).unwrap(),
        Command::Demo(DemoArgs { keep: true })
    );
}

#[test]
fn bad_config_is_exit_1_naming_file_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "bad.yaml", "storage:\n  max_size: 10XB\n");
    let e = parse(&["--config", &path]).unwrap_err();
    assert_eq!(e.exit_code(), 1);
    assert_eq!(
        e.to_string(),
        format!(
            "config {path}: storage.max_size: invalid size \"10XB\" (examples: 500MB, 100GB, 1.5TB)"
        )
    );
    let e = parse(&["--config", "/nonexistent/lp.yaml"]).unwrap_err();
    assert_eq!(e.exit_code(), 1);
    assert!(
        e.to_string()
            .starts_with("read config /nonexistent/lp.yaml: "),
        "{e}"
    );
    let e = parse(&["--listen", "8080"]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("listen (--listen): invalid address \"8080\""),
        "{e}"
    );
}

#[test]
fn check_config_prints_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "c.yaml", &format!("{FILE}routing:\n  hash_onn: x\n"));
    let env = |k: &str| (k == "HF_TOKEN").then(|| "hf_very_secret".to_owned());
    let out = check_config_with_env(path.as_ref(), env).unwrap();
    assert!(out.starts_with(&format!("# {path}: OK\n")), "{out}");
    assert!(
        out.contains("# warning: unknown key routing.hash_onn (ignored)"),
        "{out}"
    );
    assert!(!out.contains("hf_very_secret"), "{out}");
    for key in [
        "listen: :9090",
        "self_addr:",
        "vllm_url: http://127.0.0.1:8000",
        "  dir: /data",
        "  max_size: 100GB",
        "  rewrite_base_model: false",
        "  direct_io: auto",
        "  fetch_wait_timeout: 2m",
        "- type: huggingface",
        "  endpoint: https://huggingface.co",
        "  token: <redacted>",
        "  connect_timeout: 10s",
        "  retries: 3",
        "  ttl: 1h",
        "  mode: static",
        "  - 10.0.0.1:9090",
        "  hash_on: model",
        "  vnodes_per_peer: 150",
        "  forward_timeout: 5s",
        "  overflow_threshold: 0.8",
        "  fallback_to_base_model: false",
        "  model_name:",
        "  max_loras: 200",
        "  max_lora_rank: 64",
        "  health_check_interval: 10s",
        "  workers:",
        "  driver: auto",
        "  max_body_size: 32MB",
        "  max_header_size: 64KB",
        "  header_read_timeout: 30s",
        "  body_read_timeout: 1m",
        "  idle_timeout: 2m",
        "  upstream_connect_timeout: 5s",
        "  upstream_idle_timeout: 1m",
        "  shutdown_grace: 15s",
        "  log_format: text",
        "admin:",
        "cluster:",
    ] {
        assert!(out.contains(key), "{key} missing from:\n{out}");
    }
    // What it prints is a config that loads to the same settings (tokens aside).
    let reloaded = Config::resolve(Some(&out), &Overrides::default(), no_env)
        .unwrap()
        .config;
    let mut original = Config::resolve(
        Some(&std::fs::read_to_string(&path).unwrap()),
        &Overrides::default(),
        env,
    )
    .unwrap()
    .config;
    if let OriginConfig::HuggingFace { token, .. } = &mut original.origins[0] {
        *token = Some("<redacted>".into());
    }
    assert_eq!(reloaded, original);

    let bad = write(&dir, "bad.yaml", "routing:\n  overflow_threshold: 1.5\n");
    let e = check_config_with_env(bad.as_ref(), no_env).unwrap_err();
    assert_eq!(e.exit_code(), 1);
    assert_eq!(
        e.to_string(),
        format!("config {bad}: routing.overflow_threshold: 1.5 is not between 0 and 1")
    );
}

#[test]
fn check_config_reads_the_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let yaml = format!("server:\n  tls: {{cert: {d}/none.crt, key: {d}/none.key}}\n");
    let path = write(&dir, "tls.yaml", &yaml);
    let e = check_config_with_env(path.as_ref(), no_env).unwrap_err();
    assert_eq!(e.exit_code(), 1);
    let e = e.to_string();
    assert!(
        e.contains(&format!("server.tls.cert: {d}/none.crt: No such file")),
        "{e}"
    );
}

#[test]
fn vllm_url_repeats_for_several_backends() {
    let c = serve(&[
        "--vllm-url",
        "http://127.0.0.1:8001",
        "-vllm-url=http://127.0.0.1:8002",
    ]);
    assert_eq!(
        c.vllm_urls,
        ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    );
}
