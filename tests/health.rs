//! End-to-end tests of `tandem health`: exit 0 with both listeners ready
//! (HTTPS pinned to the published certificate), 1 when the server is gone or
//! not ready, 2 on bad usage.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn health(t: &Tandem, args: &[&str]) -> Output {
    Command::new(TANDEM).arg("health").args(args).env_clear().envs(&t.env).output().unwrap()
}

fn show(o: &Output) -> String {
    format!("{:?}\n{}{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn health_follows_the_server_it_describes() {
    let mut t = TandemBuilder::new().ssl().env("HOST", "0.0.0.0").start();
    let out = health(&t, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("http 200") && said.contains("https 200 (certificate "), "{said}");
    assert_eq!(health(&t, &["--live"]).status.code(), Some(0));
    assert_eq!(health(&t, &["--bogus"]).status.code(), Some(2));
    t.signal(nix::sys::signal::Signal::SIGTERM);
    t.wait_exit(Duration::from_secs(20));
    let out = health(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"), "{}", show(&out));
}

#[test]
fn a_server_that_is_live_but_not_ready_is_unhealthy_but_live() {
    let b = TandemBuilder::new();
    let repo = b.dir().join("repo");
    std::fs::create_dir_all(repo.join("broken/1")).unwrap();
    std::fs::write(repo.join("broken/1/model.onnx"), b"not a model").unwrap();
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start_live();
    let out = health(&t, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("503"), "{}", show(&out));
    assert_eq!(health(&t, &["--live"]).status.code(), Some(0), "{}", show(&health(&t, &["--live"])));
}
