//! The per-request codec work on the hot path: reading the `model` of a chat body (about 1 KB
//! and 64 KB, with tools and nested `"model"` keys) and parsing a typical OpenAI request head.
//! Run: `cargo bench --bench codec`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loraplex::http::{
    RequestHead,
    model::{extract_model, rewrite_model},
};
use serde_json::json;

/// A chat request as the OpenAI SDKs send it, grown with conversation turns to `target` bytes.
/// The top-level `model` comes last, after `tools` with their own nested `"model"` keys, so
/// the whole body is read before it is found.
fn chat_body(target: usize) -> Vec<u8> {
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_forecast",
            "description": "Weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "model": {"type": "string", "enum": ["gfs", "ecmwf"]}
                },
                "required": ["city"]
            }
        }
    }]);
    let mut messages = vec![json!({"role": "system", "content": "You are a concise assistant."})];
    let body = |messages: &Vec<serde_json::Value>| {
        serde_json::to_vec(&json!({
            "messages": messages,
            "tools": tools,
            "tool_choice": "auto",
            "temperature": 0.7,
            "max_tokens": 512,
            "stream": true,
            "model": "acme/support-lora-v3"
        }))
        .unwrap()
    };
    let mut turn = 0;
    while body(&messages).len() < target {
        turn += 1;
        let (role, content) = if turn % 2 == 1 {
            (
                "user",
                format!("Turn {turn}: what about tomorrow in Paris? {{\"model\":\"x\"}}"),
            )
        } else {
            (
                "assistant",
                format!("Turn {turn}: 18°C and cloudy, light wind from the west."),
            )
        };
        messages.push(json!({"role": role, "content": content}));
    }
    body(&messages)
}

const HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\n\
Host: loraplex.inference.svc:9090\r\n\
User-Agent: OpenAI/Python 1.54.0\r\n\
Accept: application/json\r\n\
Accept-Encoding: gzip, deflate\r\n\
Content-Type: application/json\r\n\
Authorization: Bearer sk-0123456789abcdef0123456789abcdef\r\n\
X-Stainless-Lang: python\r\n\
X-Stainless-Retry-Count: 0\r\n\
X-Tenant-ID: team-a\r\n\
Connection: keep-alive\r\n\
Content-Length: 1043\r\n\r\n";

fn model(c: &mut Criterion) {
    let mut g = c.benchmark_group("model");
    for (name, size) in [("extract_1k", 1024), ("extract_64k", 64 * 1024)] {
        let body = chat_body(size);
        assert_eq!(
            extract_model(&body).unwrap().as_deref(),
            Some("acme/support-lora-v3")
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| extract_model(black_box(&body)).unwrap())
        });
    }
    let body = chat_body(1024);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("rewrite_1k", |b| {
        b.iter(|| rewrite_model(black_box(&body), "meta-llama/Llama-3.1-8B-Instruct").unwrap())
    });
    g.finish();
}

fn head(c: &mut Criterion) {
    let mut g = c.benchmark_group("head");
    g.throughput(Throughput::Bytes(HEAD.len() as u64));
    g.bench_function("parse_openai", |b| {
        b.iter(|| RequestHead::parse(black_box(HEAD)).unwrap().unwrap())
    });
    let (parsed, _) = RequestHead::parse(HEAD).unwrap().unwrap();
    let mut out = Vec::with_capacity(1024);
    g.bench_function("write_forward", |b| {
        b.iter(|| {
            out.clear();
            parsed.write_forward(&mut out, &[("x-loraplex-forwarded", b"1")], 1043);
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, model, head);
criterion_main!(benches);
