//! End-to-end tests of access control at the front door: `RESTRICTED_API`
//! (Triton's restricted categories) on plain HTTP, HTTPS through the ring and
//! the proxy in front of `WORKER_COMMAND`, with the stock tritonclient, a
//! secret file swapped while serving and hostile header values; and
//! `METRICS_PUBLIC=false` keeping `/metrics` on `METRICS_PORT` only.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn write_secret(path: &Path, value: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn status(r: reqwest::Result<reqwest::blocking::Response>) -> (u16, String) {
    let r = r.unwrap();
    (r.status().as_u16(), r.text().unwrap_or_default())
}

#[test]
fn restricted_categories_need_their_header_on_every_port_and_follow_the_secret_file() {
    let b =
        TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("MODEL_CONTROL_MODE", "explicit").env("MODEL_LOAD", "*");
    let key = b.dir().join("admin.key");
    write_secret(&key, "first-secret-value");
    let rule = format!("model-repository,statistics:X-Admin-Key=@{}", key.display());
    let t = b.env("RESTRICTED_API", &rule).env("HOST", "0.0.0.0").start();
    let ca = t.dir.path().join("ca.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    let (http, https) = (Tandem::http_client(), Tandem::https_client(&t.served_chain_pem()));
    let ports: [(&reqwest::blocking::Client, String); 2] =
        [(&http, t.http_url("")), (&https, format!("https://localhost:{}", t.https_port))];
    for (client, base) in &ports {
        let (code, body) = status(client.post(format!("{base}/v2/repository/index")).send());
        assert_eq!(code, 403, "{base}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        let said = error["error"].as_str().unwrap();
        assert!(said.contains("model-repository") && said.contains("x-admin-key"), "{said}");
        assert!(!said.contains("first-secret"), "the secret leaked: {said}");
        assert_eq!(status(client.get(format!("{base}/v2/models/digits/stats")).send()).0, 403);
        let ok = client.post(format!("{base}/v2/repository/index")).header("x-admin-key", "first-secret-value").send();
        assert_eq!(status(ok).0, 200, "{base}");
        // Open categories need nothing.
        let r = client.post(format!("{base}/v2/models/digits/infer")).body(digits_body(1)).send();
        assert_eq!(status(r).0, 200);
        // Wrong, near and hostile values are refused; the worker lives on.
        for bad in ["first-secret-valu", "first-secret-valuee", "FIRST-SECRET-VALUE", &"x".repeat(60_000)] {
            let r = client.get(format!("{base}/v2/models/stats")).header("x-admin-key", bad).send();
            assert_ne!(status(r).0, 200, "{bad:.20}");
        }
    }
    // A path spelled to slip past its category is refused, not classified elsewhere.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", "-X", "POST"])
        .arg(t.http_url("/v2/models/digits/../../repository/index"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    // The stock tritonclient: refused without headers=, served with them.
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/restricted_api.py"))
        .arg(format!("127.0.0.1:{}", t.http_port))
        .args(["--header", "x-admin-key", "--key", "first-secret-value"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(seen["without"].as_str().unwrap().contains("model-repository"), "{seen}");
    assert_eq!(seen["with"], serde_json::json!(["digits"]), "{seen}");
    assert_eq!(seen["ready"], true);

    // The secret file replaced while serving: the new value within seconds, the old one refused.
    write_secret(&key, "second-secret-value");
    wait_for(
        Duration::from_secs(5),
        "the new secret to apply",
        || t.explain(),
        || {
            let r = http.post(t.http_url("/v2/repository/index")).header("x-admin-key", "second-secret-value").send();
            (status(r).0 == 200).then_some(())
        },
    );
    let old = http.post(t.http_url("/v2/repository/index")).header("x-admin-key", "first-secret-value").send();
    assert_eq!(status(old).0, 403);
    // No caution: the repository API is restricted.
    assert!(!t.stderr().contains("lets anyone who reaches"), "{}", t.explain());
}

#[test]
fn a_restricted_health_category_is_probed_by_tandem_health_with_its_header() {
    let t = TandemBuilder::new().ssl().env("RESTRICTED_API", "health:x-probe=p1;status:x-status=s1").spawn();
    let http = Tandem::http_client();
    wait_for(
        Duration::from_secs(60),
        "readiness, with the header",
        || t.explain(),
        || {
            let r = http.get(t.http_url("/v2/health/ready")).header("x-probe", "p1").send().ok()?;
            (r.status() == 200).then_some(())
        },
    );
    assert_eq!(status(http.get(t.http_url("/v2/health/ready")).send()).0, 403);
    wait_for(
        Duration::from_secs(30),
        "HTTPS readiness, with the header",
        || t.explain(),
        || {
            let https = Tandem::https_client(&std::fs::read_to_string(t.cert_dir().join("live.pem")).ok()?);
            let r = https.get(t.https_url("localhost", "/v2/health/ready")).header("x-probe", "p1").send().ok()?;
            (r.status() == 200).then_some(())
        },
    );
    let out = Command::new(TANDEM).arg("health").env_clear().envs(&t.env).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn an_open_repository_api_on_the_network_is_a_caution() {
    let t = TandemBuilder::new().env("MODEL_CONTROL_MODE", "explicit").env("HOST", "0.0.0.0").start();
    t.wait_for_log(Duration::from_secs(5), "lets anyone who reaches 0.0.0.0 load and unload models", 1);
}

#[test]
fn the_proxy_path_enforces_the_same_restrictions_and_metrics_can_stay_private() {
    let metrics = free_port();
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let command = format!("python3 -m uvicorn app:app --app-dir {} --port {{port}} --log-level warning", app.display());
    let t = TandemBuilder::new()
        .env("WORKER_COMMAND", &command)
        .env("WORKER_READY_PATH", "/whoami")
        .env("RESTRICTED_API", "status:x-k=let-me-in")
        .env("METRICS_PUBLIC", "false")
        .env("METRICS_PORT", &metrics.to_string())
        .spawn();
    let http = Tandem::http_client();
    wait_for(
        Duration::from_secs(60),
        "the copy",
        || t.explain(),
        || http.get(t.http_url("/whoami")).send().ok().filter(|r| r.status() == 200).map(|_| ()),
    );
    assert_eq!(status(http.get(t.http_url("/")).send()).0, 403, "GET / is the status category");
    assert_eq!(status(http.get(t.http_url("/")).header("x-k", "let-me-in").send()).0, 200, "passed to the copy");
    let (code, body) = status(http.get(t.http_url("/metrics")).send());
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("METRICS_PORT"), "{body}");
    let scrape = http.get(format!("http://127.0.0.1:{metrics}/metrics")).send().unwrap();
    assert_eq!(scrape.status(), 200);
    assert!(scrape.text().unwrap().contains("tandem_http_requests_total"));
}
