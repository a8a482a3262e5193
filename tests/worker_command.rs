//! `WORKER_COMMAND`: tandem supervises copies of a real FastAPI app (under
//! uvicorn on `{port}`, under gunicorn with uvicorn workers on `{socket}`)
//! and serves both ports in front of them. Crashes, hangs, drains, certificate
//! reloads, streaming and WebSockets, all through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pki::{Issued, TestCa};
use common::{free_port, python_client, wait_for, Tandem, TandemBuilder};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

fn uvicorn() -> String {
    format!("python3 -m uvicorn app:app --app-dir {} --port {{port}} --log-level warning", app_dir().display())
}

fn gunicorn() -> String {
    format!(
        "python3 -m gunicorn app:app --chdir {} -k uvicorn.workers.UvicornWorker -w 2 --bind unix:{{socket}} --graceful-timeout 5 --forwarded-allow-ips * --control-socket {{socket}}.ctl",
        app_dir().display()
    )
}

/// Starts tandem and waits until `/` answers through it on every port.
fn start(b: TandemBuilder) -> Tandem {
    let ssl = b.env_value("ENABLE_SSL") == Some("true");
    let t = b.spawn();
    let http = Tandem::http_client();
    wait_for(
        Duration::from_secs(90),
        "the copies to answer over HTTP",
        || t.explain(),
        || http.get(t.http_url("/")).send().ok().filter(|r| r.status().is_success()).map(|_| ()),
    );
    t.wait_for_log(Duration::from_secs(60), "serving HTTP", 1);
    if ssl {
        let https = Tandem::https_client(&t.served_chain_pem());
        let url = t.https_url("localhost", "/");
        wait_for(Duration::from_secs(30), "HTTPS", || t.explain(), || https.get(&url).send().ok().map(|_| ()));
    }
    t
}

fn json(r: reqwest::blocking::Response) -> serde_json::Value {
    let status = r.status();
    let text = r.text().unwrap();
    assert!(status.is_success(), "{status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The copy (TANDEM_WORKER_ID) and pid answering `/whoami` now.
fn whoami(client: &reqwest::blocking::Client, url: &str) -> (String, i32) {
    let v = json(client.get(url).send().unwrap());
    (v["worker"].as_str().unwrap().to_string(), v["pid"].as_i64().unwrap() as i32)
}

/// Which copies answered `n` requests.
fn copies_seen(client: &reqwest::blocking::Client, url: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|_| json(client.get(url).send().unwrap())["worker"].as_str().unwrap().to_string()).collect()
}

/// Load on both ports from `threads` clients (GET and POST alternating) until `stop`.
struct Load {
    stop: AtomicBool,
    ok: AtomicUsize,
    failed: AtomicUsize,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Load {
    fn new() -> Self {
        Load {
            stop: AtomicBool::new(false),
            ok: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            errors: Default::default(),
        }
    }

    fn run(&self, client: reqwest::blocking::Client, base: String, post: bool) {
        let mut i = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            i += 1;
            let r = if post && i.is_multiple_of(2) {
                client.post(format!("{base}/echo")).body(vec![b'x'; 4096]).send()
            } else {
                client.get(format!("{base}/")).send()
            };
            self.count(r);
        }
    }

    /// GETs, each on a new TLS connection (a new handshake with whatever certificate is served).
    fn run_new_connections(&self, ca: &str, base: String) {
        while !self.stop.load(Ordering::Relaxed) {
            self.count(Tandem::https_client(ca).get(format!("{base}/")).send());
        }
    }

    fn count(&self, r: reqwest::Result<reqwest::blocking::Response>) {
        match r {
            Ok(r) if r.status().is_success() => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => {
                let status = r.status();
                self.errors.lock().unwrap().push(format!("{status}: {}", r.text().unwrap_or_default()));
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.lock().unwrap().push(format!("{e:?}"));
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn report(&self, what: &str) -> (usize, usize) {
        let (ok, failed) = (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed));
        eprintln!("{what}: {ok} requests succeeded, {failed} failed {:?}", self.errors.lock().unwrap());
        (ok, failed)
    }
}

#[test]
fn uvicorn_copies_serve_both_ports_with_forwarding_headers_streams_and_websockets() {
    let metrics_port = free_port();
    let b = TandemBuilder::new()
        .ssl()
        .env("NUM_WORKERS", "2")
        .env("WORKER_COMMAND", &uvicorn())
        .env("METRICS_PORT", &metrics_port.to_string())
        .env("ACCESS_LOG", "true")
        .env("SSL_HSTS", "max-age=600")
        .env("CORS_ALLOW_ORIGINS", "*");
    let t = start(b);
    let http = Tandem::http_client();
    let ca = t.served_chain_pem();
    let https = Tandem::https_client(&ca);

    // Both ports, both copies: ties go round-robin, so 20 requests see both.
    assert_eq!(copies_seen(&http, &t.http_url("/whoami"), 20), BTreeSet::from(["1".into(), "2".into()]));
    let url = t.https_url("localhost", "/whoami");
    assert_eq!(copies_seen(&https, &url, 20), BTreeSet::from(["1".into(), "2".into()]));

    // Forwarding headers are tandem's: the client's are replaced, hop-by-hop ones dropped.
    let r = https
        .get(&url)
        .header("X-Forwarded-For", "6.6.6.6")
        .header("Forwarded", "for=6.6.6.6")
        .header("X-Tandem-Client-Subject", "CN=forged")
        .header("Connection", "x-drop-me")
        .header("X-Drop-Me", "1")
        .send()
        .unwrap();
    assert_eq!(r.headers()["strict-transport-security"], "max-age=600", "HSTS on HTTPS answers");
    let v = json(r);
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{v}");
    assert_eq!(h["x-forwarded-proto"], "https", "{v}");
    assert_eq!(h["forwarded"], format!("for=127.0.0.1;proto=https;host=\"localhost:{}\"", t.https_port), "{v}");
    assert!(h.get("x-tandem-client-subject").is_none() && h.get("x-drop-me").is_none(), "{v}");
    assert_eq!(v["client"], "127.0.0.1");
    // The copy's environment: its own address, none of tandem's secrets.
    let env = &v["tandem_env"];
    assert_eq!(env["PORT"], env["TANDEM_WORKER_PORT"], "{v}");
    assert_ne!(env["PORT"].as_str().unwrap(), t.http_port.to_string(), "{v}");
    assert_eq!(v["hidden_seen"], serde_json::json!([]), "SSL_*/ACME_*/LISTEN_* reached the copy: {v}");
    let v = json(http.get(t.http_url("/whoami")).send().unwrap());
    assert_eq!(v["headers"]["x-forwarded-proto"], "http", "{v}");

    // CORS_ALLOW_ORIGINS: tandem answers the preflight on both ports (the copy
    // never sees it) and names the origin on the copy's answers.
    for (client, url) in [(&http, t.http_url("/whoami")), (&https, t.https_url("localhost", "/whoami"))] {
        let r = client
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", "https://page.example")
            .header("access-control-request-method", "POST")
            .send()
            .unwrap();
        assert_eq!(r.status(), 204, "{url}");
        assert_eq!(r.headers()["access-control-allow-origin"], "*");
        let r = client.get(&url).header("origin", "https://page.example").send().unwrap();
        assert_eq!(r.headers()["access-control-allow-origin"], "*", "{url}");
        assert_eq!(r.status(), 200);
    }

    // A streamed answer arrives as the copy writes it, not at its end.
    let started = Instant::now();
    let mut r = http.get(t.http_url("/stream?n=5&delay=0.4")).send().unwrap();
    let mut first = [0u8; 8];
    r.read_exact(&mut first).unwrap();
    let first_at = started.elapsed();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    let end_at = started.elapsed();
    assert!(rest.contains("chunk 4"), "{rest}");
    assert!(end_at - first_at > Duration::from_millis(1000), "streamed: first {first_at:?}, end {end_at:?}");

    // WebSocket echo on both ports.
    let out = python_client(&t, "ws_echo.py", &format!("ws://127.0.0.1:{}/ws", t.http_port), None);
    assert!(out.lines().count() == 3 && out.contains(":one") && out.contains(":three"), "{out}");
    let ca_file = t.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let out = python_client(&t, "ws_echo.py", &format!("wss://localhost:{}/ws", t.https_port), Some(&ca_file));
    assert!(out.lines().count() == 3 && out.contains(":two"), "{out}");

    // tandem's metrics and access log, unchanged: requests counted by listener.
    let m = http.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().unwrap().text().unwrap();
    let https_gets = m
        .lines()
        .find(|l| {
            l.starts_with(
                r#"tandem_http_requests_total{listener="https",protocol="http",route="other",method="GET",code="200"}"#,
            )
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no HTTPS GET count in\n{m}"));
    assert!(https_gets >= 21.0, "{https_gets}");
    assert!(m.contains(r#"tandem_workers{role="proxy-worker"} 1"#), "{m}");
    assert!(m.contains(r#"tandem_workers{role="worker-command"} 2"#), "{m}");
    assert!(t.stderr().contains("access") && t.stderr().contains("/whoami"), "no access log\n{}", t.explain());
}

#[test]
fn gunicorn_copies_on_unix_sockets_started_by_tandem_run() {
    let b = TandemBuilder::new().env("NUM_WORKERS", "2");
    let mut argv: Vec<String> = vec!["run".into(), "--".into()];
    argv.extend(gunicorn().split(' ').map(String::from));
    let t = start(b.args(&argv));
    let http = Tandem::http_client();
    assert_eq!(copies_seen(&http, &t.http_url("/whoami"), 20), BTreeSet::from(["1".into(), "2".into()]));
    let v = json(http.get(t.http_url("/whoami")).send().unwrap());
    let socket = PathBuf::from(v["tandem_env"]["TANDEM_WORKER_SOCKET"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(socket.parent().unwrap()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the socket directory is private");
    // As README's example: X-Forwarded-For trusted over the socket, one control socket per copy.
    assert_eq!(v["client"], "127.0.0.1", "{v}");
    let controls = std::fs::read_dir(socket.parent().unwrap())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".ctl"))
        .count();
    assert_eq!(controls, 2, "a gunicorn control socket per copy");
    // Every line the copies print carries their number.
    assert!(t.stderr().contains("worker=1") && t.stderr().contains("Booting worker"), "{}", t.explain());
    let r = http.post(t.http_url("/echo")).body(vec![b'y'; 300_000]).send().unwrap();
    assert_eq!(json(r)["bytes"], 300_000);
}

#[test]
fn a_killed_copy_is_replaced_and_loses_at_most_its_requests_in_flight() {
    let t = start(TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("WORKER_COMMAND", &uvicorn()));
    let http = Tandem::http_client();
    let (victim_worker, victim) = whoami(&http, &t.http_url("/whoami"));
    let load = Load::new();
    const THREADS: usize = 6;
    std::thread::scope(|s| {
        for i in 0..THREADS {
            let (load, ca) = (&load, t.served_chain_pem());
            let base = if i.is_multiple_of(2) { t.http_url("") } else { t.https_url("localhost", "") };
            let client = if i.is_multiple_of(2) { Tandem::http_client() } else { Tandem::https_client(&ca) };
            s.spawn(move || load.run(client, base, true));
        }
        std::thread::sleep(Duration::from_secs(1));
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        t.wait_for_log(Duration::from_secs(30), "worker command ready", 3);
        std::thread::sleep(Duration::from_secs(1));
        load.stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = load.report("kill -9 of a copy under load");
    assert!(failed <= THREADS, "{failed} failed: more than the {THREADS} requests that could be in flight");
    assert!(ok > 200, "too little load: {ok}");
    // The same copy number answers again, from a new process.
    let mut pids = BTreeSet::new();
    for _ in 0..20 {
        let (worker, pid) = whoami(&http, &t.http_url("/whoami"));
        if worker == victim_worker {
            pids.insert(pid);
        }
    }
    assert!(!pids.is_empty() && !pids.contains(&victim), "copy {victim_worker} was not replaced: {pids:?}");
}

#[test]
fn a_hung_copy_leaves_rotation_and_comes_back() {
    let t = start(TandemBuilder::new().env("NUM_WORKERS", "2").env("WORKER_COMMAND", &uvicorn()));
    let http = Tandem::http_client();
    let (hung_worker, hung) = whoami(&http, &t.http_url("/whoami"));
    // Its whole process group, as a stuck interpreter would be.
    kill(Pid::from_raw(-hung), Signal::SIGSTOP).unwrap();
    // Requests find it out at once (the proxy tells the prober), else the next probe does.
    t.wait_for_log(Duration::from_secs(25), "stopped answering; out of rotation", 1);
    let started = Instant::now();
    let seen = copies_seen(&http, &t.http_url("/whoami"), 20);
    let _ = kill(Pid::from_raw(-hung), Signal::SIGCONT);
    assert!(!seen.contains(&hung_worker), "requests went to the hung copy: {seen:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "the others answered slowly: {:?}", started.elapsed());
    t.wait_for_log(Duration::from_secs(25), "answers again; back in rotation", 1);
    assert_eq!(copies_seen(&http, &t.http_url("/whoami"), 20).len(), 2);
}

#[test]
fn sigterm_drains_a_slow_request_then_stops_every_copy() {
    let mut t = start(TandemBuilder::new().env("NUM_WORKERS", "2").env("WORKER_COMMAND", &uvicorn()));
    let copies: Vec<i32> = (0..10).map(|_| whoami(&Tandem::http_client(), &t.http_url("/whoami")).1).collect();
    let url = t.http_url("/slow?secs=3");
    let slow = std::thread::spawn(move || {
        let r = Tandem::http_client().get(url).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    std::thread::sleep(Duration::from_millis(500));
    t.signal(Signal::SIGTERM);
    let (status, body) = slow.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"slept\":3"), "{body}");
    assert_eq!(t.wait_exit(Duration::from_secs(20)).code(), Some(0), "{}", t.explain());
    for pid in copies {
        assert!(kill(Pid::from_raw(pid), None).is_err(), "copy {pid} outlived tandem\n{}", t.explain());
    }
    assert!(!t.stderr().contains("stopped answering"), "an intended stop was reported as a failure\n{}", t.explain());
}

#[test]
fn sigttou_drains_the_removed_copy_before_stopping_it() {
    let t = start(TandemBuilder::new().env("NUM_WORKERS", "1").env("WORKER_COMMAND", &uvicorn()));
    // Without HTTPS a SIGHUP has nothing to reload, and must not touch the proxy worker.
    let proxy = t.workers("proxy-worker");
    t.signal(Signal::SIGHUP);
    t.wait_for_log(Duration::from_secs(10), "SIGHUP: HTTPS is off", 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(t.workers("proxy-worker"), proxy, "a SIGHUP restarted the proxy worker\n{}", t.explain());
    t.signal(Signal::SIGTTIN);
    let http = Tandem::http_client();
    wait_for(
        Duration::from_secs(30),
        "a second copy",
        || t.explain(),
        || (copies_seen(&http, &t.http_url("/whoami"), 6).len() == 2).then_some(()),
    );
    // Slow requests on both copies, then the second copy is removed.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = t.http_url("/slow?secs=2");
            std::thread::spawn(move || json(Tandem::http_client().get(url).send().unwrap()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    t.signal(Signal::SIGTTOU);
    let answers: Vec<_> = slow.into_iter().map(|h| h.join().unwrap()["worker"].clone()).collect();
    assert!(answers.contains(&"2".into()), "the draining copy finished its request: {answers:?}");
    t.wait_for_log(Duration::from_secs(15), "worker command drained; stopping it", 1);
    assert_eq!(copies_seen(&http, &t.http_url("/whoami"), 6), BTreeSet::from(["1".into()]));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!t.stderr().contains("stopped answering"), "an intended stop was reported as a failure\n{}", t.explain());
}

#[test]
fn a_copy_that_listens_elsewhere_is_told_where_tandem_probes_with_its_output() {
    let script = "import time; print('Uvicorn running on http://127.0.0.1:8000', flush=True); time.sleep(60)";
    let t = TandemBuilder::new()
        .env("WORKER_COMMAND", &format!("python3 -c \"{script}\""))
        .env("WORKER_START_TIMEOUT", "30")
        .spawn();
    t.wait_for_log(Duration::from_secs(15), "has not answered GET / at http://127.0.0.1:", 1);
    let err = t.stderr();
    assert!(err.contains("| Uvicorn running on http://127.0.0.1:8000"), "the copy's output is in the hint\n{err}");
    assert!(err.contains("tandem set PORT and HOST"), "{err}");
}

/// Replaces the certificate files tandem watches, each by an atomic rename.
fn swap_files(dir: &Path, issued: &Issued) {
    for (name, text) in [("key.pem", &issued.key_pem), ("cert.pem", &issued.cert_pem)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

#[test]
fn certificate_reloads_under_load_fail_no_request() {
    let ca = TestCa::new();
    let certs = [ca.issue(), ca.issue()];
    let b = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("WORKER_COMMAND", &uvicorn());
    let dir = b.dir().join("certs");
    certs[0].write(&dir, "cert.pem", "key.pem");
    let t = start(b.env("SSL_CERTIFICATE", dir.join("cert.pem").to_str().unwrap()));
    let proxy = t.workers("proxy-worker");
    let load = Load::new();
    std::thread::scope(|s| {
        for i in 0..4 {
            let (load, ca) = (&load, &ca.pem);
            let base = t.https_url("localhost", "");
            s.spawn(move || {
                if i < 2 {
                    load.run(Tandem::https_client(ca), base, true);
                } else {
                    load.run_new_connections(ca, base);
                }
            });
        }
        for i in 1..=6 {
            swap_files(&dir, &certs[i % 2]);
            t.signal(Signal::SIGHUP);
            t.wait_for_log(Duration::from_secs(15), "serves the new certificate", i);
            std::thread::sleep(Duration::from_millis(200));
        }
        load.stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = load.report("certificate reloads under load");
    assert_eq!(failed, 0, "{}", t.explain());
    assert!(ok > 100, "too little load: {ok}");
    assert_eq!(t.workers("proxy-worker"), proxy, "the proxy worker restarted for a reload");
}

#[test]
fn a_command_that_exits_at_once_is_a_clear_error_with_its_output() {
    let script = "import sys; print('loading weights'); sys.exit('cannot open /models/missing.onnx')";
    let mut t =
        TandemBuilder::new().env("NUM_WORKERS", "2").env("WORKER_COMMAND", &format!("python3 -c \"{script}\"")).spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(30)).code(), Some(1), "{}", t.explain());
    let err = t.stderr();
    assert!(err.contains("exited before it was ready (exit code 1); its last output"), "{err}");
    assert!(err.contains("| cannot open /models/missing.onnx") && err.contains("| loading weights"), "{err}");
    // A command with no {port} or {socket} is told at start-up where its copies must listen.
    assert!(err.contains("WORKER_COMMAND has no {port} or {socket}") && err.contains("$PORT"), "{err}");

    let mut t = TandemBuilder::new().env("WORKER_COMMAND", "no-such-server --port {port}").spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(10)).code(), Some(2), "{}", t.explain());
    assert!(t.stderr().contains("WORKER_COMMAND") && t.stderr().contains("not on PATH"), "{}", t.explain());
}

#[test]
fn a_copy_that_never_becomes_ready_is_restarted_with_its_output_reported() {
    // python's http.server answers 404 on the ready path: never ready.
    let t = TandemBuilder::new()
        .env("WORKER_COMMAND", "python3 -u -m http.server {port} --bind 127.0.0.1")
        .env("WORKER_READY_PATH", "/ready")
        .env("WORKER_START_TIMEOUT", "2")
        .env("REQUEST_TIMEOUT", "2")
        .spawn();
    wait_for(
        Duration::from_secs(30),
        "a restart after the start timeout",
        || t.explain(),
        || {
            let err = t.stderr();
            (err.contains("not ready within WORKER_START_TIMEOUT") && err.contains("worker died; restarting"))
                .then_some(())
        },
    );
    let err = t.stderr();
    assert!(err.contains("did not answer /ready within WORKER_START_TIMEOUT; its last output"), "{err}");
    assert!(err.contains("\"GET /ready HTTP/1.1\" 404"), "the copy's own log is in the report\n{err}");
    // Until a copy is ready, a client waits (REQUEST_TIMEOUT) and then hears why.
    let r = Tandem::http_client().get(t.http_url("/")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().unwrap().contains("no WORKER_COMMAND copy became ready"));
}

#[test]
fn client_certificates_reach_the_copy_as_tandem_s_identity_headers_and_logs_stay_json() {
    let b = TandemBuilder::new();
    let dir = b.dir().join("pki");
    std::fs::create_dir_all(&dir).unwrap();
    common::pki::ca_and_client(&dir, "ca1", "alice");
    let t = start(
        b.ssl()
            .env("WORKER_COMMAND", &uvicorn().replace("warning", "info"))
            .env("SSL_CLIENT_CA", dir.join("ca1.pem").to_str().unwrap())
            .env("SSL_CLIENT_AUTH", "optional")
            .env("LOG_FORMAT", "json"),
    );
    let server_ca = dir.join("server.pem");
    std::fs::write(&server_ca, t.served_chain_pem()).unwrap();
    let curl = |client: bool| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "--cacert"]).arg(&server_ca).args(["-H", "X-Tandem-Client-Subject: CN=mallory"]);
        if client {
            cmd.arg("--cert").arg(dir.join("alice.pem")).arg("--key").arg(dir.join("alice.key"));
        }
        let out = cmd.arg(t.https_url("localhost", "/whoami")).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };
    let with = curl(true);
    let h = &with["headers"];
    assert!(h["x-tandem-client-subject"].as_str().unwrap().contains("CN=alice"), "{with}");
    assert!(h["x-tandem-client-sans"].as_str().unwrap().contains("alice.example"), "{with}");
    assert_eq!(h["x-tandem-client-fingerprint"].as_str().unwrap().len(), 64, "{with}");
    let without = curl(false);
    assert!(without["headers"].get("x-tandem-client-subject").is_none(), "a forged identity passed: {without}");
    // The copies' own output is relayed as JSON lines too, with their number.
    let relayed = t
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["stream"] == "stderr" && v["worker"] == 1);
    assert!(relayed.is_some(), "no JSON line from copy 1\n{}", t.explain());
}

/// Sends `head` (a raw HTTP/1.1 request head) on a new connection to `port`
/// and returns what came back until the server closed or `wait` passed.
fn raw(port: u16, head: &str, wait: Duration) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let started = Instant::now();
    while started.elapsed() < wait {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // One whole answer of known length is enough.
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok());
                    if len.is_some_and(|n| body.len() >= n) {
                        break;
                    }
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_proxy_cannot_be_bypassed_by_upgrades_spellings_or_framing() {
    let b = TandemBuilder::new().env("WORKER_COMMAND", &uvicorn()).env("IDLE_TIMEOUT", "3").env("REQUEST_TIMEOUT", "2");
    let t = start(b);
    let wait = Duration::from_secs(10);

    // An h2c upgrade is not passed on: the copy answers a plain request and
    // sees neither the upgrade nor tandem's headers in any other spelling.
    let answer = raw(
        t.http_port,
        "GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX_Forwarded_For: 6.6.6.6\r\nX-Forwarded_Proto: gopher\r\n\
         X-Tandem-Client_Subject: CN=forged\r\nx-tandem-client-fingerprint: forged\r\nX_Real_IP: 6.6.6.6\r\n\r\n",
        wait,
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}\n{}", t.explain());
    let body: serde_json::Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    let headers = body["headers"].as_object().unwrap();
    for (name, value) in headers {
        let value = value.as_str().unwrap();
        assert!(!name.contains('_'), "{name} reached the copy: {headers:?}");
        assert!(!["6.6.6.6", "gopher", "CN=forged", "forged"].contains(&value), "{name}: {value} reached the copy");
    }
    for gone in ["upgrade", "http2-settings"] {
        assert!(!headers.contains_key(gone), "{gone} reached the copy: {headers:?}");
    }
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");

    // Connection may not take Host away.
    let answer = raw(t.http_port, "GET /whoami HTTP/1.1\r\nHost: api.example\r\nConnection: host\r\n\r\n", wait);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"host\":\"api.example\""), "{answer}");

    // tandem answers what it must not forward.
    for (head, status) in [
        ("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "405"),
        ("OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n", "204"),
        ("GET /whoami HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", "400"),
        ("GET /whoami HTTP/1.1\r\n\r\n", "400"),
    ] {
        let answer = raw(t.http_port, head, wait);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{head:?} -> {answer}");
    }
    let answer = raw(t.http_port, "GET /whoami HTTP/1.0\r\n\r\n", wait);
    assert!(answer.starts_with("HTTP/1.0 200"), "HTTP/1.0 needs no Host: {answer}");

    // A WebSocket tunnel obeys IDLE_TIMEOUT: silent for longer, it is closed.
    let started = Instant::now();
    let answer = raw(
        t.http_port,
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        Duration::from_secs(20),
    );
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert!(took < Duration::from_secs(15), "the idle tunnel stayed open {took:?}");
    assert!(took >= Duration::from_secs(3), "closed before IDLE_TIMEOUT: {took:?}");
}

#[test]
fn a_health_only_plain_port_passes_nothing_else_to_the_copies() {
    let b = TandemBuilder::new().ssl().env("WORKER_COMMAND", &uvicorn()).env("HTTP_MODE", "health");
    let t = start(b);
    let wait = Duration::from_secs(10);
    // The ready path and health checks pass; anything else, in any spelling, is refused.
    let ready = raw(t.http_port, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", wait);
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    for path in ["/whoami", "/v2/health/../whoami", "/v2/health/%2e%2e/whoami", "//whoami", "/v2/health/./../whoami"] {
        let answer = raw(t.http_port, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"), wait);
        assert!(answer.starts_with("HTTP/1.1 403"), "{path} -> {answer}");
        assert!(answer.contains("HTTP_MODE=health"), "{path} -> {answer}");
    }
    let https = Tandem::https_client(&t.served_chain_pem());
    let (worker, _) = whoami(&https, &t.https_url("localhost", "/whoami"));
    assert!(!worker.is_empty());
}
