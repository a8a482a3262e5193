//! End-to-end tests of HTTPS through the shared-memory ring: load sharing over
//! every engine worker, a worker killed mid-load, an HTTPS worker killed while
//! it watches the ring, a full queue, a slow engine, clients that hang up
//! mid-request, and size limits.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};

/// Worker ids of the HTTP (engine) workers, from the supervisor's "worker started" lines.
fn engine_ids(t: &Tandem) -> Vec<u64> {
    let re = t.stderr();
    re.lines()
        .filter(|l| l.contains("role=\"engine-worker\"") && l.contains("worker started"))
        .filter_map(|l| l.split("worker_id=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn https_inference_is_spread_over_every_engine_worker() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").start();
    let url = t.https_url("localhost", "/v2/models/digits/infer");
    let chain = t.served_chain_pem();
    let counts: BTreeMap<String, usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let client = Tandem::https_client(&chain);
                    (0..100)
                        .map(|i| {
                            let r = client.post(&url).body(common::digits_body(i % 16)).send().unwrap();
                            assert!(r.status().is_success(), "{}", r.status());
                            r.headers()["x-tandem-worker"].to_str().unwrap().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut counts = BTreeMap::new();
        for id in handles.into_iter().flat_map(|h| h.join().unwrap()) {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    });
    let engines: Vec<String> = engine_ids(&t).iter().map(u64::to_string).collect();
    assert_eq!(counts.len(), 2, "both engine workers should answer HTTPS: {counts:?}");
    for id in counts.keys() {
        assert!(engines.contains(id), "HTTPS answered by {id}, which is not an engine worker {engines:?}");
    }
    // The HTTPS worker holds no model: it never logs an engine load.
    let https_id = t
        .stderr()
        .lines()
        .find(|l| l.contains("role=\"https-worker\""))
        .and_then(|l| l.split("worker_id=").nth(1)?.split_whitespace().next().map(String::from));
    let https_id = https_id.expect("https worker started line");
    assert!(
        !t.stderr().lines().any(|l| l.contains("engine loaded") && l.contains(&format!("worker_id={https_id} "))),
        "the HTTPS worker loaded a model\n{}",
        t.explain()
    );
}

#[test]
fn killed_engine_worker_under_https_load_loses_nothing_that_could_be_retried() {
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("REQUEST_TIMEOUT", "20").start();
    let url = t.https_url("127.0.0.1", "/v2/models/digits/infer");
    let chain = t.served_chain_pem();
    let victim = t.workers("engine-worker")[0];
    let stop_at = Instant::now() + Duration::from_secs(4);
    let results: Vec<(bool, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let client = Tandem::https_client(&chain);
                    let mut out = Vec::new();
                    while Instant::now() < stop_at {
                        let started = Instant::now();
                        let ok = client
                            .post(&url)
                            .body(common::digits_body(9))
                            .send()
                            .is_ok_and(|r| r.status().is_success());
                        out.push((ok, started.elapsed()));
                    }
                    out
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        kill(victim, Signal::SIGKILL).unwrap();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let failures = results.iter().filter(|(ok, _)| !ok).count();
    let slowest = results.iter().map(|(_, d)| *d).max().unwrap();
    assert!(results.len() > 100, "too few requests ran: {}", results.len());
    assert!(slowest < Duration::from_secs(10), "a request hung for {slowest:?}");
    // At most the requests the dead worker held, and those are retried on the other worker.
    assert!(failures <= 4, "{failures} of {} requests failed\n{}", results.len(), t.explain());
    let replaced = t.wait_replaced(Duration::from_secs(10), "engine-worker", victim, 2);
    assert_eq!(replaced.len(), 2);
    let client = Tandem::https_client(&chain);
    wait_for(
        Duration::from_secs(10),
        "HTTPS inference after the restart",
        || t.explain(),
        || client.post(&url).body(common::digits_body(1)).send().ok().filter(|r| r.status().is_success()),
    );
}

#[test]
fn full_queue_is_503_and_a_stalled_engine_is_504_at_the_deadline() {
    let t =
        TandemBuilder::new().ssl().env("NUM_WORKERS", "1").env("SHM_SLOTS", "2").env("REQUEST_TIMEOUT", "2").start();
    let url = t.https_url("localhost", "/v2/models/digits/infer");
    let chain = t.served_chain_pem();
    let engine = t.workers("engine-worker")[0];
    // A stopped engine claims nothing: submitted requests wait in their slots.
    kill(engine, Signal::SIGSTOP).unwrap();
    // Three requests at once for two slots: one is turned away at once with
    // 503 + Retry-After, the two queued ones get 504 at the deadline.
    let mut results: Vec<(u16, Option<String>, String, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let client = Tandem::https_client(&chain);
                    let started = Instant::now();
                    let r = client.post(&url).body(common::digits_body(2)).send().unwrap();
                    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                    (r.status().as_u16(), retry, r.text().unwrap(), started.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    kill(engine, Signal::SIGCONT).unwrap();
    results.sort_by_key(|r| r.0);
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(statuses, [503, 504, 504], "{results:?}\n{}", t.explain());
    let (_, retry, body, took) = &results[0];
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(body.contains("SHM_SLOTS"), "{body}");
    assert!(*took < Duration::from_millis(1500), "the 503 should be immediate, took {took:?}");
    for (_, _, body, took) in &results[1..] {
        assert!(body.contains("REQUEST_TIMEOUT"), "{body}");
        assert!(*took >= Duration::from_millis(1900) && *took < Duration::from_secs(6), "504 after {took:?}");
    }
    // The abandoned slots were given back: the queue serves again.
    let client = Tandem::https_client(&chain);
    for _ in 0..10 {
        let r = client.post(&url).body(common::digits_body(4)).send().unwrap();
        assert!(r.status().is_success(), "{}\n{}", r.status(), t.explain());
    }
}

/// Ring slots holding a request now, from the supervisor's metrics.
fn slots_busy(metrics_port: u16) -> Option<u64> {
    let text = reqwest::blocking::get(format!("http://127.0.0.1:{metrics_port}/metrics")).ok()?.text().ok()?;
    text.lines().find_map(|l| l.strip_prefix("tandem_shm_slots_busy ")?.trim().parse().ok())
}

#[test]
fn clients_that_hang_up_mid_request_leave_no_ring_slot_behind() {
    let metrics = free_port();
    let t = TandemBuilder::new()
        .ssl()
        .env("NUM_WORKERS", "2")
        .env("SHM_SLOTS", "8")
        .env("METRICS_PORT", &metrics.to_string())
        .start();
    let url = t.https_url("localhost", "/v2/models/digits/infer");
    let chain = t.served_chain_pem();
    // Eight clients that give up after 0.2-3 ms, so their connections close at
    // every point of a request: before the engine took it, while it runs, and
    // after its answer reached the HTTPS worker but before it was sent.
    let gave_up: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u32)
            .map(|c| {
                let (url, chain) = (&url, &chain);
                s.spawn(move || {
                    let client = Tandem::https_client(chain);
                    (0..500u32)
                        .filter(|i| {
                            let wait = Duration::from_micros(200 + u64::from((i * 37 + c * 11) % 2800));
                            client.post(url).body(common::digits_body(i % 16)).timeout(wait).send().is_err()
                        })
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert!(gave_up > 0, "no client gave up: the test exercised nothing");
    // Every slot comes back, and the whole ring serves again.
    wait_for(
        Duration::from_secs(10),
        "every ring slot to be free again",
        || t.explain(),
        || (slots_busy(metrics)? == 0).then_some(()),
    );
    std::thread::scope(|s| {
        for i in 0..8 {
            let (url, chain, t) = (&url, &chain, &t);
            s.spawn(move || {
                let client = Tandem::https_client(chain);
                for _ in 0..20 {
                    let r = client.post(url).body(common::digits_body(i)).send().unwrap();
                    assert!(r.status().is_success(), "{}\n{}", r.status(), t.explain());
                }
            });
        }
    });
}

#[test]
fn oversized_https_bodies_are_413_naming_the_limit() {
    let t = TandemBuilder::new().ssl().env("SHM_SLOT_BYTES", "65536").start();
    let client = Tandem::https_client(&t.served_chain_pem());
    let url = t.https_url("localhost", "/v2/models/digits/infer");
    let r = client.post(&url).body(vec![b' '; 100_000]).send().unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("SHM_SLOT_BYTES"), "{body}");
    // Under the limit works, and so does a request with a large JSON batch.
    let r = client.post(&url).body(common::digits_body(5)).send().unwrap();
    assert!(r.status().is_success());
    // Plain HTTP is limited by MAX_REQUEST_BYTES only.
    let r = Tandem::http_client().post(t.http_url("/v2/models/digits/infer")).body(vec![b' '; 100_000]).send().unwrap();
    assert_eq!(r.status(), 400, "HTTP accepts the size and refuses the (blank) JSON");
}

#[test]
fn sigterm_drains_https_requests_through_the_ring_promptly() {
    let mut t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("GRACEFUL_TIMEOUT", "25").start();
    let url = t.https_url("localhost", "/v2/models/digits/infer");
    let chain = t.served_chain_pem();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let client = Tandem::https_client(&chain);
                    let mut out = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // Refused or closed connections once the listener is gone are
                        // expected; a timeout (a request left hanging) or an error status is not.
                        match client.post(&url).body(common::digits_body(8)).send() {
                            Ok(r) => out.push(r.status().as_u16()),
                            Err(e) if e.is_timeout() => out.push(0),
                            Err(_) => {}
                        }
                    }
                    out
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        t.signal(Signal::SIGTERM);
        let status = t.wait_exit(Duration::from_secs(8));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status.code(), Some(0), "{}", t.explain());
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    // Draining must not wait for GRACEFUL_TIMEOUT: the engines serve the ring until the HTTPS worker is gone.
    assert!(statuses.len() > 10, "too little load: {}", statuses.len());
    assert!(
        statuses.iter().all(|&s| s == 200),
        "non-200 answers (0: timed out) during the stop: {:?}",
        statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
    );
    assert!(!t.stderr().contains("did not drain in time"), "{}", t.explain());
}

#[test]
fn losing_the_supervisor_strands_no_https_request() {
    let b = TandemBuilder::new().ssl().env("NUM_WORKERS", "1");
    let repo = bench_model_repository(b.dir(), "cnn");
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let workers: Vec<_> = Tandem::children_of(t.pid()).into_iter().map(|(p, _)| p).collect();
    let ca = t.served_chain_pem();
    let url = t.https_url("localhost", "/v2/models/cnn/infer");
    let body = format!(
        r#"{{"inputs":[{{"name":"image","shape":[1,3,64,64],"datatype":"FP32","data":[{}]}}]}}"#,
        vec!["0.5"; 3 * 64 * 64].join(",")
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let killed_at = std::sync::OnceLock::<std::time::Instant>::new();
    // 32 clients keep the ring full (a cnn inference takes milliseconds; one engine worker).
    let slowest_after_kill = std::thread::scope(|s| {
        let clients: Vec<_> = (0..32)
            .map(|_| {
                s.spawn(|| {
                    let client = reqwest::blocking::Client::builder()
                        .use_rustls_tls()
                        .tls_built_in_root_certs(false)
                        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
                        .timeout(Duration::from_secs(90))
                        .build()
                        .unwrap();
                    let mut slowest = Duration::ZERO;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let sent = std::time::Instant::now();
                        let r = client.post(&url).body(body.clone()).send();
                        if let Some(k) = killed_at.get() {
                            // Time from the later of (kill, send) to the answer or the error.
                            slowest = slowest.max(sent.max(*k).elapsed());
                        }
                        if r.is_err() {
                            break;
                        }
                    }
                    slowest
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        install_provider();
        nix::sys::signal::kill(t.pid(), Signal::SIGKILL).unwrap();
        killed_at.set(std::time::Instant::now()).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        clients.into_iter().map(|c| c.join().unwrap()).max().unwrap()
    });
    // Before: requests no engine had claimed waited for REQUEST_TIMEOUT (60 s), then 504.
    assert!(
        slowest_after_kill < Duration::from_secs(10),
        "a request waited {slowest_after_kill:?} after the kill\n{}",
        t.explain()
    );
    wait_for(
        Duration::from_secs(15),
        "every worker to exit",
        || t.explain(),
        || workers.iter().all(|&p| !matches!(process_state(p), Some(s) if s != 'Z')).then_some(()),
    );
}

#[test]
fn an_https_worker_killed_while_watching_the_ring_leaves_its_successor_woken() {
    // A lone client keeps a serving thread watching the ring for its answer
    // (engines skip waking the completion thread meanwhile); killed at a
    // random moment, the worker often dies mid-watch. Its successor must
    // still be woken for every answer, not find them on its 200 ms timer.
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").start();
    let url = t.https_url("127.0.0.1", "/v2/models/digits/infer");
    let chain = t.served_chain_pem();
    for round in 0..5 {
        let victim = t.workers("https-worker")[0];
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let client = Tandem::https_client(&chain);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client.post(&url).body(common::digits_body(3)).send();
                }
            });
            std::thread::sleep(Duration::from_millis(300 + 37 * round));
            kill(victim, Signal::SIGKILL).unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        t.wait_replaced(Duration::from_secs(15), "https-worker", victim, 1);
        let client = Tandem::https_client(&chain);
        wait_for(
            Duration::from_secs(15),
            "the replacement HTTPS worker answering",
            || t.explain(),
            || client.post(&url).body(common::digits_body(1)).send().ok().filter(|r| r.status().is_success()),
        );
    }
    // Eight clients at once keep more than two requests in the ring, so no
    // thread watches and every answer needs the completion thread's wake-up.
    // Left asleep, 8 x 60 requests would take 60 rounds of its 200 ms timer.
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let client = Tandem::https_client(&chain);
                for i in 0..60 {
                    let r = client.post(&url).body(common::digits_body(i % 16)).send().unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                }
            });
        }
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "480 HTTPS requests took {took:?}: answers waited for a timer\n{}",
        t.explain()
    );
}

/// Bytes of memory the ring's memfd holds now, seen through the supervisor's descriptor of it.
fn ring_allocated(t: &Tandem) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", t.pid())).unwrap();
    let ring = fds
        .filter_map(Result::ok)
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("memfd:tandem-shm")))
        .expect("the supervisor holds the ring's memfd");
    std::fs::metadata(ring.path()).unwrap().blocks() * 512
}

#[test]
fn large_https_bodies_reuse_warm_ring_pages_within_shm_warm_bytes() {
    const MIB: u64 = 1 << 20;
    let body = vec![b' '; 6 << 20];
    let post = |t: &Tandem| {
        let client = Tandem::https_client(&t.served_chain_pem());
        let r = client.post(t.https_url("127.0.0.1", "/v2/models/digits/infer")).body(body.clone()).send().unwrap();
        // Through the ring to the engine, which refuses a body of blanks.
        assert_eq!(r.status(), 400, "{}", r.text().unwrap_or_default());
    };
    // A budget for two such bodies: the first keeps its 5 MiB past the slot's
    // first MiB; the ones after it take the same warm slot, so nothing grows.
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "1").env("SHM_WARM_BYTES", "12582912").start();
    let idle = ring_allocated(&t);
    post(&t);
    let first = ring_allocated(&t);
    assert!(first >= idle + 5 * MIB, "the first large body's pages were given back: {idle} -> {first}");
    for _ in 0..4 {
        post(&t);
    }
    let after = ring_allocated(&t);
    assert!(after <= first + MIB, "later bodies warmed other slots instead of reusing one: {first} -> {after}");
    drop(t);
    // SHM_WARM_BYTES=0: what passes the first MiB is given back every time.
    let t = TandemBuilder::new().ssl().env("NUM_WORKERS", "1").env("SHM_WARM_BYTES", "0").start();
    let idle = ring_allocated(&t);
    for _ in 0..3 {
        post(&t);
    }
    // Each slot used keeps its first MiB (and a page of the answer), no more.
    let after = ring_allocated(&t);
    assert!(
        after <= idle + 3 * MIB + MIB / 4,
        "pages past the first MiB were kept with SHM_WARM_BYTES=0: {idle} -> {after}"
    );
}
