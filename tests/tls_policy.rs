//! End-to-end tests of the TLS policy settings: `SSL_MIN_VERSION`, `SSL_HSTS`
//! (HTTPS answers only), what the plain port serves beside HTTPS (`HTTP_MODE`:
//! redirect and health with health checks excepted, off with no listener, the
//! caution when client certificates are required but the plain port serves
//! everything) and the 400 a plain HTTP request to the TLS port gets instead
//! of a dropped connection.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn handshake(port: u16, version_flag: &str) -> bool {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), version_flag, "-servername", "localhost"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE")
}

#[test]
fn min_version_1_3_refuses_tls_1_2() {
    let t = TandemBuilder::new().ssl().env("SSL_MIN_VERSION", "1.3").start();
    assert!(handshake(t.https_port, "-tls1_3"), "TLS 1.3 is served\n{}", t.explain());
    assert!(!handshake(t.https_port, "-tls1_2"), "TLS 1.2 is refused");
    let t12 = TandemBuilder::new().ssl().start();
    assert!(handshake(t12.https_port, "-tls1_2"), "TLS 1.2 is served by default");
}

#[test]
fn hsts_is_sent_over_https_only_and_a_bad_value_exits_2() {
    let hsts = "max-age=31536000; includeSubDomains";
    let t = TandemBuilder::new().ssl().env("SSL_HSTS", hsts).start();
    let https =
        Tandem::https_client(&t.served_chain_pem()).get(t.https_url("localhost", "/v2/health/ready")).send().unwrap();
    assert_eq!(https.headers()["strict-transport-security"], hsts);
    let http = Tandem::http_client().get(t.http_url("/v2/health/ready")).send().unwrap();
    assert!(http.headers().get("strict-transport-security").is_none(), "RFC 6797: never over plain HTTP");

    let mut bad = TandemBuilder::new().ssl().env("SSL_HSTS", "max-age=soon").spawn();
    assert_eq!(bad.wait_exit(Duration::from_secs(10)).code(), Some(2), "{}", bad.explain());
    assert!(bad.stderr().contains("SSL_HSTS"), "{}", bad.explain());
}

#[test]
fn plain_http_is_redirected_except_health_checks() {
    let t = TandemBuilder::new().ssl().env("SSL_REDIRECT_HTTP", "true").start();
    let client = reqwest::blocking::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = client.get(t.http_url("/v2/models/digits?x=1")).send().unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], format!("https://127.0.0.1:{}/v2/models/digits?x=1", t.https_port));
    let health = client.get(t.http_url("/v2/health/ready")).send().unwrap();
    assert_eq!(health.status(), 200, "load balancers probe plain HTTP");
    // Following the redirect lands on the model over HTTPS.
    let followed = Tandem::https_client(&t.served_chain_pem())
        .get(r.headers()["location"].to_str().unwrap().replace("127.0.0.1", "localhost"))
        .send()
        .unwrap();
    assert_eq!(followed.status(), 200);

    let mut bad = TandemBuilder::new().env("SSL_REDIRECT_HTTP", "true").spawn();
    assert_eq!(bad.wait_exit(Duration::from_secs(10)).code(), Some(2), "needs ENABLE_SSL\n{}", bad.explain());
}

#[test]
fn plain_http_on_the_tls_port_gets_a_400_that_says_so() {
    let t = TandemBuilder::new().ssl().start();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", t.https_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("speaks TLS") && answer.contains("https://"), "{answer}");
    // The port still serves TLS.
    let ok =
        Tandem::https_client(&t.served_chain_pem()).get(t.https_url("localhost", "/v2/health/ready")).send().unwrap();
    assert_eq!(ok.status(), 200);
    let metrics = Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains(r#"tandem_tls_handshake_failures_total{reason="plain_http"} 1"#), "{metrics}");
}

fn tandem_health(t: &Tandem) -> std::process::Output {
    Command::new(TANDEM).arg("health").env_clear().envs(&t.env).output().unwrap()
}

#[test]
fn a_health_only_plain_port_answers_probes_and_refuses_the_rest() {
    let t = TandemBuilder::new().ssl().env("HTTP_MODE", "health").start();
    let http = Tandem::http_client();
    for path in ["/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready", "/v2/models/digits/versions/1/ready"]
    {
        assert_eq!(http.get(t.http_url(path)).send().unwrap().status(), 200, "{path}\n{}", t.explain());
    }
    let refused = http.post(t.http_url("/v2/models/digits/infer")).body(digits_body(3)).send().unwrap();
    assert_eq!(refused.status(), 403);
    let error: serde_json::Value = refused.json().unwrap();
    let said = error["error"].as_str().unwrap();
    assert!(said.contains("HTTP_MODE=health") && said.contains(&t.https_port.to_string()), "{said}");
    for path in ["/", "/v2/repository/index", "/metrics"] {
        assert_eq!(http.get(t.http_url(path)).send().unwrap().status(), 403, "{path}");
    }
    // A path another server might resolve differently is no health check.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is"])
        .arg(t.http_url("/v2/health/../models/digits/infer"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    // HTTPS serves everything.
    let https = Tandem::https_client(&t.served_chain_pem());
    let r = https.post(t.https_url("localhost", "/v2/models/digits/infer")).body(digits_body(3)).send().unwrap();
    assert_eq!(r.status(), 200);
    let out = tandem_health(&t);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn without_a_plain_port_https_serves_through_the_ring_and_health_probes_it() {
    let t = TandemBuilder::new().ssl().env("HTTP_MODE", "off").env("NUM_WORKERS", "2").start();
    t.wait_for_log(Duration::from_secs(10), "no plain HTTP port (HTTP_MODE=off)", 1);
    assert!(std::net::TcpStream::connect(("127.0.0.1", t.http_port)).is_err(), "nothing listens on PORT");
    let https = Tandem::https_client(&t.served_chain_pem());
    for i in 0..8 {
        let r = https.post(t.https_url("localhost", "/v2/models/digits/infer")).body(digits_body(i)).send().unwrap();
        assert_eq!(r.status(), 200, "{}", t.explain());
    }
    let out = tandem_health(&t);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("https 200") && !said.contains("http 200"), "{said}");
    // An HTTPS-only server still drains and exits 0.
    let mut t = t;
    t.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(t.wait_exit(Duration::from_secs(20)).code(), Some(0), "{}", t.explain());
}

#[test]
fn required_client_certificates_beside_an_open_plain_port_are_a_caution() {
    let b = TandemBuilder::new();
    let dir = b.dir().join("pki");
    std::fs::create_dir_all(&dir).unwrap();
    common::pki::ca_and_client(&dir, "ca1", "alice");
    let ca = dir.join("ca1.pem");
    let open = b.ssl().env("HOST", "0.0.0.0").env("SSL_CLIENT_CA", ca.to_str().unwrap()).start_live();
    open.wait_for_log(Duration::from_secs(10), "serves everything (inference, model control) to anyone", 1);
    let check = Command::new(TANDEM).arg("check").env_clear().envs(&open.env).output().unwrap();
    assert!(String::from_utf8_lossy(&check.stdout).contains("HTTP_MODE=health"), "{check:?}");
    let closed =
        Command::new(TANDEM).arg("check").env_clear().envs(&open.env).env("HTTP_MODE", "health").output().unwrap();
    assert!(!String::from_utf8_lossy(&closed.stdout).contains("serves everything"), "{closed:?}");
}
