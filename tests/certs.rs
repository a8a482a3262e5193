//! End-to-end tests of every certificate source with a test CA made here:
//! key discovery, validation at start, Kubernetes secret swaps, INDIRECT
//! downloads with outages, generated-certificate renewal, `cert status`, and
//! hot reload under load with zero failed requests.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::pki::{Issued, TestCa};
use common::*;
use nix::sys::signal::Signal;

/// Fingerprint of the certificate a fresh TLS connection gets, trusting `ca`.
fn fingerprint_now(t: &Tandem, ca: &str, host: &str) -> Option<String> {
    let client = Tandem::https_client(ca);
    let resp = client.get(t.https_url(host, "/v2/health/live")).send().ok()?;
    Some(served_fingerprint(&resp))
}

fn wait_for_fingerprint(t: &Tandem, ca: &str, want: &str, what: &str) {
    wait_for(
        Duration::from_secs(15),
        what,
        || t.explain(),
        || (fingerprint_now(t, ca, "localhost").as_deref() == Some(want)).then_some(()),
    );
}

fn json_of(t: &Tandem, path: &str) -> serde_json::Value {
    Tandem::http_client().get(t.http_url(path)).send().unwrap().json().unwrap()
}

#[test]
fn custom_certificate_key_is_discovered_for_each_naming_pattern() {
    let ca = TestCa::new();
    for (cert, key) in [
        ("tls.crt", "tls.key"),
        ("fullchain.pem", "privkey.pem"),
        ("cert.pem", "key.pem"),
        ("server.crt", "server.key"),
    ] {
        let b = TandemBuilder::new().ssl();
        let dir = b.dir().join("certs");
        let issued = ca.issue();
        issued.write(&dir, cert, key);
        let t = b.env("SSL_CERTIFICATE", dir.join(cert).to_str().unwrap()).start();
        let got = fingerprint_now(&t, &ca.pem, "localhost");
        assert_eq!(got.as_deref(), Some(issued.fingerprint.as_str()), "{cert} + {key}\n{}", t.explain());
        // Verified by IP too (the leaf has an IP SAN).
        assert!(fingerprint_now(&t, &ca.pem, "127.0.0.1").is_some());
        let status = json_of(&t, "/");
        assert_eq!(status["certificate"]["mode"], "PATH");
        assert_eq!(status["certificate"]["fingerprint"], issued.fingerprint.as_str());
        assert!(status["certificate"]["days_left"].as_i64().unwrap() >= 88);
        // The test wrote the key with the umask's mode (0644): tandem says so.
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join(key)).unwrap().permissions());
        if mode & 0o044 != 0 {
            assert!(t.stderr().contains("private key is readable by other users"), "{}", t.explain());
        }
    }
    // A key only we and our own group can read (0640, as Kubernetes mounts a secret with fsGroup) draws no warning.
    let b = TandemBuilder::new().ssl();
    let dir = b.dir().join("certs");
    ca.issue().write(&dir, "tls.crt", "tls.key");
    std::fs::set_permissions(dir.join("tls.key"), std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let t = b.env("SSL_CERTIFICATE", dir.join("tls.crt").to_str().unwrap()).start();
    assert!(!t.stderr().contains("readable by other users"), "{}", t.explain());
}

#[test]
fn missing_key_lists_every_path_tried_and_exits_2() {
    let ca = TestCa::new();
    let b = TandemBuilder::new().ssl();
    let dir = b.dir().join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("site.pem"), ca.issue().cert_pem).unwrap();
    let cache = b.dir().join("cache");
    let mut t = b.env("SSL_CERTIFICATE", dir.join("site.pem").to_str().unwrap()).spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(10)).code(), Some(2), "{}", t.explain());
    let err = t.stderr();
    for tried in ["site.key", "privkey.pem", "key.pem", "tls.key"] {
        assert!(err.contains(&dir.join(tried).display().to_string()), "{tried} not listed\n{err}");
    }
    assert!(err.contains("SSL_KEY"), "no hint\n{err}");
    assert!(!cache.exists(), "cache written despite a bad certificate");
}

#[test]
fn mismatched_or_expired_certificates_exit_2_naming_the_files() {
    let ca = TestCa::new();
    let b = TandemBuilder::new().ssl();
    let dir = b.dir().join("certs");
    let a = ca.issue();
    let other = ca.issue();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &a.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &other.key_pem).unwrap();
    let mut t = b.env("SSL_CERTIFICATE", dir.join("tls.crt").to_str().unwrap()).spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(10)).code(), Some(2), "{}", t.explain());
    let err = t.stderr();
    assert!(err.contains("tls.crt") && err.contains("tls.key") && err.contains("does not match"), "{err}");

    let b = TandemBuilder::new().ssl();
    let dir = b.dir().join("certs");
    ca.issue_valid(&["localhost"], -30, -1).write(&dir, "cert.pem", "key.pem");
    let mut t = b.env("SSL_CERTIFICATE", dir.join("cert.pem").to_str().unwrap()).spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(10)).code(), Some(2), "{}", t.explain());
    assert!(t.stderr().contains("not valid now"), "{}", t.explain());
}

/// A Kubernetes secret volume: `tls.crt` -> `..data/tls.crt`, `..data` -> a timestamped dir.
struct SecretVolume {
    dir: PathBuf,
    generation: usize,
}

impl SecretVolume {
    fn new(dir: &Path, first: &Issued) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut v = SecretVolume { dir: dir.to_path_buf(), generation: 0 };
        v.swap(first);
        symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
        symlink("..data/tls.key", dir.join("tls.key")).unwrap();
        v
    }

    /// Writes a new timestamped dir and atomically repoints `..data`, as the kubelet does.
    fn swap(&mut self, issued: &Issued) {
        self.generation += 1;
        let name = format!("..2026_11_23_{:04}", self.generation);
        issued.write(&self.dir.join(&name), "tls.crt", "tls.key");
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }
}

#[test]
fn kubernetes_secret_swap_is_served_by_the_same_https_worker() {
    let ca = TestCa::new();
    let (a, b_cert) = (ca.issue(), ca.issue());
    let b = TandemBuilder::new().ssl();
    let mut volume = SecretVolume::new(&b.dir().join("secret"), &a);
    let t = b.env("SSL_CERTIFICATE", volume.cert().to_str().unwrap()).start();
    assert_eq!(fingerprint_now(&t, &ca.pem, "localhost").as_deref(), Some(a.fingerprint.as_str()));
    let https_pid = t.workers("https-worker");
    volume.swap(&b_cert);
    // No signal: the file watcher (or the poll) notices the swap.
    wait_for_fingerprint(&t, &ca.pem, &b_cert.fingerprint, "the swapped certificate");
    assert_eq!(t.workers("https-worker"), https_pid, "the https worker must not restart for a reload");
    assert!(t.stderr().contains("https worker serves the new certificate"), "no reload ack\n{}", t.explain());

    // A broken update is refused; the previous certificate keeps serving.
    let mut broken = ca.issue();
    broken.key_pem = ca.issue().key_pem;
    volume.swap(&broken);
    t.wait_for_log(Duration::from_secs(15), "certificate refused; the previous one keeps serving", 1);
    // The status file is written just after the log line: wait for it too.
    wait_for(
        Duration::from_secs(10),
        "the refusal in GET /",
        || t.explain(),
        || {
            json_of(&t, "/")["certificate"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("does not match"))
                .then_some(())
        },
    );
    assert_eq!(fingerprint_now(&t, &ca.pem, "localhost").as_deref(), Some(b_cert.fingerprint.as_str()));
}

/// The Python HTTPS distribution server, killed on drop.
struct CertServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl CertServer {
    fn start(dir: &Path, ca: &TestCa) -> CertServer {
        let own = ca.issue();
        own.write(&dir.join("server-tls"), "cert.pem", "key.pem");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/cert_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(dir.join("www"))
            .arg(dir.join("server-tls/cert.pem"))
            .arg(dir.join("server-tls/key.pem"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        CertServer { child, port: line.trim().parse().expect("port"), dir: dir.join("www") }
    }

    fn serve(&self, issued: &Issued) {
        issued.write(&self.dir, "fullchain.pem.tmp", "privkey.pem.tmp");
        std::fs::rename(self.dir.join("fullchain.pem.tmp"), self.dir.join("fullchain.pem")).unwrap();
        std::fs::rename(self.dir.join("privkey.pem.tmp"), self.dir.join("privkey.pem")).unwrap();
    }

    fn outage(&self, on: bool) {
        let marker = self.dir.join("OUTAGE");
        if on {
            std::fs::write(marker, b"").unwrap();
        } else {
            let _ = std::fs::remove_file(marker);
        }
    }

    /// A server in a fresh directory, and the file of the CA its certificate chains to.
    fn with_ca_file(ca: &TestCa) -> (tempfile::TempDir, CertServer, PathBuf) {
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(work.path().join("www")).unwrap();
        let server = CertServer::start(work.path(), ca);
        let ca_file = work.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        (work, server, ca_file)
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/", self.port)
    }
}

impl Drop for CertServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn indirect_downloads_renews_survives_outages_and_recovers_from_degraded() {
    let ca = TestCa::new();
    let (work, server, ca_file) = CertServer::with_ca_file(&ca);
    let cache = work.path().join("cache");
    let (a, b) = (ca.issue(), ca.issue());
    server.serve(&a);
    let indirect = |refresh: &str, cache: &Path| {
        TandemBuilder::new()
            .ssl()
            .env("SSL_CERTIFICATE", "INDIRECT")
            .env("SSL_INDIRECT_URL", &server.url())
            .env("SSL_CERT_FILE", ca_file.to_str().unwrap())
            .env("SSL_REFRESH_INTERVAL", refresh)
            .env("MODEL_CACHE_DIR", cache.to_str().unwrap())
    };

    // Download at start; renewal picked up by SIGHUP (the refresh interval is an hour).
    let mut t = indirect("3600", &cache).start();
    assert_eq!(fingerprint_now(&t, &ca.pem, "localhost").as_deref(), Some(a.fingerprint.as_str()), "{}", t.explain());
    // The shared, downloaded key is said plainly at start-up, with the URL and the alternatives.
    let err = t.stderr();
    assert!(
        err.contains("SSL_CERTIFICATE=INDIRECT") && err.contains(&server.url()) && err.contains("same key"),
        "{}",
        t.explain()
    );
    assert!(err.contains("SSL_CERTIFICATE=GENERATE"), "{}", t.explain());
    let mode = std::fs::metadata(cache.join("ssl_certificates/indirect.pem")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
    server.serve(&b);
    t.signal(Signal::SIGHUP);
    wait_for_fingerprint(&t, &ca.pem, &b.fingerprint, "the renewed certificate after SIGHUP");

    // Outage: the cached pair keeps serving, and the failure is visible.
    server.outage(true);
    t.signal(Signal::SIGHUP);
    wait_for(
        Duration::from_secs(10),
        "the outage to be noticed",
        || t.explain(),
        || json_of(&t, "/")["certificate"]["last_error"].as_str().map(|_| ()),
    );
    assert_eq!(fingerprint_now(&t, &ca.pem, "localhost").as_deref(), Some(b.fingerprint.as_str()));
    t.signal(Signal::SIGTERM);
    assert_eq!(t.wait_exit(Duration::from_secs(20)).code(), Some(0));

    // Restart during the outage: comes up with the cache.
    let t = indirect("3600", &cache).start();
    assert_eq!(fingerprint_now(&t, &ca.pem, "localhost").as_deref(), Some(b.fingerprint.as_str()), "{}", t.explain());
    assert_eq!(json_of(&t, "/")["certificate"]["degraded"], false);
    drop(t);

    // No cache and an outage: a generated stand-in, reported as degraded.
    let fresh = work.path().join("fresh-cache");
    let t = indirect("2", &fresh).start();
    let status = json_of(&t, "/v2/health/ready");
    assert_eq!(status["certificate"]["degraded"], true, "{status}\n{}", t.explain());
    let stand_in = status["certificate"]["fingerprint"].as_str().unwrap().to_string();
    assert!(stand_in != a.fingerprint && stand_in != b.fingerprint);
    assert!(t.stderr().contains("serving a generated self-signed certificate"), "{}", t.explain());
    // Recovery: the real certificate arrives on the next retry, then refresh picks up renewals.
    server.outage(false);
    wait_for_fingerprint(&t, &ca.pem, &b.fingerprint, "recovery from the degraded state");
    wait_for(
        Duration::from_secs(10),
        "degraded to clear",
        || t.explain(),
        || (json_of(&t, "/")["certificate"]["degraded"] == false).then_some(()),
    );
    server.serve(&a);
    wait_for_fingerprint(&t, &ca.pem, &a.fingerprint, "renewal picked up by the refresh interval");
}

#[test]
fn generated_certificate_follows_ssl_san_and_key_type() {
    let b = TandemBuilder::new().ssl();
    let cache = b.dir().join("cache").display().to_string();
    let mut t = b.env("SSL_SAN", "api.example.test,10.9.8.7").env("SSL_KEY_TYPE", "ecdsa-p256").start();
    let live = tandem_shared::certs::primitives::Bundle::load(&t.cert_dir().join("live.pem")).unwrap();
    assert!(live.info.sans.contains(&"DNS:api.example.test".to_string()), "{:?}", live.info.sans);
    assert!(live.info.sans.contains(&"IP:10.9.8.7".to_string()), "{:?}", live.info.sans);
    assert!(live.info.key_algorithm.starts_with("EC"), "{}", live.info.key_algorithm);
    t.signal(Signal::SIGTERM);
    t.wait_exit(Duration::from_secs(20));
    // Other names: regenerated.
    let t2 = TandemBuilder::new()
        .ssl()
        .env("MODEL_CACHE_DIR", &cache)
        .env("SSL_SAN", "other.example.test")
        .env("SSL_KEY_TYPE", "ecdsa-p256")
        .start();
    let again = tandem_shared::certs::primitives::Bundle::load(&t2.cert_dir().join("live.pem")).unwrap();
    assert_ne!(again.info.fingerprint, live.info.fingerprint);
    assert!(again.info.sans.contains(&"DNS:other.example.test".to_string()));
}

#[test]
fn cert_status_reports_and_exits_by_usability() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let issued = ca.issue();
    issued.write(dir.path(), "tls.crt", "tls.key");
    let run = |json: bool| {
        let mut cmd = Command::new(TANDEM);
        cmd.args(["cert", "status"])
            .env_clear()
            .env("SSL_CERTIFICATE", dir.path().join("tls.crt"))
            .env("MODEL_CACHE_DIR", dir.path().join("cache"));
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let out = run(true);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "PATH");
    assert_eq!(report["fingerprint"], issued.fingerprint.as_str());
    assert_eq!(report["usable"], true);
    assert!(report["sans"].as_array().unwrap().iter().any(|s| s == "IP:127.0.0.1"));
    assert!(report["days_left"].as_i64().unwrap() >= 88);
    let text = String::from_utf8(run(false).stdout).unwrap();
    assert!(text.contains("sha256") && text.contains(&issued.fingerprint), "{text}");
    // A mismatched key: exit 1, and the reason.
    std::fs::write(dir.path().join("tls.key"), ca.issue().key_pem).unwrap();
    let out = run(true);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["error"].as_str().unwrap().contains("does not match"), "{report}");
}

#[test]
fn twenty_reloads_under_load_fail_no_request() {
    let ca = TestCa::new();
    let certs = [ca.issue(), ca.issue()];
    let b = TandemBuilder::new().ssl().env("NUM_WORKERS", "2");
    let mut volume = SecretVolume::new(&b.dir().join("secret"), &certs[0]);
    let t = b.env("SSL_CERTIFICATE", volume.cert().to_str().unwrap()).start();
    let https_pid = t.workers("https-worker");
    let url = t.https_url("localhost", "/v2/models/digits/infer");
    let body = common::digits_body(6);
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    std::thread::scope(|s| {
        for keep_alive in [true, true, false, false] {
            let (url, body, stop, ok, failed, seen, ca) = (&url, &body, &stop, &ok, &failed, &seen, &ca.pem);
            s.spawn(move || {
                let mut client = Tandem::https_client(ca);
                while !stop.load(Ordering::Relaxed) {
                    if !keep_alive {
                        client = Tandem::https_client(ca); // a new TLS connection per request
                    }
                    match client.post(url).body(body.clone()).send() {
                        Ok(r) if r.status().is_success() => {
                            if !keep_alive {
                                seen.lock().unwrap().insert(served_fingerprint(&r));
                            }
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            eprintln!("failed: {}", r.status());
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("failed: {e:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        for i in 1..=20 {
            volume.swap(&certs[i % 2]);
            t.signal(Signal::SIGHUP);
            t.wait_for_log(Duration::from_secs(15), "https worker serves the new certificate", i);
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    eprintln!("reload under load: {ok} requests succeeded, {failed} failed");
    assert_eq!(failed, 0, "{failed} of {} requests failed during reloads\n{}", ok + failed, t.explain());
    assert!(ok > 100, "too little load: {ok}");
    let seen = seen.into_inner().unwrap();
    assert!(seen.contains(&certs[0].fingerprint) && seen.contains(&certs[1].fingerprint), "clients saw {seen:?}");
    assert_eq!(t.workers("https-worker"), https_pid, "the https worker restarted");
}

#[test]
fn a_certificate_in_its_last_third_is_served_with_a_warning() {
    let ca = TestCa::new();
    let b = TandemBuilder::new().ssl();
    let dir = b.dir().join("certs");
    let old = ca.issue_valid(&["localhost", "127.0.0.1"], -60, 10);
    old.write(&dir, "tls.crt", "tls.key");
    let t = b.env("SSL_CERTIFICATE", dir.join("tls.crt").to_str().unwrap()).start();
    assert_eq!(fingerprint_now(&t, &ca.pem, "localhost").as_deref(), Some(old.fingerprint.as_str()));
    assert!(t.stderr().contains("less than a third of its lifetime left"), "{}", t.explain());
    let status = json_of(&t, "/");
    assert_eq!(status["certificate"]["renew_soon"], true, "{status}");
    assert!(status["certificate"]["days_left"].as_i64().unwrap() <= 10, "{status}");
}

#[test]
fn indirect_credentials_never_show_and_oversized_downloads_are_refused() {
    let ca = TestCa::new();
    let (work, server, ca_file) = CertServer::with_ca_file(&ca);
    // A "bundle" of 3 MiB below a path: refused by size, not parsed.
    let certs = work.path().join("www/certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("fullchain.pem"), vec![b'A'; 3 << 20]).unwrap();
    std::fs::write(certs.join("privkey.pem"), b"key").unwrap();
    let url = format!("https://robot:s3cret@localhost:{}/certs/?token=t0ken#frag", server.port);
    let t = TandemBuilder::new()
        .ssl()
        .env("SSL_CERTIFICATE", "INDIRECT")
        .env("SSL_INDIRECT_URL", &url)
        .env("SSL_CERT_FILE", ca_file.to_str().unwrap())
        .start();
    let info = json_of(&t, "/");
    let error = info["certificate"]["last_error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("larger than 1048576 bytes"), "{info}\n{}", t.explain());
    assert!(error.contains("localhost"), "the redacted URL still says where: {error}");
    assert_eq!(info["certificate"]["degraded"], true, "{info}");
    for secret in ["s3cret", "t0ken", "robot", "frag"] {
        assert!(!info.to_string().contains(secret), "GET / leaks {secret}: {info}");
        assert!(!t.stderr().contains(secret), "the log leaks {secret}\n{}", t.explain());
    }
}

#[test]
fn a_certificate_path_that_turns_into_a_fifo_never_freezes_the_supervisor() {
    let ca = TestCa::new();
    let b = TandemBuilder::new().ssl();
    let dir = b.dir().join("certs");
    let issued = ca.issue();
    issued.write(&dir, "tls.crt", "tls.key");
    let t = b.env("SSL_CERTIFICATE", dir.join("tls.crt").to_str().unwrap()).start();
    // The certificate becomes a FIFO: reading it would block for ever.
    std::fs::remove_file(dir.join("tls.crt")).unwrap();
    nix::unistd::mkfifo(&dir.join("tls.crt"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    t.wait_for_log(Duration::from_secs(20), "not a regular file", 1);
    // The supervisor still supervises: a killed engine worker comes back at once.
    let engine = t.workers("engine-worker")[0];
    nix::sys::signal::kill(engine, Signal::SIGKILL).unwrap();
    wait_for(
        Duration::from_secs(5),
        "the engine worker to be restarted",
        || t.explain(),
        || t.workers("engine-worker").iter().any(|&p| p != engine).then_some(()),
    );
    // And the old certificate keeps serving.
    assert_eq!(fingerprint_now(&t, &ca.pem, "localhost").as_deref(), Some(issued.fingerprint.as_str()));
}

#[test]
fn a_sighup_with_nothing_new_is_reported_as_unchanged() {
    let t = TandemBuilder::new().ssl().start();
    t.signal(Signal::SIGHUP);
    t.wait_for_log(Duration::from_secs(15), "https worker re-read the certificate: unchanged", 1);
    assert!(!t.stderr().contains("serves the new certificate"), "{}", t.explain());
    let status: serde_json::Value = json_of(&t, "/");
    // A day begun counts: a generated certificate made just now has its whole year left.
    assert_eq!(status["certificate"]["days_left"], 365, "{status}");
}
