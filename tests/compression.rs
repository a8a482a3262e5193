//! End-to-end tests of compressed bodies: tritonclient's gzip and deflate
//! request and response compression on both ports, a gzip bomb refused with
//! 413 and no worker lost, an unknown encoding refused as JSON, and the access
//! log that records each answer once with the client's real address.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn compression_suite(t: &Tandem, url: &str, ca: Option<&Path>) {
    let stdout = python_client(t, "compression.py", url, ca);
    assert!(stdout.contains("compression passed"), "{stdout}\n{}", t.explain());
}

#[test]
fn tritonclient_compression_works_on_both_ports() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").start();
    let ca = t.dir.path().join("ca.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    compression_suite(&t, &format!("127.0.0.1:{}", t.http_port), None);
    compression_suite(&t, &format!("localhost:{}", t.https_port), Some(&ca));
}

/// curl posting `file` with a `Content-Encoding` header per `|`-separated
/// part of `encoding`, spelled as written; returns (status, body).
fn curl_encoded(url: &str, ca: Option<&Path>, file: &Path, encoding: &str) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "-H", "content-type: application/json"]);
    for (i, part) in encoding.split('|').enumerate() {
        let name = if i % 2 == 0 { "content-encoding" } else { "Content-Encoding" };
        cmd.args(["-H", &format!("{name}: {part}")]);
    }
    cmd.arg("--data-binary").arg(format!("@{}", file.display())).arg(url);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}

#[test]
fn a_gzip_bomb_is_a_413_and_no_worker_dies() {
    let t = TandemBuilder::new().ssl().env("MAX_REQUEST_BYTES", "4194304").start();
    let ca = t.dir.path().join("ca.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    // 1 GiB of zeros, about 1 MiB compressed.
    let bomb = t.dir.path().join("bomb.gz");
    let made = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 1073741824 /dev/zero | gzip -c > {}", bomb.display()))
        .status()
        .unwrap();
    assert!(made.success());
    assert!(std::fs::metadata(&bomb).unwrap().len() < 4 << 20);
    let digits_gz = t.dir.path().join("digits.json.gz");
    std::fs::write(&digits_gz, gzip(common::digits_body(1).as_bytes())).unwrap();
    let workers = t.workers("engine-worker");
    let http = t.http_url("/v2/models/digits/infer");
    let https = t.https_url("localhost", "/v2/models/digits/infer");
    for (url, ca) in [(&http, None), (&https, Some(ca.as_path()))] {
        let (code, body) = curl_encoded(url, ca, &bomb, "gzip");
        assert_eq!(code, "413", "{url}: {body}\n{}", t.explain());
        assert!(body.contains("MAX_REQUEST_BYTES"), "{body}");
        // A body that is not gzip at all: a JSON 400, and an unknown encoding a JSON 415.
        let (code, body) = curl_encoded(url, ca, &t.dir.path().join("ca.pem"), "gzip");
        assert_eq!(code, "400", "{url}: {body}");
        assert!(serde_json::from_str::<Value>(&body).is_ok(), "{body}");
        let (code, body) = curl_encoded(url, ca, &t.dir.path().join("ca.pem"), "br-unknown");
        assert_eq!(code, "415", "{url}: {body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].as_str().unwrap().contains("gzip"), "{body}");
        // Every Content-Encoding counts, as a list and as repeated headers in two
        // spellings: identity is no coding; a body coded twice is refused.
        for (encoding, want) in
            [("identity, gzip", "200"), ("identity|gzip", "200"), ("gzip, gzip", "415"), ("gzip|deflate", "415")]
        {
            let (code, body) = curl_encoded(url, ca, &digits_gz, encoding);
            assert_eq!(code, want, "{url} {encoding}: {body}");
            if want == "415" {
                assert!(body.contains("two Content-Encodings"), "{body}");
            }
        }
    }
    assert_eq!(t.workers("engine-worker"), workers, "a worker died\n{}", t.explain());
    let ok = Tandem::http_client()
        .post(&http)
        .header("content-type", "application/json")
        .body(common::digits_body(1))
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn the_access_log_has_one_json_line_per_answer_with_the_real_client() {
    let t = TandemBuilder::new()
        .ssl()
        .env("ACCESS_LOG", "true")
        .env("LOG_FORMAT", "json")
        .env("MAX_REQUEST_BYTES", "4096")
        .start();
    let body = common::digits_body(1);
    let http = Tandem::http_client();
    let https = Tandem::https_client(&t.served_chain_pem());
    let r = http.post(t.http_url("/v2/models/digits/infer")).body(body.clone()).send().unwrap();
    assert_eq!(r.status(), 200);
    // A forged address header is never believed.
    let r = https
        .post(t.https_url("localhost", "/v2/models/digits/infer"))
        .header("x-tandem-peer", "6.6.6.6:1")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Answered by the HTTPS worker itself (over MAX_REQUEST_BYTES).
    let r = https
        .post(t.https_url("localhost", "/v2/models/digits/infer?token=secret"))
        .body(vec![b' '; 8192])
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    let lines = || -> Vec<Value> {
        t.stderr()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "access" && v["path"] == "/v2/models/digits/infer")
            .collect()
    };
    wait_for(
        std::time::Duration::from_secs(5),
        "three access lines",
        || t.explain(),
        || (lines().len() == 3).then_some(()),
    );
    let lines = lines();
    let by = |listener: &str, status: u64| {
        lines.iter().find(|l| l["listener"] == listener && l["status"] == status).unwrap_or_else(|| panic!("{lines:?}"))
    };
    let plain = by("http", 200);
    let tls = by("https", 200);
    let refused = by("https", 413);
    for l in [plain, tls, refused] {
        assert!(l["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{l}");
        assert_eq!(l["method"], "POST", "{l}");
        assert!(l["bytes_in"].as_u64().is_some(), "{l}");
        assert_eq!(l["model"], "digits", "{l}");
        assert!(l["duration_ms"].as_f64().unwrap() >= 0.0, "{l}");
        assert!(l["worker"].as_u64().unwrap() >= 1, "{l}");
    }
    assert_eq!(plain["bytes_in"], body.len() as u64, "{plain}");
    assert!(tls["bytes_out"].as_u64().unwrap() > 10, "{tls}");
    assert!(!t.stderr().contains("6.6.6.6"), "the forged address reached the log");
    assert!(!t.stderr().contains("secret"), "the query string reached the log");
}
