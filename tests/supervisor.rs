//! End-to-end tests of the supervisor: process tree, both listeners,
//! restarts, signals, PID 1 duties and configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[test]
fn process_tree_has_every_worker() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "3").start();
    let children = Tandem::children_of(t.pid());
    let http = children.iter().filter(|(_, c)| c == "tandem engine-worker").count();
    let https = children.iter().filter(|(_, c)| c == "tandem https-worker").count();
    assert_eq!((http, https, children.len()), (3, 1, 4), "children: {children:?}\n{}", t.explain());
    // The supervisor announces both URLs once every worker reported ready.
    let (http, https) =
        (format!("url=http://127.0.0.1:{}", t.http_port), format!("url=https://127.0.0.1:{}", t.https_port));
    wait_for(
        Duration::from_secs(10),
        "the serving lines",
        || t.explain(),
        || {
            let err = t.stderr();
            (err.contains(&http) && err.contains(&https)).then_some(())
        },
    );
}

#[test]
fn http_and_https_answer_with_the_generated_certificate() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").start();
    let body: serde_json::Value = Tandem::http_client().get(t.http_url("/")).send().unwrap().json().unwrap();
    assert_eq!(body["name"], "tandem");
    assert_eq!(body["scheme"], "http");
    assert_eq!(body["workers"], 2);

    let client = Tandem::https_client(&t.served_chain_pem());
    for host in ["localhost", "127.0.0.1"] {
        let resp =
            client.get(t.https_url(host, "/")).send().unwrap_or_else(|e| panic!("{host}: {e:?}\n{}", t.explain()));
        assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN should pick h2");
        assert!(resp.headers().contains_key("x-tandem-worker"));
        let body: serde_json::Value = resp.json().unwrap();
        assert_eq!(body["scheme"], "https", "{host}");
    }
    // An HTTP/1.1-only client works too.
    let h1 = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(t.served_chain_pem().as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let resp = h1.get(t.https_url("localhost", "/v2/health/live")).send().unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert!(resp.status().is_success());
    // Unknown routes are JSON errors.
    let resp = Tandem::http_client().get(t.http_url("/nope")).send().unwrap();
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = resp.json().unwrap();
    assert!(body["error"].is_string());
}

#[test]
fn generated_certificate_is_private_has_ip_sans_and_is_reused() {
    let b = TandemBuilder::new().ssl();
    let cache = b.dir().join("cache");
    let env_cache = cache.display().to_string();
    let (p1, p2) = free_ports();
    let mut t = b.env("PORT", &p1.to_string()).env("SSL_PORT", &p2.to_string()).start();
    let dir = t.cert_dir();
    assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    for f in ["live.pem", "generated.pem"] {
        assert_eq!(fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
    }
    let client = Tandem::https_client(&t.served_chain_pem());
    let first = served_fingerprint(&client.get(t.https_url("127.0.0.1", "/")).send().unwrap());
    let live = tandem_shared::certs::primitives::Bundle::load(&dir.join("live.pem")).unwrap();
    for san in ["DNS:localhost", "IP:127.0.0.1", "IP:::1", "DNS:*.roboflow.host"] {
        assert!(live.info.sans.contains(&san.to_string()), "{san} missing from {:?}", live.info.sans);
    }
    assert!(live.info.key_algorithm.starts_with("RSA-2048"), "{}", live.info.key_algorithm);
    t.signal(Signal::SIGTERM);
    assert!(t.wait_exit(Duration::from_secs(20)).success(), "{}", t.explain());

    // Same cache, new process: the same certificate.
    let t2 = TandemBuilder::new().ssl().env("MODEL_CACHE_DIR", &env_cache).start();
    let client = Tandem::https_client(&t2.served_chain_pem());
    let second = served_fingerprint(&client.get(t2.https_url("localhost", "/")).send().unwrap());
    assert_eq!(first, second, "generated certificate was not reused\n{}", t2.explain());
}

#[test]
fn killed_worker_is_replaced_while_the_port_keeps_answering() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").start();
    let before = t.workers("engine-worker");
    assert_eq!(before.len(), 2, "{}", t.explain());
    kill(before[0], Signal::SIGKILL).unwrap();
    let http = Tandem::http_client();
    let replaced = t.wait_replaced(Duration::from_secs(10), "engine-worker", before[0], 2);
    assert!(replaced.contains(&before[1]), "the healthy worker must be left alone");
    // The port never closed: the surviving worker and the new one answer.
    for _ in 0..20 {
        let resp = http.get(t.http_url("/v2/health/ready")).send().unwrap();
        assert!(resp.status().is_success());
    }
    // The HTTPS worker is restarted too.
    let https = t.workers("https-worker");
    kill(https[0], Signal::SIGKILL).unwrap();
    t.wait_replaced(Duration::from_secs(10), "https-worker", https[0], 1);
    let client = Tandem::https_client(&t.served_chain_pem());
    wait_for(
        Duration::from_secs(10),
        "HTTPS to answer again",
        || t.explain(),
        || client.get(t.https_url("localhost", "/")).send().ok().filter(|r| r.status().is_success()),
    );
    assert!(t.stderr().contains("worker died; restarting"), "{}", t.explain());
}

#[test]
fn sigterm_stops_cleanly_with_no_worker_left() {
    let mut t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").start();
    let workers: Vec<Pid> = Tandem::children_of(t.pid()).into_iter().map(|(p, _)| p).collect();
    assert_eq!(workers.len(), 3);
    t.signal(Signal::SIGTERM);
    let status = t.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", t.explain());
    for w in workers {
        assert_eq!(process_state(w), None, "worker {w} outlived the supervisor");
    }
    assert!(Tandem::http_client().get(t.http_url("/")).send().is_err(), "port still open after stop");
}

#[test]
fn sigint_stops_cleanly_too() {
    let mut t = TandemBuilder::new().start();
    t.signal(Signal::SIGINT);
    assert_eq!(t.wait_exit(Duration::from_secs(20)).code(), Some(0), "{}", t.explain());
}

#[test]
fn ttin_and_ttou_scale_engine_workers() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "1").env("MAX_WORKERS", "2").start();
    t.signal(Signal::SIGTTIN);
    wait_for(
        Duration::from_secs(10),
        "a second worker",
        || t.explain(),
        || (t.workers("engine-worker").len() == 2).then_some(()),
    );
    // MAX_WORKERS is a ceiling: two more SIGTTIN add nobody, one warning each.
    for _ in 0..2 {
        t.signal(Signal::SIGTTIN);
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for(
        Duration::from_secs(10),
        "two refused SIGTTIN",
        || t.explain(),
        || (t.stderr().matches("SIGTTIN ignored").count() == 2).then_some(()),
    );
    assert_eq!(t.workers("engine-worker").len(), 2, "{}", t.explain());
    t.signal(Signal::SIGTTOU);
    wait_for(
        Duration::from_secs(10),
        "back to one worker",
        || t.explain(),
        || (t.workers("engine-worker").len() == 1).then_some(()),
    );
    // Never below one.
    t.signal(Signal::SIGTTOU);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(t.workers("engine-worker").len(), 1, "{}", t.explain());
    assert!(Tandem::http_client().get(t.http_url("/")).send().unwrap().status().is_success());
}

#[test]
fn supervisor_killed_takes_workers_with_it() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "2").start();
    let workers = t.workers("engine-worker");
    // Kill only the supervisor; the parent-death signal must end the workers.
    kill(t.pid(), Signal::SIGKILL).unwrap();
    for w in workers {
        wait_for(
            Duration::from_secs(15),
            "an orphaned worker to exit",
            || t.explain(),
            || matches!(process_state(w), None | Some('Z')).then_some(()),
        );
    }
}

#[test]
fn pid1_reaps_orphans_and_stops_cleanly() {
    let unshare_ok = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(unshare_ok, "unshare --pid --fork --mount-proc must work here (run as root)");
    let mut t =
        TandemBuilder::new().wrapped(&["unshare", "--pid", "--fork", "--mount-proc"]).env("NUM_WORKERS", "2").start();
    // The wrapper's only child is tandem, PID 1 in its namespace.
    let tandem = wait_for(
        Duration::from_secs(10),
        "tandem under unshare",
        || t.explain(),
        || Tandem::children_of(t.pid()).first().map(|(p, _)| *p),
    );
    let status = fs::read_to_string(format!("/proc/{tandem}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.split_whitespace().last() == Some("1"), "tandem is not PID 1: {nspid}");

    // Orphans: a shell inside the namespace starts sleepers and exits at once,
    // so the sleepers are re-parented to PID 1.
    let out = std::process::Command::new("nsenter")
        .args(["--target", &tandem.to_string(), "--pid", "--mount", "--", "sh", "-c", "sleep 1.5 & sleep 1.5 & exit 0"])
        .status()
        .unwrap();
    assert!(out.success());
    let sleepers = || Tandem::children_of(tandem).into_iter().filter(|(_, c)| c.starts_with("sleep")).count();
    wait_for(
        Duration::from_secs(5),
        "both orphans adopted by PID 1",
        || t.explain(),
        || (sleepers() == 2).then_some(()),
    );
    // After they exit, nothing is left: no zombie among tandem's children.
    wait_for(
        Duration::from_secs(10),
        "orphans reaped",
        || t.explain(),
        || {
            let zombies =
                Tandem::children_of(tandem).into_iter().filter(|(p, _)| process_state(*p) == Some('Z')).count();
            (sleepers() == 0 && zombies == 0).then_some(())
        },
    );
    let workers = Tandem::children_of(tandem);
    assert_eq!(workers.len(), 2, "{workers:?}");

    kill(tandem, Signal::SIGTERM).unwrap();
    let status = t.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", t.explain());
}

/// Runs tandem with `vars` and expects exit 2 naming `var`, with nothing written.
fn expect_config_error(vars: &[(&str, &str)], names: &[&str]) {
    let mut b = TandemBuilder::new().ssl();
    for (k, v) in vars {
        b = b.env(k, v);
    }
    let cache = b.dir().join("cache");
    let mut t = b.spawn();
    let status = t.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{vars:?}\n{}", t.explain());
    let err = t.stderr();
    for name in names {
        assert!(err.contains(name), "{name} not named in the error for {vars:?}\n{}", t.explain());
    }
    assert!(err.contains("expected") || err.contains("tried") || err.contains("match"), "no accepted values\n{err}");
    assert!(!cache.exists(), "cache written despite bad config {vars:?}");
    assert!(Tandem::http_client().get(t.http_url("/")).send().is_err(), "port bound despite bad config");
}

#[test]
fn every_bad_variable_exits_2_naming_it() {
    expect_config_error(&[("PORT", "abc")], &["PORT"]);
    expect_config_error(&[("PORT", "70000")], &["PORT"]);
    expect_config_error(&[("NUM_WORKERS", "0")], &["NUM_WORKERS"]);
    expect_config_error(&[("NUM_WORKERS", "300")], &["NUM_WORKERS", "1-256"]);
    expect_config_error(&[("NUM_WORKERS", "4"), ("MAX_WORKERS", "3")], &["MAX_WORKERS", "4-256"]);
    expect_config_error(&[("ENABLE_SSL", "maybe")], &["ENABLE_SSL", "true/false"]);
    expect_config_error(&[("SSL_CERTIFICATE", "/missing.pem")], &["SSL_CERTIFICATE", "INDIRECT, GENERATE"]);
    expect_config_error(&[("HOST", "not-an-ip")], &["HOST"]);
    expect_config_error(&[("LOG_FORMAT", "xml")], &["LOG_FORMAT", "text or json"]);
    expect_config_error(&[("GRACEFUL_TIMEOUT", "-1")], &["GRACEFUL_TIMEOUT"]);
    expect_config_error(&[("GRACEFUL_TIMEOUT", "2d")], &["GRACEFUL_TIMEOUT", "with a unit"]);
    expect_config_error(&[("LOG_LEVEL", "verbose")], &["LOG_LEVEL"]);
    expect_config_error(&[("LOG_LEVEL", "off")], &["LOG_LEVEL", "fatal errors"]);
    for bad in ["10.0.0.0/33", "10.0.0.1,example.com", "::ffff:10.0.0.0/95", "fd00::/129", ","] {
        expect_config_error(&[("TRUSTED_PROXIES", bad)], &["TRUSTED_PROXIES", "CIDR"]);
    }
    // All at once: every one is reported.
    expect_config_error(
        &[("PORT", "abc"), ("NUM_WORKERS", "0"), ("ENABLE_SSL", "maybe"), ("SSL_CERTIFICATE", "/missing.pem")],
        &["PORT", "NUM_WORKERS", "ENABLE_SSL", "SSL_CERTIFICATE", "4 problems"],
    );
}

#[test]
fn taken_port_is_one_clear_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let mut t = TandemBuilder::new().env("PORT", &port.to_string()).spawn();
    let status = t.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", t.explain());
    assert!(t.stderr().contains(&format!("127.0.0.1:{port}")), "address not named\n{}", t.explain());
    assert!(Tandem::children_of(t.pid()).is_empty());
}

#[test]
fn environment_values_that_are_not_utf8_never_panic() {
    // A variable tandem does not read: ignored, and passed to no worker.
    let t = TandemBuilder::new().env_bytes("SOME_OTHER_TOOL", b"caf\xe9").start();
    assert_eq!(Tandem::http_client().get(t.http_url("/v2/health/live")).send().unwrap().status(), 200);
    drop(t);
    // One it reads: exit 2 naming it, nothing written.
    let b = TandemBuilder::new().env_bytes("PORT", b"90\xff1");
    let cache = b.dir().join("cache");
    let mut t = b.spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(20)).code(), Some(2), "{}", t.explain());
    assert!(t.stderr().contains("PORT=") && t.stderr().contains("valid UTF-8"), "{}", t.explain());
    assert!(!cache.exists());
}

#[test]
fn check_names_the_serve_mode_and_every_ignored_variable() {
    let run = |vars: &[(&str, &str)]| {
        let out =
            std::process::Command::new(TANDEM).arg("check").env_clear().envs(vars.iter().copied()).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) =
        run(&[("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "GENERATE"), ("SSL_INDIRECT_URL", "https://example.com/")]);
    assert_eq!(code, Some(0));
    assert!(out.contains("serve mode: generate"), "{out}");
    assert!(out.contains("SSL_INDIRECT_URL: SSL_CERTIFICATE is not INDIRECT"), "{out}");
    let (code, _, err) = run(&[("SSL_CLIENT_AUTH", "required")]);
    assert_eq!(code, Some(2), "a conflict is exit 2");
    assert!(err.contains("SSL_CLIENT_AUTH"), "{err}");
    // The supervisor says the same at start-up.
    let t = TandemBuilder::new().env("SSL_HSTS", "max-age=60").start();
    assert!(t.stderr().contains("variable set but ignored") && t.stderr().contains("SSL_HSTS"), "{}", t.explain());
}

#[test]
fn a_misspelt_variable_is_named_with_what_was_meant_and_strict_config_refuses_it() {
    // Start-up: a warning with the name meant; plain HTTP serves as before.
    let t = TandemBuilder::new().env("ENABLE_SLL", "true").env("NUM_WORKER", "2").start();
    let err = t.stderr();
    assert!(err.contains("ENABLE_SLL") && err.contains("did you mean ENABLE_SSL?"), "{}", t.explain());
    assert!(err.contains("NUM_WORKER") && err.contains("did you mean NUM_WORKERS?"), "{}", t.explain());
    drop(t);
    // tandem check lists them.
    let out = std::process::Command::new(TANDEM)
        .arg("check")
        .env_clear()
        .env("ENABLE_SLL", "true")
        .env("HOME", "/root")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("ENABLE_SLL is not one of tandem's variables (did you mean ENABLE_SSL?)"), "{text}");
    assert!(!text.contains("HOME is not"), "an ordinary variable is not a misspelling: {text}");
    // STRICT_CONFIG=true: exit 2 naming it, nothing bound or written.
    expect_config_error(
        &[("STRICT_CONFIG", "true"), ("ENABLE_SLL", "true")],
        &["STRICT_CONFIG", "ENABLE_SLL", "ENABLE_SSL"],
    );
}

#[test]
fn log_level_warning_means_warn() {
    let t = TandemBuilder::new().env("LOG_LEVEL", "warning").env("SSL_HSTS", "max-age=60").start();
    let err = t.stderr();
    assert!(err.contains("variable set but ignored"), "warnings are shown\n{}", t.explain());
    assert!(!err.contains("serving HTTP"), "info lines are not\n{}", t.explain());
}

#[test]
fn a_fatal_error_reaches_stderr_whatever_the_filter() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    // A filter that lets nothing of the supervisor's own through.
    let mut t =
        TandemBuilder::new().env("PORT", &port.to_string()).env("LOG_LEVEL", "tandem_engine_worker=error").spawn();
    assert_eq!(t.wait_exit(Duration::from_secs(10)).code(), Some(1), "{}", t.explain());
    assert!(t.stderr().contains(&format!("127.0.0.1:{port}")), "the fatal error is on stderr\n{}", t.explain());
}
