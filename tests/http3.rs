//! HTTP/3 on the HTTPS port (`SSL_HTTP3`), with aioquic as the client
//! (tests/python/h3_client.py, a QUIC and HTTP/3 stack of its own): inference
//! in JSON and binary answered as over TCP, Alt-Svc only when enabled, the
//! statistics and access log saying h3, a certificate swap seen by new QUIC
//! connections while an old one keeps working, client certificates required,
//! the UDP port kept across an HTTPS worker kill (its buffers sized for
//! loopback speed), the copies reached through
//! the proxy with `WORKER_COMMAND`, and a flood
//! of half-open handshakes bounded by Retry.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pki::{ca_and_client, TestCa};
use common::*;
use serde_json::{json, Value};

/// Runs the aioquic client with `plan` (or other arguments) against `t`'s HTTPS port; one JSON value per line.
fn plan(steps: Value) -> String {
    steps.to_string()
}

/// The served chain in a file, for the client to trust.
fn trust(t: &Tandem) -> PathBuf {
    let path = t.dir.path().join("served.pem");
    std::fs::write(&path, t.served_chain_pem()).unwrap();
    path
}

fn metrics(t: &Tandem) -> String {
    Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap()
}

/// A binary-extension inference body for digits: JSON header, then 64 FP32 pixels; the output asked in binary.
fn binary_body(dir: &Path) -> (PathBuf, usize) {
    let header = json!({
        "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    for i in 0..64u32 {
        body.extend_from_slice(&((i % 17) as f32).to_le_bytes());
    }
    let path = dir.join("binary.bin");
    std::fs::write(&path, &body).unwrap();
    (path, header.len())
}

#[test]
fn the_server_takes_quic_packets_larger_than_ethernet_s_where_a_client_sends_them() {
    let t = TandemBuilder::new().ssl().env("SSL_HTTP3", "true").start();
    let ca = trust(&t);
    let (binary, header_len) = binary_body(t.dir.path());
    let headers = json!([["inference-header-content-length", header_len.to_string()]]);
    let request = |conn: &str| {
        json!({"request": conn, "method": "POST", "path": "/v2/models/digits/infer",
               "body_file": binary.to_str().unwrap(), "headers": headers})
    };
    let out = h3(
        &t,
        &[&plan(json!([
            {"connect": "usual"}, request("usual"),
            {"connect": "large", "max_datagram_size": 6500}, request("large"),
        ]))],
        &ca,
    );
    assert_eq!(out.len(), 4, "{out:?}");
    // Advertised to every client (tls/src/h3.rs, MAX_UDP_PAYLOAD): quinn's
    // default, 1472, would keep even loopback and jumbo-frame paths at
    // Ethernet's packet size.
    assert_eq!(out[0]["max_udp_payload_size"], 6500, "{out:?}");
    // A client that sends packets of that size is answered as one that does
    // not: byte for byte the same answer.
    assert_eq!((&out[1]["status"], &out[3]["status"]), (&json!(200), &json!(200)), "{out:?}");
    assert_eq!(out[1]["body_b64"], out[3]["body_b64"], "{out:?}");
    assert!(out[1]["body_b64"].as_str().is_some_and(|b| !b.is_empty()), "{out:?}");
}

#[test]
fn inference_over_http3_is_answered_as_over_tcp_and_alt_svc_advertises_it() {
    let t =
        TandemBuilder::new().ssl().env("SSL_HTTP3", "true").env("ACCESS_LOG", "true").env("LOG_FORMAT", "json").start();
    let ca = trust(&t);
    let chain = t.served_chain_pem();
    let tcp = Tandem::https_client(&chain);
    let json_body = digits_body(3);
    let (binary, header_len) = binary_body(t.dir.path());
    let binary_headers = json!([["inference-header-content-length", header_len.to_string()]]);
    let out = h3(
        &t,
        &[&plan(json!([
            {"connect": "a"},
            {"request": "a", "path": "/v2/health/ready"},
            {"request": "a", "method": "POST", "path": "/v2/models/digits/infer", "body": json_body,
             "headers": [["content-type", "application/json"]]},
            {"request": "a", "method": "POST", "path": "/v2/models/digits/infer", "body_file": binary.to_str().unwrap(),
             "headers": binary_headers},
            {"request": "a", "method": "POST", "path": "/v2/models/nope/infer", "body": "{}"},
        ]))],
        &ca,
    );
    assert_eq!(out.len(), 5, "{out:?}");
    assert!(out[0]["cert_sha256"].as_str().is_some_and(|f| f.len() == 64), "{out:?}");
    assert_eq!(out[1]["status"], 200, "{out:?}");
    // JSON inference: the same answer as over TCP.
    assert_eq!(out[2]["status"], 200, "{out:?}");
    let over_tcp =
        tcp.post(t.https_url("localhost", "/v2/models/digits/infer")).body(json_body.clone()).send().unwrap();
    let over_tcp: Value = over_tcp.json().unwrap();
    let over_h3: Value = serde_json::from_str(out[2]["body"].as_str().unwrap()).unwrap();
    assert_eq!(over_h3["outputs"], over_tcp["outputs"]);
    // Binary inference: byte for byte the answer over TCP.
    assert_eq!(out[3]["status"], 200, "{out:?}");
    let r = tcp
        .post(t.https_url("localhost", "/v2/models/digits/infer"))
        .header("inference-header-content-length", header_len.to_string())
        .body(std::fs::read(&binary).unwrap())
        .send()
        .unwrap();
    let tcp_len = r.headers()["inference-header-content-length"].to_str().unwrap().to_string();
    let tcp_bytes = r.bytes().unwrap();
    assert_eq!(out[3]["headers"]["inference-header-content-length"], tcp_len.as_str());
    let h3_bytes = base64_decode(out[3]["body_b64"].as_str().expect("a binary answer"));
    assert_eq!(h3_bytes, tcp_bytes.to_vec());
    // An error is the same JSON error.
    assert_eq!(out[4]["status"], 404, "{out:?}");
    assert!(out[4]["body"].as_str().unwrap().contains("error"), "{out:?}");
    // Every HTTPS answer advertises HTTP/3 on the same port number; plain HTTP does not.
    let alt_svc = format!("h3=\":{}\"; ma=86400", t.https_port);
    let r = tcp.get(t.https_url("localhost", "/v2/health/ready")).send().unwrap();
    assert_eq!(r.headers().get("alt-svc").unwrap(), alt_svc.as_str());
    let r = Tandem::http_client().get(t.http_url("/v2/health/ready")).send().unwrap();
    assert!(r.headers().get("alt-svc").is_none());
    // Counted as h3, on the HTTPS listener; the handshake under ALPN h3; logged as h3.
    let m = metrics(&t);
    let line = r#"tandem_http_requests_total{listener="https",protocol="h3",route="/v2/models/{name}/infer",method="POST",code="200"} 2"#;
    assert!(m.contains(line), "{m}");
    assert!(m.contains(r#"tandem_tls_handshakes_total{protocol="TLSv1.3",alpn="h3"} 1"#), "{m}");
    let logged = t
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "access" && v["protocol"] == "h3")
        .count();
    assert_eq!(logged, 4, "{}", t.explain());
    // The start-up says where HTTP/3 is served.
    assert!(t.stderr().contains("serving HTTP/3 (QUIC) on UDP"), "{}", t.explain());
}

fn base64_decode(s: &str) -> Vec<u8> {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    out.stdout
}

#[test]
fn without_ssl_http3_nothing_listens_on_udp_and_nothing_advertises_it() {
    let t = TandemBuilder::new().ssl().start();
    let ca = trust(&t);
    let r =
        Tandem::https_client(&t.served_chain_pem()).get(t.https_url("localhost", "/v2/health/ready")).send().unwrap();
    assert!(r.headers().get("alt-svc").is_none());
    let out = h3(&t, &[&plan(json!([{"connect": "a"}]))], &ca);
    assert!(out[0]["error"].is_string(), "an HTTP/3 client found nothing to talk to: {out:?}");
    // Set but ignored without HTTPS, and said so.
    let out = Command::new(TANDEM).arg("check").env_clear().env("SSL_HTTP3", "true").output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("SSL_HTTP3"), "{said}");
}

#[test]
fn a_certificate_swap_reaches_new_quic_connections_while_an_old_one_keeps_working() {
    let ca = TestCa::new();
    let b = TandemBuilder::new().ssl().env("SSL_HTTP3", "true");
    let dir = b.dir().join("certs");
    let first = ca.issue();
    first.write(&dir, "tls.crt", "tls.key");
    let t = b.env("SSL_CERTIFICATE", dir.join("tls.crt").to_str().unwrap()).start();
    let ca_file = t.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (ready, go) = (t.dir.path().join("ready"), t.dir.path().join("go"));
    let steps = plan(json!([
        {"connect": "old"},
        {"request": "old", "path": "/v2/health/ready"},
        {"touch": ready.to_str().unwrap()},
        {"wait_file": go.to_str().unwrap()},
        {"connect": "new"},
        {"request": "old", "method": "POST", "path": "/v2/models/digits/infer", "body": digits_body(1)},
        {"request": "new", "method": "POST", "path": "/v2/models/digits/infer", "body": digits_body(1)},
    ]));
    let client = h3_command(&t, &[&steps], &ca_file).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(Duration::from_secs(20), "the first QUIC connection", || t.explain(), || ready.exists().then_some(()));
    // A new certificate in place of the old (the key first, then the chain, as an operator copies them).
    let second = ca.issue();
    second.write(&dir, "tls.crt.next", "tls.key.next");
    std::fs::rename(dir.join("tls.key.next"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.next"), dir.join("tls.crt")).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the new certificate over TCP",
        || t.explain(),
        || {
            // A new client each time: a kept-alive connection keeps the certificate it began with.
            let r = Tandem::https_client(&ca.pem).get(t.https_url("localhost", "/v2/health/live")).send().ok()?;
            (served_fingerprint(&r) == second.fingerprint).then_some(())
        },
    );
    std::fs::write(&go, b"").unwrap();
    let out = client.wait_with_output().unwrap();
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let said = format!("{lines:?}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines.len(), 7, "{said}");
    assert_eq!(lines[0]["cert_sha256"], first.fingerprint.as_str(), "{said}");
    assert_eq!(lines[4]["cert_sha256"], second.fingerprint.as_str(), "a new QUIC handshake gets the new one: {said}");
    assert_eq!(lines[5]["status"], 200, "the connection made before the swap keeps working: {said}");
    assert_eq!(lines[6]["status"], 200, "{said}");
}

#[test]
fn with_client_certificates_required_http3_refuses_a_client_without_one() {
    let b = TandemBuilder::new();
    let pki = b.dir().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    ca_and_client(&pki, "ca1", "alice");
    let t = b
        .ssl()
        .env("SSL_HTTP3", "true")
        .env("SSL_CLIENT_CA", pki.join("ca1.pem").to_str().unwrap())
        .env("ACCESS_LOG", "true")
        .env("LOG_FORMAT", "json")
        .start_live();
    let ca = trust(&t);
    let steps = plan(json!([{"connect": "a"}, {"request": "a", "path": "/v2/health/live"}]));
    let refused = h3(&t, &[&steps], &ca);
    // TLS 1.3: the client's handshake ends before the server has read its
    // (missing) certificate, so the refusal reaches it as the connection's close.
    assert!(refused.iter().all(|l| l.get("status").is_none()), "served without a certificate: {refused:?}");
    assert!(
        refused.iter().any(|l| l["error"].as_str().is_some_and(|e| e.contains("no certificates"))),
        "no client certificate: refused at the handshake: {refused:?}"
    );
    t.wait_for_log(Duration::from_secs(5), "client certificate rejected (HTTP/3)", 1);
    let (cert, key) = (pki.join("alice.pem"), pki.join("alice.key"));
    let served = h3(&t, &[&steps, "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()], &ca);
    assert_eq!(served[1]["status"], 200, "{served:?}\n{}", t.explain());
    let line = t
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "access" && v["protocol"] == "h3")
        .unwrap_or_else(|| panic!("no h3 access line\n{}", t.explain()));
    assert_eq!(line["client"], "CN=alice", "{line}");
    let m = metrics(&t);
    assert!(m.contains(r#"tandem_tls_handshake_failures_total{reason="bad_certificate"} 1"#), "{m}");
}

#[test]
fn the_udp_port_is_kept_across_an_https_worker_kill() {
    let t = TandemBuilder::new().ssl().env("SSL_HTTP3", "true").start();
    let ca = trust(&t);
    let steps = plan(json!([{"connect": "a"}, {"request": "a", "path": "/v2/health/ready"}]));
    assert_eq!(h3(&t, &[&steps], &ca)[1]["status"], 200);
    assert_buffers_sized(&t);
    let victim = t.workers("https-worker")[0];
    nix::sys::signal::kill(victim, nix::sys::signal::Signal::SIGKILL).unwrap();
    t.wait_replaced(Duration::from_secs(20), "https-worker", victim, 1);
    // The supervisor held the socket: the new worker serves the same port, no rebind.
    wait_for(
        Duration::from_secs(20),
        "HTTP/3 served by the new HTTPS worker",
        || t.explain(),
        || (h3(&t, &[&steps], &ca).get(1)?["status"] == 200).then_some(()),
    );
    assert!(!t.stderr().contains("cannot bind"), "{}", t.explain());
}

/// The UDP socket's receive buffer is 4 MiB (the kernel's 208 KiB default
/// drops an upload's datagrams at loopback speed; `ss` shows the kernel's
/// doubled figure), or, where the kernel's `net.core.rmem_max` caps it, the
/// log says so with the sysctl that fixes it.
fn assert_buffers_sized(t: &Tandem) {
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
    let out = Command::new("ss").args(["-uamnH", &format!("sport = :{}", t.https_port)]).output().unwrap();
    let ss = String::from_utf8_lossy(&out.stdout).to_string();
    let rb: usize = ss
        .split([',', '('])
        .find_map(|f| f.strip_prefix("rb")?.parse().ok())
        .unwrap_or_else(|| panic!("no receive buffer in ss's answer: {ss}"));
    if rmem_max >= 4 << 20 {
        assert!(rb >= 2 * (4 << 20), "receive buffer {rb} bytes: {ss}");
    } else {
        assert!(t.stderr().contains("sysctl -w net.core.rmem_max"), "rmem_max {rmem_max}: {}", t.explain());
    }
}

#[test]
fn a_flood_of_half_open_handshakes_is_bounded_and_real_clients_still_connect() {
    // HEADER_TIMEOUT well past the flood's own length (500 handshakes built
    // in Python take 2-4 s on a loaded 2-core machine): the first half-open
    // ones must still hold their place when the last ones arrive.
    let t = TandemBuilder::new().ssl().env("SSL_HTTP3", "true").env("HEADER_TIMEOUT", "8").start();
    let ca = trust(&t);
    let https_worker = t.workers("https-worker");
    // 500 first Initial packets from one address, never continued.
    let flood = h3(&t, &["--flood", "500", "--wait", "1"], &ca);
    let (held, retried) =
        (flood[0]["answered_initial"].as_u64().unwrap(), flood[0]["answered_retry"].as_u64().unwrap());
    assert!(held <= 64, "at most RETRY_ABOVE handshakes hold state: {flood:?}");
    assert!(retried >= 500 - 64 - 10, "the rest are sent a stateless Retry: {flood:?}");
    // A real client answers the Retry and is served meanwhile.
    let steps = plan(json!([{"connect": "a"}, {"request": "a", "path": "/v2/health/ready"}]));
    assert_eq!(h3(&t, &[&steps], &ca)[1]["status"], 200);
    // The half-open ones are dropped at HEADER_TIMEOUT and counted as timeouts; the worker lives on.
    wait_for(
        Duration::from_secs(30),
        "the half-open handshakes counted as timed out",
        || metrics(&t),
        || {
            metrics(&t)
                .contains(&format!(r#"tandem_tls_handshake_failures_total{{reason="timeout"}} {held}"#))
                .then_some(())
        },
    );
    let again = h3(&t, &["--flood", "10", "--wait", "1"], &ca);
    assert_eq!(again[0]["answered_initial"], 10, "state is held again once the flood's is gone: {again:?}");
    assert_eq!(t.workers("https-worker"), https_worker, "the HTTPS worker was never replaced");
}

#[test]
fn with_worker_command_http3_reaches_the_copies_through_the_proxy() {
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let command = format!("python3 -m uvicorn app:app --app-dir {} --port {{port}} --log-level warning", app.display());
    let metrics_port = free_port();
    let t = TandemBuilder::new()
        .ssl()
        .env("SSL_HTTP3", "true")
        .env("WORKER_COMMAND", &command)
        .env("METRICS_PORT", &metrics_port.to_string())
        .spawn();
    let live = t.cert_dir().join("live.pem");
    wait_for(Duration::from_secs(30), "the certificate", || t.explain(), || live.exists().then_some(()));
    wait_for(
        Duration::from_secs(90),
        "the copies to answer over HTTPS",
        || t.explain(),
        || {
            let r = Tandem::https_client(&t.served_chain_pem()).get(t.https_url("localhost", "/")).send().ok()?;
            r.status().is_success().then_some(())
        },
    );
    let ca = trust(&t);
    let out = h3(
        &t,
        &[&plan(json!([
            {"connect": "a"},
            {"request": "a", "path": "/whoami"},
            {"request": "a", "method": "POST", "path": "/echo", "body": "x".repeat(100_000)},
        ]))],
        &ca,
    );
    assert_eq!(out[1]["status"], 200, "{out:?}\n{}", t.explain());
    let whoami: Value = serde_json::from_str(out[1]["body"].as_str().unwrap()).unwrap();
    assert_eq!(whoami["headers"]["x-forwarded-proto"], "https", "{whoami}");
    assert_eq!(out[1]["headers"]["alt-svc"], format!("h3=\":{}\"; ma=86400", t.https_port), "{out:?}");
    assert_eq!(out[2]["status"], 200, "{out:?}");
    let echo: Value = serde_json::from_str(out[2]["body"].as_str().unwrap()).unwrap();
    assert_eq!(echo["bytes"], 100_000, "the whole body reached the copy: {echo}");
    // The copies' answers are counted as tandem's (the supervisor's metrics port, as the copies own PORT's /metrics).
    let m =
        Tandem::http_client().get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().unwrap().text().unwrap();
    assert!(m.contains(r#"listener="https",protocol="h3""#), "{m}");
}

#[test]
fn half_open_handshakes_do_not_hold_up_a_stop() {
    // HEADER_TIMEOUT (30 s) is longer than GRACEFUL_TIMEOUT (4 s): a handshake
    // left under way is given up halfway through the drain, so the stop (or
    // an upgrade) ends in time instead of killing the workers.
    let mut t = TandemBuilder::new().ssl().env("SSL_HTTP3", "true").env("GRACEFUL_TIMEOUT", "4s").start();
    let ca = trust(&t);
    let flood = h3(&t, &["--flood", "5", "--wait", "0.5"], &ca);
    assert_eq!(flood[0]["answered_initial"], 5, "{flood:?}");
    let began = std::time::Instant::now();
    t.signal(nix::sys::signal::Signal::SIGTERM);
    let status = t.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", t.explain());
    assert!(began.elapsed() < Duration::from_millis(3500), "the stop took {:?}\n{}", began.elapsed(), t.explain());
    assert!(!t.stderr().contains("did not drain in time"), "{}", t.explain());
}
