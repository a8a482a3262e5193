//! The container image, for real: built from the repository's Dockerfile
//! (`--target prebuilt`, with the binary built for this test run, stripped) on
//! a Debian base made locally with debootstrap and `docker import` (no
//! registry here), then run: tandem is PID 1, HTTP and HTTPS answer, an
//! orphaned grandchild is reaped, the cache on a mounted directory is 0700 /
//! 0600 and owned by the container user, a Kubernetes-style `..data` secret
//! swap is served by the same HTTPS worker, a new binary put at tandem's
//! path is taken in place by `tandem upgrade` (PID 1 stays, the workers are
//! new), the health check turns healthy, and `docker stop` drains and exits 0
//! within GRACEFUL_TIMEOUT.
//!
//! Skipped, saying so, where there is no Docker Engine. With
//! `TANDEM_TEST_IMAGE` set, the same checks run on that image instead
//! (`scripts/test-image --from-source`: the default target, built from source).
//!
//! Also: the Dockerfile's dependency layer loads the workspace, and the
//! guard that says so (`scripts/check-dockerfile`) fails on one that forgets
//! a workspace member.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::docker::{docker_available, run, text, Container};
use common::*;

const UID: u32 = 10001;

/// Builds the image (`scripts/test-image`: the `prebuilt` target on a locally made base, with this run's binary).
fn build_image(tag: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    run(Command::new("bash").arg(root.join("scripts/test-image")).arg(TANDEM).arg(tag));
}

impl Container {
    fn inspect(&self, format: &str) -> String {
        text(&run(Command::new("docker").args(["inspect", "-f", format, &self.0])))
    }

    fn logs(&self) -> String {
        let out = Command::new("docker").args(["logs", &self.0]).output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// The pid (in the container) of the process whose argv[1] is `role`.
    fn pid_of(&self, role: &str) -> String {
        self.exec(&format!(
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline | grep -q '^tandem {role}' && basename $p; done; true"
        ))
    }
}

/// A Kubernetes-style secret volume: `..data` points at a timestamped directory, the files point through it.
fn secret_volume(dir: &Path, issued: &pki::Issued, generation: u32) {
    let real = dir.join(format!("..2026_12_02_{generation}"));
    issued.write(&real, "tls.crt", "tls.key");
    for f in ["tls.crt", "tls.key"] {
        std::os::unix::fs::chown(real.join(f), Some(UID), Some(UID)).unwrap();
    }
    std::os::unix::fs::chown(&real, Some(UID), Some(UID)).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(real.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(dir.join(f)).is_err() {
            symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
    }
}

fn served(port: u16, ca: &str) -> Option<String> {
    let r = Tandem::https_client(ca).get(format!("https://localhost:{port}/v2/health/ready")).send().ok()?;
    r.status().is_success().then(|| served_fingerprint(&r))
}

#[test]
fn the_image_runs_tandem_as_pid_1_and_behaves_as_a_container_entrypoint() {
    if !docker_available() {
        eprintln!("image test skipped: no Docker Engine answers `docker info` here");
        return;
    }
    // TANDEM_TEST_IMAGE: an image built elsewhere (`scripts/test-image
    // --from-source` builds the default target), checked the same way and kept.
    let given = std::env::var("TANDEM_TEST_IMAGE").ok();
    let tag = given.clone().unwrap_or_else(|| format!("tandem-test:{}", std::process::id()));
    if given.is_none() {
        build_image(&tag);
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The cache: a host directory the container user owns.
    let cache = work.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(UID), Some(UID)).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    // The certificate: a secret volume, as cert-manager's would be mounted.
    let ca = pki::TestCa::new();
    let secret = work.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    let (first, second) = (ca.issue(), ca.issue());
    secret_volume(&secret, &first, 1);
    // A repository of the built-in digits and a scikit-learn text pipeline, whose
    // StringNormalizer needs the en_US.UTF-8 locale the image carries.
    let models = work.path().join("models");
    let generated = work.path().join("generated");
    std::fs::create_dir(&models).unwrap();
    make_test_models(&generated);
    for (from, to) in
        [(generated.join("text"), "text"), (Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits"), "digits")]
    {
        run(Command::new("cp").arg("-r").arg(&from).arg(models.join(to)));
    }
    run(Command::new("chmod").args(["-R", "a+rX"]).arg(&models));
    let name = format!("tandem-test-{}", std::process::id());
    let out = run(Command::new("docker")
        .args(["run", "-d", "--name", &name, "-p", "127.0.0.1::9001", "-p", "127.0.0.1::9002"])
        .args([
            "-e",
            "ENABLE_SSL=true",
            "-e",
            "SSL_CERTIFICATE=/certs/tls.crt",
            "-e",
            "GRACEFUL_TIMEOUT=10",
            "-e",
            "NUM_WORKERS=2",
            "-e",
            "MODEL_REPOSITORY=/models",
        ])
        .arg("-v")
        .arg(format!("{}:/models:ro", models.display()))
        .arg("-v")
        .arg(format!("{}:/var/cache/tandem", cache.display()))
        .arg("-v")
        .arg(format!("{}:/certs:ro", secret.display()))
        .arg(&tag));
    let c = Container(text(&out));
    let _image = given.is_none().then(|| ImageGuard(tag.clone()));
    let (http, https) = (c.port(9001), c.port(9002));
    let client = Tandem::http_client();
    wait_for(
        START_DEADLINE,
        "HTTP from the container",
        || c.logs(),
        || {
            client
                .get(format!("http://127.0.0.1:{http}/v2/health/ready"))
                .send()
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        },
    );
    let fp = wait_for(START_DEADLINE, "HTTPS from the container", || c.logs(), || served(https, &ca.pem));
    assert_eq!(fp, first.fingerprint);
    // PID 1, as the non-root user, with ONNX Runtime loaded.
    assert_eq!(c.exec("cat /proc/1/comm"), "tandem");
    assert!(c.exec("grep '^Uid:' /proc/1/status").contains(&UID.to_string()));
    let info: serde_json::Value = client.get(format!("http://127.0.0.1:{http}/")).send().unwrap().json().unwrap();
    assert!(info.to_string().contains("onnxruntime"), "{info}");
    // The text pipeline loaded (readiness waited for it) and classifies.
    let said: serde_json::Value = client
        .post(format!("http://127.0.0.1:{http}/v2/models/text/infer"))
        .body(r#"{"inputs":[{"name":"text","shape":[1,1],"datatype":"BYTES","data":["the cat sat"]}]}"#)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(said["outputs"][0]["data"][0], "cat", "{said}\n{}", c.logs());
    // An orphaned grandchild is re-parented to tandem and reaped when it exits.
    let parent = c.exec("(sleep 2 &) ; sleep 0.3; for p in /proc/[0-9]*; do [ \"$(cat $p/comm)\" = sleep ] && grep '^PPid:' $p/status; done; true");
    assert!(parent.contains("PPid:\t1"), "the orphan's parent: {parent:?}");
    std::thread::sleep(Duration::from_secs(3));
    let zombies =
        c.exec("for p in /proc/[0-9]*; do grep -q '^State:.*Z' $p/status 2>/dev/null && cat $p/comm; done; true");
    assert_eq!(zombies, "", "no zombie left");
    // The cache, created by tandem on the mounted directory.
    let certs = cache.join("ssl_certificates");
    let meta = std::fs::metadata(&certs).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o700, UID));
    let live = std::fs::metadata(certs.join("live.pem")).unwrap();
    assert_eq!((live.mode() & 0o777, live.uid()), (0o600, UID));
    // A ..data swap: the same HTTPS worker serves the new certificate.
    let https_worker = c.pid_of("https-worker");
    assert!(!https_worker.is_empty(), "{}", c.logs());
    secret_volume(&secret, &second, 2);
    wait_for(
        Duration::from_secs(30),
        "the swapped secret",
        || c.logs(),
        || (served(https, &ca.pem).as_deref() == Some(second.fingerprint.as_str())).then_some(()),
    );
    assert_eq!(c.pid_of("https-worker"), https_worker, "same HTTPS worker");
    // A hot fix without a new container: a new binary at tandem's path, then
    // `tandem upgrade` (PID 1 becomes it in place and drains its old workers).
    let engines = c.pid_of("engine-worker");
    run(Command::new("docker")
        .args(["exec", "-u", "root", &c.0, "sh", "-c"])
        .arg("t=$(readlink -f /usr/local/bin/tandem) && cp \"$t\" \"$t.new\" && mv \"$t.new\" \"$t\""));
    let said = c.exec("tandem upgrade 2>&1");
    assert!(said.contains("upgraded: supervisor 1 -> 1"), "{said}\n{}", c.logs());
    wait_for(
        Duration::from_secs(30),
        "new engine workers only",
        || c.logs(),
        || {
            let now = c.pid_of("engine-worker");
            (now.lines().count() == 2 && now.lines().all(|p| !engines.lines().any(|o| o == p))).then_some(())
        },
    );
    assert_eq!(c.exec("cat /proc/1/comm"), "tandem");
    assert_eq!(served(https, &ca.pem).as_deref(), Some(second.fingerprint.as_str()), "{}", c.logs());
    // The health check (tandem health) turns healthy.
    wait_for(
        Duration::from_secs(60),
        "a healthy container",
        || c.inspect("{{json .State.Health}}"),
        || (c.inspect("{{.State.Health.Status}}") == "healthy").then_some(()),
    );
    // docker stop: SIGTERM, drain, exit 0 well within GRACEFUL_TIMEOUT.
    let stopping = Instant::now();
    run(Command::new("docker").args(["stop", "-t", "30", &c.0]));
    let took = stopping.elapsed();
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "{}", c.logs());
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    assert!(c.logs().contains("drained"), "{}", c.logs());
}

/// Removes the test's image on drop.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

#[test]
fn the_dockerfile_guard_passes_this_dockerfile_and_fails_one_that_forgets_a_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guard = |dockerfile: &Path| {
        Command::new("python3").arg(root.join("scripts/check-dockerfile")).arg(dockerfile).output().unwrap()
    };
    let ok = guard(&root.join("Dockerfile"));
    assert!(
        ok.status.success(),
        "the Dockerfile's dependency layer does not load the workspace:\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The layer as it was once written by hand: every member's manifest but one.
    let members: Vec<String> =
        text(&run(Command::new("cargo").args(["metadata", "--no-deps", "--format-version", "1"]).current_dir(root)))
            .split("\"manifest_path\":\"")
            .skip(1)
            .filter_map(|m| {
                m.split('"')
                    .next()?
                    .strip_prefix(&format!("{}/", root.display()))?
                    .strip_suffix("/Cargo.toml")
                    .map(String::from)
            })
            .collect();
    assert!(members.len() >= 5, "workspace members: {members:?}");
    let forgotten = &members[members.len() - 1];
    let kept: Vec<&String> = members.iter().filter(|m| *m != forgotten).collect();
    let copies: String = kept.iter().map(|m| format!("COPY {m}/ {m}/\n")).collect();
    let dockerfile = format!(
        "FROM rust AS build\nWORKDIR /src\nCOPY Cargo.toml Cargo.lock ./\n{copies}RUN cargo build --release --locked --bin tandem\nCOPY . .\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
    let bad = guard(&dir.path().join("Dockerfile"));
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "a layer without {forgotten} passed the guard:\n{said}");
    assert!(said.contains("would not load the workspace") && said.contains(forgotten.as_str()), "{said}");
}
