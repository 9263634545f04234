use super::*;

/// Captures of a real vLLM 0.32 (`tests/fixtures/vllm/README.md` says how they were taken).
const BUSY: &str = include_str!("../../../tests/fixtures/vllm/metrics-busy-lora.txt");
const IDLE_AFTER: &str = include_str!("../../../tests/fixtures/vllm/metrics-idle-after-lora.txt");
const FRESH: &str = include_str!("../../../tests/fixtures/vllm/metrics-idle-fresh.txt");
const SERVED: &str =
    include_str!("../../../tests/fixtures/vllm/metrics-served-name-after-lora.txt");

#[test]
fn reads_a_real_vllm_while_busy() {
    // Five adapters, four slots: four run, one waits (and the base model runs too).
    let m = VllmMetrics::parse(BUSY).unwrap();
    assert!(m.is_vllm);
    assert_eq!((m.running, m.waiting), (5.0, 1.0));
    assert!(m.kv.unwrap() > 0.0 && m.kv.unwrap() < 1.0);
    assert_eq!(m.started, Some(1.7961368319e9));
    assert_eq!(m.max_lora, Some(4));
    // The newest label set, not the last line.
    assert_eq!(
        m.adapters,
        [
            "acme/summarizer-lora",
            "acme/translator-lora",
            "acme/coder-lora",
            "acme/math-lora"
        ]
    );
}

#[test]
fn reads_a_real_vllm_idle_before_and_after_lora_requests() {
    let fresh = VllmMetrics::parse(FRESH).unwrap();
    assert!(fresh.is_vllm);
    assert_eq!(
        (fresh.running, fresh.waiting, fresh.success_total),
        (0.0, 0.0, 0.0)
    );
    assert_eq!(
        (fresh.max_lora, fresh.adapters.len()),
        (None, 0),
        "no LoRA request yet"
    );
    let after = VllmMetrics::parse(IDLE_AFTER).unwrap();
    assert_eq!((after.running, after.waiting), (0.0, 0.0));
    assert!(after.success_total >= 6.0, "{}", after.success_total);
    assert_eq!(after.max_lora, Some(4));
    // Every label set seen stays exported (eight here); the newest, once idle, is the empty one.
    let series = IDLE_AFTER
        .lines()
        .filter(|l| l.starts_with("vllm:lora_requests_info{"))
        .count();
    assert!(series >= 5, "{series}");
    assert!(after.adapters.is_empty(), "{:?}", after.adapters);
    // With --served-model-name: the same figures.
    let served = VllmMetrics::parse(SERVED).unwrap();
    assert_eq!(served.max_lora, Some(4));
    assert!(served.started.is_some() && served.adapters.is_empty());
}

#[test]
fn sums_engines_and_falls_back_to_the_old_kv_name() {
    let text = "vllm:num_requests_running{engine=\"0\"} 2\nvllm:num_requests_running{engine=\"1\"} 3\n\
                vllm:gpu_cache_usage_perc{engine=\"0\"} 0.5\nvllm:gpu_cache_usage_perc{engine=\"1\"} 0.7\n";
    let m = VllmMetrics::parse(text).unwrap();
    assert_eq!(m.running, 5.0);
    assert!((m.kv.unwrap() - 0.6).abs() < 1e-9);
    assert_eq!((m.max_lora, m.adapters.len()), (None, 0));
    // Before the first LoRA request and on a server that is not vLLM.
    let m = VllmMetrics::parse("process_start_time_seconds 1e9\nup 1\n").unwrap();
    assert!(!m.is_vllm);
    assert_eq!(m.kv, None);
}

#[test]
fn labels_with_escapes_commas_and_braces() {
    let line = r#"m{a="x,y",b="q\"}\\",c="n\nl",} 1.5 1700000000000"#;
    let s = samples(line).next().unwrap().unwrap();
    assert_eq!((s.name, s.value), ("m", 1.5));
    assert_eq!(s.label("a").as_deref(), Some("x,y"));
    assert_eq!(s.label("b").as_deref(), Some("q\"}\\"));
    assert_eq!(s.label("c").as_deref(), Some("n\nl"));
    assert_eq!(s.label("d"), None);
    for v in ["NaN", "+Inf", "-Inf", "1e-3", "-0.5"] {
        assert!(samples(&format!("m {v}")).next().unwrap().is_ok(), "{v}");
    }
}

#[test]
fn malformed_lines_are_refused_with_their_number() {
    for (bad, what) in [
        ("m{a=\"x} 1", "unterminated"),
        ("m{a=x} 1", "=\""),
        ("m{a=\"x\"b=\"y\"} 1", ","),
        ("m 1 2 3", "after the timestamp"),
        ("m one", "value"),
        ("m{a=\"\\q\"} 1", "escape"),
        ("9m 1", "name"),
        ("m", "space"),
        ("# TYPE", "name"),
        ("m 1 x", "timestamp"),
    ] {
        let text = format!("ok 1\n{bad}\n");
        let err = VllmMetrics::parse(&text).unwrap_err();
        assert_eq!(err.line, 2, "{bad}");
        assert!(err.message.contains(what), "{bad}: {err}");
    }
}
