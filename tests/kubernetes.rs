//! The Kubernetes manifests in deploy/kubernetes, validated offline against the
//! Kubernetes schemas (kubernetes-validate, from PyPI) and checked for what
//! tandem needs of them (tests/python/check_kubernetes.py).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

use std::process::Command;

#[test]
fn the_kubernetes_manifests_validate_and_fit_tandem() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out =
        Command::new("python3").arg(format!("{root}/tests/python/check_kubernetes.py")).arg(root).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert!(said.contains("ok: every manifest checked"), "{said}");
}
