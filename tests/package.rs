//! The Debian package, for real: `cargo deb` packages this run's binary, a
//! Debian container (made here: scripts/test-base --systemd) installs it with
//! `dpkg -i`, the `tandem` user exists, `systemd-socket-activate` holds the
//! port and starts the installed binary as that user on the first connection,
//! which is served with the packaged model; `dpkg -r` then leaves nothing of
//! tandem but its cache, and `dpkg --purge` takes the cache and the user too.
//!
//! Skipped, saying so, where there is no Docker Engine or no cargo-deb.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::docker::{docker_available, run, text, Container};
use common::*;

fn available(program: &[&str]) -> bool {
    Command::new(program[0]).args(&program[1..]).output().is_ok_and(|o| o.status.success())
}

/// The uids the container's tandem processes run as, one per line.
const TANDEM_UIDS: &str = r#"for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = tandem ] && awk '/^Uid:/ {print $2}' $p/status; done | sort -u"#;

#[test]
fn the_debian_package_installs_serves_under_socket_activation_and_leaves_only_its_cache() {
    if !docker_available() {
        eprintln!("skipped: no Docker Engine");
        return;
    }
    if !available(&["cargo", "deb", "--version"]) {
        eprintln!("skipped: cargo-deb is not installed (cargo install cargo-deb --locked)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    // This run's binary, from the target directory it was built in.
    let target = Path::new(TANDEM).parent().and_then(Path::parent).unwrap();
    run(Command::new("cargo")
        .args(["deb", "--no-build", "--locked", "-o"])
        .arg(dir.path().join("tandem.deb"))
        .env("CARGO_TARGET_DIR", target)
        .current_dir(root));
    let base = text(&run(Command::new("bash").arg(root.join("scripts/test-base")).arg("--systemd")));
    let name = format!("tandem-package-test-{}", std::process::id());
    let mount = format!("{}:/pkg:ro", dir.path().display());
    run(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &name,
        "-p",
        "127.0.0.1::9001",
        "-v",
        &mount,
        &base,
        "sleep",
        "infinity",
    ]));
    let c = Container(name);

    c.exec("dpkg -i /pkg/tandem.deb");
    let uid = c.exec("id -u tandem");
    assert!(uid.parse::<u32>().unwrap() < 1000, "a system user: {uid}");
    c.exec("test -x /usr/bin/tandem && test -f /usr/share/tandem/models/digits/1/model.onnx");
    c.exec("test -f /lib/systemd/system/tandem.socket && test -f /usr/share/doc/tandem/DEPLOYMENT.md");
    // As tandem.socket and tandem.service would: the socket held outside, the
    // cache as systemd's CacheDirectory makes it, the binary found by name.
    c.exec("install -d -o tandem -g tandem -m 0700 /var/cache/tandem");
    run(Command::new("docker").args([
        "exec",
        "-d",
        &c.0,
        "sh",
        "-c",
        "exec setpriv --reuid tandem --regid tandem --init-groups systemd-socket-activate -l 0.0.0.0:9001 \
         --fdname=http -E MODEL_CACHE_DIR=/var/cache/tandem -E PATH=/usr/bin:/bin /usr/bin/tandem \
         >/var/log/server.log 2>&1",
    ]));
    let port = c.port(9001);
    let http = Tandem::http_client();
    let url = format!("http://127.0.0.1:{port}");
    let logs = || {
        Command::new("docker")
            .args(["exec", &c.0, "cat", "/var/log/server.log"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    // The first connection starts tandem; it is served once the engine is ready.
    wait_for(Duration::from_secs(60), "the packaged tandem to answer", logs, || {
        http.get(format!("{url}/v2/health/ready")).send().ok().filter(|r| r.status() == 200).map(|_| ())
    });
    let r = http.post(format!("{url}/v2/models/digits/infer")).body(digits_body(0)).send().unwrap();
    assert_eq!(r.status(), 200, "{}", logs());
    let answer: serde_json::Value = r.json().unwrap();
    assert_eq!(answer["outputs"][0]["name"], "probabilities", "{answer}");
    assert!(logs().contains("using a listener passed by systemd"), "{}", logs());
    assert_eq!(c.exec(TANDEM_UIDS), uid, "every tandem process runs as the tandem user");
    assert_eq!(c.exec("stat -c '%U %a' /var/cache/tandem"), "tandem 700");

    // Stopped, then removed: nothing of tandem is left but its cache.
    c.exec(
        r#"for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = tandem ] && kill -TERM ${p#/proc/}; done; true"#,
    );
    wait_for(Duration::from_secs(20), "tandem to stop", logs, || c.exec(TANDEM_UIDS).is_empty().then_some(()));
    c.exec("dpkg -r tandem");
    let left = c.exec(
        "find / -xdev \\( -path /proc -o -path /sys -o -path /pkg -o -path /var/lib/dpkg \\) -prune -o \
         -name '*tandem*' -print | sort",
    );
    assert_eq!(left, "/var/cache/tandem", "left behind after dpkg -r:\n{left}");
    c.exec("dpkg --purge tandem");
    c.exec("test ! -e /var/cache/tandem && ! getent passwd tandem");
}
