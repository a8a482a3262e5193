//! The rolling-update drill (`scripts/rolling-update`) with the binary of this
//! test run: two containers behind HAProxy under mixed HTTP/HTTPS load,
//! replaced one at a time; no request may fail. Skipped, saying so, where
//! there is no Docker Engine.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

use std::process::Command;

#[test]
fn a_rolling_update_behind_haproxy_fails_no_request() {
    let docker = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
    if !docker.is_ok_and(|o| o.status.success()) {
        eprintln!("rolling-update drill skipped: no Docker Engine answers `docker info` here");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/scripts/rolling-update"))
        .args(["--seconds-between", "2", "--clients", "4", "--binary", env!("CARGO_BIN_EXE_tandem")])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("**0 failed of "), "{report}");
    // Both containers were really replaced, each old one exiting 0 after its drain.
    for slot in ["s1", "s2"] {
        assert!(report.lines().any(|l| l.starts_with(&format!("| {slot} | 0 |"))), "{report}");
    }
}
