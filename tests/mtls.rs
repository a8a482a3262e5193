//! End-to-end tests of client certificates (`SSL_CLIENT_CA`, `SSL_CLIENT_AUTH`):
//! required refuses no certificate and one from another CA at the handshake
//! and serves the right one with its identity in the access log; optional
//! serves both; a forged identity header is never believed; a new CA bundle is
//! picked up without a restart. Certificates are made with the openssl CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::pki::ca_and_client;
use common::*;
use serde_json::Value;

/// curl over HTTPS with an optional client certificate; returns the HTTP code ("000" when the handshake fails).
fn curl(t: &Tandem, server_ca: &Path, client: Option<(&Path, &str)>, extra: &[&str]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"]).arg(server_ca).args(extra);
    if let Some((dir, name)) = client {
        cmd.arg("--cert").arg(dir.join(format!("{name}.pem"))).arg("--key").arg(dir.join(format!("{name}.key")));
    }
    cmd.arg(t.https_url("localhost", "/v2/health/ready"));
    String::from_utf8(cmd.output().unwrap().stdout).unwrap()
}

fn access_lines(t: &Tandem) -> Vec<Value> {
    t.stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "access")
        .collect()
}

fn start(auth: &str) -> (Tandem, PathBuf, PathBuf) {
    let b = TandemBuilder::new();
    let dir = b.dir().join("pki");
    std::fs::create_dir_all(&dir).unwrap();
    ca_and_client(&dir, "ca1", "alice");
    ca_and_client(&dir, "ca2", "bob");
    let bundle = dir.join("client-ca.pem");
    std::fs::copy(dir.join("ca1.pem"), &bundle).unwrap();
    let t = b
        .ssl()
        .env("SSL_CLIENT_CA", bundle.to_str().unwrap())
        .env("SSL_CLIENT_AUTH", auth)
        .env("ACCESS_LOG", "true")
        .env("LOG_FORMAT", "json")
        .start_live();
    let server_ca = dir.join("server.pem");
    std::fs::write(&server_ca, t.served_chain_pem()).unwrap();
    (t, dir, server_ca)
}

#[test]
fn required_client_certificates_are_verified_and_their_identity_reaches_the_log() {
    let (t, dir, server_ca) = start("required");
    assert_eq!(curl(&t, &server_ca, None, &[]), "000", "no certificate: refused at the handshake");
    assert_eq!(curl(&t, &server_ca, Some((&dir, "bob")), &[]), "000", "another CA's certificate: refused");
    // The operator hears why, once a minute per client address.
    t.wait_for_log(Duration::from_secs(5), "client certificate rejected", 1);
    let err = t.stderr();
    assert!(err.contains("no client certificate (SSL_CLIENT_AUTH=required)"), "{}", t.explain());
    assert_eq!(err.matches("client certificate rejected").count(), 1, "{}", t.explain());
    // The right one is served, and a forged identity header is replaced by the verified one.
    assert_eq!(curl(&t, &server_ca, Some((&dir, "alice")), &["-H", "x-tandem-client-subject: CN=mallory"]), "200");
    let lines = access_lines(&t);
    let served =
        lines.iter().find(|l| l["listener"] == "https").unwrap_or_else(|| panic!("{lines:?}\n{}", t.explain()));
    assert_eq!(served["client"], "CN=alice", "{served}");
    assert_eq!(served["client_fingerprint"].as_str().unwrap().len(), 64, "{served}");
    assert!(!t.stderr().contains("mallory"), "the forged subject reached the engine");
    // Plain HTTP cannot claim an identity either.
    let http = Tandem::http_client()
        .get(t.http_url("/v2/health/live"))
        .header("x-tandem-client-subject", "CN=mallory")
        .send()
        .unwrap();
    assert_eq!(http.status(), 200);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!t.stderr().contains("mallory"), "a plain-HTTP client named itself");
    let metrics = Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"tandem_tls_handshake_failures_total{reason="bad_certificate"} "#))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!(refused >= 2.0, "both refused handshakes are counted as bad_certificate: {refused}");

    // A new bundle (ca2) is picked up without a restart: bob is in, alice is out.
    std::fs::copy(dir.join("ca2.pem"), dir.join("client-ca.pem.new")).unwrap();
    std::fs::rename(dir.join("client-ca.pem.new"), dir.join("client-ca.pem")).unwrap();
    wait_for(
        Duration::from_secs(15),
        "the new client CA bundle",
        || t.explain(),
        || (curl(&t, &server_ca, Some((&dir, "bob")), &[]) == "200").then_some(()),
    );
    assert_eq!(curl(&t, &server_ca, Some((&dir, "alice")), &[]), "000");
}

#[test]
fn optional_client_certificates_serve_everyone_and_name_those_who_present_one() {
    let (t, dir, server_ca) = start("optional");
    assert_eq!(curl(&t, &server_ca, None, &[]), "200");
    assert_eq!(curl(&t, &server_ca, Some((&dir, "alice")), &[]), "200");
    assert_eq!(
        curl(&t, &server_ca, Some((&dir, "bob")), &[]),
        "000",
        "a certificate that does not verify is still refused"
    );
    let lines: Vec<Value> = access_lines(&t).into_iter().filter(|l| l["listener"] == "https").collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|l| l["client"] == "CN=alice"), "{lines:?}");
    assert!(lines.iter().any(|l| l.get("client").is_none()), "{lines:?}");
}

#[test]
fn client_auth_without_a_ca_exits_2() {
    let mut t = TandemBuilder::new().ssl().env("SSL_CLIENT_AUTH", "required").spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(10)).code(), Some(2), "{}", t.explain());
    assert!(t.stderr().contains("SSL_CLIENT_AUTH") && t.stderr().contains("SSL_CLIENT_CA"), "{}", t.explain());
}

#[test]
fn a_client_subject_with_special_characters_cannot_pass_for_another() {
    let b = TandemBuilder::new();
    let dir = b.dir().join("pki");
    std::fs::create_dir_all(&dir).unwrap();
    // One common name that, written naively, reads as CN=eve plus an O=Admins attribute.
    common::pki::ca_and_client_named(&dir, "ca1", "eve", r"/CN=eve,O=Admins\+OU=root");
    let t = b
        .ssl()
        .env("SSL_CLIENT_CA", dir.join("ca1.pem").to_str().unwrap())
        .env("ACCESS_LOG", "true")
        .env("LOG_FORMAT", "json")
        .start_live();
    let server_ca = dir.join("server.pem");
    std::fs::write(&server_ca, t.served_chain_pem()).unwrap();
    assert_eq!(curl(&t, &server_ca, Some((&dir, "eve")), &[]), "200");
    std::thread::sleep(Duration::from_millis(200));
    let lines = access_lines(&t);
    let served = lines.iter().find(|l| l["listener"] == "https").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(served["client"], r"CN=eve\,O=Admins\+OU=root", "{served}");
}
