//! The Kubernetes example (`examples/k8s`, a kustomize layout): its parts agree with each other
//! and with what discovery expects, the tokens come from a Secret through `${...}` in the config
//! (the config itself passes `check-config` in `tests/examples.rs`), the monitoring copies match
//! `deploy/`, and `kubectl kustomize examples/k8s` renders all of it (when kubectl is installed).

mod common;
#[path = "monitoring/mod.rs"]
mod monitoring;

use std::{path::Path, process::Command};

use common::tools;
use monitoring::{DASHBOARD, RULES, repo, yaml};
use serde::Deserialize;
use serde_json::{Value, json};

const K8S: &str = "examples/k8s";
const SERVICE: &str = "loraplex-headless";
const NS: &str = "inference";

fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

/// The documents of a kustomization's `resources`, as written (directories followed).
fn resources(dir: &Path) -> Vec<Value> {
    let k = yaml(&dir.join("kustomization.yaml").display().to_string());
    let mut out = Vec::new();
    for r in k["resources"].as_array().unwrap() {
        let path = dir.join(r.as_str().unwrap());
        if path.is_dir() {
            out.extend(resources(&path));
        } else {
            out.extend(docs(&std::fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn env(c: &Value, k: &str) -> Value {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == k)
        .cloned()
        .unwrap_or_default()
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The parts agree with each other and with what discovery expects (RBAC for EndpointSlices,
/// headless Service with a port discovery picks, the config naming that Service, the shared
/// adapter volume, probes, `--self`).
#[test]
fn manifests_are_consistent() {
    let docs = resources(&repo(K8S));
    find(&docs, "Namespace", NS);
    let k = yaml(&format!("{K8S}/kustomization.yaml"));
    assert_eq!(k["namespace"], NS);
    for d in docs.iter().filter(|d| d["kind"] != "Namespace") {
        let ns = &d["metadata"]["namespace"];
        assert!(ns.is_null() || ns == NS, "{}", d["metadata"]["name"]);
    }

    let rule = &find(&docs, "Role", "loraplex-endpointslice-reader")["rules"][0];
    assert_eq!(rule["apiGroups"], json!(["discovery.k8s.io"]));
    assert_eq!(rule["resources"], json!(["endpointslices"]));
    assert_eq!(rule["verbs"], json!(["get", "list", "watch"]));
    let binding = find(&docs, "RoleBinding", "loraplex-endpointslice-reader");
    assert_eq!(binding["subjects"][0]["name"], "loraplex");
    find(&docs, "ServiceAccount", "loraplex");

    let headless = &find(&docs, "Service", SERVICE)["spec"];
    assert_eq!(headless["clusterIP"], "None");
    assert_eq!(headless["publishNotReadyAddresses"], false);
    assert_eq!(
        headless["ports"][0]["name"], "http",
        "the port name discovery looks for"
    );

    let config = yaml(&format!("{K8S}/config.yaml"));
    assert_eq!(config["discovery"]["mode"], "k8s");
    assert_eq!(config["discovery"]["k8s"]["service"], SERVICE);
    assert_eq!(config["discovery"]["k8s"]["namespace"], NS);
    let dir = config["storage"]["dir"].as_str().unwrap();

    let pod = &find(&docs, "Deployment", "loraplex")["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"], headless["selector"]);
    assert_eq!(pod["spec"]["serviceAccountName"], "loraplex");
    let (vllm, lp) = (container(pod, "vllm"), container(pod, "loraplex"));
    assert_eq!(
        env(vllm, "VLLM_ALLOW_RUNTIME_LORA_UPDATING")["value"],
        "true"
    );
    assert_eq!(
        env(vllm, "VLLM_PLUGINS")["value"],
        "lora_filesystem_resolver"
    );
    assert_eq!(env(vllm, "VLLM_LORA_RESOLVER_CACHE_DIR")["value"], dir);
    let mount = |c: &Value, path: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .cloned()
    };
    let (vm, lm) = (
        mount(vllm, dir).expect("vllm mounts the dir"),
        mount(lp, dir).expect("loraplex too"),
    );
    assert_eq!(vm["name"], lm["name"], "one shared volume");
    let volume = |name: &Value| {
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| &v["name"] == name)
            .cloned()
            .unwrap()
    };
    assert!(volume(&lm["name"])["emptyDir"].is_object());
    assert_eq!(lp["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(lp["readinessProbe"]["httpGet"]["path"], "/readyz");
    let args: Vec<&str> = lp["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let self_at = args.iter().position(|a| *a == "--self").expect("--self");
    assert_eq!(args[self_at + 1], "$(POD_IP):9090");
    assert_eq!(
        env(lp, "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );

    // The config file is the ConfigMap kustomize generates, mounted where --config points.
    let generated = &k["configMapGenerator"][0];
    assert_eq!(generated["files"], json!(["config.yaml"]));
    let config_at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let config_path = Path::new(args[config_at + 1]);
    let config_mount = lp["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| config_path.parent() == Some(Path::new(m["mountPath"].as_str().unwrap())))
        .expect("the config's directory is mounted");
    assert_eq!(config_path.file_name().unwrap(), "config.yaml");
    assert_eq!(
        volume(&config_mount["name"])["configMap"]["name"],
        generated["name"]
    );

    // server.tls and cluster.tls read the Secret loraplex-tls where it is mounted, and the
    // probes speak HTTPS to the TLS listener.
    let tls_files = [
        &config["server"]["tls"]["cert"],
        &config["server"]["tls"]["key"],
        &config["cluster"]["tls"]["ca"],
    ];
    for file in tls_files {
        let file = Path::new(file.as_str().expect("a TLS file in the config"));
        let tls_mount = lp["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| file.parent() == Some(Path::new(m["mountPath"].as_str().unwrap())))
            .expect("the TLS files' directory is mounted");
        assert_eq!(
            volume(&tls_mount["name"])["secret"]["secretName"],
            "loraplex-tls"
        );
    }
    assert_eq!(
        config["cluster"]["tls"]["server_name"],
        format!("{SERVICE}.{NS}.svc"),
        "peers are checked for the headless Service's name"
    );
    assert_eq!(lp["livenessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(lp["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
}

/// `admin.token` (and `cluster.token`) come from the Secret through `${...}`: every variable
/// the config names is set in the loraplex container, the tokens from a required Secret.
#[test]
fn tokens_come_from_a_secret() {
    let text = std::fs::read_to_string(repo(&format!("{K8S}/config.yaml"))).unwrap();
    let config: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(config["admin"]["token"], "${LORAPLEX_ADMIN_TOKEN}");
    assert_eq!(config["cluster"]["token"], "${LORAPLEX_CLUSTER_TOKEN}");
    let docs = resources(&repo(K8S));
    let lp = container(
        &find(&docs, "Deployment", "loraplex")["spec"]["template"],
        "loraplex",
    );
    let vars: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split("${").skip(1))
        .map(|v| &v[..v.find('}').unwrap()])
        .collect();
    assert_eq!(
        vars,
        ["HF_TOKEN", "LORAPLEX_ADMIN_TOKEN", "LORAPLEX_CLUSTER_TOKEN"]
    );
    for var in vars {
        assert!(
            env(lp, var).is_object(),
            "{var} is not set in the loraplex container"
        );
    }
    for (var, key) in [
        ("LORAPLEX_ADMIN_TOKEN", "admin-token"),
        ("LORAPLEX_CLUSTER_TOKEN", "cluster-token"),
    ] {
        let secret = &env(lp, var)["valueFrom"]["secretKeyRef"];
        assert_eq!(secret["name"], "loraplex-tokens", "{var}");
        assert_eq!(secret["key"], key, "{var}");
        assert!(
            secret["optional"].is_null() || secret["optional"] == false,
            "{var}: a missing Secret must stop the pod, not open the admin API"
        );
    }
}

/// `examples/k8s/monitoring` holds copies of `deploy/` (kustomize reads nothing outside the
/// example): they must be what `scripts/sync-k8s-monitoring.sh` makes of the originals, and
/// the PodMonitor must produce the scrape job the rules expect.
#[test]
fn monitoring_matches_deploy() {
    let stale = "stale copy: run scripts/sync-k8s-monitoring.sh";
    assert!(
        std::fs::read(repo(DASHBOARD)).unwrap()
            == std::fs::read(repo(&format!("{K8S}/monitoring/loraplex.json"))).unwrap(),
        "the dashboard: {stale}"
    );
    let rule = yaml(&format!("{K8S}/monitoring/prometheusrule.yaml"));
    assert_eq!(rule["kind"], "PrometheusRule");
    assert!(
        rule["spec"]["groups"] == yaml(RULES)["groups"],
        "the rules: {stale}"
    );

    let docs = resources(&repo(K8S));
    let monitor = find(&docs, "PodMonitor", "loraplex");
    let pod = &find(&docs, "Deployment", "loraplex")["spec"]["template"];
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        pod["metadata"]["labels"]
    );
    let job = &pod["metadata"]["labels"][monitor["spec"]["jobLabel"].as_str().unwrap()];
    assert_eq!(job, "loraplex");
    let rules = std::fs::read_to_string(repo(RULES)).unwrap();
    assert!(
        rules.contains(&format!(r#"up{{job={job}}}"#)),
        "the rules select {job}"
    );
    let port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let ports = container(pod, "loraplex")["ports"]
        .as_array()
        .unwrap()
        .clone();
    assert!(ports.iter().any(|p| p["name"] == port), "{port}");
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"][0]["path"],
        "/metrics"
    );
}

/// `kubectl kustomize examples/k8s` renders: every object in the namespace, the generated
/// config ConfigMap (hashed name) mounted by the Deployment, the dashboard ConfigMap for
/// Grafana's sidecar, the PodMonitor and the PrometheusRule.
#[test]
fn kubectl_kustomize_renders() {
    let test = "kubectl_kustomize_renders";
    let Some(kubectl) = tools::which("kubectl") else {
        // Not installable from the package registries CI uses: a plain, loud skip.
        tools::skip(test, "kubectl is not installed");
        return;
    };
    let out = Command::new(kubectl)
        .args(["kustomize", K8S])
        .current_dir(repo(""))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let docs = docs(&String::from_utf8(out.stdout).unwrap());
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    for d in docs.iter().filter(|d| d["kind"] != "Namespace") {
        assert_eq!(d["metadata"]["namespace"], NS, "{}", d["metadata"]["name"]);
    }

    let config = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("loraplex-config-")
        })
        .expect("the generated config ConfigMap");
    assert_eq!(
        config["data"]["config.yaml"].as_str().unwrap(),
        std::fs::read_to_string(repo(&format!("{K8S}/config.yaml"))).unwrap()
    );
    let pod = &find(&docs, "Deployment", "loraplex")["spec"]["template"];
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"] == config["metadata"]["name"]),
        "the Deployment mounts the generated name"
    );

    let dashboard = find(&docs, "ConfigMap", "loraplex-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        dashboard["data"]["loraplex.json"].as_str().unwrap(),
        std::fs::read_to_string(repo(DASHBOARD)).unwrap()
    );
    let rule = find(&docs, "PrometheusRule", "loraplex");
    assert!(rule["spec"]["groups"] == yaml(RULES)["groups"]);
    let monitor = find(&docs, "PodMonitor", "loraplex");
    assert_eq!(
        monitor["metadata"]["labels"], rule["metadata"]["labels"],
        "one label for the operator to select both"
    );
}
