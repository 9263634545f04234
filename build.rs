//! Build script: records the git commit for `loraplex --version` (`LORAPLEX_GIT_SHA`).
//! Outside a git checkout (a source tarball, a vendored copy) the commit is "none"; a
//! packager can set `LORAPLEX_GIT_SHA` in the environment instead. Never fails the build.

use std::{path::Path, process::Command};

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LORAPLEX_GIT_SHA");
    if let Ok(sha) = std::env::var("LORAPLEX_GIT_SHA") {
        println!("cargo:rustc-env=LORAPLEX_GIT_SHA={sha}");
        return;
    }
    let Some(sha) = git(&["rev-parse", "--short", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=LORAPLEX_GIT_SHA={sha}");
    // Run again when HEAD moves: HEAD itself, the branch it points to, packed refs. Only
    // files that exist, or cargo would rerun this on every build.
    let mut watch = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
