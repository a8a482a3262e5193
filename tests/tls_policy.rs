//! End-to-end tests of the TLS policy settings: `SSL_MIN_VERSION`, `SSL_HSTS`
//! (HTTPS answers only), `SSL_REDIRECT_HTTP` (health checks excepted) and the
//! 400 a plain HTTP request to the TLS port gets instead of a dropped connection.

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
