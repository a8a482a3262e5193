//! End-to-end tests of the gRPC face (Triton's `GRPCInferenceService`) with
//! the stock `tritonclient.grpc`: health, metadata, configuration and
//! inference on the plain port (h2c) beside HTTP, answers equal to the HTTP
//! face's, errors as gRPC status codes; the same front door (restricted
//! categories and API keys as call metadata); streams; health checks; the
//! call's deadline; and all of it again over TLS with a client certificate,
//! through the HTTPS worker and the shared-memory ring.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// Where a client calls: the plain port (h2c), or the HTTPS port trusting
/// the served certificate, maybe with a client certificate.
#[derive(Clone)]
struct Target {
    address: String,
    /// CA, then the client's key and certificate.
    tls: Option<(PathBuf, Option<(PathBuf, PathBuf)>)>,
}

impl Target {
    fn plain(t: &Tandem) -> Self {
        Target { address: format!("127.0.0.1:{}", t.http_port), tls: None }
    }

    /// The HTTPS port, trusting the served chain, presenting `client` (a `pki` name in `dir`) if given.
    fn tls(t: &Tandem, dir: &Path, client: Option<&str>) -> Self {
        let ca = dir.join("served.pem");
        std::fs::write(&ca, t.served_chain_pem()).unwrap();
        let client = client.map(|name| (dir.join(format!("{name}.key")), dir.join(format!("{name}.pem"))));
        Target { address: format!("localhost:{}", t.https_port), tls: Some((ca, client)) }
    }

    /// As `connect` below reads them: ADDRESS [CA [KEY CERT]].
    fn args(&self) -> Vec<String> {
        let mut args = vec![self.address.clone()];
        if let Some((ca, client)) = &self.tls {
            args.push(ca.display().to_string());
            if let Some((key, cert)) = client {
                args.extend([key.display().to_string(), cert.display().to_string()]);
            }
        }
        args
    }
}

fn grpc_client(t: &Tandem, extra: &[&str]) -> Value {
    grpc_client_at(t, &Target::plain(t), extra)
}

fn grpc_client_at(t: &Tandem, target: &Target, extra: &[&str]) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/grpc_client.py")).arg(&target.address);
    cmd.args(["--http", &format!("127.0.0.1:{}", t.http_port)]);
    if let Some((ca, client)) = &target.tls {
        cmd.arg("--ca").arg(ca);
        if let Some((key, cert)) = client {
            cmd.arg("--key").arg(key).arg("--cert").arg(cert);
        }
    }
    let out = cmd.args(extra).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), t.explain());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What every script starts with: `triton()` (a `tritonclient.grpc` client)
/// and `channel()` (a grpcio channel) for the target in its arguments, and
/// `HTTP`, the plain port's address.
const CONNECT: &str = r#"
import os, sys
URL = sys.argv[1]
CA = sys.argv[2] if len(sys.argv) > 2 else None
KEY, CERT = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else (None, None)
HTTP = os.environ["TANDEM_HTTP"]
def triton():
    import tritonclient.grpc as g
    if CA is None:
        return g.InferenceServerClient(URL)
    return g.InferenceServerClient(URL, ssl=True, root_certificates=CA, private_key=KEY, certificate_chain=CERT)
def channel():
    import grpc
    if CA is None:
        return grpc.insecure_channel(URL)
    read = lambda p: open(p, "rb").read() if p else None
    return grpc.secure_channel(URL, grpc.ssl_channel_credentials(read(CA), read(KEY), read(CERT)))
"#;

/// Runs `script` (after [`CONNECT`]) against the plain port and reads the JSON it prints.
fn python(t: &Tandem, script: &str) -> Value {
    python_at(t, &Target::plain(t), script)
}

fn python_at(t: &Tandem, target: &Target, script: &str) -> Value {
    let out = Command::new("python3")
        .args(["-c", &format!("{CONNECT}\n{script}")])
        .args(target.args())
        .env("TANDEM_HTTP", format!("127.0.0.1:{}", t.http_port))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), t.explain());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A raw gRPC call by curl over h2c (no gRPC stack of ours or the client's):
/// `frame` (length-prefixed messages) to `method` of the inference service
/// with `headers` besides the call's own; the answer's headers and trailers
/// (lowercase) and its body.
fn raw_call(t: &Tandem, method: &str, frame: &Path, headers: &[&str]) -> (String, Vec<u8>) {
    let answer = t.dir.path().join("answer.grpc");
    let mut curl = Command::new("curl");
    curl.args(["-s", "-D", "-", "--max-time", "10", "--http2-prior-knowledge", "-o"]).arg(&answer);
    curl.args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    for h in headers {
        curl.args(["-H", h]);
    }
    let out = curl
        .arg("--data-binary")
        .arg(format!("@{}", frame.display()))
        .arg(t.http_url(&format!("/inference.GRPCInferenceService/{method}")))
        .output()
        .unwrap();
    (String::from_utf8_lossy(&out.stdout).to_lowercase(), std::fs::read(&answer).unwrap_or_default())
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
    // Data that does not fit its shape is told in the message's own terms.
    let malformed = &seen["malformed"];
    assert_eq!(
        malformed["short_raw"],
        "INVALID_ARGUMENT: input pixels: its raw_input_contents entry is 255 bytes but shape [1, 64] of FP32 needs 256",
        "{seen}"
    );
    assert_eq!(
        malformed["short_contents"],
        "INVALID_ARGUMENT: input pixels: contents hold 10 FP32 values but shape [1, 64] holds 64",
        "{seen}"
    );
    assert_eq!(malformed["twice"], "INVALID_ARGUMENT: input \"pixels\" is given twice", "{seen}");
    // Six megabytes of empty entries would decode into gigabytes: refused before prost allocates.
    assert!(malformed["bomb"].as_str().unwrap().starts_with("RESOURCE_EXHAUSTED: a 6000008-byte message"), "{seen}");
    assert_eq!(seen["index"], serde_json::json!([["digits", "READY"]]), "{seen}");
    // Triton's statistics over gRPC: the same totals HTTP reads.
    assert_eq!(seen["grpc_stats"]["name"], "digits", "{seen}");
    assert!(seen["grpc_stats"]["success"].as_u64().unwrap() >= 3, "{seen}");
    assert_eq!(seen["grpc_stats"]["success"], seen["http_stats_success"], "{seen}");
    // A raw h2c call that also asks for HTTP compression: the answer keeps
    // its gRPC framing and its status trailer (never gzipped as a whole).
    let frame = t.dir.path().join("empty.grpc");
    std::fs::write(&frame, [0u8; 5]).unwrap();
    let (head, _) = raw_call(&t, "ServerLive", &frame, &["accept-encoding: gzip"]);
    assert!(head.contains("grpc-status: 0") && !head.contains("content-encoding"), "{head}");
    // gzip both ways, as the call asks: a plain call that accepts gzip (as
    // every grpc-core client does) is answered plain; a gzipped call is
    // answered in gzip, its message flagged compressed.
    let gzipped = t.dir.path().join("gzipped.grpc");
    let z = gzip(b"");
    let mut message = vec![1u8];
    message.extend_from_slice(&(z.len() as u32).to_be_bytes());
    message.extend_from_slice(&z);
    std::fs::write(&gzipped, message).unwrap();
    for (file, encoding, compressed) in [(&frame, "identity", false), (&gzipped, "gzip", true)] {
        let asks = format!("grpc-encoding: {encoding}");
        let (head, body) = raw_call(&t, "ServerLive", file, &[&asks, "grpc-accept-encoding: identity,deflate,gzip"]);
        assert!(head.contains("grpc-status: 0"), "{encoding}: {head}");
        assert_eq!(head.contains("grpc-encoding: gzip"), compressed, "{encoding}: {head}");
        assert_eq!(body.first(), Some(&u8::from(compressed)), "{encoding}: {body:?}");
    }
    // Calls are counted by call, a failed one as what its code means.
    let metrics = Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    let route = "protocol=\"grpc\",route=\"/inference.GRPCInferenceService/ModelInfer\"";
    let live = "protocol=\"grpc\",route=\"/inference.GRPCInferenceService/ServerLive\"";
    assert!(metrics.lines().any(|l| l.contains(live) && l.contains("code=\"200\"")), "{metrics}");
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
import json
from tritonclient.utils import InferenceServerException
c = triton()
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
    stream_of_100(&t, &Target::plain(&t));
}

/// 100 requests on one `ModelStreamInfer` stream, the 38th of a bad shape:
/// every good one answered in order, the bad one with its error, the stream open.
fn stream_of_100(t: &Tandem, target: &Target) {
    let script = r#"
import json, queue
import numpy as np
import tritonclient.grpc as g
c = triton()
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
        seen["shape"] = list(result.as_numpy("probabilities").shape)
c.stop_stream()
print(json.dumps(seen))
"#;
    let seen = python_at(t, target, script);
    let ok: Vec<u64> = seen["ok"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let expected: Vec<u64> = (0..100).filter(|&i| i != 37).collect();
    assert_eq!(ok, expected, "every good request answered, in order: {seen}");
    assert_eq!(seen["shape"], serde_json::json!([1, 10]), "{seen}");
    let errors = seen["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{seen}");
    assert!(errors[0].as_str().unwrap().contains("64"), "the error names the expected shape: {seen}");
}

#[test]
fn a_call_s_deadline_is_kept_by_the_server() {
    let b = TandemBuilder::new().env("NUM_WORKERS", "1");
    let repo = b.dir().join("repo");
    // Each inference takes about 2 s.
    copy_slow(&repo, "slow", 2.0, "");
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let script = r#"
import json, time
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
c = triton()
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
    let (head, _) = raw_call(&t, "ModelInfer", &frame, &["grpc-timeout: 300m"]);
    assert!(head.contains("grpc-status: 4"), "{head}");
    assert!(started.elapsed() < std::time::Duration::from_millis(1500), "{:?}", started.elapsed());
    let metrics = Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    let route = "route=\"/inference.GRPCInferenceService/ModelInfer\"";
    assert!(metrics.lines().any(|l| l.contains(route) && l.contains("code=\"504\"")), "{metrics}");
}

#[test]
fn grpc_health_checks_answer_for_the_server_and_each_model() {
    let t = TandemBuilder::new().env("MODEL_CONTROL_MODE", "explicit").env("MODEL_LOAD", "*").start();
    health_checks(&t, &Target::plain(&t));
}

/// `grpc.health.v1` with grpcio-health-checking: `Check` for the server and
/// each model, and a `Watch` of `digits` that sees it unloaded over HTTP.
fn health_checks(t: &Tandem, target: &Target) {
    let script = r#"
import json, grpc, urllib.request
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(channel())
name = health_pb2.HealthCheckResponse.ServingStatus.Name
seen = {}
for service in ["", "digits", "nope"]:
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=service))
        seen[service or "server"] = name(r.status)
    except grpc.RpcError as e:
        seen[service or "server"] = str(e.code())
unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=20)
seen["watch_nope"] = name(next(unknown).status)
unknown.cancel()
watch = stub.Watch(health_pb2.HealthCheckRequest(service="digits"), timeout=20)
seen["watch"] = [name(next(watch).status)]
urllib.request.urlopen(urllib.request.Request(f"http://{HTTP}/v2/repository/models/digits/unload", data=b"", method="POST"))
seen["watch"].append(name(next(watch).status))
watch.cancel()
urllib.request.urlopen(urllib.request.Request(f"http://{HTTP}/v2/repository/models/digits/load", data=b"", method="POST"))
short = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=1.5)
statuses = []
try:
    for r in short:
        statuses.append(name(r.status))
except grpc.RpcError as e:
    seen["short_end"] = str(e.code())
seen["short"] = statuses
print(json.dumps(seen))
"#;
    let seen = python_at(t, target, script);
    assert_eq!(
        (&seen["server"], &seen["digits"], &seen["nope"]),
        (&"SERVING".into(), &"SERVING".into(), &"StatusCode.NOT_FOUND".into()),
        "{seen}"
    );
    assert_eq!(seen["watch_nope"], "SERVICE_UNKNOWN", "{seen}");
    let watched = seen["watch"].as_array().unwrap();
    assert_eq!(watched[0], "SERVING", "{seen}");
    assert!(watched[1] == "SERVICE_UNKNOWN" || watched[1] == "NOT_SERVING", "the unload is seen: {seen}");
    // A watch sends once while nothing changes, and ends at its deadline.
    assert_eq!(seen["short"], serde_json::json!(["SERVING"]), "{seen}");
    assert_eq!(seen["short_end"], "StatusCode.DEADLINE_EXCEEDED", "{seen}");
}

#[test]
fn kserve_s_grpc_client_is_served() {
    let t = TandemBuilder::new().start();
    kserve_client(&t, &Target::plain(&t));
}

/// KServe's `InferenceGRPCClient` (asyncio): health, then an inference whose
/// answer is the HTTP face's for the same input.
fn kserve_client(t: &Tandem, target: &Target) {
    let script = r#"
import asyncio, json, urllib.request
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
async def main():
    c = InferenceGRPCClient(URL, use_ssl=CA is not None, root_certificates=CA, private_key=KEY, certificate_chain=CERT)
    seen = {"live": await c.is_server_live(), "ready": await c.is_server_ready(), "model_ready": await c.is_model_ready("digits")}
    pixels = (np.arange(128, dtype=np.float32) % 17).reshape(2, 64)
    x = InferInput("pixels", [2, 64], "FP32")
    x.set_data_from_numpy(pixels)
    r = await c.infer(InferRequest(model_name="digits", infer_inputs=[x], request_id="k1"))
    out = r.outputs[0]
    seen.update(id=r.id, name=out.name, shape=list(out.shape))
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": pixels.reshape(-1).tolist()}]}).encode()
    req = urllib.request.Request(f"http://{HTTP}/v2/models/digits/infer", data=body, headers={"content-type": "application/json"})
    via_http = np.array(json.load(urllib.request.urlopen(req))["outputs"][0]["data"], dtype=np.float32)
    seen["same_answer"] = bool(np.allclose(out.as_numpy().reshape(-1), via_http, rtol=0, atol=1e-6))
    await c.close()
    print(json.dumps(seen))
asyncio.run(main())
"#;
    let seen = python_at(t, target, script);
    assert_eq!((&seen["live"], &seen["ready"], &seen["model_ready"]), (&true.into(), &true.into(), &true.into()));
    assert_eq!((&seen["id"], &seen["name"]), (&"k1".into(), &"probabilities".into()), "{seen}");
    assert_eq!(seen["shape"], serde_json::json!([2, 10]), "{seen}");
    assert_eq!(seen["same_answer"], true, "{seen}");
}

#[test]
fn server_reflection_lists_the_services_and_describes_their_messages() {
    let t = TandemBuilder::new().start();
    reflection(&t, &Target::plain(&t));
}

/// grpcio-reflection's descriptor database, as grpcurl-style tools use it:
/// the services listed, a call and its message described.
fn reflection(t: &Tandem, target: &Target) {
    let script = r#"
import json
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
db = ProtoReflectionDescriptorDatabase(channel())
pool = DescriptorPool(db)
service = pool.FindServiceByName("inference.GRPCInferenceService")
infer = service.FindMethodByName("ModelInfer")
request = pool.FindMessageTypeByName("inference.ModelInferRequest")
print(json.dumps({
    "services": sorted(db.get_services()),
    "input": infer.input_type.full_name,
    "fields": sorted(f.name for f in request.fields)[:4],
    "methods": len(service.methods),
}))
"#;
    let seen = python_at(t, target, script);
    let services = seen["services"].as_array().unwrap();
    for s in ["inference.GRPCInferenceService", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|v| v == s), "{s} not listed: {seen}");
    }
    assert_eq!(seen["input"], "inference.ModelInferRequest", "{seen}");
    assert_eq!(seen["fields"], serde_json::json!(["id", "inputs", "model_name", "model_version"]), "{seen}");
    assert!(seen["methods"].as_u64().unwrap() >= 20, "{seen}");
}

#[test]
fn grpc_over_tls_with_client_certificates_is_served_through_the_ring_like_plain() {
    let b = TandemBuilder::new().ssl();
    let pki = b.dir().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    common::pki::ca_and_client(&pki, "ca1", "alice");
    let t = b
        .env("NUM_WORKERS", "2")
        .env("SSL_CLIENT_CA", pki.join("ca1.pem").to_str().unwrap())
        .env("SSL_CLIENT_AUTH", "required")
        .env("MODEL_CONTROL_MODE", "explicit")
        .env("MODEL_LOAD", "*")
        .env("ACCESS_LOG", "true")
        .env("LOG_FORMAT", "json")
        .start_live();
    let target = Target::tls(&t, &pki, Some("alice"));
    let seen = grpc_client_at(&t, &target, &[]);
    assert_eq!((&seen["live"], &seen["ready"], &seen["model_ready"]), (&true.into(), &true.into(), &true.into()));
    assert_eq!(seen["metadata"]["inputs"][0]["name"], "pixels", "{seen}");
    assert_eq!(seen["config_max_batch"], 256, "{seen}");
    assert_eq!(seen["same_answer"], true, "the TLS gRPC answer is the plain HTTP one: {seen}");
    assert_eq!(seen["classes"].as_array().unwrap().len(), 4, "{seen}");
    assert_eq!(seen["errors"]["unknown_model"], "StatusCode.NOT_FOUND", "{seen}");
    assert_eq!(seen["errors"]["bad_shape"], "StatusCode.INVALID_ARGUMENT", "{seen}");
    assert_eq!(seen["grpc_stats"]["success"], seen["http_stats_success"], "{seen}");
    stream_of_100(&t, &target);
    health_checks(&t, &target);
    reflection(&t, &target);
    kserve_client(&t, &target);
    // The status arrives in trailers, after the message, as gRPC requires
    // (seen by curl, which is not lenient about them as grpcio is).
    let frame = t.dir.path().join("empty.grpc");
    std::fs::write(&frame, [0u8; 5]).unwrap();
    let (ca, client) = target.tls.clone().unwrap();
    let (key, cert) = client.unwrap();
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", "--http2", "--cacert"])
        .arg(&ca)
        .arg("--key")
        .arg(&key)
        .arg("--cert")
        .arg(&cert)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary"])
        .arg(format!("@{}", frame.display()))
        .arg(t.https_url("localhost", "/inference.GRPCInferenceService/ServerLive"))
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let (head, trailers) = dump.split_once("\r\n\r\n").unwrap_or((&dump, ""));
    assert!(!head.contains("grpc-status") && !head.contains("content-length"), "{dump}");
    assert!(trailers.contains("grpc-status: 0"), "no status trailer: {dump}");
    // The engine logged the calls with the client's verified identity.
    let infer = t
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "access" && v["path"] == "/inference.GRPCInferenceService/ModelInfer")
        .unwrap_or_else(|| panic!("no access line for ModelInfer\n{}", t.explain()));
    assert_eq!((&infer["listener"], &infer["client"]), (&"https".into(), &"CN=alice".into()), "{infer}");
    // Without a client certificate there is no call at all.
    let refused = Command::new("python3")
        .args(["-c", &format!("{CONNECT}\nprint(triton().is_server_live())")])
        .args(Target::tls(&t, &pki, None).args())
        .env("TANDEM_HTTP", "unused")
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a call without a client certificate was served");
}

#[test]
fn hostile_http2_calls_get_a_status_and_never_take_a_worker_down() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("MAX_REQUEST_BYTES", "1000000").start_live();
    let ca = t.dir.path().join("served.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/h2_hostile.py");
    let plain = ["127.0.0.1".to_string(), t.http_port.to_string()];
    let tls = ["127.0.0.1".to_string(), t.https_port.to_string(), ca.display().to_string()];
    for args in [&plain[..], &tls[..]] {
        let out = Command::new("python3").arg(&script).args(args).output().unwrap();
        assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), t.explain());
        let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
        let code = |k: &str| seen[k]["status"].as_u64().unwrap_or_else(|| panic!("{k}: {seen}"));
        // A message that is not protobuf, a body shorter than its prefix says,
        // a bad compressed flag: INTERNAL, as gRPC's protocol errors are.
        for k in ["bad_protobuf", "short_body", "bad_flag", "stream_short_body"] {
            assert_eq!(code(k), 13, "{k} over {args:?}: {seen}");
        }
        // A prefix over MAX_REQUEST_BYTES is refused from its five bytes.
        assert_eq!(code("huge_prefix"), 8, "{seen}");
        let message = seen["huge_prefix"]["message"].as_str().unwrap().replace("%20", " ");
        assert!(message.contains("MAX_REQUEST_BYTES"), "{seen}");
        // 2000 streams at once on one connection: never served past the
        // server's limit (refused, or the connection closed).
        let many = &seen["many_streams"];
        assert_eq!(many["limit"], 256, "{seen}");
        let refused =
            many["refused"].as_u64().unwrap_or(0) > 0 || many["goaway"] == true || many.get("error").is_some();
        assert!(refused, "{seen}");
        assert!(many["answered"].as_u64().unwrap_or(0) <= 256, "{seen}");
        // A stream whose answers are never read stops being read (flow
        // control holds its client), and another connection is served meanwhile.
        let unread = &seen["unread_stream"];
        assert!(unread["sent"].as_u64().unwrap() < 2000, "the server read everything: {seen}");
        assert_eq!(unread["other_call"]["status"], 0, "{seen}");
        assert_eq!(seen["after"]["status"], 0, "{seen}");
    }
    // No worker died on the way.
    let metrics = Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    let restarted = metrics.lines().any(|l| l.starts_with("tandem_worker_restarts_total") && !l.ends_with(" 0"));
    assert!(!restarted, "{metrics}");
}

#[test]
fn grpc_calls_are_proxied_to_worker_command_copies_over_http2_with_their_trailers() {
    // The copies are tandem itself (an existing gRPC server on {port}, HTTP/1.1
    // and h2c on one port): two of them, each serving digits.
    let b = TandemBuilder::new().ssl();
    let caches = b.dir().join("copies");
    let command = format!(
        "env -u WORKER_COMMAND -u ENABLE_SSL -u SSL_PORT -u METRICS_PORT NUM_WORKERS=1 HOST=127.0.0.1 \
         MODEL_CACHE_DIR={}/{{worker}} {TANDEM}",
        caches.display()
    );
    let t = b.env("NUM_WORKERS", "2").env("WORKER_COMMAND", &command).start_live();
    let dir = t.dir.path().to_path_buf();
    for target in [Target::plain(&t), Target::tls(&t, &dir, None)] {
        let seen = grpc_client_at(&t, &target, &[]);
        assert_eq!((&seen["live"], &seen["model_ready"]), (&true.into(), &true.into()), "{seen}");
        assert_eq!(seen["same_answer"], true, "{seen}");
        // A copy's error status comes back as it sent it (trailers-only).
        assert_eq!(seen["errors"]["unknown_model"], "StatusCode.NOT_FOUND", "{seen}");
        assert_eq!(seen["errors"]["bad_shape"], "StatusCode.INVALID_ARGUMENT", "{seen}");
        // A stream through the proxy: messages both ways, status in trailers.
        stream_of_100(&t, &target);
    }
}

#[test]
fn grpc_port_serves_the_grpc_face_alone_and_outlives_an_engine_worker() {
    let grpc_port = free_port();
    let t = TandemBuilder::new().env("NUM_WORKERS", "2").env("GRPC_PORT", &grpc_port.to_string()).start();
    let target = Target { address: format!("127.0.0.1:{grpc_port}"), tls: None };
    let script = r#"
import json, numpy as np
import tritonclient.grpc as g
c = triton()
x = g.InferInput("pixels", [1, 64], "FP32"); x.set_data_from_numpy(np.full((1, 64), 3, np.float32))
print(json.dumps({"live": c.is_server_live(), "ready": c.is_model_ready("digits"),
                  "shape": list(c.infer("digits", [x]).as_numpy("probabilities").shape)}))
"#;
    let seen = python_at(&t, &target, script);
    assert_eq!(seen, serde_json::json!({"live": true, "ready": true, "shape": [1, 10]}));
    // HTTP on the gRPC port: a JSON 404 that says where HTTP is.
    let res = Tandem::http_client().get(format!("http://127.0.0.1:{grpc_port}/v2/health/ready")).send().unwrap();
    assert_eq!(res.status(), 404);
    let body: Value = res.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("the HTTP API is on PORT"), "{body}");
    // The supervisor holds the port: a killed engine worker's successor serves it too.
    let victim = t.workers("engine-worker")[0];
    nix::sys::signal::kill(victim, nix::sys::signal::Signal::SIGKILL).unwrap();
    t.wait_replaced(std::time::Duration::from_secs(30), "engine-worker", victim, 2);
    for _ in 0..4 {
        assert_eq!(python_at(&t, &target, script)["shape"], serde_json::json!([1, 10]));
    }
    assert!(t.stderr().contains("serving gRPC alone on GRPC_PORT"), "{}", t.explain());
}
