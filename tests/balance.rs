//! Balanced plain HTTP: engine workers share the supervisor's one listening
//! socket, and keep-alive connections still spread evenly over them (each
//! holds back its accepts while it is ahead; shared::edge::balance).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use common::TandemBuilder;

/// `tandem_worker_requests_total{slot="N",listener="http"}` for every slot.
fn per_slot(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("tandem_worker_requests_total{") && l.contains(r#"listener="http""#))
        .map(|l| {
            let slot = l.split("slot=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
            (slot, l.rsplit(' ').next().unwrap().parse().unwrap())
        })
        .collect()
}

#[test]
fn sixteen_keep_alive_connections_spread_over_two_engine_workers() {
    let t = TandemBuilder::new().env("NUM_WORKERS", "2").start();
    let url = t.http_url("/v2/models/digits/infer");
    let body = common::digits_body(3);
    let before = per_slot(&common::Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap());
    let barrier = std::sync::Barrier::new(16);
    std::thread::scope(|s| {
        for _ in 0..16 {
            let (url, body, barrier) = (&url, &body, &barrier);
            s.spawn(move || {
                // One client, one keep-alive connection, opened together with the others.
                let client = reqwest::blocking::Client::builder().pool_max_idle_per_host(1).build().unwrap();
                barrier.wait();
                for _ in 0..150 {
                    let r =
                        client.post(url).header("content-type", "application/json").body(body.clone()).send().unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                }
            });
        }
    });
    let after = per_slot(&common::Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap());
    let served: Vec<f64> =
        after.iter().map(|(slot, n)| n - before.iter().find(|(s, _)| s == slot).map_or(0.0, |(_, b)| *b)).collect();
    let total: f64 = served.iter().sum();
    eprintln!("requests per engine worker: {served:?} of {total}");
    assert_eq!(served.len(), 2, "{after:?}\n{}", t.explain());
    assert!(total >= 2400.0, "{total}");
    for n in &served {
        assert!(*n >= total / 3.0, "one worker served {n} of {total}: {served:?}\n{}", t.explain());
    }
}
