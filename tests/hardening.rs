//! End-to-end tests of tandem under hostile connections: silent and half-open
//! connections on both ports under a low descriptor limit never keep
//! legitimate clients out, and idle connections are closed by the server.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// Opens `n` connections to `port`; every third sends half a request line, the rest nothing.
fn hostile(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|i| {
            let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
            if i % 3 == 0 {
                let _ = s.write_all(b"POST /v2/models/digits/infer HT");
            }
            Some(s)
        })
        .collect()
}

/// Whether the server closed `s` (EOF or reset) within `deadline`.
fn closed_by_server(s: &mut TcpStream, deadline: Duration) -> bool {
    s.set_read_timeout(Some(deadline)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408 or similar before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_and_half_open_connections_under_a_low_fd_limit_never_keep_clients_out() {
    // 256 descriptors for the whole tree: each worker may hold ~190 connections.
    let t = TandemBuilder::new()
        .ssl()
        .env("HEADER_TIMEOUT", "2")
        .env("KEEPALIVE_TIMEOUT", "3")
        .wrapped(&["prlimit", "--nofile=256:256", "--"])
        .start();
    let ca = t.served_chain_pem();
    let https = Tandem::https_client(&ca);
    let http = Tandem::http_client();
    let started = Instant::now();
    // Twice the descriptors the workers have, on each port.
    let mut plain = hostile(t.http_port, 500);
    let mut tls = hostile(t.https_port, 500);
    assert!(
        plain.len() > 300 && tls.len() > 300,
        "the kernel's backlog takes the connections: {} {}",
        plain.len(),
        tls.len()
    );

    // Legitimate clients get through while the hostile connections are open or timing out.
    for _ in 0..5 {
        let r = http.get(t.http_url("/v2/health/ready")).timeout(Duration::from_secs(20)).send();
        assert!(r.as_ref().is_ok_and(|r| r.status() == 200), "HTTP: {r:?}\n{}", t.explain());
        let r = https.get(t.https_url("localhost", "/v2/health/ready")).timeout(Duration::from_secs(20)).send();
        assert!(r.as_ref().is_ok_and(|r| r.status() == 200), "HTTPS: {r:?}\n{}", t.explain());
    }
    // The server closes what it accepted: silent, half-open, never-handshaken.
    let accepted_and_closed = |conns: &mut [TcpStream]| {
        let mut closed = 0;
        for s in conns.iter_mut().take(50) {
            closed += usize::from(closed_by_server(s, Duration::from_secs(15)));
        }
        closed
    };
    assert_eq!(accepted_and_closed(&mut plain), 50, "HTTP connections left open\n{}", t.explain());
    assert_eq!(accepted_and_closed(&mut tls), 50, "HTTPS connections left open\n{}", t.explain());
    assert!(started.elapsed() < Duration::from_secs(60));
    // Accept errors, if any, are reported at most about once a second.
    let accept_lines = t.stderr().matches("accept failed").count();
    assert!(
        accept_lines <= 2 * started.elapsed().as_secs() as usize + 2,
        "{accept_lines} accept lines\n{}",
        t.explain()
    );
    // And the workers are the ones that started: nothing crashed.
    assert!(!t.stderr().contains("exited"), "{}", t.explain());
}

#[test]
fn idle_keep_alive_connections_are_closed_on_both_ports() {
    let t = TandemBuilder::new().ssl().env("KEEPALIVE_TIMEOUT", "1").env("HEADER_TIMEOUT", "5").start();
    // One request, then silence: the server closes the connection after KEEPALIVE_TIMEOUT.
    let mut s = TcpStream::connect(("127.0.0.1", t.http_port)).unwrap();
    s.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let started = Instant::now();
    assert!(closed_by_server(&mut s, Duration::from_secs(10)), "keep-alive connection left open\n{}", t.explain());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "closed before KEEPALIVE_TIMEOUT: {waited:?}");
    // Over TLS, HTTP/1.1 after a request and HTTP/2 with no stream: closed the same way.
    let ca = t.served_chain_pem();
    let mut h1 = tls(t.https_port, &ca, b"http/1.1");
    h1.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    assert!(tls_closed(&mut h1, Duration::from_secs(10)), "HTTPS keep-alive connection left open\n{}", t.explain());
    let mut h2 = tls(t.https_port, &ca, b"h2");
    assert_eq!(h2.conn.alpn_protocol(), Some(&b"h2"[..]));
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").unwrap();
    assert!(tls_closed(&mut h2, Duration::from_secs(15)), "idle HTTP/2 connection left open\n{}", t.explain());
}

/// Whether the server closed the TLS stream within `deadline` (anything it sends first is read and dropped).
fn tls_closed(s: &mut Tls, deadline: Duration) -> bool {
    s.sock.set_read_timeout(Some(deadline)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn a_planted_certificate_cache_is_refused_with_exit_2() {
    let b = TandemBuilder::new().ssl();
    let cache = b.dir().join("cache");
    let planted = b.dir().join("attacker");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&planted).unwrap();
    std::os::unix::fs::symlink(&planted, cache.join("ssl_certificates")).unwrap();
    let mut t = b.spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(30)).code(), Some(2), "{}", t.explain());
    assert!(t.stderr().contains("symbolic link") && t.stderr().contains("hint:"), "{}", t.explain());
    assert_eq!(std::fs::read_dir(&planted).unwrap().count(), 0, "nothing written into the planted directory");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&planted).unwrap().permissions().mode() & 0o777;
    assert_ne!(mode, 0o700, "the planted directory's mode was not touched");
}

#[test]
fn a_cache_folder_this_user_cannot_write_is_exit_2_with_the_chown_that_fixes_it() {
    use std::os::unix::fs::PermissionsExt;
    // A folder bind-mounted as root's (0755) while tandem runs as another user.
    let b = TandemBuilder::new().ssl().copied_binary();
    for d in [b.dir().to_path_buf(), b.dir().join("bin")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mount = b.dir().join("mount");
    std::fs::create_dir(&mount).unwrap();
    std::fs::set_permissions(&mount, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut t = b
        .env("MODEL_CACHE_DIR", mount.to_str().unwrap())
        .wrapped(&["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(30)).code(), Some(2), "{}", t.explain());
    let err = t.stderr();
    assert!(err.contains("this user (uid 65534) may not write in"), "{}", t.explain());
    assert!(err.contains(&format!("hint: chown 65534 {}", mount.display())), "{}", t.explain());
}

/// A binary-extension request for `large` ([batch, channels, 512, 512] FP32, 1 MiB per channel).
fn large_request(dir: &std::path::Path, channels: usize) -> (std::path::PathBuf, usize) {
    let header = format!(
        r#"{{"inputs":[{{"name":"image","shape":[1,{channels},512,512],"datatype":"FP32","parameters":{{"binary_data_size":{}}}}}]}}"#,
        channels << 20
    );
    let mut body = header.clone().into_bytes();
    body.resize(header.len() + (channels << 20), 0);
    let path = dir.join(format!("large-{channels}.bin"));
    std::fs::write(&path, body).unwrap();
    (path, header.len())
}

fn curl_infer(
    t: &Tandem,
    ca: &std::path::Path,
    proto: &str,
    body: &std::path::Path,
    json_len: usize,
) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", proto, "--cacert", ca.to_str().unwrap(), "-w", "\n%{http_code}", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .args(["-H", &format!("inference-header-content-length: {json_len}")])
        .arg(t.https_url("localhost", "/v2/models/large/infer"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    (body.to_string(), code.to_string())
}

#[test]
fn https_carries_the_bodies_http_carries_and_refuses_larger_ones_readably() {
    let b = TandemBuilder::new().ssl().env("MAX_REQUEST_BYTES", "33554432");
    let repo = bench_model_repository(b.dir(), "large");
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let ca = t.dir.path().join("ca.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    // 20 MiB: more than the old 8 MiB slots, within MAX_REQUEST_BYTES; both protocols.
    let (body, json_len) = large_request(t.dir.path(), 20);
    for proto in ["--http1.1", "--http2"] {
        let (answer, code) = curl_infer(&t, &ca, proto, &body, json_len);
        assert_eq!(code, "200", "{proto}: {answer}\n{}", t.explain());
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 20]), "{v}");
    }
    // Above MAX_REQUEST_BYTES: a 413 the client reads, as over HTTP.
    let (too_big, json_len) = large_request(t.dir.path(), 40);
    let (answer, code) = curl_infer(&t, &ca, "--http2", &too_big, json_len);
    assert_eq!(code, "413", "{answer}\n{}", t.explain());
    assert!(answer.contains("MAX_REQUEST_BYTES"), "{answer}");
}

#[test]
fn clients_cannot_flood_the_log_with_ip_address_sni() {
    let t = TandemBuilder::new().ssl().start();
    let before = t.stderr().lines().count();
    for _ in 0..20 {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", t.https_port), "-servername", "127.0.0.1"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"), "handshake failed");
    }
    let after: Vec<String> = t.stderr().lines().skip(before).map(String::from).collect();
    assert!(
        after.len() < 5,
        "20 handshakes with an IP address as SNI wrote {} log lines:\n{}",
        after.len(),
        after.join("\n")
    );
}

#[test]
fn a_worker_that_does_not_drain_is_killed_and_reported_once() {
    let mut t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("GRACEFUL_TIMEOUT", "1").start();
    let workers: Vec<_> = Tandem::children_of(t.pid()).into_iter().map(|(p, _)| p).collect();
    assert_eq!(workers.len(), 3, "{}", t.explain());
    // Stopped processes cannot drain: every one meets the deadline.
    for w in &workers {
        nix::sys::signal::kill(*w, nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
    t.signal(nix::sys::signal::Signal::SIGTERM);
    t.wait_exit(Duration::from_secs(15));
    let err = t.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("did not drain")).collect();
    assert_eq!(lines.len(), workers.len(), "one line per killed worker:\n{}", t.explain());
    for w in &workers {
        assert_eq!(process_state(*w), None, "worker {w} outlived the supervisor");
        assert_eq!(lines.iter().filter(|l| l.contains(&format!("pid={w}"))).count(), 1, "{}", t.explain());
    }
}

#[test]
fn a_failed_write_at_start_up_leaves_no_temporary_file() {
    // Files are limited to 1 KiB (SIGXFSZ ignored, so the write fails with EFBIG):
    // the generated RSA key cannot be written.
    let b = TandemBuilder::new().ssl().wrapped(&["sh", "-c", "trap '' XFSZ; ulimit -f 2; exec \"$@\"", "sh"]);
    let certs = b.dir().join("cache/ssl_certificates");
    let mut t = b.spawn();
    let status = t.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{}", t.explain());
    assert!(t.stderr().contains("ssl_certificates"), "the failed path is named\n{}", t.explain());
    let left: Vec<String> = std::fs::read_dir(&certs)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|n| !n.ends_with(".tmp")), "temporary files left: {left:?}\n{}", t.explain());
    assert!(left.iter().all(|n| n != "live.pem"), "a partial live.pem: {left:?}");
}

#[test]
fn a_burst_of_connections_waits_in_the_kernel_while_every_worker_is_busy() {
    // The supervisor's listeners queue up to 4096 connections (Rust's default
    // is 128): with the workers stopped, a burst of 600 clients still
    // completes its TCP handshake at once, and every one is answered later.
    let t = TandemBuilder::new().env("NUM_WORKERS", "1").start();
    let workers = t.workers("engine-worker");
    assert_eq!(workers.len(), 1, "{}", t.explain());
    nix::sys::signal::kill(workers[0], nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut conns = Vec::new();
    let mut refused = 0;
    for _ in 0..600 {
        match TcpStream::connect_timeout(&([127, 0, 0, 1], t.http_port).into(), Duration::from_millis(500)) {
            Ok(mut s) => {
                s.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
                conns.push(s);
            }
            Err(_) => refused += 1,
        }
    }
    nix::sys::signal::kill(workers[0], nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(refused, 0, "connections not queued by the kernel while the worker was stopped\n{}", t.explain());
    let mut answered = 0;
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        answered += usize::from(reply.starts_with("HTTP/1.1 200"));
    }
    assert_eq!(answered, 600, "{}", t.explain());
}

#[test]
fn a_plain_http_body_sent_a_byte_at_a_time_is_cut_off_with_408() {
    let t = TandemBuilder::new().env("REQUEST_TIMEOUT", "2").env("IDLE_TIMEOUT", "5").start();
    let mut s = TcpStream::connect(("127.0.0.1", t.http_port)).unwrap();
    s.write_all(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // A byte every 400 ms: often enough for IDLE_TIMEOUT, far too slow for REQUEST_TIMEOUT.
    while started.elapsed() < Duration::from_secs(12) {
        if s.write_all(b" ").is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "after {:?}: {answer:?}\n{}", started.elapsed(), t.explain());
    assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    // The worker serves on.
    let r = Tandem::http_client().post(t.http_url("/v2/models/digits/infer")).body(digits_body(1)).send().unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn names_from_requests_cannot_forge_log_lines() {
    let t = TandemBuilder::new()
        .env("MODEL_CONTROL_MODE", "explicit")
        .env("MODEL_LOAD", "*")
        .env("ACCESS_LOG", "true")
        .env("NUM_WORKERS", "2")
        .start();
    let forged = "2026-01-01T00:00:00.000000Z ERROR forged";
    let name = format!("x%0A{}", forged.replace(' ', "%20"));
    for path in [
        format!("/v2/repository/models/{name}/load"),
        format!("/v2/repository/models/{name}/unload"),
        format!("/v2/models/{name}/infer"),
    ] {
        let r = Tandem::http_client().post(t.http_url(&path)).body("{}").send().unwrap();
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
        let body: serde_json::Value = r.json().unwrap();
        assert!(body["error"].is_string(), "{body}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = t.stderr();
    assert!(log.lines().all(|l| !l.starts_with(forged)), "a forged line:\n{log}");
    assert!(log.lines().all(|l| !l.contains('\u{1b}')), "{log}");
}

#[test]
fn silent_connections_never_keep_a_scraper_off_the_metrics_port() {
    let metrics = free_port();
    let t = TandemBuilder::new().env("METRICS_PORT", &metrics.to_string()).env("HEADER_TIMEOUT", "60").start();
    let _silent: Vec<TcpStream> = (0..200).filter_map(|_| TcpStream::connect(("127.0.0.1", metrics)).ok()).collect();
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let r = client.get(format!("http://127.0.0.1:{metrics}/metrics")).send();
        let took = started.elapsed();
        let r = r.unwrap_or_else(|e| panic!("scrape failed after {took:?}: {e}\n{}", t.explain()));
        assert_eq!(r.status(), 200);
        // A stall detector, not a speed goal: waiting out a header timeout takes 5 s or more.
        assert!(took < Duration::from_secs(3), "the scrape waited {took:?} behind silent connections");
    }
}

/// A memory cgroup of `limit` bytes that tandem is started in (v1 or v2,
/// whichever this machine has), removed when dropped; `None` where none can be made.
struct MemoryCgroup {
    dir: std::path::PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn new(limit: u64) -> Option<MemoryCgroup> {
        let name = format!("tandem-test-{}", std::process::id());
        let (dir, v2) = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (std::path::Path::new("/sys/fs/cgroup").join(&name), true)
        } else {
            (std::path::Path::new("/sys/fs/cgroup/memory").join(&name), false)
        };
        std::fs::create_dir(&dir).ok()?;
        let file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        if std::fs::write(dir.join(file), limit.to_string()).is_err() {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        if !v2 {
            // No swap to hide in: the limit is the memory.
            let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        }
        Some(MemoryCgroup { dir, v2 })
    }

    /// The wrapper that moves the process into the group before it execs tandem.
    fn wrapper(&self) -> Vec<String> {
        let procs = self.dir.join("cgroup.procs");
        vec!["sh".into(), "-c".into(), format!("echo $$ > {} && exec \"$@\"", procs.display()), "sh".into()]
    }

    /// The most memory the group held at once, where the kernel tells (v2's
    /// `memory.peak` is from Linux 5.19).
    fn peak(&self) -> Option<u64> {
        let file = if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
        std::fs::read_to_string(self.dir.join(file)).ok()?.trim().parse().ok()
    }

    /// How many processes the kernel killed for memory in the group.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn concurrent_large_uploads_never_get_a_worker_killed_for_memory() {
    let limit = 700u64 << 20;
    let Some(group) = MemoryCgroup::new(limit) else {
        eprintln!("skipped: no memory cgroup can be made here (needs root and a cgroup v1 or v2 memory controller)");
        return;
    };
    let wrapper = group.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let t = TandemBuilder::new().ssl().env("MAX_REQUEST_BYTES", "33554432").wrapped(&wrapper).start();
    let started_workers = t.stderr().matches("worker started").count();
    // 30 MiB of JSON zeros: one element in two bytes. As a tree of JSON values
    // each of them took over 32 bytes (half a gigabyte per request).
    let zeros = "0,".repeat(15 << 20);
    let body = std::sync::Arc::new(format!(
        r#"{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[{}0]}}]}}"#,
        zeros
    ));
    // The same, compressed: a small body that inflates to the same size.
    let packed = std::sync::Arc::new(gzip(body.as_bytes()));
    let ca = t.served_chain_pem();
    let mut threads = Vec::new();
    for i in 0..18 {
        let (body, packed) = (body.clone(), packed.clone());
        let (http, https) =
            (t.http_url("/v2/models/digits/infer"), t.https_url("localhost", "/v2/models/digits/infer"));
        let ca = ca.clone();
        threads.push(std::thread::spawn(move || {
            let within = Duration::from_secs(120);
            let client = if i % 3 == 2 {
                Tandem::https_client_within(&ca, within)
            } else {
                reqwest::blocking::Client::builder().timeout(within).build().unwrap()
            };
            let url = if i % 3 == 2 { https } else { http };
            let mut statuses = Vec::new();
            for round in 0..3 {
                let r = if (i + round) % 2 == 0 {
                    client.post(&url).body(body.as_bytes().to_vec()).send()
                } else {
                    client.post(&url).header("content-encoding", "gzip").body(packed.to_vec()).send()
                };
                statuses.push(match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let retry = r.headers().contains_key("retry-after");
                        let text = r.text().unwrap_or_default();
                        assert!(text.starts_with("{\"error\""), "{status}: {text}");
                        assert!(status != 503 || retry, "a 503 without Retry-After: {text}");
                        status
                    }
                    Err(e) => {
                        eprintln!("request {i}/{round} failed: {e:?}");
                        0
                    }
                });
            }
            statuses
        }));
    }
    let began = Instant::now();
    let statuses: Vec<u16> = threads.into_iter().flat_map(|h| h.join().unwrap()).collect();
    eprintln!("{} uploads answered in {:?}: {statuses:?}", statuses.len(), began.elapsed());
    assert!(statuses.iter().all(|s| [400, 503].contains(s)), "{statuses:?}\n{}", t.explain());
    assert!(statuses.contains(&400), "some were decoded and refused for their shape: {statuses:?}");
    assert_eq!(group.oom_kills(), 0, "the kernel killed for memory\n{}", t.explain());
    // Not only no kill: room to spare. Freed bodies the allocator kept used to
    // take the group to its limit (one run in a few was killed).
    if let Some(peak) = group.peak() {
        eprintln!("the group's peak: {} MiB of {}", peak >> 20, limit >> 20);
        assert!(peak < limit / 100 * 85, "the group peaked at {} MiB of {}", peak >> 20, limit >> 20);
    }
    assert_eq!(t.stderr().matches("worker started").count(), started_workers, "a worker restarted\n{}", t.explain());
    let r = Tandem::http_client().post(t.http_url("/v2/models/digits/infer")).body(digits_body(1)).send().unwrap();
    assert_eq!(r.status(), 200);
}
