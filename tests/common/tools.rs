//! Programs from outside the project that some tests drive (promtool, prometheus, kubectl): found
//! on PATH or installed, else the test says loudly that it skipped (a failure under `CI=true`).

use std::{io::Write, path::PathBuf, process::Command, sync::Mutex};

/// `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|f| f.is_file())
}

/// The Prometheus server and promtool.
pub struct Prometheus {
    pub prometheus: PathBuf,
    pub promtool: PathBuf,
}

/// prometheus and promtool from PATH, installed first with `scripts/install-prometheus.sh`
/// (Debian's package; needs root and apt) when missing. `None` after skipping `test` (a failure
/// under `CI=true`: CI installs them).
pub fn prometheus(test: &str) -> Option<Prometheus> {
    // One install at a time within this process; apt's own lock (waited for) orders processes.
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let found = || {
        Some(Prometheus {
            prometheus: which("prometheus")?,
            promtool: which("promtool")?,
        })
    };
    if let Some(p) = found() {
        return Some(p);
    }
    let installed = Command::new("bash")
        .arg("scripts/install-prometheus.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .is_ok_and(|s| s.success());
    match found() {
        Some(p) if installed => Some(p),
        _ => {
            skip_or_fail_in_ci(
                test,
                "promtool/prometheus are missing and scripts/install-prometheus.sh could not \
                 install them (it needs root and apt-get)",
            );
            None
        }
    }
}

/// Say that `test` did not run and why, on the real stderr (libtest's capture only takes the
/// print macros, so this shows even when the test passes).
pub fn skip(test: &str, why: &str) {
    let bar = "!".repeat(78);
    let _ = writeln!(std::io::stderr(), "\n{bar}\nSKIPPED {test}: {why}\n{bar}");
}

/// [`skip`], except under `CI=true`, where a tool CI is meant to have is a failure.
pub fn skip_or_fail_in_ci(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} cannot run under CI=true: {why}");
    }
    skip(test, why);
}
