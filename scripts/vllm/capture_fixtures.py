"""Captures what a real vLLM answers, as test fixtures (run by capture-fixtures.sh).

    python capture_fixtures.py OUT_DIR --plain URL --adapters A,B,... --adapter-dir DIR \
        --served URL --served-adapter NAME

--plain: a vLLM started without --served-model-name, whose resolver directory holds the
adapters named by --adapters (at least 5, one more than serve.sh's --max-loras 4, so that one
waits); --adapter-dir holds the same adapters for /v1/load_lora_adapter. --served: a vLLM
started with --served-model-name, whose resolver directory holds --served-adapter.

Writes into OUT_DIR: the /metrics text idle before any request, while LoRA requests run and idle
after them (plain), and after a LoRA request (served); /v1/models of both before and after a
LoRA request; responses.json, the status, content type and exact body of error (and the few
success) answers of the completions and adapter-loading endpoints. Fails when the LoRA
metrics did not show the label sets the fixtures are for.
"""

import argparse
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request


def call(url, body=None):
    """(status, content type, body text) of a GET, or of a POST of `body` as JSON."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=300) as res:
            return res.status, res.headers.get("content-type"), res.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read().decode()


def get_ok(url):
    status, _, text = call(url)
    if status != 200:
        sys.exit(f"GET {url}: {status} {text[:300]}")
    return text


def write(out, name, text):
    with open(os.path.join(out, name), "w") as f:
        f.write(text)
    print("wrote", name)


LORA_INFO = re.compile(r"^vllm:lora_requests_info\{(.*)\} (\S+)$", re.M)


def lora_series(metrics):
    """The label sets of vllm:lora_requests_info, as dicts."""
    return [dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) for m in LORA_INFO.finditer(metrics)]


def newest_lora_state(metrics):
    """The labels of the lora_requests_info series set last (its value is the time it was set)."""
    found = [(float(m.group(2)), m.group(1)) for m in LORA_INFO.finditer(metrics)]
    if not found:
        return None
    return dict(re.findall(r'(\w+)="([^"]*)"', max(found)[1]))


def completion(url, model, max_tokens=8, **extra):
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return call(f"{url}/v1/completions", body)


def sample(metrics, name):
    """The value of the first sample of `name` (0 when absent)."""
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def busy_metrics(url, adapters, base):
    """Send one long request per adapter (and one for the base) at once, more adapters than
    LoRA slots; return the /metrics text seen with a request waiting and the most adapters
    running."""
    results = []

    def run(model):
        results.append((model, completion(url, model, max_tokens=240, ignore_eos=True)[0]))

    threads = [threading.Thread(target=run, args=(m,)) for m in adapters + [base]]
    for t in threads:
        t.start()
    best, best_rank = None, None
    while any(t.is_alive() for t in threads):
        text = get_ok(f"{url}/metrics")
        state = newest_lora_state(text) or {}
        running = [a for a in state.get("running_lora_adapters", "").split(",") if a]
        rank = (sample(text, "vllm:num_requests_waiting") > 0, len(running),
                sample(text, "vllm:num_requests_running"))
        if best_rank is None or rank > best_rank:
            best, best_rank = text, rank
        time.sleep(0.2)
    for t in threads:
        t.join()
    bad = [r for r in results if r[1] != 200]
    if bad:
        sys.exit(f"requests failed: {bad}")
    if not best_rank[0] or best_rank[1] < 2:
        sys.exit(f"no /metrics snapshot with a request waiting and 2 adapters running: {best_rank}")
    print("busy snapshot: waiting, adapters running, requests running =", best_rank)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--plain", required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--adapter-dir", required=True)
    ap.add_argument("--served", required=True)
    ap.add_argument("--served-adapter", required=True)
    args = ap.parse_args()
    out, plain, served = args.out_dir, args.plain, args.served
    adapters = args.adapters.split(",")
    os.makedirs(out, exist_ok=True)
    responses = []

    def record(name, method, url, path, body=None):
        status, ctype, text = call(f"{url}{path}", body)
        responses.append({"name": name, "method": method, "path": path, "request": body,
                          "status": status, "content_type": ctype, "body": text})
        print(f"{name}: {status} {text[:120]}")
        return status

    # --- plain: no --served-model-name
    models = get_ok(f"{plain}/v1/models")
    base = json.loads(models)["data"][0]["id"]
    write(out, "models.json", models)
    write(out, "metrics-idle-fresh.txt", get_ok(f"{plain}/metrics"))
    status, _, text = completion(plain, adapters[0])
    if status != 200:
        sys.exit(f"{adapters[0]}: {status} {text[:300]}")
    write(out, "metrics-busy-lora.txt", busy_metrics(plain, adapters, base))
    time.sleep(1)
    idle = get_ok(f"{plain}/metrics")
    series = lora_series(idle)
    if len(series) < 3:
        sys.exit(f"only {len(series)} vllm:lora_requests_info series after the LoRA requests")
    write(out, "metrics-idle-after-lora.txt", idle)
    write(out, "models-after-lora.json", get_ok(f"{plain}/v1/models"))

    unknown = "acme/does-not-exist"
    record("completions_unknown_model", "POST", plain, "/v1/completions",
           {"model": unknown, "prompt": "Hi", "max_tokens": 4})
    record("chat_completions_unknown_model", "POST", plain, "/v1/chat/completions",
           {"model": unknown, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    loaded = adapters[0]  # resolved by the first request above
    record("load_lora_adapter_unknown_path", "POST", plain, "/v1/load_lora_adapter",
           {"lora_name": unknown, "lora_path": "/nonexistent/" + unknown})
    record("load_lora_adapter_already_loaded", "POST", plain, "/v1/load_lora_adapter",
           {"lora_name": loaded, "lora_path": os.path.join(args.adapter_dir, loaded)})
    record("load_lora_adapter_no_path", "POST", plain, "/v1/load_lora_adapter",
           {"lora_name": unknown})
    record("unload_lora_adapter_unknown_name", "POST", plain, "/v1/unload_lora_adapter",
           {"lora_name": unknown})
    fresh = "acme/loaded-by-name"
    record("load_lora_adapter_ok", "POST", plain, "/v1/load_lora_adapter",
           {"lora_name": fresh, "lora_path": os.path.join(args.adapter_dir, loaded)})
    record("unload_lora_adapter_loaded_name", "POST", plain, "/v1/unload_lora_adapter",
           {"lora_name": fresh})
    record("unload_lora_adapter_unloaded_name", "POST", plain, "/v1/unload_lora_adapter",
           {"lora_name": fresh})

    # --- served: --served-model-name differs from --model
    models = get_ok(f"{served}/v1/models")
    entry = json.loads(models)["data"][0]
    write(out, "models-served-name.json", models)
    record("served_completions_model_path", "POST", served, "/v1/completions",
           {"model": entry["root"], "prompt": "Hi", "max_tokens": 4})
    record("served_completions_served_name", "POST", served, "/v1/completions",
           {"model": entry["id"], "prompt": "Hi", "max_tokens": 4, "temperature": 0})
    record("served_completions_adapter", "POST", served, "/v1/completions",
           {"model": args.served_adapter, "prompt": "Hi", "max_tokens": 4, "temperature": 0})
    record("served_completions_unknown_model", "POST", served, "/v1/completions",
           {"model": unknown, "prompt": "Hi", "max_tokens": 4})
    write(out, "models-served-name-after-lora.json", get_ok(f"{served}/v1/models"))
    write(out, "metrics-served-name-after-lora.txt", get_ok(f"{served}/metrics"))

    write(out, "responses.json", json.dumps(responses, indent=2) + "\n")
    print("vllm:lora_requests_info series after the LoRA requests:")
    for s in series:
        print("  ", s)


if __name__ == "__main__":
    main()
