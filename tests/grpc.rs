//! End-to-end tests of the gRPC face (Triton's `GRPCInferenceService`) with
//! the stock `tritonclient.grpc`: health, metadata, configuration and
//! inference on the plain port (h2c) beside HTTP, answers equal to the HTTP
//! face's, errors as gRPC status codes; the same front door (restricted
//! categories and API keys as call metadata); streams; health checks; the
//! call's deadline; and a clear status where gRPC is not served yet (over TLS).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn grpc_client(t: &Tandem, extra: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/grpc_client.py"))
        .arg(format!("127.0.0.1:{}", t.http_port))
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), t.explain());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `python3 -c script HOST:PORT` (the plain port) and reads the JSON it prints.
fn python(t: &Tandem, script: &str) -> Value {
    let out = Command::new("python3").args(["-c", script]).arg(format!("127.0.0.1:{}", t.http_port)).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), t.explain());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tritonclient_grpc_is_served_on_the_plain_port_with_the_http_face_s_answers() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "2").start();
    let seen = grpc_client(&t, &[]);
    assert_eq!(
        (seen["live"].clone(), seen["ready"].clone(), seen["model_ready"].clone()),
        (true.into(), true.into(), true.into()),
        "{seen}"
    );
    assert_eq!(seen["server"]["name"], "tandem");
    assert_eq!(seen["metadata"]["inputs"][0]["name"], "pixels", "{seen}");
    assert_eq!(seen["metadata"]["outputs"][0]["shape"], serde_json::json!(["-1", "10"]), "{seen}");
    assert_eq!(seen["config_max_batch"], 256);
    assert_eq!(seen["same_answer"], true, "{seen}");
    assert_eq!(seen["shape"], serde_json::json!([2, 10]));
    assert_eq!(seen["classes"].as_array().unwrap().len(), 4, "two rows, two classes each: {seen}");
    assert_eq!(seen["errors"]["unknown_model"], "StatusCode.NOT_FOUND", "{seen}");
    assert_eq!(seen["errors"]["bad_shape"], "StatusCode.INVALID_ARGUMENT", "{seen}");
    assert_eq!(seen["errors"]["unimplemented"], "StatusCode.UNIMPLEMENTED", "{seen}");
    assert_eq!(seen["index"], serde_json::json!([["digits", "READY"]]), "{seen}");
    // Triton's statistics over gRPC: the same totals HTTP reads.
    assert_eq!(seen["grpc_stats"]["name"], "digits", "{seen}");
    assert!(seen["grpc_stats"]["success"].as_u64().unwrap() >= 3, "{seen}");
    assert_eq!(seen["grpc_stats"]["success"], seen["http_stats_success"], "{seen}");
    // A raw h2c call that also asks for HTTP compression: the answer keeps
    // its gRPC framing and its status trailer (never gzipped as a whole).
    let frame = t.dir.path().join("empty.grpc");
    std::fs::write(&frame, [0u8; 5]).unwrap();
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", "--http2-prior-knowledge"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "-H", "accept-encoding: gzip"])
        .arg("--data-binary")
        .arg(format!("@{}", frame.display()))
        .arg(t.http_url("/inference.GRPCInferenceService/ServerLive"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.contains("grpc-status: 0") && !head.contains("content-encoding"), "{head}");
    // Calls are counted by service, a failed one as what its code means.
    let metrics = Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    let route = "route=\"/inference.GRPCInferenceService/{method}\"";
    assert!(metrics.lines().any(|l| l.contains(route) && l.contains("code=\"200\"")), "{metrics}");
    assert!(metrics.lines().any(|l| l.contains(route) && l.contains("code=\"404\"")), "unknown model: {metrics}");
    assert!(metrics.lines().any(|l| l.contains(route) && l.contains("code=\"400\"")), "bad shape: {metrics}");
    // The inferences are counted like HTTP ones.
    let stats: Value = Tandem::http_client().get(t.http_url("/v2/models/digits/stats")).send().unwrap().json().unwrap();
    let success = stats["model_stats"][0]["inference_stats"]["success"]["count"].as_u64().unwrap();
    assert!(success >= 3, "{stats}");
}

#[test]
fn models_are_loaded_and_unloaded_over_grpc_and_http_sees_it() {
    let t = TandemBuilder::new()
        .env("NUM_WORKERS", "2")
        .env("MODEL_CONTROL_MODE", "explicit")
        .env("MODEL_LOAD", "*")
        .start();
    let script = r#"
import sys, json
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
c = g.InferenceServerClient(sys.argv[1])
seen = {}
c.unload_model("digits")
seen["after_unload"] = c.is_model_ready("digits")
try:
    c.load_model("digits", files={"file:1/model.onnx": b"x"})
except InferenceServerException as e:
    seen["files"] = [e.status(), e.message()]
c.load_model("digits")
seen["after_load"] = c.is_model_ready("digits")
print(json.dumps(seen))
"#;
    let seen = python(&t, script);
    assert_eq!(seen["after_unload"], false, "{seen}");
    assert_eq!(seen["after_load"], true, "{seen}");
    assert_eq!(seen["files"][0], "StatusCode.INVALID_ARGUMENT", "{seen}");
    assert!(seen["files"][1].as_str().unwrap().contains("not supported"), "{seen}");
    // HTTP sees what gRPC did, on every worker.
    for _ in 0..4 {
        let r = Tandem::http_client().get(t.http_url("/v2/models/digits/ready")).send().unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[test]
fn grpc_calls_meet_the_same_front_door() {
    let t = TandemBuilder::new().env("RESTRICTED_API", "inference,model-config:x-infer-key=sesame").start();
    let seen = grpc_client(&t, &["--header", "x-infer-key=sesame"]);
    assert_eq!(seen["without"], "StatusCode.PERMISSION_DENIED", "{seen}");
    // The door's own words reach the gRPC client (its status, in grpc-status).
    assert!(seen["without_message"].as_str().unwrap().contains("the inference API is restricted"), "{seen}");
    assert_eq!(seen["same_answer"], true, "{seen}");
    // API keys travel as call metadata too.
    let b = TandemBuilder::new();
    let keys = b.dir().join("keys");
    let out = Command::new(TANDEM).args(["apikey", "new", "grpc-client", "--append"]).arg(&keys).output().unwrap();
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let t = b.env("API_KEYS_FILE", keys.to_str().unwrap()).start();
    let seen = grpc_client(&t, &["--header", &format!("authorization=Bearer {key}")]);
    assert_eq!(seen["without"], "StatusCode.UNAUTHENTICATED", "{seen}");
    assert!(seen["without_message"].as_str().unwrap().contains("needs a key"), "{seen}");
    assert_eq!(seen["same_answer"], true, "{seen}");
}

#[test]
fn a_stream_answers_every_request_and_a_bad_one_with_its_error_without_closing() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "2").start();
    let script = r#"
import sys, json, queue
import numpy as np
import tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
answers = queue.Queue()
c.start_stream(callback=lambda result, error: answers.put((result, error)))
for i in range(100):
    n = 63 if i == 37 else 64
    x = g.InferInput("pixels", [1, n], "FP32")
    x.set_data_from_numpy(np.full((1, n), i % 17, dtype=np.float32))
    c.async_stream_infer("digits", [x], request_id=str(i))
seen = {"ok": [], "errors": []}
for _ in range(100):
    result, error = answers.get(timeout=30)
    if error is not None:
        seen["errors"].append(str(error))
    else:
        r = result.get_response()
        seen["ok"].append(int(r.id))
c.stop_stream()
print(json.dumps(seen))
"#;
    let seen = python(&t, script);
    let ok: Vec<u64> = seen["ok"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let expected: Vec<u64> = (0..100).filter(|&i| i != 37).collect();
    assert_eq!(ok, expected, "every good request answered, in order: {seen}");
    let errors = seen["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{seen}");
    assert!(errors[0].as_str().unwrap().contains("64"), "the error names the expected shape: {seen}");
}

#[test]
fn a_call_s_deadline_is_kept_by_the_server() {
    let b = TandemBuilder::new().env("NUM_WORKERS", "1");
    let repo = b.dir().join("repo");
    // Requests wait 2 s in the batcher for company.
    copy_digits(
        &repo,
        "slow",
        "dynamic_batching { preferred_batch_size: [ 64 ] max_queue_delay_microseconds: 2000000 }\n",
    );
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let script = r#"
import sys, json, time
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
c = g.InferenceServerClient(sys.argv[1])
x = g.InferInput("pixels", [1, 64], "FP32")
x.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
seen = {}
started = time.monotonic()
try:
    c.infer("slow", [x], client_timeout=0.4)
    seen["short"] = "served"
except InferenceServerException as e:
    seen["short"] = e.status()
seen["short_s"] = time.monotonic() - started
seen["long"] = c.infer("slow", [x], client_timeout=10).as_numpy("probabilities").shape[1]
print(json.dumps(seen))
"#;
    let seen = python(&t, script);
    assert_eq!(seen["short"], "StatusCode.DEADLINE_EXCEEDED", "{seen}");
    assert!(seen["short_s"].as_f64().unwrap() < 1.5, "{seen}");
    assert_eq!(seen["long"], 10, "{seen}");
    // The server gives up on its own, at the deadline, and says so.
    // (A client that enforces its own deadline may cancel first; curl does
    // not, so the answer it reads is the server's.)
    let frame = t.dir.path().join("infer.grpc");
    let encode = r#"
import sys
import tritonclient.grpc.service_pb2 as pb
r = pb.ModelInferRequest(model_name="slow", raw_input_contents=[bytes(256)])
r.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
m = r.SerializeToString()
open(sys.argv[1], "wb").write(b"\0" + len(m).to_bytes(4, "big") + m)
"#;
    let made = Command::new("python3").args(["-c", encode]).arg(&frame).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let started = std::time::Instant::now();
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", "--max-time", "10", "--http2-prior-knowledge"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "-H", "grpc-timeout: 300m"])
        .arg("--data-binary")
        .arg(format!("@{}", frame.display()))
        .arg(t.http_url("/inference.GRPCInferenceService/ModelInfer"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.contains("grpc-status: 4"), "{head}");
    assert!(started.elapsed() < std::time::Duration::from_millis(1500), "{:?}", started.elapsed());
    let metrics = Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    let route = "route=\"/inference.GRPCInferenceService/{method}\"";
    assert!(metrics.lines().any(|l| l.contains(route) && l.contains("code=\"504\"")), "{metrics}");
}

#[test]
fn grpc_health_checks_answer_for_the_server_and_each_model() {
    let t = TandemBuilder::new().start();
    let script = r#"
import sys, json, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(sys.argv[1]))
seen = {}
for service in ["", "digits", "nope"]:
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=service))
        seen[service or "server"] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as e:
        seen[service or "server"] = str(e.code())
print(json.dumps(seen))
"#;
    let seen = python(&t, script);
    assert_eq!(seen, serde_json::json!({"server": "SERVING", "digits": "SERVING", "nope": "StatusCode.NOT_FOUND"}));
}

#[test]
fn grpc_over_tls_answers_a_clear_status_until_it_is_served() {
    let t = TandemBuilder::new().ssl().start();
    let ca = t.dir.path().join("ca.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", "--http2", "--cacert"])
        .arg(&ca)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@/dev/null"])
        .arg(t.https_url("localhost", "/inference.GRPCInferenceService/ServerLive"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.contains("grpc-status: 12"), "{head}");
    assert!(head.contains("grpc-message: grpc is served on the plain port"), "{head}");
}
