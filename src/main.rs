//! The `loraplex` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use loraplex::{
    cli::{self, Command},
    config::{Config, LogFormat},
    node::Node,
};

fn main() -> ExitCode {
    let command = match cli::parse_from(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => {
            e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    match command {
        Command::Version => {
            println!("{}", cli::version_line());
            ExitCode::SUCCESS
        }
        Command::CheckConfig { path } => match cli::check_config(&path) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                e.print();
                ExitCode::from(e.exit_code() as u8)
            }
        },
        Command::Demo(args) => demo(&args),
        Command::Serve { config, warnings } => {
            init_logging(config.server.log_format, "info");
            for w in warnings {
                tracing::warn!("{w}");
            }
            serve(*config)
        }
    }
}

#[cfg(feature = "demo")]
fn demo(args: &cli::DemoArgs) -> ExitCode {
    init_logging(LogFormat::Text, "warn");
    match loraplex::demo::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "demo"))]
fn demo(_: &cli::DemoArgs) -> ExitCode {
    eprintln!(
        "this loraplex was built without the demo (cargo feature `demo`, on by default); \
         build it with default features to run `loraplex demo`"
    );
    ExitCode::FAILURE
}

fn serve(config: Config) -> ExitCode {
    let node = match Node::start(config) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e.message, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    node.stop_on_signals();
    node.wait();
    ExitCode::SUCCESS
}

/// `RUST_LOG` filters (default `default_level`); text or JSON lines on stderr, colored only
/// when stderr is a terminal (and `NO_COLOR` is unset), so log files stay plain.
/// `LORAPLEX_LOG_FORMAT=json|text` overrides `server.log_format`.
fn init_logging(format: LogFormat, default_level: &str) {
    let format = match std::env::var("LORAPLEX_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("text") => LogFormat::Text,
        _ => format,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(color)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
