//! The Grafana dashboard (`deploy/grafana/loraplex.json`) and the Prometheus rules against what a
//! running loraplex really exports: the JSON is an importable dashboard (a datasource variable,
//! job and node variables that every query filters on), and every metric name a panel or a rule
//! uses is in the `/metrics` of real nodes, or is a recording rule of the rules file. Whether the
//! expressions parse and evaluate is checked by a real Prometheus in `tests/prometheus.rs`.

mod common;
#[path = "monitoring/mod.rs"]
mod monitoring;

use std::collections::{BTreeMap, BTreeSet};

use monitoring::{Scene, dashboard, dashboard_exprs, metric_names, panels, rules};

/// The sample names of a Prometheus text exposition (`loraplex_requests_total`,
/// `..._bucket`, ...).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l[..l.find(['{', ' ']).unwrap_or(l.len())].to_owned())
        .collect()
}

/// Recording rules: name → expression.
fn recorded() -> BTreeMap<String, String> {
    rules()
        .iter()
        .filter_map(|r| {
            Some((
                r["record"].as_str()?.to_owned(),
                r["expr"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[test]
fn dashboard_is_importable_and_filters_every_query() {
    let d = dashboard();
    assert_eq!(d["uid"], "loraplex");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["job", "instance"] {
        let v = var(name);
        assert_eq!(v["type"], "query");
        assert_eq!(v["datasource"]["uid"], "${datasource}");
        assert_eq!(v["includeAll"], true);
        assert_eq!(v["allValue"], ".*", "All must match every value in =~");
    }

    let all = panels(&d);
    let ids: BTreeSet<u64> = all.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "panel ids are unique");
    for p in all.iter().filter(|p| p["targets"].is_array()) {
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(p["gridPos"]["w"].as_u64().unwrap() > 0, "{title}");
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    // Every selector of every query is narrowed to the chosen job and nodes.
    for (title, expr) in dashboard_exprs(&d) {
        for name in metric_names(&expr) {
            let uses: Vec<&str> = expr
                .match_indices(&name)
                .map(|(i, _)| &expr[i + name.len()..])
                .collect();
            for rest in uses
                .iter()
                .filter(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_'))
            {
                let matchers = &rest[..rest.find('}').map_or(0, |e| e + 1)];
                assert!(
                    matchers.contains(r#"job=~"$job""#)
                        && matchers.contains(r#"instance=~"$instance""#),
                    "{title}: {name} is not filtered by $job and $instance in {expr}"
                );
            }
        }
    }

    // What an operator looks for is there.
    let titles: BTreeSet<&str> = all.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Requests by tier",
        "Request duration",
        "Hit ratio",
        "Disk use against the budget",
        "Evictions",
        "Fetches by origin and result",
        "Fetched bytes/s",
        "Fetch failures by reason",
        "Peers in the placement",
        "Forwards by target peer",
        "vLLM health",
        "Errors by kind",
    ] {
        assert!(titles.contains(want), "no panel {want:?}");
    }
    // The row kept for vLLM's queue and KV use is filled by the routing: every panel of it
    // queries something, among them the queue, KV use, LoRA slots and routing decisions.
    let row = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["type"] == "row"
                && p["title"]
                    .as_str()
                    .unwrap()
                    .contains("vLLM queue, KV use and routing")
        })
        .expect("the vLLM queue, KV use and routing row");
    let panels = row["panels"].as_array().unwrap();
    assert!(
        panels
            .iter()
            .all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())),
        "a panel of the vLLM row without a query"
    );
    let exprs = serde_json::to_string(panels).unwrap();
    for metric in [
        "loraplex_vllm_requests_waiting",
        "loraplex_vllm_kv_cache_usage",
        "loraplex_vllm_lora_slots",
        "loraplex_route_decisions_total",
    ] {
        assert!(
            exprs.contains(metric),
            "no panel of the vLLM row reads {metric}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_and_rules_use_is_exported() {
    let mut scene = Scene::start();
    scene.drive().await;
    let mut exported = sample_names(&scene.metrics(0).await);
    exported.extend(sample_names(&scene.metrics(1).await));
    let recorded = recorded();

    let mut uses: Vec<(String, String)> = dashboard_exprs(&dashboard())
        .into_iter()
        .map(|(title, expr)| (format!("dashboard panel {title:?}"), expr))
        .collect();
    uses.extend(rules().iter().map(|r| {
        let name = r["alert"].as_str().or(r["record"].as_str()).unwrap();
        (
            format!("rule {name}"),
            r["expr"].as_str().unwrap().to_owned(),
        )
    }));
    let mut used = BTreeSet::new();
    for (place, expr) in &uses {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric found in {expr}");
        for name in names {
            // `up` is Prometheus's own, set for every target it scrapes.
            if name == "up" || recorded.contains_key(&name) {
                used.extend(
                    recorded
                        .get(&name)
                        .map(|e| metric_names(e))
                        .unwrap_or_default(),
                );
                continue;
            }
            assert!(
                exported.contains(&name),
                "{place} uses {name}, which loraplex does not export:\n{exported:#?}"
            );
            used.insert(name);
        }
    }
    // And the dashboard leaves no family out (a histogram counts as shown through _bucket).
    let shown: BTreeSet<String> = dashboard_exprs(&dashboard())
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .flat_map(|n| {
            recorded
                .get(&n)
                .map_or_else(|| BTreeSet::from([n.clone()]), |e| metric_names(e))
        })
        .collect();
    let unshown: Vec<&String> = exported
        .iter()
        .filter(|n| !n.ends_with("_sum") && !n.ends_with("_count") && !shown.contains(*n))
        .collect();
    assert!(
        unshown.is_empty(),
        "exported but on no panel of {}: {unshown:?} (add a panel, then run \
         scripts/sync-k8s-monitoring.sh)",
        monitoring::DASHBOARD
    );
    assert!(used.contains("loraplex_cache_max_size_bytes"));
}

#[test]
fn metric_names_reads_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x="y{z}"}[5m]))) > 60"#),
        ["a_bucket"]
    );
    assert_eq!(
        names("x:y:rate5m / on (job) group_left count by (job) (up == 1) and b offset 5m"),
        ["b", "up", "x:y:rate5m"]
    );
    assert_eq!(names("absent(up{job=\"loraplex\"})"), ["up"]);
    assert_eq!(names("sum without (tenant) (c_total) * 1e3"), ["c_total"]);
}
