use super::*;

/// Lines as vLLM 0.32 writes them (from a capture of a real server with four LoRA slots).
const REAL: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 15459.0
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7961368319e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="/tmp/tiny/base-a"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="/tmp/tiny/base-a"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="/tmp/tiny/base-a",reason="capacity"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="/tmp/tiny/base-a"} 0.0006104260774020265
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="/tmp/tiny/base-a"} 0.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="/tmp/tiny/base-a"} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="acme/summarizer-lora",waiting_lora_adapters="acme/summarizer-lora"} 1.7961368979391618e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.796136897915014e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="acme/summarizer-lora,acme/translator-lora,acme/coder-lora,acme/math-lora",waiting_lora_adapters="acme/summarizer-lora,acme/translator-lora,acme/coder-lora,acme/math-lora"} 1.7961368981362147e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="acme/summarizer-lora,acme/translator-lora,acme/coder-lora",waiting_lora_adapters="acme/summarizer-lora,acme/translator-lora,acme/coder-lora"} 1.7961368980535724e+09
"#;

#[test]
fn reads_a_real_vllm_exposition() {
    let m = VllmMetrics::parse(REAL).unwrap();
    assert!(m.is_vllm);
    assert_eq!((m.running, m.waiting), (5.0, 1.0));
    assert!((m.kv.unwrap() - 0.00061).abs() < 1e-5);
    assert_eq!(m.success_total, 1.0);
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
