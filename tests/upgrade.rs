//! Binary upgrade (`tandem upgrade`, SIGUSR2): under keep-alive HTTP and
//! HTTPS load, the binary at tandem's path is replaced and `tandem upgrade`
//! hands the listening sockets to a new supervisor started from it; no
//! request fails, the old supervisor drains and exits 0, the new one serves
//! on the same ports. A binary that cannot start leaves the old one serving
//! (its workers still restart from its own binary) and `tandem upgrade`
//! exits 1 with the reason. As PID 1 of a pid namespace (a container),
//! tandem becomes the new binary in place and drains the workers it
//! inherited, again without a failed request.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::load::Load;
use common::*;

/// Puts `contents` at `path` as a new file (a new inode renamed over the old
/// one, as package managers and `install` do), executable.
fn replace_binary(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `tandem upgrade` run with the server's environment.
fn upgrade(t: &Tandem) -> std::process::Output {
    Command::new(TANDEM).arg("upgrade").env_clear().envs(&t.env).output().unwrap()
}

/// The pid in the pid file, once the supervisor has written it (when every worker first answers).
fn supervisor_pid(t: &Tandem) -> u32 {
    let path = Path::new(&t.env["MODEL_CACHE_DIR"]).join("tandem.pid");
    wait_for(
        Duration::from_secs(10),
        "the pid file",
        || t.explain(),
        || std::fs::read_to_string(&path).ok()?.trim().parse().ok(),
    )
}

/// HTTP/2 cleartext (prior knowledge), as gRPC clients speak to the plain port.
fn h2c_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().http2_prior_knowledge().timeout(Duration::from_secs(10)).build().unwrap()
}

/// Clients posting inferences until stopped, each its own way: HTTP/1.1
/// keep-alive, HTTP/2 cleartext, HTTPS kept alive (HTTP/2 by ALPN) and
/// HTTPS with a new connection per request; and a loop that only connects to
/// the plain port and counts refusals. Every failure is kept.
fn mixed_load(t: &Tandem, ca: &str) -> Load {
    let fresh = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .http1_only()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (plain, tls) = (t.http_url("/v2/models/digits/infer"), t.https_url("localhost", "/v2/models/digits/infer"));
    let mut load = Load::start(vec![
        ("http/1.1 keep-alive", Tandem::http_client(), plain.clone()),
        ("h2c", h2c_client(), plain),
        ("https keep-alive", Tandem::https_client(ca), tls.clone()),
        ("https new connection", fresh, tls),
    ]);
    let addr = format!("127.0.0.1:{}", t.http_port);
    load.also(move || {
        let connected = std::net::TcpStream::connect(&addr).map(drop).map_err(|e| format!("connect: {e}"));
        std::thread::sleep(Duration::from_millis(2));
        connected
    });
    load
}

/// How long a load runs on after an upgrade, and the answers it must have had (more than 100).
const LINGER: Duration = Duration::from_millis(500);
const AT_LEAST: u64 = 101;

/// An HTTP/3 client (aioquic) posting inferences on a new QUIC connection each
/// time, until stopped: on an upgrade the UDP socket passes to the new
/// HTTPS worker while the old one still reads it.
struct H3Loop {
    child: std::process::Child,
    stop: std::path::PathBuf,
    /// The served chain, in a file for aioquic.
    ca: std::path::PathBuf,
}

/// `n` QUIC handshakes begun (a first Initial each) and never continued.
fn half_open_handshakes(t: &Tandem, ca: &Path, n: usize) {
    let flood = h3(t, &["--flood", &n.to_string(), "--wait", "0.5"], ca);
    assert_eq!(flood[0]["answered_initial"], n, "{flood:?}");
}

impl H3Loop {
    fn start(t: &Tandem, chain: &str) -> H3Loop {
        let ca = t.dir.path().join("h3-ca.pem");
        std::fs::write(&ca, chain).unwrap();
        let stop = t.dir.path().join("h3-stop");
        let step = serde_json::json!([{"loop": stop.to_str().unwrap(), "method": "POST",
            "path": "/v2/models/digits/infer", "body": digits_body(2)}]);
        let child = h3_command(t, &[&step.to_string()], &ca)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        H3Loop { child, stop, ca }
    }

    fn finish_without_failures(self, t: &Tandem) {
        std::fs::write(&self.stop, b"").unwrap();
        let out = self.child.wait_with_output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{said}"));
        assert_eq!(result["failed"], serde_json::json!([]), "HTTP/3 requests failed: {said}\n{}", t.explain());
        assert!(result["ok"].as_u64().unwrap() > 5, "HTTP/3 was served throughout: {said}");
        eprintln!("HTTP/3 during the upgrade: {result}");
    }
}

#[test]
fn an_upgrade_under_load_refuses_nothing_and_the_old_supervisor_drains_away() {
    install_provider();
    let mut t = TandemBuilder::new().copied_binary().ssl().env("SSL_HTTP3", "true").env("NUM_WORKERS", "2").start();
    let old = t.pid().as_raw() as u32;
    assert_eq!(supervisor_pid(&t), old, "the pid file names the running supervisor");
    let chain = t.served_chain_pem();
    let load = mixed_load(&t, &chain);
    let h3 = H3Loop::start(&t, &chain);
    std::thread::sleep(Duration::from_millis(500));
    // QUIC handshakes left under way when the old HTTPS worker starts to
    // drain: it must still ignore new connection attempts (they are the new
    // worker's) and give these up halfway, not refuse clients or outlast
    // GRACEFUL_TIMEOUT (a drain begun with no connection set up once did both).
    half_open_handshakes(&t, &h3.ca, 5);
    // The new binary arrives at the same path (here the same build, as a new file).
    replace_binary(&t.dir.path().join("bin/tandem"), &std::fs::read(TANDEM).unwrap());
    let out = upgrade(&t);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}\n{}", t.explain());
    let new = supervisor_pid(&t);
    assert_ne!(new, old);
    assert!(said.contains(&format!("upgraded: supervisor {old} -> {new}")), "{said}");
    // The old supervisor drains and exits 0 while the load goes on.
    let status = t.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "the old supervisor: {status:?}\n{}", t.explain());
    load.finish_after(LINGER, &t, AT_LEAST);
    h3.finish_without_failures(&t);
    assert!(!t.stderr().contains("did not drain in time"), "{}", t.explain());
    // The new supervisor serves both ports with workers of its own.
    let workers: Vec<_> = Tandem::children_of(nix::unistd::Pid::from_raw(new as i32))
        .into_iter()
        .filter(|(_, c)| c.starts_with("tandem "))
        .collect();
    assert_eq!(workers.len(), 3, "two engine workers and the HTTPS worker: {workers:?}");
    let r = Tandem::http_client().post(t.http_url("/v2/models/digits/infer")).body(digits_body(1)).send().unwrap();
    assert!(r.status().is_success());
    let r = Tandem::https_client(&chain).get(t.https_url("localhost", "/v2/health/ready")).send().unwrap();
    assert!(r.status().is_success());
    assert!(t.stderr().contains("the new supervisor serves; this one drains and exits"), "{}", t.explain());
    // Stop the new one (it is in the test's process group, which Drop kills anyway).
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(new as i32), nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn an_https_request_that_outlives_the_grace_does_not_take_plain_clients_with_it() {
    // The old HTTPS worker drains first and, holding an upload that stalls,
    // is killed at GRACEFUL_TIMEOUT; its engines were told the stop began
    // (SIGUSR1) and had already closed their kept-alive plain connections,
    // so the plain clients were on the new engines by then.
    install_provider();
    let mut t =
        TandemBuilder::new().copied_binary().ssl().env("NUM_WORKERS", "2").env("GRACEFUL_TIMEOUT", "3s").start();
    let old = t.pid().as_raw() as u32;
    let plain = t.http_url("/v2/models/digits/infer");
    let load =
        Load::start(vec![("http/1.1 keep-alive", Tandem::http_client(), plain.clone()), ("h2c", h2c_client(), plain)]);
    let mut stalled = tls(t.https_port, &t.served_chain_pem(), b"http/1.1");
    stalled
        .write_all(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n{\"inputs\": [",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    replace_binary(&t.dir.path().join("bin/tandem"), &std::fs::read(TANDEM).unwrap());
    let out = upgrade(&t);
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        t.explain()
    );
    assert_ne!(supervisor_pid(&t), old);
    let status = t.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "the old supervisor: {status:?}\n{}", t.explain());
    load.finish_after(LINGER, &t, AT_LEAST);
    let log = t.stderr();
    assert!(log.contains("the stop has begun: no new connections"), "{}", t.explain());
    assert!(
        log.contains("drain timed out; exiting with requests in flight")
            || log.contains("worker did not drain in time; killing worker_id=3"),
        "the upload held the old front to the end\n{}",
        t.explain()
    );
    drop(stalled);
}

#[test]
fn a_binary_that_cannot_start_leaves_the_old_supervisor_serving() {
    let t = TandemBuilder::new().copied_binary().env("NUM_WORKERS", "1").start();
    let old = t.pid().as_raw() as u32;
    assert_eq!(supervisor_pid(&t), old);
    let binary = t.dir.path().join("bin/tandem");
    replace_binary(&binary, b"#!/bin/sh\necho 'this build is broken' >&2\nexit 3\n");
    let out = upgrade(&t);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{said}\n{}", t.explain());
    assert!(said.contains("keeps serving"), "{said}");
    assert!(t.stderr().contains("this build is broken"), "the new binary's own words reach the log\n{}", t.explain());
    // Still the old one, still serving.
    assert_eq!(supervisor_pid(&t), old);
    let r = Tandem::http_client().post(t.http_url("/v2/models/digits/infer")).body(digits_body(1)).send().unwrap();
    assert!(r.status().is_success());
    // A binary whose configuration is refused (a wrapper that breaks PORT): the same.
    replace_binary(&binary, format!("#!/bin/sh\nPORT=notaport exec {TANDEM} \"$@\"\n").as_bytes());
    let out = upgrade(&t);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{said}\n{}", t.explain());
    assert!(t.stderr().contains("notaport"), "the refused value is in the log\n{}", t.explain());
    assert_eq!(supervisor_pid(&t), old);
    // A worker that dies now is restarted from the supervisor's own binary,
    // not from the broken file at its path.
    let victim = t.workers("engine-worker")[0];
    nix::sys::signal::kill(victim, nix::sys::signal::Signal::SIGKILL).unwrap();
    t.wait_replaced(Duration::from_secs(20), "engine-worker", victim, 1);
    let serves = || {
        Tandem::http_client()
            .post(t.http_url("/v2/models/digits/infer"))
            .body(digits_body(1))
            .send()
            .ok()
            .filter(|r| r.status().is_success())
    };
    wait_for(Duration::from_secs(20), "the restarted worker serving", || t.explain(), serves);
    // And once the binary is good again, the upgrade goes through.
    replace_binary(&binary, &std::fs::read(TANDEM).unwrap());
    let out = upgrade(&t);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_ne!(supervisor_pid(&t), old);
}

#[test]
fn as_pid_1_tandem_becomes_the_new_binary_in_place_and_drains_the_old_workers() {
    install_provider();
    // tandem as PID 1 of its own pid namespace, as in a container.
    let t = TandemBuilder::new()
        .copied_binary()
        .wrapped(&["unshare", "--pid", "--fork", "--mount-proc"])
        .ssl()
        .env("NUM_WORKERS", "2")
        .start();
    assert_eq!(supervisor_pid(&t), 1, "PID 1 in its namespace");
    let host_pid = Tandem::children_of(t.pid()).first().map(|(p, _)| *p).expect("tandem under unshare");
    let before: Vec<_> = Tandem::children_of(host_pid).into_iter().map(|(p, _)| p).collect();
    assert_eq!(before.len(), 3, "{before:?}");
    // `tandem upgrade` from inside the namespace (as `docker exec` runs it).
    let upgrade_inside = || {
        let out = Command::new("nsenter")
            .args(["--target", &host_pid.to_string(), "--pid", "--mount", "--"])
            .arg(TANDEM)
            .arg("upgrade")
            .env_clear()
            .envs(&t.env)
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out, said)
    };
    // A binary that fails its check first: refused before this process stops being the old one.
    let binary = t.dir.path().join("bin/tandem");
    replace_binary(&binary, b"#!/bin/sh\necho 'this build is broken' >&2\nexit 3\n");
    let (out, said) = upgrade_inside();
    assert_eq!(out.status.code(), Some(1), "{said}\n{}", t.explain());
    assert!(said.contains("this build is broken") && said.contains("keeps serving"), "{said}");
    assert_eq!(Tandem::children_of(host_pid).len(), 3, "the old workers still serve");
    let chain = t.served_chain_pem();
    let load = mixed_load(&t, &chain);
    std::thread::sleep(Duration::from_millis(500));
    replace_binary(&binary, &std::fs::read(TANDEM).unwrap());
    let (out, said) = upgrade_inside();
    assert!(out.status.success(), "{said}\n{}", t.explain());
    assert!(said.contains("upgraded: supervisor 1 -> 1"), "{said}");
    // Same process, new binary: the old workers drain and go, new ones serve.
    wait_for(
        Duration::from_secs(30),
        "the old workers gone",
        || t.explain(),
        || before.iter().all(|p| process_state(*p).is_none()).then_some(()),
    );
    load.finish_after(LINGER, &t, AT_LEAST);
    let after: Vec<_> = Tandem::children_of(host_pid).into_iter().filter(|(_, c)| c.starts_with("tandem ")).collect();
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(t.stderr().contains("becoming the new binary in place"), "{}", t.explain());
    assert!(t.stderr().contains("a worker of the previous binary drained and exited"), "{}", t.explain());
    let r = Tandem::https_client(&chain)
        .post(t.https_url("localhost", "/v2/models/digits/infer"))
        .body(digits_body(1))
        .send();
    assert!(r.unwrap().status().is_success());
}

/// Descriptors a process holds, and how many of them are memfd regions.
fn descriptors(pid: u32) -> (usize, usize) {
    let mut all = 0;
    let mut memfds = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        all += 1;
        if std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:")) {
            memfds += 1;
        }
    }
    (all, memfds)
}

/// Live (not zombie) processes in process group `pgid`.
fn live_in_group(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, a)| a).split_whitespace().collect();
            after.first() != Some(&"Z") && after.get(2) == Some(&pgid.to_string().as_str())
        })
        .collect()
}

#[test]
fn ten_upgrades_in_a_row_under_mixed_load_refuse_nothing_and_leak_nothing() {
    install_provider();
    let mut t = TandemBuilder::new().copied_binary().ssl().env("NUM_WORKERS", "2").start();
    let first = supervisor_pid(&t);
    // Settled: every worker serving, the metrics of the first start done.
    std::thread::sleep(Duration::from_millis(500));
    let held = descriptors(first);
    let chain = t.served_chain_pem();
    let load = mixed_load(&t, &chain);
    let mut supervisors = vec![first];
    for round in 0..10 {
        replace_binary(&t.dir.path().join("bin/tandem"), &std::fs::read(TANDEM).unwrap());
        let out = upgrade(&t);
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "upgrade {round}: {said}\n{}", t.explain());
        let new = supervisor_pid(&t);
        assert!(!supervisors.contains(&new), "upgrade {round}: still {new}");
        supervisors.push(new);
    }
    let last = *supervisors.last().unwrap();
    // Every previous supervisor has drained and gone (the first is our child).
    assert!(t.wait_exit(Duration::from_secs(30)).success(), "{}", t.explain());
    wait_for(
        Duration::from_secs(30),
        "the previous supervisors gone",
        || t.explain(),
        || {
            supervisors[..10]
                .iter()
                .all(|p| process_state(nix::unistd::Pid::from_raw(*p as i32)).is_none_or(|s| s == 'Z'))
                .then_some(())
        },
    );
    load.finish_after(LINGER, &t, AT_LEAST);
    // What is left: the last supervisor and its three workers, holding what the first held.
    let group = live_in_group(first);
    assert_eq!(group.len(), 4, "processes left in the group: {group:?}");
    assert!(group.contains(&last));
    assert_eq!(descriptors(last), held, "(descriptors, memfd regions) of the first and the last supervisor");
}

#[test]
fn under_systemd_the_new_supervisor_is_handed_main_and_pings_the_watchdog() {
    // A datagram socket stands in for systemd's NOTIFY_SOCKET.
    let b = TandemBuilder::new().copied_binary().env("NUM_WORKERS", "1").env("WATCHDOG_USEC", "1000000");
    let sock_path = b.dir().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // systemd names the main process in WATCHDOG_PID (here: the shell that becomes tandem).
    let mut t = b
        .env("NOTIFY_SOCKET", sock_path.to_str().unwrap())
        .wrapped(&["sh", "-c", "WATCHDOG_PID=$$ exec \"$0\""])
        .start();
    let read_until = |want: &str, within: Duration| {
        let deadline = std::time::Instant::now() + within;
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = notify.recv(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
                if seen.contains(want) {
                    return seen;
                }
            }
        }
        panic!("no {want:?} within {within:?}; got:\n{seen}");
    };
    read_until("READY=1", Duration::from_secs(30));
    replace_binary(&t.dir.path().join("bin/tandem"), &std::fs::read(TANDEM).unwrap());
    let out = upgrade(&t);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let new = supervisor_pid(&t);
    // The old main process hands the service to the new one, and does not say it is stopping.
    let seen = read_until(&format!("MAINPID={new}"), Duration::from_secs(10));
    assert!(t.wait_exit(Duration::from_secs(30)).success(), "{}", t.explain());
    // Whatever the old one sent is read; what comes next is the new one's: it pings the watchdog.
    let mut buf = [0u8; 4096];
    let mut before_exit = seen;
    while let Ok(n) = notify.recv(&mut buf) {
        before_exit.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let after = read_until("WATCHDOG=1", Duration::from_secs(3));
    assert!(!before_exit.contains("STOPPING=1") && !after.contains("STOPPING=1"), "{before_exit}{after}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(new as i32), nix::sys::signal::Signal::SIGTERM);
}
