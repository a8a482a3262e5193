//! End-to-end tests of the engine and its API: the stock Python tritonclient,
//! the README's curl example, limits, bad input, load spreading and draining.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Runs the Python tritonclient suite against `url`; `ca` switches to HTTPS.
fn tritonclient_suite(t: &Tandem, url: &str, ca: Option<&Path>) {
    let stdout = python_client(t, "tritonclient_suite.py", url, ca);
    assert!(stdout.contains("tritonclient suite passed"), "{stdout}");
}

#[test]
fn tritonclient_over_http() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "2").start();
    tritonclient_suite(&t, &format!("127.0.0.1:{}", t.http_port), None);
}

#[test]
fn tritonclient_over_https() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").start();
    let ca = t.dir.path().join("ca.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    tritonclient_suite(&t, &format!("localhost:{}", t.https_port), Some(&ca));
}

#[test]
fn readme_curl_example_classifies_a_zero() {
    let t = TandemBuilder::new().start();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("curl -s http://127.0.0.1:9001/v2/models/digits/infer"))
        .expect("README has the curl inference example");
    let line = line.replace("127.0.0.1:9001", &format!("127.0.0.1:{}", t.http_port));
    let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), t.explain()));
    let top = body["outputs"][0]["data"][0].as_str().unwrap();
    assert!(top.ends_with(":0:0"), "expected digit 0, got {top}");
}

#[test]
fn bad_requests_get_json_errors_and_never_kill_a_worker() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "1").env("MAX_REQUEST_BYTES", "4096").start();
    let workers = t.workers("engine-worker");
    let http = Tandem::http_client();
    let url = t.http_url("/v2/models/digits/infer");
    /// Body, extra headers, expected status.
    type Case = (Vec<u8>, Vec<(&'static str, &'static str)>, u16);
    let cases: Vec<Case> = vec![
        (b"{not json".to_vec(), vec![], 400),
        (br#"{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[1,2]}]}"#.to_vec(), vec![], 400),
        (br#"{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"INT64","data":[1]}]}"#.to_vec(), vec![], 400),
        // Out of FP32's range: refused, not silently infinity.
        (
            format!(
                r#"{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[1e39{}]}}]}}"#,
                ",1".repeat(63)
            )
            .into_bytes(),
            vec![],
            400,
        ),
        (br#"{"inputs":[]}"#.to_vec(), vec![("inference-header-content-length", "999")], 400),
        (vec![b' '; 10_000], vec![], 413),
    ];
    for (body, headers, want) in cases {
        let mut req = http.post(&url).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().unwrap();
        assert_eq!(resp.status().as_u16(), want);
        let json: serde_json::Value = resp.json().unwrap();
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{json}");
        if json["error"].as_str().is_some_and(|e| e.contains("1e39")) {
            assert!(json["error"].as_str().unwrap().contains("input pixels"), "{json}");
        }
    }
    // The binary extension's length header sent twice in two spellings: the same
    // value is one header; two values are refused, never one of them picked.
    let mut binary =
        br#"{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","parameters":{"binary_data_size":256}}]}"#
            .to_vec();
    binary.extend_from_slice(&[0u8; 256]);
    for (second, want) in [("101", 200), ("3", 400)] {
        let resp = http
            .post(&url)
            .header("Inference-Header-Content-Length", "101")
            .header("inference-header-content-length", second)
            .body(binary.clone())
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "second value {second}");
        if want == 400 {
            let json: serde_json::Value = resp.json().unwrap();
            assert_eq!(json["error"], r#"Inference-Header-Content-Length is given twice, as "101" and "3""#, "{json}");
        }
    }
    // A chunked body with no length is cut off at the limit too. Raw TCP:
    // the server answers before the client has finished sending.
    let mut conn = TcpStream::connect(("127.0.0.1", t.http_port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..16 {
        req.extend_from_slice(b"400\r\n");
        req.extend_from_slice(&[b' '; 1024]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let _ = conn.write_all(&req);
    let mut response = vec![0u8; 4096];
    let n = conn.read(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response[..n]);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("MAX_REQUEST_BYTES"), "{response}");
    let resp = http.get(t.http_url("/v2/models/nope")).send().unwrap();
    assert_eq!(resp.status(), 404);
    let resp = http.get(t.http_url("/v2/models/digits/versions/9")).send().unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(t.workers("engine-worker"), workers, "a bad request must not restart a worker\n{}", t.explain());
    let metrics = http.get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    let failures = metrics
        .lines()
        .find(|l| l.starts_with(r#"tandem_model_failures_total{model="digits",version="1"}"#))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(!failures.ends_with(" 0"), "the bad requests are counted as failures: {failures}");
}

#[test]
fn load_spreads_over_workers_and_every_response_names_its_worker() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "2").start();
    let url = t.http_url("/v2/models/digits/infer");
    let body = common::digits_body(3);
    let seen: BTreeSet<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    // A new connection per request, so every accept is a fresh choice.
                    let client = reqwest::blocking::Client::builder().pool_max_idle_per_host(0).build().unwrap();
                    (0..40)
                        .map(|_| {
                            let r = client.post(&url).body(body.clone()).send().unwrap();
                            assert!(r.status().is_success());
                            r.headers()["x-tandem-worker"].to_str().unwrap().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(seen.len(), 2, "both workers should answer some of 320 connections: {seen:?}");
}

#[test]
fn sigterm_drains_a_request_in_flight() {
    let mut t = TandemBuilder::new().env("NUM_WORKERS", "1").start();
    let body = common::digits_body(5);
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let mut conn = TcpStream::connect(("127.0.0.1", t.http_port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(conn, "POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len()).unwrap();
    conn.write_all(first).unwrap();
    // The request is in flight (half its body sent) when the stop arrives.
    std::thread::sleep(Duration::from_millis(300));
    t.signal(Signal::SIGTERM);
    wait_for(
        Duration::from_secs(10),
        "the worker to start draining",
        || t.explain(),
        || t.stderr().contains("draining in-flight requests").then_some(()),
    );
    conn.write_all(rest).unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "in-flight request was not answered: {response:?}\n{}", t.explain());
    assert!(response.contains("probabilities"));
    assert_eq!(t.wait_exit(Duration::from_secs(20)).code(), Some(0), "{}", t.explain());
}

/// A reader that hands out at most `step` bytes at a time: a body of no
/// declared length, sent in small chunks.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    step: usize,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[test]
fn a_body_of_no_declared_length_in_small_chunks_is_read_whole_on_both_ports() {
    let t = TandemBuilder::new().ssl().start();
    // digits with 300 KiB of JSON whitespace before its data: gathered from
    // 1000-byte chunks into several buffers, it must decode as the same body
    // sent in one piece with its length.
    let body = digits_body(7).replacen("\"data\":", &format!("\"data\":{}", " ".repeat(300 << 10)), 1);
    let http = Tandem::http_client();
    let https = Tandem::https_client(&t.served_chain_pem());
    let expected: serde_json::Value =
        http.post(t.http_url("/v2/models/digits/infer")).body(digits_body(7)).send().unwrap().json().unwrap();
    for (client, url) in
        [(&http, t.http_url("/v2/models/digits/infer")), (&https, t.https_url("localhost", "/v2/models/digits/infer"))]
    {
        let trickle = Trickle { data: body.clone().into_bytes(), at: 0, step: 1000 };
        let r = client.post(&url).body(reqwest::blocking::Body::new(trickle)).send().unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let got: serde_json::Value = r.json().unwrap();
        assert_eq!(got["outputs"], expected["outputs"], "{url}");
    }
}
