//! End-to-end tests of model control (`MODEL_CONTROL_MODE`): explicit load
//! and unload carried out by every engine worker, with a configuration
//! override that survives a worker restart; the repository poller picking up
//! a model copied in and one removed; and, throughout, zero failed requests on
//! another model served over both ports.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::load::Load;
use common::*;
use serde_json::Value;

/// A repository with `digits` and each of `others` (copies of it).
fn repository(dir: &Path, others: &[&str]) -> PathBuf {
    let repo = dir.join("models");
    copy_digits(&repo, "digits", "");
    for o in others {
        copy_digits(&repo, o, "");
    }
    repo
}

/// Plain HTTP and HTTPS posting digits inferences until finished.
fn digits_load(t: &Tandem) -> Load {
    let ca = t.served_chain_pem();
    Load::start(vec![
        ("http", Tandem::http_client(), t.http_url("/v2/models/digits/infer")),
        ("https", Tandem::https_client(&ca), t.https_url("localhost", "/v2/models/digits/infer")),
    ])
}

/// Asks at least `count` times on new connections, and on until both engine
/// workers have answered (new connections land on whichever worker accepts
/// first, so a few may all go to one); returns the statuses, workers and bodies.
fn ask_everyone(t: &Tandem, path: &str, body: Option<String>, count: usize) -> Vec<(u16, String, Value)> {
    let client = reqwest::blocking::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut out: Vec<(u16, String, Value)> = Vec::new();
    for _ in 0..200 {
        let workers: BTreeSet<&String> = out.iter().map(|a| &a.1).collect();
        if out.len() >= count && workers.len() >= 2 {
            break;
        }
        let r = match &body {
            Some(b) => client.post(t.http_url(path)).body(b.clone()).send().unwrap(),
            None => client.get(t.http_url(path)).send().unwrap(),
        };
        let worker = r.headers()["x-tandem-worker"].to_str().unwrap().to_string();
        let status = r.status().as_u16();
        out.push((status, worker, r.json::<Value>().unwrap_or(Value::Null)));
    }
    out
}

fn post(t: &Tandem, path: &str, body: &str) -> (u16, Value) {
    let r = Tandem::http_client().post(t.http_url(path)).body(body.to_string()).send().unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

#[test]
fn explicit_load_and_unload_reach_every_worker_while_other_models_serve() {
    let b =
        TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("MODEL_CONTROL_MODE", "explicit").env("MODEL_LOAD", "*");
    let repo = repository(b.dir(), &["other"]);
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let v2: Value = Tandem::http_client().get(t.http_url("/v2")).send().unwrap().json().unwrap();
    assert!(v2["extensions"].as_array().unwrap().contains(&"model_repository".into()), "{v2}");
    let load = digits_load(&t);

    let (status, body) = post(&t, "/v2/repository/models/other/unload", "");
    assert_eq!(status, 200, "{body}\n{}", t.explain());
    let answers = ask_everyone(&t, "/v2/models/other/infer", Some(common::digits_body(1)), 8);
    assert!(answers.iter().all(|(s, _, _)| *s == 503), "every worker refuses the unloaded model: {answers:?}");
    assert!(answers[0].2["error"].as_str().unwrap().contains("unloaded"), "{answers:?}");
    assert_eq!(answers.iter().map(|a| &a.1).collect::<BTreeSet<_>>().len(), 2, "both workers asked");

    // Loaded again with a configuration override: every worker serves it so.
    let config = r#"{"name":"other","platform":"onnxruntime_onnx","max_batch_size":8,"input":[{"name":"pixels","data_type":"TYPE_FP32","dims":[64]}],"output":[{"name":"probabilities","data_type":"TYPE_FP32","dims":[10]}]}"#;
    let request = serde_json::json!({ "parameters": { "config": config } }).to_string();
    let (status, body) = post(&t, "/v2/repository/models/other/load", &request);
    assert_eq!(status, 200, "{body}\n{}", t.explain());
    let mut before = BTreeSet::new();
    for (status, worker, config) in ask_everyone(&t, "/v2/models/other/config", None, 8) {
        assert_eq!(status, 200, "worker {worker}: {config}");
        assert_eq!(config["max_batch_size"], 8, "worker {worker}: {config}");
        before.insert(worker);
    }
    assert!(ask_everyone(&t, "/v2/models/other/infer", Some(common::digits_body(1)), 4).iter().all(|a| a.0 == 200));

    // A replacement worker starts with the override, not the files. (The load
    // pauses: a killed worker takes its open connections with it.)
    load.finish(&t, 11);
    let victim = t.workers("engine-worker")[0];
    nix::sys::signal::kill(victim, nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for(
        Duration::from_secs(20),
        "the replacement worker",
        || t.explain(),
        || (t.stderr().matches("engine worker ready").count() >= 3).then_some(()),
    );
    let answers = ask_everyone(&t, "/v2/models/other/config", None, 8);
    assert!(answers.iter().any(|a| !before.contains(&a.1)), "the new worker answered: {answers:?}");
    assert!(answers.iter().all(|a| a.2["max_batch_size"] == 8), "{answers:?}");
    let load = digits_load(&t);

    // Failures name their reason and change nothing.
    let (status, body) = post(&t, "/v2/repository/models/missing/load", "");
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("no model folder"), "{body}");
    let (status, body) =
        post(&t, "/v2/repository/models/other/load", r#"{"parameters":{"config":"{\"max_batch_size\": \"x\"}"}}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("previous load keeps serving"), "{body}");
    assert!(ask_everyone(&t, "/v2/models/other/infer", Some(common::digits_body(1)), 4).iter().all(|a| a.0 == 200));
    load.finish(&t, 11);
}

#[test]
fn the_poller_loads_a_model_copied_in_and_unloads_one_removed() {
    let b = TandemBuilder::new()
        .ssl()
        .env("NUM_WORKERS", "2")
        .env("MODEL_CONTROL_MODE", "poll")
        .env("REPOSITORY_POLL_SECS", "1");
    let repo = repository(b.dir(), &[]);
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let load = digits_load(&t);
    let (status, body) = post(&t, "/v2/repository/models/digits/unload", "");
    assert_eq!(status, 400, "poll mode refuses explicit changes: {body}");

    copy_digits(&repo, "fresh", "");
    wait_for(
        Duration::from_secs(20),
        "every worker to serve the new model",
        || t.explain(),
        || {
            ask_everyone(&t, "/v2/models/fresh/infer", Some(common::digits_body(1)), 6)
                .iter()
                .all(|a| a.0 == 200)
                .then_some(())
        },
    );
    std::fs::remove_dir_all(repo.join("fresh")).unwrap();
    wait_for(
        Duration::from_secs(20),
        "every worker to stop serving the removed model",
        || t.explain(),
        || {
            ask_everyone(&t, "/v2/models/fresh/infer", Some(common::digits_body(1)), 6)
                .iter()
                .all(|a| a.0 != 200)
                .then_some(())
        },
    );
    load.finish(&t, 11);
}

#[test]
fn without_model_control_load_is_refused_and_not_advertised() {
    let t = TandemBuilder::new().start();
    let (status, body) = post(&t, "/v2/repository/models/digits/load", "");
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("MODEL_CONTROL_MODE=explicit"), "{body}");
    let v2: Value = Tandem::http_client().get(t.http_url("/v2")).send().unwrap().json().unwrap();
    assert!(!v2["extensions"].as_array().unwrap().contains(&"model_repository".into()), "{v2}");
}

/// The answer to a load request for `model` with `config` (a JSON configuration).
fn load_with(t: &Tandem, model: &str, config: &serde_json::Value) -> (u16, Value) {
    let request = serde_json::json!({ "parameters": { "config": config.to_string() } }).to_string();
    post(t, &format!("/v2/repository/models/{model}/load"), &request)
}

/// The digits configuration (JSON) as `name`, with `change` merged in.
fn digits_config(name: &str, change: Value) -> Value {
    let mut c = serde_json::json!({
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "input": [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [64]}],
        "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10], "label_filename": "labels.txt"}]
    });
    for (k, v) in change.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn model_configurations_cannot_reach_outside_their_folder() {
    let b = TandemBuilder::new().ssl().env("MODEL_CONTROL_MODE", "explicit").env("MODEL_LOAD", "*");
    let repo = repository(b.dir(), &["other", "ondisk"]);
    let secret = b.dir().join("secret.txt");
    std::fs::write(&secret, "TOPSECRET-LABEL\n").unwrap();
    // A model whose own file names a label file outside its folder.
    let ondisk = std::fs::read_to_string(repo.join("ondisk/config.pbtxt")).unwrap();
    std::fs::write(repo.join("ondisk/config.pbtxt"), ondisk.replace("\"labels.txt\"", "\"../../secret.txt\"")).unwrap();
    std::os::unix::fs::symlink(&secret, repo.join("other/link.txt")).unwrap();
    nix::unistd::mkfifo(&repo.join("other/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).env("STRICT_READINESS", "false").start();
    let root = t.dir.path().to_str().unwrap().to_string();
    let live = t.cert_dir().join("live.pem");

    let meta: Value = Tandem::http_client().get(t.http_url("/v2/models/ondisk")).send().unwrap().json().unwrap();
    let text = meta.to_string();
    assert!(text.contains("label_filename") && !text.contains("TOPSECRET"), "{text}");
    assert!(!text.contains(&root), "an absolute path reached a client: {text}");

    let refused = |field: &str, value: &str| {
        let config = digits_config("other", serde_json::json!({}));
        let mut config = config.clone();
        if field == "label_filename" {
            config["output"][0]["label_filename"] = value.into();
        } else {
            config[field] = value.into();
        }
        let started = std::time::Instant::now();
        let (status, body) = load_with(&t, "other", &config);
        let error = body["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, 400, "{field}={value}: {body}\n{}", t.explain());
        assert!(error.contains(field), "{field}={value}: {error}");
        // The value the client sent comes back as it was sent; nothing else may.
        let error = error.replace(&format!("{:?}", value), "VALUE");
        for leak in ["TOPSECRET", "PRIVATE KEY", "root:", &root] {
            assert!(!error.contains(leak), "{field}={value} leaked {leak:?}: {error}");
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{field}={value} took {:?}", started.elapsed());
        error
    };
    let outside_existing = refused("label_filename", secret.to_str().unwrap());
    let outside_missing = refused("label_filename", "/nonexistent/labels.txt");
    assert_eq!(outside_existing, outside_missing, "the answer tells whether a file outside exists");
    for value in
        ["../../secret.txt", live.to_str().unwrap(), "/proc/self/environ", "/dev/zero", "link.txt", "fifo", "1"]
    {
        refused("label_filename", value);
    }
    for value in ["../../digits/1/model.onnx", "/etc/passwd", "/dev/zero", "../fifo"] {
        refused("default_model_filename", value);
    }

    // The model keeps serving its own labels; a load with them is accepted.
    let (status, body) = load_with(&t, "other", &digits_config("other", serde_json::json!({})));
    assert_eq!(status, 200, "{body}\n{}", t.explain());
    let body = common::digits_body(1)
        .replace("]}]}", "]}],\"outputs\":[{\"name\":\"probabilities\",\"parameters\":{\"classification\":1}}]}");
    let r: Value =
        Tandem::http_client().post(t.http_url("/v2/models/other/infer")).body(body).send().unwrap().json().unwrap();
    let top = r["outputs"][0]["data"][0].as_str().unwrap_or_else(|| panic!("{r}"));
    let label = top.rsplit(':').next().unwrap();
    assert!(label.len() == 1 && label.chars().all(|c| c.is_ascii_digit()), "{top}");
}

#[test]
fn overrides_are_bounded_and_only_a_load_that_succeeded_is_replayed() {
    let b = TandemBuilder::new().env("NUM_WORKERS", "2").env("MODEL_CONTROL_MODE", "explicit").env("MODEL_LOAD", "*");
    let repo = repository(b.dir(), &["a", "b", "c"]);
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let started = t.stderr().matches("worker started").count();
    let serving = |t: &Tandem| {
        assert!(
            ask_everyone(t, "/v2/models/digits/infer", Some(common::digits_body(1)), 4).iter().all(|a| a.0 == 200),
            "{}",
            t.explain()
        );
    };

    // Numbers past their bounds are refused with the reason; nothing restarts.
    for (change, want) in [
        (serde_json::json!({"instance_group": [{"count": 100000, "kind": "KIND_CPU"}]}), "at most 64"),
        (serde_json::json!({"parameters": {"intra_op_thread_count": {"string_value": "100000"}}}), "at most 256"),
        (serde_json::json!({"max_batch_size": 2000000000}), "max_batch_size"),
        (
            serde_json::json!({"input": [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [99999999999i64]}]}),
            "larger than",
        ),
    ] {
        let (status, body) = load_with(&t, "a", &digits_config("a", change.clone()));
        assert_eq!(status, 400, "{change}: {body}");
        assert!(body["error"].as_str().unwrap().contains(want), "{change}: {body}");
    }
    let huge = serde_json::json!({ "parameters": { "config": " ".repeat(200_000) } }).to_string();
    let (status, body) = post(&t, "/v2/repository/models/a/load", &huge);
    assert_eq!(status, 413, "{body}");
    serving(&t);
    assert_eq!(t.stderr().matches("worker started").count(), started, "a worker restarted\n{}", t.explain());

    // A load that fails is not what a restarted worker loads, and every worker agrees.
    let bad =
        digits_config("a", serde_json::json!({"input": [{"name": "nope", "data_type": "TYPE_FP32", "dims": [64]}]}));
    let (status, body) = load_with(&t, "a", &bad);
    assert_eq!(status, 400, "{body}");
    // Overrides that together outgrow an environment variable (128 KiB) reach a restarted worker.
    let padded = |name: &str| {
        let text = digits_config(name, serde_json::json!({"max_batch_size": 4})).to_string();
        text.clone() + &" ".repeat(60_000 - text.len())
    };
    for name in ["b", "c", "digits"] {
        let request = serde_json::json!({ "parameters": { "config": padded(name) } }).to_string();
        let (status, body) = post(&t, &format!("/v2/repository/models/{name}/load"), &request);
        assert_eq!(status, 200, "{name}: {body}\n{}", t.explain());
    }
    let victim = t.workers("engine-worker")[0];
    nix::sys::signal::kill(victim, nix::sys::signal::Signal::SIGKILL).unwrap();
    t.wait_replaced(Duration::from_secs(30), "engine-worker", victim, 2);
    wait_for(
        Duration::from_secs(30),
        "the replacement to be ready",
        || t.explain(),
        || (t.stderr().matches("engine worker ready").count() >= 3).then_some(()),
    );
    let answers = ask_everyone(&t, "/v2/models/a/config", None, 8);
    assert!(answers.iter().all(|a| a.0 == 200 && a.2["max_batch_size"] == 256), "a: {answers:?}");
    for name in ["b", "c", "digits"] {
        let answers = ask_everyone(&t, &format!("/v2/models/{name}/config"), None, 8);
        assert!(
            answers.iter().all(|a| a.0 == 200 && a.2["max_batch_size"] == 4),
            "{name}: {answers:?}\n{}",
            t.explain()
        );
    }
    serving(&t);
}

fn index(t: &Tandem) -> Vec<Value> {
    let r = Tandem::http_client().post(t.http_url("/v2/repository/index")).body("{}").send().unwrap();
    r.json::<Vec<Value>>().unwrap()
}

fn state_of(index: &[Value], name: &str) -> Option<String> {
    index.iter().find(|m| m["name"] == name).map(|m| m["state"].as_str().unwrap().to_string())
}

#[test]
fn explicit_control_loads_only_what_model_load_names_and_forgets_deleted_folders() {
    // Nothing named: nothing loaded, the server is ready, the log says how to load.
    let b = TandemBuilder::new().env("MODEL_CONTROL_MODE", "explicit");
    let repo = repository(b.dir(), &["other"]);
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    t.wait_for_log(Duration::from_secs(5), "no model is loaded at start", 1);
    let listed = index(&t);
    assert_eq!(state_of(&listed, "digits").as_deref(), Some("UNAVAILABLE"), "{listed:?}");
    assert_eq!(state_of(&listed, "other").as_deref(), Some("UNAVAILABLE"), "{listed:?}");
    let r = Tandem::http_client().post(t.http_url("/v2/models/digits/infer")).body(digits_body(1)).send().unwrap();
    assert_eq!(r.status(), 503);
    let (status, body) = post(&t, "/v2/repository/models/digits/load", "");
    assert_eq!(status, 200, "{body}");
    let r = Tandem::http_client().post(t.http_url("/v2/models/digits/infer")).body(digits_body(1)).send().unwrap();
    assert_eq!(r.status(), 200);
    // A folder added later is listed (not loaded); one unloaded and deleted leaves the index.
    copy_digits(&repo, "later", "");
    assert_eq!(state_of(&index(&t), "later").as_deref(), Some("UNAVAILABLE"));
    std::fs::remove_dir_all(repo.join("other")).unwrap();
    assert_eq!(state_of(&index(&t), "other"), None, "{:?}", index(&t));
    // A loaded model whose folder is deleted still serves and stays listed.
    std::fs::remove_dir_all(repo.join("digits")).unwrap();
    assert_eq!(state_of(&index(&t), "digits").as_deref(), Some("READY"));
    drop(t);

    // Named: those load, the others wait; a worker restarted serves the same set.
    let b = TandemBuilder::new().env("MODEL_CONTROL_MODE", "explicit").env("MODEL_LOAD", "other, missing");
    let repo = repository(b.dir(), &["other"]);
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    t.wait_for_log(Duration::from_secs(5), "MODEL_LOAD names a model the repository does not hold", 1);
    let listed = index(&t);
    assert_eq!(state_of(&listed, "other").as_deref(), Some("READY"), "{listed:?}");
    assert_eq!(state_of(&listed, "digits").as_deref(), Some("UNAVAILABLE"), "{listed:?}");
    let engine = t.workers("engine-worker")[0];
    nix::sys::signal::kill(engine, nix::sys::signal::Signal::SIGKILL).unwrap();
    t.wait_replaced(Duration::from_secs(30), "engine-worker", engine, 1);
    let mut t = t;
    t.wait_ready(false);
    let listed = index(&t);
    assert_eq!(state_of(&listed, "other").as_deref(), Some("READY"), "{listed:?}");
    assert_eq!(state_of(&listed, "digits").as_deref(), Some("UNAVAILABLE"), "{listed:?}");
}
