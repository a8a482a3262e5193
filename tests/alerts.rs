//! The Prometheus rules in deploy/prometheus: they load (`promtool check
//! rules`), each alert fires exactly when its unit test says and the others
//! stay silent (`promtool test rules tests/prometheus/tandem-rules.test.yaml`),
//! and every metric they name is one a real tandem exports.
//!
//! Skipped, saying so, where promtool (Debian's `prometheus`) is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;

fn promtool() -> bool {
    Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_rules_load_and_fire_exactly_when_their_unit_tests_say() {
    if !promtool() {
        eprintln!("alert rules test skipped: promtool is not installed (Debian's prometheus package)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let check = Command::new("promtool")
        .args(["check", "rules", "deploy/prometheus/tandem-rules.yaml"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new("promtool")
        .args(["test", "rules", "tandem-rules.test.yaml"])
        .current_dir(root.join("tests/prometheus"))
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

#[test]
fn every_metric_the_rules_name_is_exported_by_tandem() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/tandem-rules.yaml")).unwrap();
    // Metric names: `tandem_` words (recording rules are `tandem:`), outside comments.
    let named: BTreeSet<String> = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map(String::from).collect::<Vec<_>>())
        .filter(|w| w.starts_with("tandem_"))
        .collect();
    assert!(named.len() >= 6, "{named:?}");
    let t = TandemBuilder::new().ssl().start();
    let client = Tandem::http_client();
    let r = client.post(t.http_url("/v2/models/digits/infer")).body(digits_body(1)).send().unwrap();
    assert!(r.status().is_success());
    let exposition = client.get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in &named {
        assert!(exported.contains(name.as_str()), "the rules name {name}, which tandem does not export:\n{exposition}");
    }
}
