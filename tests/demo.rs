//! The README's first command: `loraplex demo` runs on its own and reports a cold fetch, warm
//! hits, a stream and an unknown adapter.

use std::process::Command;

#[test]
fn demo_runs_and_reports_cold_and_warm() {
    let out = Command::new(env!("CARGO_BIN_EXE_loraplex"))
        .arg("demo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "base model",
        "acme/summarizer-lora (cold)",
        "acme/summarizer-lora (warm, mean of 5)",
        "stream (SSE)",
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(row))
            .unwrap_or_else(|| panic!("{row}:\n{text}"));
        assert!(line.contains(" 200 "), "{line}");
    }
    let unknown = text
        .lines()
        .find(|l| l.contains("unknown adapter"))
        .unwrap();
    assert!(
        unknown.contains(" 404 ") && unknown.contains("does not exist"),
        "{unknown}"
    );
    assert!(text.contains("cache: 2 adapters"), "{text}");
    assert!(text.contains("adapter_model.safetensors"), "{text}");
}
