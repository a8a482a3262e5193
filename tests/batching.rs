//! End-to-end test of dynamic batching: concurrent requests to a model whose
//! configuration asks for `dynamic_batching` run in fewer executions than
//! requests (Triton's statistics say so) and get exactly the answers the same
//! model gives unbatched, over both ports.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use common::*;
use serde_json::Value;

/// Request `i`: `rows` rows of pixel values that differ per request and row.
/// These tests measure what executions cost: one at a time, so that a
/// neighbour's start-up is not taken for the model's own cost (the verdict
/// on whether batching pays came out wrong once in CI with all three at once).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn request(i: usize, rows: usize) -> String {
    let data: Vec<String> = (0..rows * 64).map(|k| ((i * 7 + k * 3) % 17).to_string()).collect();
    format!(r#"{{"inputs":[{{"name":"pixels","shape":[{rows},64],"datatype":"FP32","data":[{}]}}]}}"#, data.join(","))
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(20)).build().unwrap()
}

/// Request `i` of `rows` rows to `model`, answered 200.
fn infer(t: &Tandem, c: &reqwest::blocking::Client, model: &str, i: usize, rows: usize) -> Value {
    let r = c.post(t.http_url(&format!("/v2/models/{model}/infer"))).body(request(i, rows)).send().unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

/// Busy: one request of 16 rows runs, `n` more (request `i` of `1 + i % 3`
/// rows) arrive meanwhile. Their clients and threads are made first and
/// released together, and the busy one has 16 rows (the slow models' time
/// grows with their rows: 2 rows ran in about 120 ms, less than the pause
/// below, on a loaded CI machine), so all of them arrive within its run.
fn busy_wave(t: &Tandem, model: &str, n: usize) -> Vec<(usize, Value)> {
    let clients: Vec<reqwest::blocking::Client> = (0..=n).map(|_| client()).collect();
    let go = std::sync::Barrier::new(n + 1);
    std::thread::scope(|s| {
        let rest: Vec<_> = (1..=n)
            .map(|i| {
                let (go, c) = (&go, &clients[i]);
                s.spawn(move || {
                    go.wait();
                    (i, infer(t, c, model, i, 1 + i % 3))
                })
            })
            .collect();
        let first = s.spawn(|| infer(t, &clients[0], model, 100, 16));
        std::thread::sleep(std::time::Duration::from_millis(150));
        go.wait();
        first.join().unwrap();
        rest.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Executions of `model` so far, from its statistics.
fn executions(t: &Tandem, model: &str) -> u64 {
    let stats: Value =
        Tandem::http_client().get(t.http_url(&format!("/v2/models/{model}/stats"))).send().unwrap().json().unwrap();
    stats["model_stats"][0]["execution_count"].as_u64().unwrap()
}

#[test]
fn a_model_that_batching_does_not_speed_up_runs_its_requests_as_they_come() {
    let _alone = one_at_a_time();
    // One core: one inference thread, so every execution runs by itself and
    // its time is the model's alone, not shared with a neighbour's.
    let b = TandemBuilder::new().env("NUM_WORKERS", "1").env("LOG_LEVEL", "info").wrapped(&["taskset", "-c", "0"]);
    let repo = b.dir().join("models");
    // A row costs the same alone or stacked (one intra-op thread, so stacking
    // cannot buy a second thread's help either): batching can only serialise work.
    // A batch of up to 32 rows: the first wave's 24 fit in one.
    let batching = "dynamic_batching { preferred_batch_size: [ 32 ] max_queue_delay_microseconds: 30000000 }\n\
                    parameters { key: \"intra_op_thread_count\" value: { string_value: \"1\" } }\n";
    copy_slow_linear(&repo, "linear", 0.01, batching);
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    // Alone: idle requests run as they came (enough of them that the moving
    // average of a row's cost alone settles past the first, cold, run).
    for i in 0..12 {
        infer(&t, &client(), "linear", i, 1);
    }
    let n = 12;
    // What a row costs together is not known yet: the first wave batches, to learn it.
    let before = executions(&t, "linear");
    let first = busy_wave(&t, "linear", n);
    let batched = executions(&t, "linear") - before;
    assert!(batched <= 4, "the busy one, then the twelve together: {batched} executions");
    // Now it is known to save nothing: the second wave runs one request per
    // execution (13), but for at most one small batch run to look again
    // (a second after the verdict, of up to 4 requests).
    let before = executions(&t, "linear");
    let second = busy_wave(&t, "linear", n);
    let alone = executions(&t, "linear") - before;
    assert!(alone >= n as u64 - 2, "the busy one and the twelve one by one: {alone} executions\n{}", t.explain());
    t.wait_for_log(std::time::Duration::from_secs(5), "dynamic batching saves nothing per row here", 1);
    // Batched or not, each request got its own rows.
    for (i, v) in first.iter().chain(&second) {
        assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1 + i % 3, 10]), "{v}");
    }
}

#[test]
fn concurrent_requests_share_executions_and_get_the_unbatched_answers() {
    let _alone = one_at_a_time();
    let b = TandemBuilder::new().ssl().env("NUM_WORKERS", "1");
    let repo = b.dir().join("models");
    copy_digits(&repo, "plain", "");
    copy_digits(
        &repo,
        "batched",
        "dynamic_batching { preferred_batch_size: [ 16 ] max_queue_delay_microseconds: 50000 }\n",
    );
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let config: Value =
        Tandem::http_client().get(t.http_url("/v2/models/batched/config")).send().unwrap().json().unwrap();
    assert_eq!(config["dynamic_batching"]["preferred_batch_size"], serde_json::json!([16]), "{config}");

    let ca = t.served_chain_pem();
    let n = 48;
    let answers: Vec<(Value, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (t, ca) = (&t, &ca);
                s.spawn(move || {
                    let rows = 1 + i % 3;
                    let body = request(i, rows);
                    let (client, url) = if i % 2 == 0 {
                        (Tandem::http_client(), t.http_url("/v2/models/batched/infer"))
                    } else {
                        (Tandem::https_client(ca), t.https_url("localhost", "/v2/models/batched/infer"))
                    };
                    let batched = client.post(&url).body(body.clone()).send().unwrap();
                    assert_eq!(batched.status(), 200);
                    let batched: Value = batched.json().unwrap();
                    let plain: Value = Tandem::http_client()
                        .post(t.http_url("/v2/models/plain/infer"))
                        .body(body)
                        .send()
                        .unwrap()
                        .json()
                        .unwrap();
                    assert_eq!(batched["outputs"][0]["shape"], serde_json::json!([rows, 10]), "{batched}");
                    (batched, plain)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // ONNX Runtime may sum in another order for another batch size (its GEMM
    // blocks by rows), so equal means equal to float rounding, not bit for bit.
    for (batched, plain) in &answers {
        let numbers = |v: &Value| -> Vec<f64> {
            v["outputs"][0]["data"].as_array().expect("data").iter().map(|x| x.as_f64().expect("number")).collect()
        };
        let (b, p) = (numbers(batched), numbers(plain));
        assert_eq!(b.len(), p.len(), "a batched answer has another size than the unbatched one");
        for (x, y) in b.iter().zip(&p) {
            assert!(
                (x - y).abs() <= 1e-6 + 1e-4 * y.abs(),
                "a batched answer differs from the unbatched one: {x} vs {y}"
            );
        }
    }
    let stats: Value =
        Tandem::http_client().get(t.http_url("/v2/models/batched/stats")).send().unwrap().json().unwrap();
    let s = &stats["model_stats"][0];
    let rows: u64 = (0..n).map(|i| 1 + (i % 3) as u64).sum();
    assert_eq!(s["inference_count"], rows, "{s}");
    assert_eq!(s["inference_stats"]["success"]["count"], n as u64, "{s}");
    let executions = s["execution_count"].as_u64().unwrap();
    assert!(executions <= n as u64, "{n} requests ran in {executions} executions\n{s}");
    // Every execution is counted under its batch size.
    let by_size: u64 =
        s["batch_stats"].as_array().unwrap().iter().map(|b| b["compute_infer"]["count"].as_u64().unwrap()).sum();
    assert_eq!(by_size, executions, "{s}");
}

#[test]
fn requests_gather_behind_a_busy_model_and_an_idle_one_never_waits_for_company() {
    let _alone = one_at_a_time();
    let b = TandemBuilder::new().env("NUM_WORKERS", "1");
    let repo = b.dir().join("models");
    // A queue delay far longer than any answer below may take: only a request
    // that waits for company would wait it out.
    let batching = "dynamic_batching { preferred_batch_size: [ 16 ] max_queue_delay_microseconds: 30000000 }\n";
    copy_slow(&repo, "batched", 0.5, batching);
    // The same model file unbatched.
    std::fs::create_dir_all(repo.join("plain/1")).unwrap();
    std::fs::copy(repo.join("batched/1/model.onnx"), repo.join("plain/1/model.onnx")).unwrap();
    std::fs::copy(repo.join("batched/labels.txt"), repo.join("plain/labels.txt")).unwrap();
    let config = std::fs::read_to_string(repo.join("batched/config.pbtxt")).unwrap();
    let config = config.replace("name: \"batched\"", "name: \"plain\"").replace(batching, "");
    std::fs::write(repo.join("plain/config.pbtxt"), config).unwrap();
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    // Idle: answered at once, not after the 30 s delay (the client gives up at 20 s).
    infer(&t, &client(), "batched", 0, 1);
    let n = 12;
    let answers = busy_wave(&t, "batched", n);
    // Each gets its own rows, as the model answers them unbatched.
    let plain: Vec<(usize, Value)> = std::thread::scope(|s| {
        let t = &t;
        let all: Vec<_> = (1..=n).map(|i| s.spawn(move || (i, infer(t, &client(), "plain", i, 1 + i % 3)))).collect();
        all.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((i, batched), (_, unbatched)) in answers.iter().zip(&plain) {
        assert_eq!(batched["outputs"][0]["shape"], serde_json::json!([1 + i % 3, 10]), "{batched}");
        let numbers = |v: &Value| -> Vec<f64> {
            v["outputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
        };
        for (x, y) in numbers(batched).iter().zip(numbers(unbatched)) {
            assert!((x - y).abs() <= 1e-6 + 1e-4 * y.abs(), "request {i}: {x} vs {y}");
        }
    }
    let stats: Value =
        Tandem::http_client().get(t.http_url("/v2/models/batched/stats")).send().unwrap().json().unwrap();
    let s = &stats["model_stats"][0];
    let executions = s["execution_count"].as_u64().unwrap();
    assert!(executions <= 4, "the idle one, the busy one, then the twelve together: {executions}\n{s}");
    let sizes: Vec<u64> =
        s["batch_stats"].as_array().unwrap().iter().map(|b| b["batch_size"].as_u64().unwrap()).collect();
    assert!(sizes.iter().any(|&b| b > 3), "no batch held more than one request: {sizes:?}\n{s}");
}
