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

use common::docker::run;
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
    // Each must succeed; a failure shows promtool's report.
    run(Command::new("promtool").args(["check", "rules", "deploy/prometheus/tandem-rules.yaml"]).current_dir(root));
    run(Command::new("promtool")
        .args(["test", "rules", "tandem-rules.test.yaml"])
        .current_dir(root.join("tests/prometheus")));
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
    // A repository with a model that serves and one that cannot load.
    let repo = tempfile::tempdir().unwrap();
    copy_digits(repo.path(), "digits", "");
    broken_model(repo.path(), "broken");
    // Live, not ready: with a model unavailable the server is not ready (strict readiness).
    let t = TandemBuilder::new().ssl().env("MODEL_REPOSITORY", repo.path().to_str().unwrap()).start_live();
    let client = Tandem::http_client();
    wait_for(
        std::time::Duration::from_secs(60),
        "the models loaded or failed",
        || t.explain(),
        || {
            client
                .post(t.http_url("/v2/models/digits/infer"))
                .body(digits_body(1))
                .send()
                .ok()
                .filter(|r| r.status().is_success())
        },
    );
    let exposition = client.get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    // The model state the availability alerts read.
    assert!(exposition.contains("tandem_model_ready{model=\"digits\"} 1\n"), "{exposition}");
    assert!(exposition.contains("tandem_model_ready{model=\"broken\"} 0\n"), "{exposition}");
    let ready = client.get(t.http_url("/v2/health/ready")).send().unwrap().status().is_success();
    assert!(exposition.contains(&format!("tandem_ready {}\n", u8::from(ready))), "ready={ready}\n{exposition}");
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in &named {
        assert!(exported.contains(name.as_str()), "the rules name {name}, which tandem does not export:\n{exposition}");
    }
}
