//! `deploy/prometheus` with the real Prometheus tools: `promtool check rules` and `promtool test
//! rules` (which must also fail on a wrong expectation), and a real Prometheus server that loads
//! the rules, scrapes two running loraplex nodes, and answers for their series, the recorded
//! ones, and every query of the Grafana dashboard.

mod common;
#[path = "monitoring/mod.rs"]
mod monitoring;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{chat_with, tools};
use monitoring::{RULES, Scene, dashboard, dashboard_exprs, repo, rules, yaml};
use serde_json::Value;

const RULE_TESTS: &str = "deploy/prometheus/loraplex.rules.test.yml";

fn promtool(tool: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn promtool_checks_the_rules() {
    let Some(t) = tools::prometheus("promtool_checks_the_rules") else {
        return;
    };
    let out = promtool(&t.promtool, &["check", "rules", RULES], &repo(""));
    assert!(out.status.success(), "{}", text(&out));
    let n = rules().len();
    assert!(
        text(&out).contains(&format!("SUCCESS: {n} rules found")),
        "{}",
        text(&out)
    );
}

#[test]
fn promtool_unit_tests_pass() {
    let Some(t) = tools::prometheus("promtool_unit_tests_pass") else {
        return;
    };
    let out = promtool(&t.promtool, &["test", "rules", RULE_TESTS], &repo(""));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

/// The unit tests can fail: a wrong expectation, and a rule that no longer does what they
/// expect, each make `promtool test rules` fail on the alert concerned.
#[test]
fn promtool_unit_tests_fail_when_they_should() {
    let Some(t) = tools::prometheus("promtool_unit_tests_fail_when_they_should") else {
        return;
    };
    let rules = std::fs::read_to_string(repo(RULES)).unwrap();
    let tests = std::fs::read_to_string(repo(RULE_TESTS)).unwrap();
    let run = |rules: &str, tests: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("loraplex.rules.yml"), rules).unwrap();
        std::fs::write(dir.path().join("t.yml"), tests).unwrap();
        promtool(&t.promtool, &["test", "rules", "t.yml"], dir.path())
    };
    let ok = run(&rules, &tests);
    assert!(ok.status.success(), "{}", text(&ok));

    let wrong_node = tests.replacen("loraplex a:9090 is down", "loraplex b:9090 is down", 1);
    assert_ne!(wrong_node, tests);
    let out = run(&rules, &wrong_node);
    assert!(!out.status.success(), "a wrong expectation passed");
    assert!(
        text(&out).contains("alertname: LoraplexDown"),
        "{}",
        text(&out)
    );

    // Counting not_found as a failure makes the peer origin's normal misses alert.
    let broken = rules.replacen(r#"{reason!="not_found"}"#, "", 1);
    assert_ne!(broken, rules);
    let out = run(&broken, &tests);
    assert!(!out.status.success(), "a broken rule passed");
    assert!(
        text(&out).contains("alertname: LoraplexFetchFailures"),
        "{}",
        text(&out)
    );
}

/// Every alert has a `for`, a severity, a summary and a description, and the unit tests make it
/// fire in one case and stay quiet in another.
#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let tests = yaml(RULE_TESTS);
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    let alerts: Vec<Value> = rules()
        .into_iter()
        .filter(|r| r["alert"].is_string())
        .collect();
    assert!(alerts.len() >= 9, "{alerts:?}");
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        assert!(a["for"].is_string(), "{name}: no `for`");
        assert!(
            ["critical", "warning"].contains(&a["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity"
        );
        for k in ["summary", "description"] {
            assert!(a["annotations"][k].is_string(), "{name}: no {k}");
        }
        let of_alert = || cases.iter().filter(|c| c["alertname"] == name);
        let fires = of_alert().any(|c| c["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()));
        let quiet = of_alert().any(|c| c["exp_alerts"].as_array().is_some_and(|e| e.is_empty()));
        assert!(
            fires && quiet,
            "{name}: fires tested {fires}, quiet tested {quiet}"
        );
    }
}

/// A Prometheus server on a free loopback port, its storage in a tempdir; killed on drop.
struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(bin: &Path, targets: &[SocketAddr]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{:?}]\nscrape_configs:\n  - job_name: loraplex\n    \
             static_configs:\n      - targets: [{list}]\n",
            repo(RULES).display().to_string()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus");
        let mut server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("{}/-/ready", server.url)).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return server;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never ready:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url =
            url::Url::parse_with_params(&format!("{}/api/v1/{path}", self.url), query).unwrap();
        let v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        assert_eq!(v["status"], "success", "{path} {query:?}: {v}");
        v["data"].clone()
    }

    /// The instant vector `expr`: `(labels, value)` per series.
    async fn query(&self, expr: &str) -> Vec<(Value, f64)> {
        let data = self.api("query", &[("query", expr)]).await;
        assert_eq!(data["resultType"], "vector", "{expr}");
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    /// Poll `expr` until `cond` holds on its result (60 s at most: scrapes are every second).
    async fn until(
        &self,
        what: &str,
        expr: &str,
        cond: impl Fn(&[(Value, f64)]) -> bool,
    ) -> Vec<(Value, f64)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.query(expr).await;
            if cond(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {expr} = {r:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `series` (name and labels exactly as exported) in an exposition.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_loraplex_and_evaluates_rules_and_dashboard() {
    let Some(t) =
        tools::prometheus("prometheus_scrapes_loraplex_and_evaluates_rules_and_dashboard")
    else {
        return;
    };
    let mut scene = Scene::start();
    scene.drive().await;
    let prom = Server::start(&t.prometheus, &[scene.nodes[0].addr, scene.nodes[1].addr]).await;
    let a = scene.nodes[0].addr.to_string();
    prom.until("both nodes scraped", r#"up{job="loraplex"} == 1"#, |r| {
        r.len() == 2
    })
    .await;

    // Traffic while Prometheus watches, so rates and the recorded series are above zero.
    for _ in 0..3 {
        assert_eq!(
            chat_with(scene.nodes[0].addr, &scene.warm).await.status,
            200
        );
        scene.local_hits += 1;
    }
    let local =
        format!(r#"loraplex_requests_total{{job="loraplex",instance="{a}",cache_tier="local"}}"#);
    let want = scene.local_hits as f64;
    prom.until("the local hits", &local, |r| r.len() == 1 && r[0].1 == want)
        .await;
    let exported = scene.metrics(0).await;
    assert_eq!(
        sample(
            &exported,
            r#"loraplex_requests_total{tenant="_default",cache_tier="local"}"#
        ),
        want,
        "Prometheus holds what /metrics says"
    );
    let budget = prom
        .query(&format!(
            r#"loraplex_cache_max_size_bytes{{instance="{a}"}}"#
        ))
        .await;
    assert_eq!(budget.len(), 1);
    assert_eq!(
        budget[0].1,
        sample(&exported, r#"loraplex_cache_max_size_bytes{tier="local"}"#)
    );
    assert_eq!(budget[0].0["tier"], "local");

    // The recording rules run on the real series.
    let recorded = format!(
        r#"instance_cache_tier:loraplex_requests:rate5m{{instance="{a}",cache_tier="local"}}"#
    );
    prom.until("the recorded request rate", &recorded, |r| {
        r.len() == 1 && r[0].1 > 0.0
    })
    .await;
    let p99 = format!(
        r#"histogram_quantile(0.99, sum by (le) (instance_cache_tier_le:loraplex_request_duration_seconds_bucket:rate5m{{instance="{a}",cache_tier="local"}}))"#
    );
    prom.until("a p99 from the recorded buckets", &p99, |r| {
        r.len() == 1 && r[0].1 > 0.0 && r[0].1 < 10.0
    })
    .await;

    // Every rule is loaded and evaluates without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = prom.api("rules", &[]).await["groups"]
            .as_array()
            .unwrap()
            .clone();
        let rules: Vec<&Value> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert_eq!(rules.len(), monitoring::rules().len(), "{groups:?}");
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        let bad: Vec<&&Value> = rules.iter().filter(|r| r["health"] == "err").collect();
        assert!(bad.is_empty(), "rules failing: {bad:?}");
        assert!(
            Instant::now() < deadline,
            "rules never all evaluated: {rules:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A healthy two-node cluster fires nothing.
    let firing = prom.query("ALERTS").await;
    assert!(firing.is_empty(), "{firing:?}");

    // Every query of the dashboard, with Grafana's variables set, evaluates; the panels show
    // data except those about what this cluster never did (5xx answers).
    let mut empty = Vec::new();
    for (title, expr) in dashboard_exprs(&dashboard()) {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", "loraplex")
            .replace("$instance", ".*");
        if prom.query(&q).await.is_empty() {
            empty.push(title);
        }
    }
    assert_eq!(empty, ["5xx errors/s"], "panels without data");

    // Alerts follow real trouble: node 0's vLLM fails its health checks, node 1 is killed.
    // (Both stay pending for their `for`; that they fire after it is promtool's part.)
    scene.vllms[0].set_healthy(false);
    drop(scene.nodes.pop());
    let b = scene.peers[1].clone();
    let pending = |name: &'static str, instance: String| {
        move |r: &[(Value, f64)]| {
            r.iter().any(|(l, _)| {
                l["alertname"] == name
                    && l["instance"] == instance.as_str()
                    && l["alertstate"] == "pending"
            })
        }
    };
    prom.until(
        "LoraplexVllmUnhealthy",
        "ALERTS",
        pending("LoraplexVllmUnhealthy", a.clone()),
    )
    .await;
    prom.until("LoraplexDown", "ALERTS", pending("LoraplexDown", b))
        .await;
}
