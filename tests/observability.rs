//! A real Prometheus (Debian's `prometheus`) scraping two real tandems, one
//! healthy (scraped on `PORT`) and one failing on purpose (a model that
//! cannot load, an engine worker killed again and again, a certificate that
//! expires in hours; scraped on `METRICS_PORT` with `METRICS_PUBLIC=false`,
//! as the Kubernetes manifests do): after load, the rules of deploy/prometheus
//! fire exactly the expected alerts for the failing one and none for the
//! healthy one, and every query of the Grafana dashboard
//! (deploy/grafana/tandem.json) returns series. Every metric the dashboard
//! and the Kubernetes components name is one tandem exports.
//!
//! Skipped, saying so, where the prometheus binary is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use serde_json::Value;

use common::pki::TestCa;
use common::*;

/// A Prometheus server on loopback, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `targets` (host:port, `/metrics`) every second and evaluates
    /// `rules` every second.
    fn start(targets: &[String], rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [rules.yaml]\n\
             scrape_configs:\n  - job_name: tandem\n    static_configs: [{{targets: [{}]}}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus { child, url: format!("http://127.0.0.1:{port}"), dir };
        let http = Tandem::http_client();
        wait_for(
            Duration::from_secs(30),
            "Prometheus ready",
            || p.log(),
            || http.get(format!("{}/-/ready", p.url)).send().ok().filter(|r| r.status().is_success()),
        );
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let resp = Tandem::http_client().get(format!("{}{path}", self.url)).query(query).send().unwrap();
        let body: Value = resp.json().unwrap();
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, expr: &str) -> Vec<Value> {
        self.api("/api/v1/query", &[("query", expr)])["result"].as_array().unwrap().clone()
    }

    /// (alert name, instance, state) of every pending or firing alert.
    fn alerts(&self) -> BTreeSet<(String, String, String)> {
        let data = self.api("/api/v1/alerts", &[]);
        let label = |a: &Value, k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (label(a, "alertname"), label(a, "instance"), a["state"].as_str().unwrap().to_string()))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log:\n{}", self.log());
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped rules with every `for:` shortened to 0s, so that an alert
/// fires within the test; the expressions are the shipped ones.
fn rules_firing_at_once() -> String {
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/tandem-rules.yaml")).unwrap();
    let shortened: Vec<String> = rules
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 0s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_string(),
        })
        .collect();
    assert!(shortened.len() == rules.lines().count() && rules.contains("for: 5m"));
    shortened.join("\n") + "\n"
}

/// Sends inference requests for `seconds`: to `digits` over HTTP and HTTPS,
/// and a few the client gets wrong (404, 400), as traffic looks.
fn load(t: &Tandem, https: &reqwest::blocking::Client, seconds: u64) {
    let http = Tandem::http_client();
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u32;
    while Instant::now() < end {
        let ok = http.post(t.http_url("/v2/models/digits/infer")).body(digits_body(n % 17)).send().unwrap();
        assert!(ok.status().is_success(), "{}", t.explain());
        let ok = https.post(t.https_url("localhost", "/v2/models/digits/infer")).body(digits_body(n % 5)).send();
        assert!(ok.unwrap().status().is_success(), "{}", t.explain());
        if n.is_multiple_of(10) {
            let missing = http.post(t.http_url("/v2/models/nosuch/infer")).body(digits_body(1)).send().unwrap();
            assert_eq!(missing.status().as_u16(), 404);
            let bad = http.post(t.http_url("/v2/models/digits/infer")).body("{not json").send().unwrap();
            assert_eq!(bad.status().as_u16(), 400);
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn host_port(t: &Tandem) -> String {
    t.http_url("").trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// The names of the metric families in an exposition (histogram series included).
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

#[test]
fn a_real_prometheus_raises_the_expected_alerts_and_feeds_every_dashboard_panel() {
    if !Command::new("prometheus").arg("--version").output().is_ok_and(|o| o.status.success()) {
        eprintln!("Prometheus test skipped: the prometheus binary is not installed (Debian's prometheus package)");
        return;
    }
    install_provider();
    // Healthy: one model that serves, a generated certificate.
    let healthy_repo = tempfile::tempdir().unwrap();
    copy_digits(healthy_repo.path(), "digits", "");
    let healthy = TandemBuilder::new()
        .ssl()
        .env("NUM_WORKERS", "2")
        .env("MODEL_REPOSITORY", healthy_repo.path().to_str().unwrap())
        .start();
    let healthy_chain = healthy.served_chain_pem();
    // Failing: a model that cannot load beside one that serves, and a
    // certificate from a CA that expires in 12 hours.
    let failing_repo = tempfile::tempdir().unwrap();
    copy_digits(failing_repo.path(), "digits", "");
    broken_model(failing_repo.path(), "broken");
    let ca = TestCa::new();
    let certs = tempfile::tempdir().unwrap();
    ca.issue_between(&["localhost", "127.0.0.1"], time::Duration::days(-1), time::Duration::hours(12)).write(
        certs.path(),
        "tls.crt",
        "tls.key",
    );
    let metrics_port = free_port();
    let failing = TandemBuilder::new()
        .ssl()
        .env("NUM_WORKERS", "2")
        .env("METRICS_PORT", &metrics_port.to_string())
        .env("METRICS_PUBLIC", "false")
        .env("MODEL_REPOSITORY", failing_repo.path().to_str().unwrap())
        .env("SSL_CERTIFICATE", certs.path().join("tls.crt").to_str().unwrap())
        .start_live();
    let failing_https = Tandem::https_client(&ca.pem);
    wait_for(
        Duration::from_secs(60),
        "digits serving beside the broken model",
        || failing.explain(),
        || {
            failing_https
                .post(failing.https_url("localhost", "/v2/models/digits/infer"))
                .body(digits_body(1))
                .send()
                .ok()
                .filter(|r| r.status().is_success())
        },
    );

    let failing_metrics = format!("127.0.0.1:{metrics_port}");
    let prometheus = Prometheus::start(&[host_port(&healthy), failing_metrics.clone()], &rules_firing_at_once());
    load(&healthy, &Tandem::https_client(&healthy_chain), 6);
    load(&failing, &failing_https, 6);
    // The failing tandem's engine workers die four times (each replacement is
    // waited for, so the supervisor counts four restarts).
    for i in 0..4 {
        let victim = failing.workers("engine-worker")[i % 2];
        kill(victim, Signal::SIGKILL).unwrap();
        failing.wait_replaced(Duration::from_secs(30), "engine-worker", victim, 2);
    }

    // What the rules must say, per tandem.
    let (h, f) = (host_port(&healthy), failing_metrics.clone());
    let expected: BTreeSet<(String, String, String)> = [
        "TandemCertificateExpiresSoon",
        "TandemCertificateExpiresWithinADay",
        "TandemModelUnavailable",
        "TandemNotReady",
        "TandemWorkerCrashLooping",
    ]
    .iter()
    .map(|a| (a.to_string(), f.clone(), "firing".to_string()))
    .collect();
    let mut seen = BTreeSet::new();
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        seen = prometheus.alerts();
        if seen.is_superset(&expected) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Given a few more evaluations, nothing else joins them.
    std::thread::sleep(Duration::from_secs(4));
    seen.extend(prometheus.alerts());
    assert_eq!(seen, expected, "healthy is {h}, failing is {f}\n{}\n{}", healthy.explain(), failing.explain());

    // The dashboard: every panel's every query returns series from what
    // tandem exports (its variables set to All, Grafana's rate interval 1m).
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/tandem.json")).unwrap()).unwrap();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for url in [healthy.http_url("/metrics"), format!("http://{failing_metrics}/metrics")] {
        names.extend(exported(&Tandem::http_client().get(url).send().unwrap().text().unwrap()));
    }
    // METRICS_PUBLIC=false: the failing tandem's inference port does not serve them.
    let hidden = Tandem::http_client().get(failing.http_url("/metrics")).send().unwrap();
    assert_eq!(hidden.status().as_u16(), 404, "{}", failing.explain());
    // What the Kubernetes components name (the in-flight autoscaler, the adapter's rule).
    for file in ["hpa-in-flight.yaml", "prometheus-adapter-rules.yaml"] {
        let path = root().join("deploy/kubernetes/components/autoscale-in-flight").join(file);
        let text = std::fs::read_to_string(path).unwrap();
        let named: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
            .filter(|w| w.starts_with("tandem_"))
            .collect();
        assert!(!named.is_empty(), "{file} names no metric");
        for word in named {
            assert!(names.contains(word), "{file}: {word} is not a metric tandem exports");
        }
    }
    let panels = dashboard["panels"].as_array().unwrap();
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap();
        assert!(panel["gridPos"]["w"].as_u64().is_some_and(|w| w <= 24), "{title}: gridPos");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}: the datasource variable");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("tandem_") {
                    assert!(names.contains(word), "{title}: {word} is not a metric tandem exports");
                }
            }
            let concrete = expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*");
            let result = prometheus.query(&concrete);
            assert!(!result.is_empty(), "{title}: no series for {concrete}");
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
    // The variables' queries name a series that exists.
    for var in dashboard["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        let q = var["query"]["query"].as_str().unwrap();
        let metric = q.trim_start_matches("label_values(").split(['{', ',']).next().unwrap();
        assert!(!prometheus.query(metric).is_empty(), "variable {}: {q}", var["name"]);
    }
}
