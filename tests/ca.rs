//! End-to-end tests of the private CA: `tandem ca init|status|export|issue`
//! with real files and openssl's verifier, and `SSL_CERTIFICATE=CA` serving
//! short-lived leaves that chain to the exported root and are renewed and
//! hot-swapped by the same HTTPS worker.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn ca(cache: &Path, args: &[&str]) -> Output {
    Command::new(TANDEM).arg("ca").args(args).env_clear().env("MODEL_CACHE_DIR", cache).output().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn ca_mode_without_a_ca_exits_2_and_says_to_run_init() {
    let mut t = TandemBuilder::new().ssl().env("SSL_CERTIFICATE", "CA").spawn();
    let status = t.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{}", t.explain());
    assert!(t.stderr().contains("tandem ca init"), "{}", t.explain());
    assert!(!t.cert_dir().exists(), "nothing written before the configuration is accepted");
}

#[test]
fn the_ca_commands_make_export_and_issue() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let ca_dir = cache.join("ssl_certificates/ca");
    // status and export before init: a hint, exit 2.
    let out = ca(&cache, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tandem ca init"), "{}", text(&out));
    let out = ca(&cache, &["init"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&ca_dir), 0o700);
    for key in ["root.key", "intermediate.key"] {
        assert_eq!(mode(&ca_dir.join(key)), 0o600, "{key}");
    }
    // A second init never overwrites.
    let again = ca(&cache, &["init"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    let status: serde_json::Value = serde_json::from_slice(&ca(&cache, &["status", "--json"]).stdout).unwrap();
    assert_eq!(status["root_key_present"], true);
    assert!(status["intermediate_days_left"].as_i64().unwrap() >= 364, "{status}");
    assert_eq!(status["root"]["fingerprint"].as_str().unwrap().len(), 64);
    let root = ca(&cache, &["export"]);
    assert!(root.status.success());
    let root_pem = String::from_utf8(root.stdout).unwrap();
    assert_eq!(root_pem.matches("BEGIN CERTIFICATE").count(), 1, "{root_pem}");
    assert!(!root_pem.contains("PRIVATE"), "export never prints a key");
    std::fs::write(dir.path().join("root.pem"), &root_pem).unwrap();
    // A leaf for another service, as files; openssl verifies it against the root alone.
    let out_dir = dir.path().join("issued");
    std::fs::create_dir(&out_dir).unwrap();
    let out = ca(
        &cache,
        &[
            "issue",
            "--san",
            "db.internal",
            "--san",
            "10.9.8.7",
            "--days",
            "3",
            "--client",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let (cert, key) = (out_dir.join("db.internal.pem"), out_dir.join("db.internal.key"));
    assert_eq!(mode(&key), 0o600);
    let verify = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(dir.path().join("root.pem"))
        .arg("-untrusted")
        .arg(&cert)
        .arg(&cert)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify));
    let shown = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName,extendedKeyUsage", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("DNS:db.internal") && shown.contains("IP Address:10.9.8.7"), "{shown}");
    assert!(shown.contains("TLS Web Client Authentication"), "{shown}");
    // PEM on stdout without --out when stdout is no terminal, or with --out -; bad usage is exit 2.
    for args in [&["issue", "--san", "x.internal"][..], &["issue", "--san", "x.internal", "--out", "-"]] {
        let out = ca(&cache, args);
        let pem = String::from_utf8_lossy(&out.stdout);
        assert!(pem.contains("PRIVATE KEY") && pem.matches("BEGIN CERTIFICATE").count() == 2, "{}", text(&out));
    }
    // On a terminal, the key is printed only when asked for with --out -.
    let on_tty = |extra: &str| {
        let command = format!("{TANDEM} ca issue --san tty.internal {extra}");
        Command::new("script")
            .args(["-q", "-e", "-c", &command, "/dev/null"])
            .env_clear()
            .env("MODEL_CACHE_DIR", &cache)
            .env("PATH", std::env::var("PATH").unwrap())
            .output()
            .unwrap()
    };
    let refused = on_tty("");
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let said = String::from_utf8_lossy(&refused.stdout);
    assert!(!said.contains("PRIVATE KEY") && said.contains("--out"), "{}", text(&refused));
    let asked = on_tty("--out -");
    assert!(String::from_utf8_lossy(&asked.stdout).contains("PRIVATE KEY"), "{}", text(&asked));
    // Service identities: an email address and a SPIFFE ID, into a folder made 0700.
    let ids = dir.path().join("new/ids");
    let out = ca(
        &cache,
        &[
            "issue",
            "--san",
            "spiffe://cluster.local/ns/default/sa/billing-api-with-a-long-service-account-name",
            "--san",
            "alice@example.com",
            "--client",
            "--out",
            ids.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&ids), 0o700);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(until 20"), "ISO 8601: {}", text(&out));
    let pem = std::fs::read_dir(&ids).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().unwrap() == "pem");
    let shown = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(pem.unwrap())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("URI:spiffe://cluster.local/ns/default/sa/billing-api"), "{shown}");
    assert!(shown.contains("email:alice@example.com"), "{shown}");
    for bad in [
        &["issue"][..],
        &["issue", "--san", "bad name!"],
        &["issue", "--san", "a", "--days", "0"],
        &["issue", "--san", "@example.com"],
        &["issue", "--san", "://x"],
        &["frobnicate"],
    ] {
        assert_eq!(ca(&cache, bad).status.code(), Some(2), "{bad:?}");
    }
}

#[test]
fn ca_mode_serves_short_leaves_that_chain_to_the_root_and_renews_them_in_place() {
    let b = TandemBuilder::new()
        .ssl()
        .env("SSL_CERTIFICATE", "CA")
        .env("SSL_CERT_VALIDITY", "60")
        .env("SSL_SAN", "svc.example.internal");
    let cache = b.dir().join("cache");
    let out = ca(&cache, &["init"]);
    assert!(out.status.success(), "{}", text(&out));
    // The root key goes offline: the intermediate keeps issuing.
    std::fs::remove_file(cache.join("ssl_certificates/ca/root.key")).unwrap();
    let root_pem = String::from_utf8(ca(&cache, &["export"]).stdout).unwrap();
    let mut t = b.spawn();
    let client = Tandem::https_client(&root_pem);
    let url = t.https_url("localhost", "/v2/health/ready");
    let first = wait_for(
        START_DEADLINE,
        "HTTPS with a leaf from the private CA",
        || t.explain(),
        || client.get(&url).send().ok().filter(|r| r.status().is_success()).map(|r| served_fingerprint(&r)),
    );
    t.wait_ready(true);
    let https = t.workers("https-worker");
    let live = tandem_shared::certs::primitives::Bundle::load(&t.cert_dir().join("live.pem")).unwrap();
    assert_eq!(live.chain.len(), 2, "leaf and intermediate are served");
    assert!(live.info.sans.contains(&"DNS:svc.example.internal".to_string()), "{:?}", live.info.sans);
    assert!(live.info.sans.contains(&"IP:127.0.0.1".to_string()));
    let lifetime = live.info.not_after - live.info.not_before;
    assert!(
        (60..=71).contains(&lifetime),
        "SSL_CERT_VALIDITY=60 gives a one-minute leaf (plus a sixth back-dated): {lifetime}"
    );
    // `tandem cert status` names the source it describes.
    let status = Command::new(TANDEM).args(["cert", "status", "--json"]).env_clear().envs(&t.env).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["mode"], "CA", "{report}");
    assert!(report["source"].as_str().unwrap().contains("private CA"), "{report}");
    assert_eq!(report["served_fingerprint"], first.as_str());
    // Renewed at two thirds of its lifetime (~37 s after issue), swapped in by the same worker.
    let renewed = wait_for(
        Duration::from_secs(90),
        "a renewed leaf",
        || t.explain(),
        || {
            // A new connection per look: a kept-alive one shows the certificate of its handshake.
            let r = Tandem::https_client(&root_pem).get(&url).send().ok().filter(|r| r.status().is_success())?;
            let fp = served_fingerprint(&r);
            (fp != first).then_some(fp)
        },
    );
    assert_ne!(renewed, first);
    assert_eq!(t.workers("https-worker"), https, "the same HTTPS worker serves the renewed leaf");
    assert!(t.stderr().contains("issued a leaf from the private CA"), "{}", t.explain());
}

#[test]
fn the_ca_commands_write_only_new_files_and_refuse_unsafe_folders_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = ca(&cache, &["init"]);
    assert!(out.status.success(), "{}", text(&out));

    // Names no CA should certify.
    for bad in ["*.com", "123", "host.42"] {
        let out = ca(&cache, &["issue", "--san", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
    }

    // --out never writes through a symlink or over a file.
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, out_dir.join("svc.example.pem")).unwrap();
    let out = ca(&cache, &["issue", "--san", "svc.example", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    let out = ca(&cache, &["issue", "--san", "fresh.example", "--out", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&out_dir.join("fresh.example.key")), 0o600);
    let again = ca(&cache, &["issue", "--san", "fresh.example", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "an existing pair is not overwritten: {}", text(&again));

    // A CA folder that is a symlink (as `ca init` refuses) is refused by every command and by CA mode.
    let linked = dir.path().join("linked");
    std::fs::create_dir_all(linked.join("ssl_certificates")).unwrap();
    std::fs::set_permissions(linked.join("ssl_certificates"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(cache.join("ssl_certificates/ca"), linked.join("ssl_certificates/ca")).unwrap();
    for args in [&["status"][..], &["export"], &["issue", "--san", "x.example"]] {
        let out = ca(&linked, args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("symbolic link"), "{args:?}: {}", text(&out));
    }
    let mut t = TandemBuilder::new()
        .ssl()
        .env("SSL_CERTIFICATE", "CA")
        .env("MODEL_CACHE_DIR", linked.to_str().unwrap())
        .spawn();
    let status = t.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "{}", t.explain());
    assert!(t.stderr().contains("symbolic link"), "{}", t.explain());
}
