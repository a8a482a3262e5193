//! The Kubernetes manifests in deploy/kubernetes: every kustomize overlay
//! built (with and without the monitoring component), validated offline
//! against the Kubernetes schemas (kubernetes-validate, from PyPI), checked
//! for what the objects need of each other and of tandem, and each
//! Deployment's environment accepted by `tandem check`
//! (tests/python/check_kubernetes.py). Skipped, saying so, without kubectl.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

use std::process::Command;

#[test]
fn the_kubernetes_manifests_validate_and_fit_tandem() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/tests/python/check_kubernetes.py"))
        .arg(root)
        .arg(env!("CARGO_BIN_EXE_tandem"))
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    if said.contains("skip: kubectl") {
        eprintln!("Kubernetes manifests test skipped: {said}");
        return;
    }
    assert!(said.contains("ok: every manifest checked"), "{said}");
}
