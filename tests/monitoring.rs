//! `manifests/monitoring/` (ServiceMonitor, PrometheusRule, Grafana dashboard), checked by real
//! tools rather than by eye:
//! - the rules pass `promtool check rules` and the unit tests of
//!   `tests/monitoring/rules_test.yaml` (`promtool test rules`), promtool built from the
//!   Prometheus Go module (hack/controlplane/build.sh --promtool);
//! - the dashboard is JSON whose every query is valid PromQL (promtool again);
//! - a running webhook, driven through allocations, a full pool, a missing pool, a release and a
//!   machine waiting for CAPE, exports every metric the rules, their unit tests and the
//!   dashboard use, with the labels the unit tests give them;
//! - the component renders on top of the base and the real apiserver accepts it (server-side
//!   dry run, with the Prometheus operator's CRDs from tests/crds/ and cert-manager's).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cape_static_ip::contract::CAPE_FINALIZER;
use common::controlplane::{CrdSet, shared, temp_namespace};
use common::tools::{self, root, run, temp_dir, yaml_file};
use common::util::eventually;
use common::webhook::{self, WebhookOptions, capi_machine, create, machines, pool, template};
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

/// Labels Prometheus adds to every series scraped through the ServiceMonitor.
const TARGET_LABELS: [&str; 7] = [
    "namespace",
    "service",
    "pod",
    "instance",
    "job",
    "endpoint",
    "container",
];

fn monitoring_dir() -> PathBuf {
    root().join("manifests/monitoring")
}

/// The PrometheusRule of the component.
fn prometheus_rule() -> Value {
    let mut docs = yaml_file(&monitoring_dir().join("prometheusrule.yaml"));
    assert_eq!(docs.len(), 1, "one object in prometheusrule.yaml");
    let rule = docs.remove(0);
    assert_eq!(rule["kind"], "PrometheusRule");
    rule
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(monitoring_dir().join("dashboard.json")).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("dashboard.json is not JSON: {e}"))
}

/// Every alerting rule of the PrometheusRule.
fn alerts(rule: &Value) -> Vec<&Value> {
    rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

/// Every query of the dashboard (panels, rows' panels, template variables), as written.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn panels(list: &Value, out: &mut Vec<String>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_else(|| {
                    panic!("a target of panel {:?} has no expr: {t}", p["title"])
                });
                out.push(expr.to_owned());
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    out
}

/// The metrics of the dashboard's `label_values(metric, label)` variables.
fn dashboard_variable_metrics(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {:?}: not label_values(...): {q}", v["name"]));
            inner.split(',').next().unwrap().trim().to_owned()
        })
        .collect()
}

/// A dashboard query as plain PromQL: Grafana's variables replaced by values.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$pool", ".*")
}

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords, label names (in `{}` and grouping clauses), strings or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Aggregations may be followed by `by (...)` before their `(`.
    const KEYWORDS: [&str; 26] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut grouping = false; // the next `(...)` holds label names
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
            }
            '(' if grouping => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                grouping = false;
            }
            '0'..='9' | '.' => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let call = j < chars.len() && chars[j] == '(';
                if matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    grouping = call;
                } else if !call && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let expr = r#"histogram_quantile(0.99, sum by (le, operation) (rate(cape_static_ip_admission_duration_seconds_bucket{result!="a b"}[5m])))
        / on (pool) group_left (x) max by (pool) (foo:bar offset 10m) > bool 1e3 unless time() - other"#;
    assert_eq!(
        metric_names(expr),
        [
            "cape_static_ip_admission_duration_seconds_bucket",
            "foo:bar",
            "other"
        ]
        .into_iter()
        .map(String::from)
        .collect()
    );
}

/// Series of a promtool unit test file: metric name and label names.
fn test_series(tests: &Value) -> Vec<(String, BTreeSet<String>)> {
    let mut out = Vec::new();
    for t in tests["tests"].as_array().unwrap() {
        for s in t["input_series"].as_array().unwrap() {
            let series = s["series"].as_str().unwrap();
            let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
            let labels = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').unwrap().0.trim().to_owned())
                .collect();
            out.push((name.to_owned(), labels));
        }
    }
    out
}

/// Writes the rules (the PrometheusRule's spec: a Prometheus rule file) and the unit tests
/// into a fresh directory.
fn rules_workdir() -> PathBuf {
    let dir = temp_dir("promtool");
    let spec = &prometheus_rule()["spec"];
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(
        dir.join("rules.yaml"),
        serde_json::to_vec_pretty(spec).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        root().join("tests/monitoring/rules_test.yaml"),
        dir.join("rules_test.yaml"),
    )
    .unwrap();
    dir
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    let promtool = tools::tool("--promtool");
    let dir = rules_workdir();
    let rule = prometheus_rule();

    // What the person on call needs on every alert.
    let alerts = alerts(&rule);
    assert!(alerts.len() >= 8, "{} alerts", alerts.len());
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        assert!(
            matches!(
                a["labels"]["severity"].as_str(),
                Some("warning" | "critical")
            ),
            "{name}: severity warning or critical"
        );
        for key in ["summary", "description"] {
            let text = a["annotations"][key].as_str().unwrap_or_default();
            assert!(text.len() > 20, "{name}: a {key}");
        }
        let summary = a["annotations"]["summary"].as_str().unwrap();
        assert!(
            [
                "$labels.pool",
                "$labels.machine",
                "$labels.pod",
                "$labels.service"
            ]
            .iter()
            .any(|l| summary.contains(l)),
            "{name}: the summary names the pool, machine, pod or service: {summary}"
        );
    }

    let (check, _) = run(Command::new(&promtool)
        .args(["check", "rules", "rules.yaml"])
        .current_dir(&dir));
    eprintln!("$ promtool check rules rules.yaml\n{check}");
    assert!(
        check.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{check}"
    );

    // Every alert is unit-tested firing at least once.
    let tests = yaml_file(&dir.join("rules_test.yaml")).remove(0);
    let fired: BTreeSet<&str> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|c| c["alertname"].as_str().unwrap())
        .collect();
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        assert!(
            fired.contains(name),
            "{name} has a promtool test where it fires"
        );
    }

    let out = Command::new(&promtool)
        .args(["test", "rules", "rules_test.yaml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ promtool test rules rules_test.yaml\n{text}");
    assert!(out.status.success(), "promtool test rules failed:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dashboard_parses_and_every_query_is_promql() {
    let promtool = tools::tool("--promtool");
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "cape-static-ip");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{} queries", queries.len());
    for title in [
        "Pool usage",
        "Allocations",
        "Releases",
        "Admission latency",
        "Denials by reason",
    ] {
        assert!(
            dashboard["panels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["title"] == title),
            "a panel {title:?}"
        );
    }
    // Each query as a recording rule: `promtool check rules` parses it.
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| json!({"record": format!("dashboard:query_{i}"), "expr": as_promql(q)}))
        .collect();
    let dir = temp_dir("dashboard");
    let file = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.join("dashboard.rules.yaml"), file.to_string()).unwrap();
    let (check, _) = run(Command::new(&promtool)
        .args(["check", "rules", "dashboard.rules.yaml"])
        .current_dir(&dir));
    assert!(
        check.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{check}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The label names of one metric in a scrape.
#[derive(Debug, Default)]
struct Labels {
    /// On some sample.
    any: BTreeSet<String>,
    /// On every sample, with a value (Prometheus treats an empty value as no label).
    always: Option<BTreeSet<String>>,
}

/// Sample names of a scrape, each with the label names it carries.
fn scraped(text: &str) -> BTreeMap<String, Labels> {
    let mut out: BTreeMap<String, Labels> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let entry = out.entry(name.to_owned()).or_default();
        let mut set = BTreeSet::new();
        // Label values here are pool/machine keys, results and numbers: no ',' inside.
        for kv in labels
            .trim_end_matches('}')
            .split(',')
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap();
            entry.any.insert(k.to_owned());
            if v != "\"\"" {
                set.insert(k.to_owned());
            }
        }
        entry.always = Some(match entry.always.take() {
            None => set,
            Some(before) => before.intersection(&set).cloned().collect(),
        });
    }
    out
}

#[tokio::test]
async fn every_metric_of_the_rules_and_the_dashboard_is_exported_by_a_running_webhook() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "monitoring").await;
    // A short claim grace makes the background loop refresh its figures every second.
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            claim_grace: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    create(&client, &ns, pool("pool", json!({
        "namePrefix": "pool",
        "pools": [{"start": "10.20.0.10", "end": "10.20.0.11", "prefix": 24, "gateway": "10.20.0.1"}],
    }), json!({}))).await.unwrap();
    create(
        &client,
        &ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "pool"})),
    )
    .await
    .unwrap();
    create(
        &client,
        &ns,
        template("nopool", json!({"cluster.x-k8s.io/ip-pool-name": "absent"})),
    )
    .await
    .unwrap();
    common::util::wait_for_pool(&hook, &ns).await;
    let devices = json!([{"networkType": "IPV4"}]);

    // Two allocations; the second machine carries CAPE's finalizer, as CAPE adds it.
    create(&client, &ns, capi_machine("m-0", "tpl", devices.clone()))
        .await
        .unwrap();
    let mut held = capi_machine("m-held", "tpl", devices.clone());
    held["metadata"]["finalizers"] = json!([CAPE_FINALIZER]);
    create(&client, &ns, held).await.unwrap();
    // A full pool and a missing pool: both denied.
    let full = create(&client, &ns, capi_machine("m-full", "tpl", devices.clone())).await;
    assert!(full.is_err(), "the third machine is denied: {full:?}");
    let none = create(
        &client,
        &ns,
        capi_machine("m-none", "nopool", devices.clone()),
    )
    .await;
    assert!(
        none.is_err(),
        "a machine whose pool is absent is denied: {none:?}"
    );
    // A release, and a machine whose VM CAPE is still deleting.
    let api = machines(&client, &ns);
    api.delete("m-0", &DeleteParams::default()).await.unwrap();
    api.delete("m-held", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(120), "m-0 released", || {
        common::util::gone(&client, &ns, "m-0")
    })
    .await;

    let admin = format!("http://{}/metrics", hook.running.admin_addr);
    let http = reqwest::Client::new();
    let scrape = || async { http.get(&admin).send().await.unwrap().text().await.unwrap() };
    let waiting = format!("machine=\"{ns}/m-held\",waiting_for=\"vm-deletion\"");
    // The background loop refreshes the figure at the start of each pass (every second here,
    // unless a pass waits for admission to be quiet).
    let mut text = String::new();
    let start = std::time::Instant::now();
    while !text.contains(&waiting) && start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = scrape().await;
    }
    assert!(text.contains(&waiting), "m-held waits for CAPE:\n{text}");
    let exported = scraped(&text);
    eprintln!(
        "metrics exported: {:?}",
        exported.keys().collect::<Vec<_>>()
    );
    for result in ["allocated", "exhausted", "no_pool"] {
        assert!(
            text.contains(&format!("result=\"{result}\"")),
            "allocations_total has result={result}:\n{text}"
        );
    }

    // The rules, the dashboard and the rules' unit tests use only exported metrics.
    let rule = prometheus_rule();
    let dashboard = dashboard();
    let mut used: BTreeMap<String, String> = BTreeMap::new();
    for a in alerts(&rule) {
        for m in metric_names(a["expr"].as_str().unwrap()) {
            used.insert(m, format!("alert {}", a["alert"]));
        }
    }
    for q in dashboard_queries(&dashboard) {
        for m in metric_names(&as_promql(&q)) {
            used.insert(m, format!("dashboard query {q}"));
        }
    }
    for m in dashboard_variable_metrics(&dashboard) {
        used.insert(m, "dashboard variable".into());
    }
    assert!(used.len() >= 8, "{used:?}");
    for (metric, by) in &used {
        assert!(
            exported.contains_key(metric),
            "{metric} (used by {by}) is not exported by the webhook:\n{text}"
        );
    }
    let tests = yaml_file(&root().join("tests/monitoring/rules_test.yaml")).remove(0);
    for (metric, labels) in test_series(&tests) {
        let Some(real) = exported.get(&metric) else {
            panic!("rules_test.yaml uses {metric}, which the webhook does not export");
        };
        for label in &labels {
            assert!(
                real.any.contains(label) || TARGET_LABELS.contains(&label.as_str()),
                "rules_test.yaml gives {metric} the label {label}: the webhook exports {real:?}"
            );
        }
        for label in real.always.iter().flatten() {
            assert!(
                labels.contains(label),
                "rules_test.yaml lacks the label {label} of {metric}: {labels:?}"
            );
        }
    }

    // Let CAPE's part go, so that the machine is released and the namespace is left clean.
    api.patch(
        "m-held",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"finalizers": [cape_static_ip::contract::STATIC_IP_FINALIZER]}}),
        ),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(120), "m-held released", || {
        common::util::gone(&client, &ns, "m-held")
    })
    .await;
    hook.stop().await;
}

/// `kubectl` against the control plane of this test binary.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    run(Command::new(tools::kubectl())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .current_dir(root()))
    .0
}

#[tokio::test]
async fn component_renders_on_the_base_and_the_apiserver_accepts_it() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let kubeconfig = cp.kubeconfig();

    // The CRDs: the Prometheus operator's from tests/crds/, cert-manager's (the base's
    // Certificates and Issuers) from its Go module.
    let crds = root().join("tests/crds/prometheus-operator-v0.94.0");
    kubectl(
        kubeconfig,
        &["apply", "--server-side", "-f", crds.to_str().unwrap()],
    );
    let (cert_manager, _) =
        run(Command::new("bash").arg(root().join("hack/controlplane/certmanager-crds.sh")));
    kubectl(
        kubeconfig,
        &["apply", "--server-side", "-f", cert_manager.trim()],
    );
    kubectl(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
            "crd/certificates.cert-manager.io",
            "crd/issuers.cert-manager.io",
        ],
    );

    // An overlay as a user writes it: the base, the component, another namespace.
    let ns = temp_namespace(&client, "monitoring-dry-run").await;
    // kustomize takes only relative paths: the overlay lives in target/ (as release.sh's).
    let overlay = root().join(format!("target/.monitoring-{ns}"));
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {ns}\n\
             resources:\n  - ../../manifests\ncomponents:\n  - ../../manifests/monitoring\n"
        ),
    )
    .unwrap();
    let rendered = kubectl(kubeconfig, &["kustomize", overlay.to_str().unwrap()]);
    let objects = tools::yaml_docs(&rendered);
    let find =
        |kind: &str| -> Vec<&Value> { objects.iter().filter(|o| o["kind"] == kind).collect() };
    let monitors = find("ServiceMonitor");
    let rules = find("PrometheusRule");
    let dashboards: Vec<&Value> = find("ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(
        (monitors.len(), rules.len(), dashboards.len()),
        (1, 1, 1),
        "{rendered}"
    );
    for o in [monitors[0], rules[0], dashboards[0]] {
        assert_eq!(o["metadata"]["namespace"], ns.as_str(), "{o}");
    }
    // The dashboard is shipped as written.
    let shipped = std::fs::read_to_string(monitoring_dir().join("dashboard.json")).unwrap();
    assert_eq!(
        dashboards[0]["data"]["cape-static-ip.json"],
        shipped.as_str()
    );

    // The ServiceMonitor selects the base's Service and scrapes its admin port by name.
    let monitor = monitors[0];
    let services = find("Service");
    let selected: Vec<&&Value> = services
        .iter()
        .filter(|s| {
            monitor["spec"]["selector"]["matchLabels"]
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| s["metadata"]["labels"][k] == *v)
        })
        .collect();
    assert_eq!(selected.len(), 1, "the ServiceMonitor selects one Service");
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let service_port = selected[0]["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("the Service has a port named {port}"));
    let deployment = find("Deployment")[0];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let target = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == service_port["targetPort"])
        .unwrap_or_else(|| panic!("the container has port {}", service_port["targetPort"]));
    let admin_listen = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix("--admin-listen="))
        .expect("--admin-listen in the Deployment's args");
    assert!(
        admin_listen.ends_with(&format!(":{}", target["containerPort"])),
        "the ServiceMonitor scrapes the admin port ({admin_listen}), /metrics's home"
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");

    // Everything, base and component, through the real apiserver's admission and schemas.
    let file = overlay.join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    let dry_run = kubectl(
        kubeconfig,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    eprintln!("server-side dry run of manifests/ + manifests/monitoring/:\n{dry_run}");
    let accepted = dry_run
        .lines()
        .filter(|l| l.ends_with("serverside-applied (server dry run)"))
        .count();
    assert_eq!(accepted, objects.len(), "every object accepted:\n{dry_run}");
    for kind in [
        "servicemonitor",
        "prometheusrule",
        "configmap/cape-static-ip-dashboard",
    ] {
        assert!(dry_run.contains(kind), "{kind} in:\n{dry_run}");
    }
    let _ = std::fs::remove_dir_all(&overlay);
}
