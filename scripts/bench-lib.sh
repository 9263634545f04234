# Shared by the bench-*.sh scripts (sourced from the repo root, not run): tools, the nginx
# stand-in for vLLM, wrk runs and medians. Sets ROOT (the repo), OUT (target/bench) and WORK
# (a fresh scratch dir, unless the caller has one).
ROOT=$PWD
OUT=$ROOT/target/bench
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"

# need CMD PACKAGE: install PACKAGE with apt-get when CMD is missing.
need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "installing $2" >&2
  apt-get install -y -q "$2" >/dev/null
}

# median: the median of the numbers on stdin, one per line.
median() { sort -n | awk '{a[NR]=$1} END { print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2 }'; }

# start_fake_vllm NAME PORT: nginx answering like vLLM for a base model named `base-model`
# (/health, /v1/models, and a fixed ~300 B chat completion for everything else).
start_fake_vllm() {
  cat > "$WORK/$1.conf" <<CONF
worker_processes 1;
pid $WORK/$1.pid;
error_log $WORK/$1.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK;
  server {
    listen 127.0.0.1:$2;
    keepalive_requests 1000000;
    location /health { return 200 ''; }
    location /v1/models { default_type application/json; return 200 '{"object":"list","data":[{"id":"base-model","object":"model","parent":null}]}'; }
    location / { default_type application/json; return 200 '{"id":"chatcmpl-1","object":"chat.completion","model":"base-model","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":31,"completion_tokens":11,"total_tokens":42}}'; }
  }
}
CONF
  nginx -c "$WORK/$1.conf"
}

# start_nginx_proxy NAME LISTEN UPSTREAM [tls]: nginx (2 workers) as a keep-alive reverse
# proxy; with `tls`, its clients speak TLS (the certificate of make_tls_cert). With REUSEPORT=1
# each worker listens on its own `reuseport` socket, so the kernel spreads connections over the
# workers as it does over loraplex's; without it one busy worker may accept them all.
start_nginx_proxy() {
  local ssl="" rp=""
  [ "${REUSEPORT:-0}" = 1 ] && rp=" reuseport"
  [ "${4:-}" = tls ] && ssl=" ssl; ssl_certificate $WORK/tls.crt; ssl_certificate_key $WORK/tls.key"
  cat > "$WORK/$1.conf" <<CONF
worker_processes 2;
pid $WORK/$1.pid;
error_log $WORK/$1.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK;
  proxy_temp_path $WORK;
  upstream up { server $3; keepalive 256; }
  server {
    listen $2$rp$ssl;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
CONF
  nginx -c "$WORK/$1.conf"
}

# make_tls_cert: a self-signed certificate for 127.0.0.1 (IP SAN) in $WORK/tls.{crt,key}.
make_tls_cert() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=bench -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
}

# stop_nginx: stop every nginx started from $WORK.
stop_nginx() {
  for pid in "$WORK"/*.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null; done
  return 0
}

# write_post_lua: the wrk script POSTing a ~300 B chat body to $LUA (default $WORK/post.lua),
# its `model` $MODEL (default base-model); extra headers as arguments, `Name: value`.
write_post_lua() {
  {
    echo 'wrk.method = "POST"'
    echo "wrk.body   = '{\"model\":\"${MODEL:-base-model}\",\"messages\":[{\"role\":\"system\",\"content\":\"You are a helpful assistant.\"},{\"role\":\"user\",\"content\":\"Summarize in one sentence: the quick brown fox jumps over the lazy dog, twice.\"}],\"max_tokens\":64,\"temperature\":0.0,\"stream\":false}'"
    echo 'wrk.headers["Content-Type"] = "application/json"'
    for h in "$@"; do echo "wrk.headers[\"${h%%:*}\"] = \"${h#*: }\""; done
  } > "${LUA:-$WORK/post.lua}"
}

# wrk_run NAME URL [SECONDS]: one wrk -t1 -c$CONNS (default 64) run of $LUA (default
# $WORK/post.lua); prints
# "NAME rps p50_ms p99_ms requests".
wrk_run() {
  wrk -t1 -c"${CONNS:-64}" -d"${3:-${SECS:-10}}s" -s "${LUA:-$WORK/post.lua}" --latency "$2" \
    | awk -v name="$1" '
      function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
      /Requests\/sec/ { rps=$2 } / 50%/ { p50=ms($2) } / 99%/ { p99=ms($2) }
      / requests in / { n=$1 }
      /Non-2xx/ { bad=$4 }
      END { if (bad>0) print "ERROR " name " non-2xx " bad > "/dev/stderr"; printf "%s %.0f %.3f %.3f %d\n", name, rps, p50, p99, n }'
}

# cpu_ticks PID...: user + system CPU time of these processes (every thread), in clock ticks.
cpu_ticks() {
  local t=0 p
  for p in "$@"; do
    t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}

# kernel_work NAME URL PID...: one more wrk run of URL with `perf stat` on the PIDs (every thread)
# meanwhile; prints "NAME syscalls io_uring_sqes context_switches", each per request (the
# requests wrk completed). Needs perf (linux-perf) and root or perf_event_paranoid <= 1.
kernel_work() {
  local name=$1 url=$2 pids line n
  shift 2
  pids=$(echo "$@" | tr ' ' ,)
  perf stat -x, -e raw_syscalls:sys_enter,io_uring:io_uring_submit_req,context-switches \
    -p "$pids" -o "$WORK/perf-$name.txt" &
  local perf_pid=$!
  sleep 0.2
  line=$(wrk_run "$name" "$url")
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
  n=$(echo "$line" | awk '{print $5}')
  awk -F, -v name="$name" -v n="$n" '
    $3 ~ /sys_enter/ { s=$1 } $3 ~ /submit_req/ { q=$1 } $3 ~ /context-switches/ { c=$1 }
    END { printf "%s %.2f %.2f %.2f\n", name, s/n, q/n, c/n }' "$WORK/perf-$name.txt"
}

# profile_run NAME URL DIR PID...: one more wrk run of URL with `perf record -g` on the PIDs
# (every thread) into DIR/NAME.perf; prints "NAME kernel_share_% user_share_% requests" (the
# requests wrk completed meanwhile, to read samples per request: -F 999, a sample per ms).
profile_run() {
  local name=$1 url=$2 dir=$3 pids n
  shift 3
  pids=$(echo "$@" | tr ' ' ,)
  mkdir -p "$dir"
  perf record -q -F 999 -g -p "$pids" -o "$dir/$name.perf" 2>/dev/null &
  local perf_pid=$!
  sleep 0.2
  n=$(wrk_run "$name" "$url" | awk '{print $5}')
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
  perf report -i "$dir/$name.perf" --no-children --sort dso -g none --stdio 2>/dev/null \
    | awk -v name="$name" -v n="$n" '/%/ && !/^#/ { p=$1; sub(/%/,"",p); if ($2 ~ /kernel/) k+=p; else u+=p }
        END { printf "%s %.1f %.1f %d\n", name, k, u, n }'
}

# nginx_pids NAME: the master and worker processes of the nginx started as NAME.
nginx_pids() {
  local master
  master=$(cat "$WORK/$1.pid")
  echo "$master" $(pgrep -P "$master")
}

# wait_healthz ADDR: until loraplex at ADDR answers /healthz (10 s at most).
wait_healthz() {
  for _ in $(seq 100); do curl -skf "$1/healthz" >/dev/null && return; sleep 0.1; done
  echo "loraplex at $1 did not come up" >&2
  return 1
}

# machine: one line describing this machine.
machine() {
  echo "$(nproc) cores, $(awk '/model name/ {sub(/.*: /,""); print; exit}' /proc/cpuinfo), kernel $(uname -r), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
}
