//! End-to-end tests of the whole-server view: `/metrics` (parsed by the
//! Prometheus Python client) and Triton's statistics (read by tritonclient)
//! count every request sent through both ports, whichever of several workers
//! answers the scrape, and keep counting across a worker's restart.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use serde_json::Value;

/// A digits request of `batch` rows.
fn digits(batch: usize) -> String {
    let data = vec!["1"; batch * 64].join(",");
    format!(r#"{{"inputs":[{{"name":"pixels","shape":[{batch},64],"datatype":"FP32","data":[{data}]}}]}}"#)
}

/// Scrapes `url` (HTTPS when `ca` is given) with the Python clients.
fn scrape(t: &Tandem, url: &str, ca: Option<&Path>) -> Value {
    serde_json::from_str(&python_client(t, "scrape_stats.py", url, ca)).unwrap()
}

fn sample(v: &Value, key: &str) -> f64 {
    v["metrics"][key].as_f64().unwrap_or_else(|| panic!("no sample {key} in {}", v["metrics"]))
}

fn infer_requests(v: &Value, listener: &str, code: &str) -> f64 {
    sample(
        v,
        &format!(
            r#"tandem_http_requests_total{{code="{code}",listener="{listener}",method="POST",protocol="http",route="/v2/models/{{name}}/infer"}}"#
        ),
    )
}

/// Sends `n` requests of `body` to `url`, each on a new connection, expecting `status`.
fn send(client: &reqwest::blocking::Client, url: &str, body: &str, n: usize, status: u16) {
    for _ in 0..n {
        let r = client.post(url).header("content-type", "application/json").body(body.to_string()).send().unwrap();
        assert_eq!(r.status().as_u16(), status, "{url}: {}", r.text().unwrap_or_default());
    }
}

#[test]
fn metrics_and_statistics_sum_every_worker_on_both_ports_across_a_restart() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "3").start();
    let ca = t.dir.path().join("ca.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    let fresh = || reqwest::blocking::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let http = fresh();
    let https = {
        let cert = reqwest::Certificate::from_pem(t.served_chain_pem().as_bytes()).unwrap();
        reqwest::blocking::Client::builder().add_root_certificate(cert).pool_max_idle_per_host(0).build().unwrap()
    };
    let http_infer = t.http_url("/v2/models/digits/infer");
    let https_infer = t.https_url("localhost", "/v2/models/digits/infer");
    send(&http, &http_infer, &digits(2), 30, 200);
    send(&https, &https_infer, &digits(1), 20, 200);
    send(&http, &t.http_url("/v2/models/nope/infer"), &digits(1), 5, 404);
    let wrong_shape = digits(1).replace("[1,64]", "[1,63]");
    send(&https, &https_infer, &wrong_shape, 4, 400);

    // One engine worker dies and is replaced: what it counted stays.
    let victim = t.workers("engine-worker")[0];
    kill(victim, Signal::SIGKILL).unwrap();
    t.wait_replaced(Duration::from_secs(20), "engine-worker", victim, 3);
    t.wait_for_log(Duration::from_secs(20), "engine worker ready", 4);
    send(&fresh(), &http_infer, &digits(3), 10, 200);

    // Every scrape, through either port and so from whichever worker answers, sees the same totals.
    let http_addr = format!("127.0.0.1:{}", t.http_port);
    let https_addr = format!("localhost:{}", t.https_port);
    for i in 0..6 {
        let v = if i % 2 == 0 { scrape(&t, &http_addr, None) } else { scrape(&t, &https_addr, Some(&ca)) };
        assert!(v["content_type"].as_str().unwrap().starts_with("text/plain; version=0.0.4"), "{}", v["content_type"]);
        assert_eq!(infer_requests(&v, "http", "200"), 40.0);
        assert_eq!(infer_requests(&v, "http", "404"), 5.0);
        assert_eq!(infer_requests(&v, "https", "200"), 20.0);
        assert_eq!(infer_requests(&v, "https", "400"), 4.0);
        let m = |name: &str| sample(&v, &format!(r#"{name}{{model="digits",version="1"}}"#));
        assert_eq!(m("tandem_model_success_total"), 60.0);
        assert_eq!(m("tandem_model_failures_total"), 4.0);
        assert_eq!(m("tandem_model_inferences_total"), (30 * 2 + 20 + 10 * 3) as f64);
        assert_eq!(m("tandem_model_executions_total"), 60.0);
        assert_eq!(m("tandem_model_request_duration_seconds_count"), 64.0);
        assert!(m("tandem_model_compute_infer_duration_seconds_total") > 0.0);
        assert_eq!(sample(&v, r#"tandem_workers{role="engine-worker"}"#), 3.0);
        assert_eq!(sample(&v, r#"tandem_workers{role="https-worker"}"#), 1.0);
        assert_eq!(sample(&v, r#"tandem_worker_restarts_total{cause="signalled",role="engine-worker"}"#), 1.0);
        assert!(sample(&v, r#"tandem_process_resident_memory_bytes{role="engine-worker"}"#) > 1e6);
        assert!(sample(&v, r#"tandem_certificate_seconds_left{source="GENERATE"}"#) > 86400.0);
        let handshakes: f64 = v["metrics"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("tandem_tls_handshakes_total{"))
            .map(|(_, n)| n.as_f64().unwrap())
            .sum();
        assert!(handshakes >= 24.0, "every HTTPS request above had its own handshake: {handshakes}");

        // Triton's statistics, as tritonclient reads them.
        for scope in ["all", "model", "version"] {
            let stats = v["triton"][scope]["model_stats"].as_array().unwrap();
            let d = stats.iter().find(|s| s["name"] == "digits" && s["version"] == "1").unwrap_or_else(|| {
                panic!("digits v1 missing from the {scope} statistics: {}", v["triton"][scope]);
            });
            assert_eq!(d["inference_count"], 110, "{d}");
            assert_eq!(d["execution_count"], 60, "{d}");
            assert_eq!(d["inference_stats"]["success"]["count"], 60, "{d}");
            assert_eq!(d["inference_stats"]["fail"]["count"], 4, "{d}");
            assert!(d["inference_stats"]["compute_infer"]["ns"].as_u64().unwrap() > 0, "{d}");
            assert!(d["last_inference"].as_u64().unwrap() > 1_700_000_000_000, "{d}");
        }
    }
    // An unknown model's statistics are a JSON 404.
    let r = http.get(t.http_url("/v2/models/nope/stats")).send().unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().unwrap()["error"].as_str().unwrap().contains("nope"));
}

#[test]
fn metrics_port_is_served_by_the_supervisor_even_while_workers_restart() {
    let port = free_port();
    let t = TandemBuilder::new().env("NUM_WORKERS", "1").env("METRICS_PORT", &port.to_string()).start();
    let http = Tandem::http_client();
    send(&http, &t.http_url("/v2/models/digits/infer"), &digits(1), 3, 200);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let worker = t.workers("engine-worker")[0];
    kill(worker, Signal::SIGSTOP).unwrap();
    // The only engine worker is frozen: the supervisor still answers.
    let text = http.get(&url).send().unwrap().text().unwrap();
    kill(worker, Signal::SIGCONT).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(r#"tandem_http_requests_total{listener="http",protocol="http",route="/v2/models/{name}/infer",method="POST",code="200"}"#))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with(" 3"), "{line}");
    let about: Value = http.get(format!("http://127.0.0.1:{port}/")).send().unwrap().json().unwrap();
    assert_eq!(about["name"], "tandem", "{about}");
    let other = http.get(format!("http://127.0.0.1:{port}/v2/models")).send().unwrap();
    assert_eq!(other.status(), 404);
    assert!(other.json::<Value>().unwrap()["error"].as_str().unwrap().contains("/metrics"));
}
