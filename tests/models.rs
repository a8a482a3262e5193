//! End-to-end tests of the engine on real exported models (scripts/make_test_models.py):
//! outputs compared with onnxruntime in Python over HTTP and HTTPS, failing models
//! isolated with their reasons, the ONNX project's own test models on both
//! backends, the Triton configuration, the tract fallback and the engine
//! settings that must stop start-up.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

/// The generated repository, made once per test binary.
fn generated() -> &'static Path {
    static REPO: OnceLock<PathBuf> = OnceLock::new();
    REPO.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("models");
        make_test_models(&dir);
        dir
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A repository in `dir`: the generated models plus `digits` and the broken and configured cases.
fn repository(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    copy_dir(generated(), &repo);
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits"), &repo.join("digits"));
    // A corrupt model beside the good ones.
    std::fs::create_dir_all(repo.join("corrupt/1")).unwrap();
    std::fs::write(repo.join("corrupt/1/model.onnx"), b"\x08\x07garbage, not an ONNX protobuf").unwrap();
    // A misspelled field in a Triton configuration.
    copy_dir(&generated().join("half"), &repo.join("typo"));
    std::fs::write(repo.join("typo/config.pbtxt"), "name: \"typo\"\nmax_batch_sise: 4\n").unwrap();
    // Three versions, the policy keeps the newest two.
    for v in ["1", "2", "3"] {
        copy_dir(&generated().join("half/1"), &repo.join("versioned").join(v));
    }
    std::fs::write(
        repo.join("versioned/config.pbtxt"),
        "name: \"versioned\"\nversion_policy: { latest: { num_versions: 2 } }\ninstance_group [ { count: 2, kind: KIND_CPU } ]\n",
    )
    .unwrap();
    // Reshape: clients send and receive [batch, 2, 2]; the model takes and gives [batch, 4].
    copy_dir(&generated().join("half"), &repo.join("reshaped"));
    std::fs::write(
        repo.join("reshaped/config.pbtxt"),
        "max_batch_size: 8\ninput [ { name: \"x\", data_type: TYPE_FP16, dims: [ 2, 2 ], reshape: { shape: [ 4 ] } } ]\noutput [ { name: \"y\", dims: [ 2, 2 ], reshape: { shape: [ 4 ] } } ]\n",
    )
    .unwrap();
    // A model folder with no version folder, and a version folder with no model file.
    std::fs::create_dir_all(repo.join("noversion/weights")).unwrap();
    std::fs::create_dir_all(repo.join("nofile/1")).unwrap();
    repo
}

/// Runs tests/python/compare_models.py against `url`.
fn compare(t: &Tandem, url: &str, repo: &Path, ca: Option<&Path>, models: Option<&str>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/compare_models.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(url).arg(repo);
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    if let Some(m) = models {
        cmd.arg("--models").arg(m);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "compare_models failed: {cmd:?}\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        t.explain()
    );
    assert!(stdout.contains("compare suite passed"), "{stdout}");
    stdout
}

fn index(t: &Tandem) -> Vec<serde_json::Value> {
    let resp = Tandem::http_client().post(t.http_url("/v2/repository/index")).send().unwrap();
    assert_eq!(resp.status(), 200);
    resp.json::<Vec<serde_json::Value>>().unwrap()
}

fn entry<'a>(index: &'a [serde_json::Value], name: &str, version: Option<&str>) -> &'a serde_json::Value {
    index
        .iter()
        .find(|e| e["name"] == name && version.is_none_or(|v| e["version"] == v))
        .unwrap_or_else(|| panic!("{name} {version:?} not in the index: {index:?}"))
}

#[test]
fn real_models_match_onnxruntime_over_http_and_https_while_broken_ones_are_unavailable() {
    let b = TandemBuilder::new().ssl().env("NUM_WORKERS", "2");
    let repo = repository(b.dir());
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start_live();
    let http = Tandem::http_client();

    // Every model loads on ONNX Runtime, the default backend.
    let info: serde_json::Value = http.get(t.http_url("/")).send().unwrap().json().unwrap();
    assert_eq!(info["engine"]["default_backend"], "onnxruntime", "{info}");
    assert!(info["engine"]["onnxruntime"]["version"].as_str().is_some_and(|v| v.starts_with("1.")), "{info}");
    assert!(t.stderr().contains("engine: ONNX Runtime"), "{}", t.explain());
    assert!(info["engine"]["onnxruntime"]["found_by"].as_str().is_some_and(|r| !r.is_empty()), "{info}");

    // The broken models are unavailable with their reasons; the others are ready.
    let idx = index(&t);
    let reason = |name: &str| entry(&idx, name, None)["reason"].as_str().unwrap_or_default().to_string();
    assert_eq!(entry(&idx, "corrupt", Some("1"))["state"], "UNAVAILABLE");
    assert!(reason("corrupt").contains("corrupt/1/model.onnx"), "{idx:?}");
    assert!(reason("typo").contains("config.pbtxt:2:1") && reason("typo").contains("max_batch_sise"), "{idx:?}");
    assert!(reason("noversion").contains("has no version folder"), "{idx:?}");
    assert!(reason("nofile").contains("has no model.onnx"), "{idx:?}");
    // External data is read from the model's own folder only.
    assert!(reason("external_escape").contains("escapes model directory"), "{idx:?}");
    // A text pipeline whose locale the machine lacks says how to add one.
    assert!(reason("text_no_locale").contains("zz_ZZ") && reason("text_no_locale").contains("localedef"), "{idx:?}");
    for name in [
        "detector",
        "branchy",
        "lstm",
        "forest",
        "boosting",
        "scaled_text",
        "zipmap",
        "zipmap_text",
        "sequence",
        "half",
        "digits",
    ] {
        assert_eq!(entry(&idx, name, Some("1"))["state"], "READY", "{name}: {idx:?}");
    }
    assert!(!idx.iter().any(|e| e["name"] == "versioned" && e["version"] == "1"), "policy keeps 2 and 3: {idx:?}");
    assert_eq!(entry(&idx, "versioned", Some("3"))["state"], "READY");
    assert_eq!(entry(&idx, "versioned", Some("2"))["state"], "READY");
    for line in ["model=corrupt", "model=typo"] {
        assert!(t.stderr().lines().any(|l| l.contains("unavailable") && l.contains(line)), "{line}\n{}", t.explain());
    }

    // Strict readiness: not ready while a model failed, on both ports; the failed model says why.
    let ready = http.get(t.http_url("/v2/health/ready")).send().unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().unwrap();
    assert!(body["unavailable"].as_array().unwrap().iter().any(|m| m["name"] == "corrupt"), "{body}");
    let model_ready = http.get(t.http_url("/v2/models/corrupt/ready")).send().unwrap();
    assert_eq!(model_ready.status(), 503);
    // "Not now", said the way every 503 of tandem's says it.
    assert_eq!(model_ready.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let server_ready = http.get(t.http_url("/v2/health/ready")).send().unwrap();
    assert_eq!(server_ready.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    assert_eq!(http.get(t.http_url("/v2/models/digits/ready")).send().unwrap().status(), 200);
    let ca = t.dir.path().join("ca.pem");
    let https = wait_for(
        START_DEADLINE,
        "HTTPS liveness",
        || t.explain(),
        || {
            let chain = std::fs::read_to_string(t.cert_dir().join("live.pem")).ok()?;
            let pem = chain[chain.find("-----BEGIN CERTIFICATE-----")?..].to_string();
            let client = Tandem::https_client(&pem);
            client.get(t.https_url("localhost", "/v2/health/live")).send().ok().filter(|r| r.status() == 200)?;
            std::fs::write(&ca, &pem).ok()?;
            Some(client)
        },
    );
    assert_eq!(https.get(t.https_url("localhost", "/v2/health/ready")).send().unwrap().status(), 503);

    // Config: metadata from the model, dims from config.pbtxt, labels from label_filename.
    let config: serde_json::Value = http.get(t.http_url("/v2/models/lstm/config")).send().unwrap().json().unwrap();
    assert_eq!(config["max_batch_size"], 0, "{config}");
    assert_eq!(config["backend"], "onnxruntime", "{config}");
    let meta: serde_json::Value = http.get(t.http_url("/v2/models/detector")).send().unwrap().json().unwrap();
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 3, -1, -1]), "{meta}");
    let meta: serde_json::Value = http.get(t.http_url("/v2/models/reshaped")).send().unwrap().json().unwrap();
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 2, 2]), "{meta}");
    // The whole effective configuration, as Triton answers it: what was given
    // (reshape) and what tandem filled in (version policy, instance group).
    let config: serde_json::Value = http.get(t.http_url("/v2/models/reshaped/config")).send().unwrap().json().unwrap();
    assert!(config["input"][0]["reshape"]["shape"].is_array(), "{config}");
    assert_eq!(config["version_policy"], serde_json::json!({"latest": {"num_versions": 1}}), "{config}");
    assert_eq!(config["instance_group"][0]["kind"], "KIND_CPU", "{config}");
    assert_eq!(config["instance_group"][0]["count"], 1, "{config}");
    let digits: serde_json::Value = http.get(t.http_url("/v2/models/digits/config")).send().unwrap().json().unwrap();
    assert_eq!(digits["output"][0]["label_filename"], "labels.txt", "{digits}");
    assert_eq!(digits["input"][0]["data_type"], "TYPE_FP32", "{digits}");
    let body = r#"{"inputs":[{"name":"x","shape":[3,2,2],"datatype":"FP16","data":[0,0,0,0,1,1,1,1,2,2,2,2]}]}"#;
    let resp: serde_json::Value =
        http.post(t.http_url("/v2/models/reshaped/infer")).body(body).send().unwrap().json().unwrap();
    assert_eq!(resp["outputs"][0]["shape"], serde_json::json!([3, 2, 2]), "{resp}");
    assert_eq!(resp["outputs"][0]["data"][0], 0.0, "tanh(0 * 0.5) {resp}");
    let versions: serde_json::Value = http.get(t.http_url("/v2/models/versioned")).send().unwrap().json().unwrap();
    assert_eq!(versions["versions"], serde_json::json!(["2", "3"]), "{versions}");

    // Every model agrees with onnxruntime in Python, over HTTP and over HTTPS.
    let out = compare(&t, &format!("127.0.0.1:{}", t.http_port), generated(), None, None);
    assert!(out.contains("ok: detector[1] binary scores"), "{out}");
    compare(&t, &format!("localhost:{}", t.https_port), generated(), Some(&ca), None);
    non_finite_numbers_travel_in_json_as_triton_writes_them(&t, &https, &ca);
    // Nothing above took a worker down.
    assert!(!t.stderr().contains("exited"), "{}", t.explain());
}

/// Bare `NaN`, `Infinity` and `-Infinity` (and RapidJSON's `Inf`) in float
/// tensors' JSON data, both ways, over HTTP and HTTPS and with tritonclient;
/// anywhere else they are what standard JSON makes them, a clear 400.
fn non_finite_numbers_travel_in_json_as_triton_writes_them(t: &Tandem, https: &reqwest::blocking::Client, ca: &Path) {
    let body = r#"{"inputs":[
        {"name":"in_fp32","shape":[1,3],"datatype":"FP32","data":[[NaN,Infinity,-Inf]]},
        {"name":"in_fp64","shape":[1,3],"datatype":"FP64","data":[-Infinity,1.5,NaN]},
        {"name":"in_fp16","shape":[1,3],"datatype":"FP16","data":[Inf,-NaN,0.25]}],
      "outputs":[{"name":"out_fp32"},{"name":"out_fp64"},{"name":"out_fp16"}]}"#;
    let url = "/v2/models/identity_all/infer";
    // The model needs every input: the other types get plain values.
    let others =
        [("bool", "BOOL", "[true,false,true]"), ("uint8", "UINT8", "[1,2,3]"), ("uint16", "UINT16", "[1,2,3]")]
            .into_iter()
            .chain([("uint32", "UINT32", "[1,2,3]"), ("uint64", "UINT64", "[1,2,3]"), ("int8", "INT8", "[1,2,3]")])
            .chain([("int16", "INT16", "[1,2,3]"), ("int32", "INT32", "[1,2,3]"), ("int64", "INT64", "[1,2,3]")])
            .chain([("bytes", "BYTES", r#"["NaN","Infinity","c"]"#)])
            .map(|(n, dt, data)| format!(r#"{{"name":"in_{n}","shape":[1,3],"datatype":"{dt}","data":{data}}}"#))
            .collect::<Vec<_>>()
            .join(",");
    let body = body.replacen(r#""inputs":["#, &format!(r#""inputs":[{others},"#), 1);
    for (client, target) in [(&Tandem::http_client(), t.http_url(url)), (https, t.https_url("localhost", url))] {
        let resp = client.post(&target).body(body.clone()).send().unwrap();
        assert_eq!(resp.status(), 200, "{target}");
        let text = resp.text().unwrap();
        for want in
            [r#""data":[NaN,Infinity,-Infinity]"#, r#""data":[-Infinity,1.5,NaN]"#, r#""data":[Infinity,NaN,0.25]"#]
        {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
    // Where no float is expected, a token is refused with what and where.
    let int = body.replacen("[1,2,3]", "[1,NaN,3]", 1);
    let resp = Tandem::http_client().post(t.http_url(url)).body(int).send().unwrap();
    assert_eq!(resp.status(), 400);
    let err: serde_json::Value = resp.json().unwrap();
    assert!(err["error"].as_str().unwrap().contains("element 1 (NaN) is not a valid UINT8"), "{err}");
    let bytes = body.replacen(r#"["NaN","Infinity""#, r#"[NaN,"Infinity""#, 1);
    let err: serde_json::Value =
        Tandem::http_client().post(t.http_url(url)).body(bytes).send().unwrap().json().unwrap();
    assert!(err["error"].as_str().unwrap().contains("(NaN) is not a valid BYTES"), "{err}");
    let shape = body.replacen(r#""shape":[1,3]"#, r#""shape":[1,NaN]"#, 1);
    let resp = Tandem::http_client().post(t.http_url(url)).body(shape).send().unwrap();
    assert_eq!(resp.status(), 400);
    // tritonclient writes and reads them too (Python's JSON, as Triton's).
    let script = r#"
import sys, numpy as np, tritonclient.http as h
url, ca = sys.argv[1], sys.argv[2]
c = h.InferenceServerClient(url) if ca == "-" else h.InferenceServerClient(url, ssl=True, ssl_options={"ca_certs": ca})
x = np.array([[np.nan, np.inf, -np.inf]], dtype=np.float32)
feeds = {}
for name, dt, np_dt in [("bool", "BOOL", bool), ("uint8", "UINT8", np.uint8), ("uint16", "UINT16", np.uint16),
                        ("uint32", "UINT32", np.uint32), ("uint64", "UINT64", np.uint64), ("int8", "INT8", np.int8),
                        ("int16", "INT16", np.int16), ("int32", "INT32", np.int32), ("int64", "INT64", np.int64),
                        ("fp16", "FP16", np.float16), ("fp32", "FP32", np.float32), ("fp64", "FP64", np.float64),
                        ("bytes", "BYTES", object)]:
    if np_dt is object:
        v = np.array([[b"a", b"b", b"c"]], dtype=object)
    elif dt.startswith("FP"):
        v = x.astype(np_dt)
    else:
        v = np.ones((1, 3), dtype=np_dt)
    i = h.InferInput("in_" + name, [1, 3], dt)
    i.set_data_from_numpy(v, binary_data=False)
    feeds[name] = i
outs = [h.InferRequestedOutput("out_" + n, binary_data=False) for n in ("fp16", "fp32", "fp64")]
r = c.infer("identity_all", list(feeds.values()), outputs=outs)
for n in ("fp16", "fp32", "fp64"):
    got = r.as_numpy("out_" + n).astype(np.float64)
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[0, 2] == -np.inf, (n, got)
print("non-finite round trip passed")
"#;
    for (target, ca) in [
        (format!("127.0.0.1:{}", t.http_port), "-".to_string()),
        (format!("localhost:{}", t.https_port), ca.display().to_string()),
    ] {
        let out = Command::new("python3").args(["-c", script, &target, &ca]).output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("round trip passed"),
            "{target}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn non_strict_readiness_is_ready_with_a_failed_model_and_exit_on_error_stops_start_up() {
    let b = TandemBuilder::new().env("STRICT_READINESS", "false");
    let repo = b.dir().join("repo");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits"), &repo.join("digits"));
    std::fs::create_dir_all(repo.join("bad/1")).unwrap();
    std::fs::write(repo.join("bad/1/model.onnx"), b"garbage").unwrap();
    let repo_s = repo.to_str().unwrap().to_string();
    let t = b.env("MODEL_REPOSITORY", &repo_s).start();
    let body: serde_json::Value =
        Tandem::http_client().get(t.http_url("/v2/health/ready")).send().unwrap().json().unwrap();
    assert_eq!(body["ready"], true, "{body}");
    assert!(body["unavailable"][0]["reason"].as_str().unwrap().contains("bad/1/model.onnx"), "{body}");
    // `t` owns the directory holding the repository: it stays alive for the second run.

    let mut t = TandemBuilder::new().env("MODEL_REPOSITORY", &repo_s).env("EXIT_ON_MODEL_ERROR", "true").spawn();
    let status = t.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", t.explain());
    assert!(t.stderr().contains("bad/1/model.onnx") && t.stderr().contains("EXIT_ON_MODEL_ERROR"), "{}", t.explain());
    assert!(Tandem::children_of(t.pid()).is_empty());
}

#[test]
fn tract_serves_when_onnx_runtime_is_hidden() {
    // No Python on PATH, and a copy of the binary outside the source tree (no
    // project .venv beside it): discovery finds no onnxruntime package.
    let b = TandemBuilder::new().copied_binary();
    let empty = b.dir().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let repo = repository(b.dir());
    let t = b.env("PATH", empty.to_str().unwrap()).env("MODEL_REPOSITORY", repo.to_str().unwrap()).start_live();
    assert!(t.stderr().contains("ONNX Runtime is NOT available"), "{}", t.explain());
    let http = Tandem::http_client();
    let info: serde_json::Value = http.get(t.http_url("/")).send().unwrap().json().unwrap();
    assert_eq!(info["engine"]["default_backend"], "tract", "{info}");
    assert!(info["engine"]["fallback_reason"].as_str().unwrap().contains("no ONNX Runtime library"), "{info}");
    let idx = index(&t);
    // What tract runs serves; what needs ONNX Runtime says so.
    for name in ["digits", "detector", "forest", "half"] {
        assert_eq!(entry(&idx, name, Some("1"))["state"], "READY", "{name}: {idx:?}");
    }
    let lstm = entry(&idx, "lstm", Some("1"));
    assert!(lstm["reason"].as_str().unwrap().contains("needs ONNX Runtime"), "{idx:?}");
    assert_eq!(entry(&idx, "scaled_text", Some("1"))["state"], "UNAVAILABLE");
    // tract reads no file a model names, and says so.
    assert!(entry(&idx, "external", Some("1"))["reason"].as_str().unwrap().contains("external file"), "{idx:?}");
    let config: serde_json::Value = http.get(t.http_url("/v2/models/detector/config")).send().unwrap().json().unwrap();
    assert_eq!(config["backend"], "tract", "{config}");
    // tract agrees with onnxruntime on the models it runs, the detector planned per input shape.
    compare(&t, &format!("127.0.0.1:{}", t.http_port), generated(), None, Some("detector,forest,half"));
}

/// tests/python/onnx_backend_sweep.py `check` of `repo` against `t` (with `extra` arguments): its output.
fn sweep(t: &Tandem, repo: &Path, extra: &[&str]) -> String {
    let mut cmd = python_script("onnx_backend_sweep.py");
    cmd.arg("check").arg(format!("127.0.0.1:{}", t.http_port)).arg(repo).args(extra);
    python_output(t, cmd)
}

/// The count before `label` in the sweep's summary line ("sweep: 100 served and matching, ...").
fn counted(summary: &str, label: &str) -> usize {
    let line = summary.lines().find(|l| l.starts_with("sweep:")).unwrap_or_default();
    let before = line.split(label).next().unwrap_or_default();
    before.rsplit(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).and_then(|w| w.parse().ok()).unwrap_or(0)
}

#[test]
fn the_onnx_projects_own_test_models_are_served_as_their_references_answer() {
    // 149 models others made (exported from PyTorch, built by hand, opsets 6 to 21, and
    // the graphs of nine real image networks), with the inputs the ONNX project recorded.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("onnx-backend");
    let made = python_script("onnx_backend_sweep.py").arg("make").arg(&repo).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let onnx_runtime =
        TandemBuilder::new().env("NUM_WORKERS", "2").env("MODEL_REPOSITORY", repo.to_str().unwrap()).start_live();
    let out = sweep(&onnx_runtime, &repo, &[]);
    assert!(out.contains(" 0 failed"), "{out}");
    // What onnxruntime loads, tandem serves with the same answers; what it refuses is unavailable with its reason.
    assert!(counted(&out, "served") >= 99 && counted(&out, "unavailable") >= 1, "{out}");
    drop(onnx_runtime);

    // tract: what it runs (some that ONNX Runtime refuses) answers as the references; the rest says why.
    let tract = TandemBuilder::new()
        .env("NUM_WORKERS", "2")
        .env("ENGINE_BACKEND", "tract")
        .env("MODEL_REPOSITORY", repo.to_str().unwrap())
        .start_live();
    let out = sweep(&tract, &repo, &["--other-backend"]);
    assert!(out.contains(" 0 failed"), "{out}");
    assert!(counted(&out, "served") >= 110, "{out}");
}

#[test]
fn engine_settings_that_cannot_work_exit_2_before_anything_starts() {
    let scratch = tempfile::tempdir().unwrap();
    let fake = scratch.path().join("libonnxruntime.so.1.99.0");
    std::fs::write(&fake, b"not a shared library").unwrap();
    let fake = fake.to_str().unwrap().to_string();
    let cases = [
        (vec![("ENGINE_DEVICE", "cuda")], "ENGINE_DEVICE=cuda".to_string()),
        (vec![("ORT_DYLIB_PATH", fake.as_str())], format!("cannot load ONNX Runtime from {fake}")),
        (vec![("ENGINE_THREADS", "lots")], "ENGINE_THREADS=\"lots\"".to_string()),
        (vec![("ENGINE_BACKEND", "tract"), ("ENGINE_DEVICE", "cuda")], "no CUDA support".to_string()),
    ];
    for (env, want) in cases {
        let mut b = TandemBuilder::new();
        for (k, v) in &env {
            b = b.env(k, v);
        }
        let cache = PathBuf::from(b.dir()).join("cache");
        let mut t = b.spawn();
        let status = t.wait_exit(Duration::from_secs(60));
        assert_eq!(status.code(), Some(2), "{env:?}\n{}", t.explain());
        assert!(t.stderr().contains(&want), "{want:?} for {env:?}\n{}", t.explain());
        assert!(!cache.exists(), "nothing may be written before exit 2: {env:?}");
    }
}

#[test]
fn the_active_virtualenv_is_searched_first_and_the_library_names_its_own_version() {
    // Where this machine's ONNX Runtime is (found by the later rules): said on
    // METRICS_PORT only, never to the inference ports' clients.
    let metrics = free_port();
    let t = TandemBuilder::new().env("METRICS_PORT", &metrics.to_string()).start();
    let public: serde_json::Value = Tandem::http_client().get(t.http_url("/")).send().unwrap().json().unwrap();
    assert!(public["engine"]["onnxruntime"]["version"].is_string(), "{public}");
    assert!(public["engine"]["onnxruntime"].get("library").is_none(), "a path leaked to clients: {public}");
    let about = format!("http://127.0.0.1:{metrics}/");
    let info: serde_json::Value = Tandem::http_client().get(&about).send().unwrap().json().unwrap();
    let real = std::path::PathBuf::from(info["engine"]["onnxruntime"]["library"].as_str().expect("a library"));
    let version = info["engine"]["onnxruntime"]["version"].as_str().expect("a version").to_string();
    drop(t);
    // A virtualenv holding it under a file name without the version (as an image may).
    let b = TandemBuilder::new();
    let venv = b.dir().join("venv");
    let capi = venv.join("lib/python3.99/site-packages/onnxruntime/capi");
    std::fs::create_dir_all(&capi).unwrap();
    std::os::unix::fs::symlink(&real, capi.join("libonnxruntime.so")).unwrap();
    let metrics = free_port();
    let t = b.env("VIRTUAL_ENV", venv.to_str().unwrap()).env("METRICS_PORT", &metrics.to_string()).start();
    let about = format!("http://127.0.0.1:{metrics}/");
    let info: serde_json::Value = Tandem::http_client().get(&about).send().unwrap().json().unwrap();
    let ort = &info["engine"]["onnxruntime"];
    assert_eq!(ort["found_by"], "VIRTUAL_ENV", "{info}");
    assert_eq!(ort["library"].as_str(), capi.join("libonnxruntime.so").to_str(), "{info}");
    assert_eq!(ort["version"].as_str(), Some(version.as_str()), "read from the library, not its file name: {info}");
    assert!(t.stderr().contains("found_by=VIRTUAL_ENV") || t.stderr().contains("VIRTUAL_ENV"), "{}", t.explain());
}

#[test]
fn a_binary_cargo_installed_from_the_checkout_finds_its_models_and_venv() {
    // As `cargo install --path .` leaves it: $CARGO_HOME/bin/tandem, no Python on PATH.
    let b = TandemBuilder::new().copied_binary();
    let empty = b.dir().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let home = b.dir().to_str().unwrap().to_string();
    let t = b.env("PATH", empty.to_str().unwrap()).env("CARGO_HOME", &home).start();
    let info: serde_json::Value = Tandem::http_client().get(t.http_url("/")).send().unwrap().json().unwrap();
    assert_eq!(info["engine"]["onnxruntime"]["found_by"], "the project's .venv", "{info}\n{}", t.explain());
    assert!(info["models"].as_array().unwrap().iter().any(|m| m["name"] == "digits" && m["ready"] == true), "{info}");
}
