//! End-to-end tests of Triton's system shared-memory extension
//! (`SYSTEM_SHARED_MEMORY`): the stock tritonclient (HTTP and gRPC, plain and
//! over TLS through the ring) registering regions, passing tensors in them and
//! making every mistake a client can; a region registered through one engine
//! worker used by all of them, and by a worker restarted after a crash; the
//! extension off by default; and Triton's own perf_analyzer (gRPC, its
//! stream, `--shared-memory system`, HTTP, TLS) running to completion.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Runs tests/python/system_shm.py against `t` (gRPC over TLS when `ca` is given).
fn tritonclient_suite(t: &Tandem, grpc: &str, ca: Option<&Path>) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/system_shm.py"))
        .arg(format!("127.0.0.1:{}", t.http_port))
        .arg(grpc);
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), t.explain());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn judge(seen: &Value) {
    for face in ["http", "grpc"] {
        let r = &seen[face];
        let status: Vec<(String, u64)> = r["status"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s[0].as_str().unwrap().to_string(), s[2].as_u64().unwrap()))
            .collect();
        assert_eq!(status, [("in".into(), 0), ("out".into(), 64), ("small".into(), 0)], "{face}: {r}");
        assert_eq!(r["out_in_region_equal"], true, "{face}: the output written to the region is the model's: {r}");
        assert_eq!(r["out_in_region_body_empty"], true, "{face}: an output in a region is not also in the body: {r}");
        assert_eq!(r["out_in_body_equal"], true, "{face}: {r}");
        let errors = &r["errors"];
        let expect = [
            ("duplicate", "already registered"),
            ("traversal", "not a POSIX shared-memory name"),
            ("symlink", "symbolic link"),
            ("fifo", "not a regular file"),
            ("missing", "does not exist"),
            ("past_object", "does not fit"),
            ("input_size", "needs 1024 bytes"),
            ("input_past_region", "do not fit"),
            ("output_too_small", "needs 160 bytes"),
            ("unknown_region", "\"nope\" is registered"),
            ("unregistered", "\"out\" is registered"),
        ];
        for (case, words) in expect {
            let e = errors[case].as_str().unwrap_or_else(|| panic!("{face} {case}: accepted: {r}"));
            assert!(e.contains(words), "{face} {case}: {e}");
            let code = if face == "http" { "[400]" } else { "INVALID_ARGUMENT" };
            assert!(e.contains(code), "{face} {case}: {e}");
        }
        assert_eq!(r["unregistered_untouched"], true, "{face}: an unregistered region was written: {r}");
        assert_eq!(r["status_after"], json!([]), "{face}: {r}");
    }
}

#[test]
fn tritonclient_registers_regions_and_passes_tensors_in_them_on_both_faces_and_over_tls() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("SYSTEM_SHARED_MEMORY", "true").start();
    judge(&tritonclient_suite(&t, &format!("127.0.0.1:{}", t.http_port), None));
    // gRPC over TLS: the HTTPS worker holds no registry, the engines behind the ring do.
    let ca = t.dir.path().join("served.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    judge(&tritonclient_suite(&t, &format!("localhost:{}", t.https_port), Some(&ca)));
}

/// A POSIX shared-memory object (a file under /dev/shm), removed when dropped.
struct Object(PathBuf);

impl Object {
    fn new(name: &str, bytes: &[u8]) -> Self {
        let path = Path::new("/dev/shm").join(format!("{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        Object(path)
    }

    fn key(&self) -> String {
        format!("/{}", self.0.file_name().unwrap().to_str().unwrap())
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every worker that answered `rounds` inference requests naming region
/// `input`, each on a new connection, with the answers they gave.
fn infer_from_region(t: &Tandem, rounds: usize) -> (BTreeSet<String>, Vec<Value>) {
    let request = json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
        "parameters": {"shared_memory_region": "input", "shared_memory_byte_size": 256}}]});
    let mut workers = BTreeSet::new();
    let mut answers = Vec::new();
    for _ in 0..rounds {
        let res = Tandem::http_client()
            .post(t.http_url("/v2/models/digits/infer"))
            .header("connection", "close")
            .json(&request)
            .send()
            .unwrap();
        workers.insert(res.headers()["x-tandem-worker"].to_str().unwrap().to_string());
        assert_eq!(res.status(), 200, "{:?}", res.text());
        answers.push(res.json::<Value>().unwrap()["outputs"][0]["data"].clone());
    }
    (workers, answers)
}

#[test]
fn a_region_registered_through_one_engine_worker_serves_on_all_and_after_a_restart() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "2").env("SYSTEM_SHARED_MEMORY", "true").start();
    let pixels: Vec<u8> = (0..64).flat_map(|_| 3.0f32.to_le_bytes()).collect();
    let object = Object::new("tandem-test-input", &pixels);
    let registered = Tandem::http_client()
        .post(t.http_url("/v2/systemsharedmemory/region/input/register"))
        .json(&json!({"key": object.key(), "byte_size": 256}))
        .send()
        .unwrap();
    assert_eq!(registered.status(), 200, "{:?}", registered.text());
    let want = Tandem::http_client()
        .post(t.http_url("/v2/models/digits/infer"))
        .body(digits_body(3))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap()["outputs"][0]["data"]
        .clone();

    // The answer is the region's, from whichever worker a connection reaches.
    let (workers, answers) = infer_from_region(&t, 24);
    assert_eq!(workers.len(), 2, "both engine workers should have answered: {workers:?}");
    assert!(answers.iter().all(|a| *a == want), "{answers:?} vs {want}");

    // A worker killed mid-life comes back with the registry.
    let engines = t.workers("engine-worker");
    let victim = engines[0];
    nix::sys::signal::kill(victim, Signal::SIGKILL).unwrap();
    t.wait_replaced(Duration::from_secs(30), "engine-worker", victim, 2);
    wait_for(
        Duration::from_secs(30),
        "both engine workers answering again",
        || t.explain(),
        || {
            let (workers, answers) = infer_from_region(&t, 24);
            assert!(answers.iter().all(|a| *a == want), "{answers:?}");
            (workers.len() == 2).then_some(())
        },
    );
    let status: Value =
        Tandem::http_client().get(t.http_url("/v2/systemsharedmemory/status")).send().unwrap().json().unwrap();
    assert_eq!(status, json!([{"name": "input", "key": object.key(), "offset": 0, "byte_size": 256}]));
}

#[test]
fn system_shared_memory_is_off_unless_asked_for_and_says_how_to_turn_it_on() {
    let t = TandemBuilder::new().start();
    let object = Object::new("tandem-test-off", &[0u8; 256]);
    let c = Tandem::http_client();
    let res = c
        .post(t.http_url("/v2/systemsharedmemory/region/input/register"))
        .json(&json!({"key": object.key(), "byte_size": 256}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.text().unwrap().contains("SYSTEM_SHARED_MEMORY=true"));
    let status: Value = c.get(t.http_url("/v2/systemsharedmemory/status")).send().unwrap().json().unwrap();
    assert_eq!(status, json!([]));
    let res = c
        .post(t.http_url("/v2/models/digits/infer"))
        .json(&json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
            "parameters": {"shared_memory_region": "input", "shared_memory_byte_size": 256}}]}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.text().unwrap().contains("SYSTEM_SHARED_MEMORY=true"));
    // CUDA shared memory: nothing registered, and a clear refusal.
    let res = c.post(t.http_url("/v2/cudasharedmemory/region/g/register")).body("{}").send().unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.text().unwrap().contains("does not implement CUDA shared memory"));
}

/// Runs Triton's perf_analyzer (scripts/perf-analyzer) for one-second
/// windows; returns its output after checking it succeeded with no error.
/// Any spread between windows is accepted (`-s 100`): this is a test of
/// correctness, not a measurement (scripts/bench-grpc measures).
fn perf_analyzer(t: &Tandem, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/perf-analyzer");
    let out = Command::new("bash")
        .arg(script)
        .args([
            "-m",
            "digits",
            "--measurement-interval",
            "1000",
            "--concurrency-range",
            "2",
            "-s",
            "100",
            "--max-trials",
            "6",
        ])
        .args(args)
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "perf_analyzer {args:?} failed:\n{text}\n{}", t.explain());
    assert!(!text.contains("had error") && !text.contains("Failed"), "perf_analyzer {args:?}:\n{text}");
    assert!(text.contains("Concurrency: 2, throughput:"), "perf_analyzer {args:?}:\n{text}");
    text
}

#[test]
fn triton_s_perf_analyzer_runs_against_tandem_over_grpc_http_streams_tls_and_shared_memory() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("SYSTEM_SHARED_MEMORY", "true").start();
    let plain = format!("127.0.0.1:{}", t.http_port);
    let ca = t.dir.path().join("served.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    let tls = format!("localhost:{}", t.https_port);
    let https = format!("https://localhost:{}", t.https_port);
    let ca = ca.to_str().unwrap();
    let runs: [&[&str]; 7] = [
        &["-u", &plain, "-i", "grpc"],
        &["-u", &plain, "-i", "grpc", "--streaming"],
        &["-u", &plain, "-i", "grpc", "--shared-memory", "system", "-b", "4"],
        &["-u", &plain, "-i", "http"],
        &["-u", &plain, "-i", "http", "--shared-memory", "system", "-b", "4"],
        &["-u", &tls, "-i", "grpc", "--ssl-grpc-use-ssl", "--ssl-grpc-root-certifications-file", ca],
        &["-u", &https, "-i", "http", "--ssl-https-ca-certificates-file", ca, "--ssl-https-verify-peer", "1"],
    ];
    for args in runs {
        perf_analyzer(&t, args);
    }
    // Its regions are gone when it ends (it unregisters them); the server kept serving.
    let status: Value =
        Tandem::http_client().get(t.http_url("/v2/systemsharedmemory/status")).send().unwrap().json().unwrap();
    assert_eq!(status, json!([]));
}
