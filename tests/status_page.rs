//! The `/status` page on METRICS_PORT: served as a self-contained HTML page
//! under a policy that runs nothing, showing the numbers the API reports for
//! a real tandem after load (a model that serves, one that cannot load), and
//! rendered by a real browser (headless Chromium: its DOM holds the tables
//! and numbers, updates after more traffic, and a screenshot is made). And
//! METRICS_PORT's `/metrics` carries the readiness the engines publish.
//!
//! The browser half is skipped, saying so, where Chromium is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// The first table row of model `name` on a page.
fn model_row(page: &str, name: &str) -> String {
    page.split("<tr>")
        .find(|r| r.contains(&format!("<td>{name}</td>")))
        .unwrap_or_else(|| panic!("no row for {name}:\n{page}"))
        .to_string()
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// Headless Chromium's arguments for one page (as root it needs --no-sandbox).
fn headless(profile: &std::path::Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--window-size=1280,1500",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

#[test]
fn the_status_page_shows_the_server_and_a_browser_renders_it() {
    install_provider();
    let metrics_port = free_port();
    let repo = tempfile::tempdir().unwrap();
    copy_digits(repo.path(), "digits", "");
    broken_model(repo.path(), "broken");
    // Live, not ready: a model is unavailable (strict readiness).
    let t = TandemBuilder::new()
        .ssl()
        .env("NUM_WORKERS", "2")
        .env("METRICS_PORT", &metrics_port.to_string())
        .env("MODEL_REPOSITORY", repo.path().to_str().unwrap())
        .start_live();
    let http = Tandem::http_client();
    // The certificate is in place before the ports are bound.
    let chain = t.served_chain_pem();
    let https = Tandem::https_client(&chain);
    wait_for(
        Duration::from_secs(60),
        "digits serving over HTTPS",
        || t.explain(),
        || {
            https
                .get(t.https_url("localhost", "/v2/models/digits/ready"))
                .send()
                .ok()
                .filter(|r| r.status().is_success())
        },
    );
    for i in 0..30 {
        let r = http.post(t.http_url("/v2/models/digits/infer")).body(digits_body(i % 16)).send().unwrap();
        assert!(r.status().is_success());
        let r =
            https.post(t.https_url("localhost", "/v2/models/digits/infer")).body(digits_body(i % 16)).send().unwrap();
        assert!(r.status().is_success());
    }
    let missing = http.get(t.http_url("/v2/models/nosuch")).send().unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    // The numbers the API reports, to find on the page.
    let stats: serde_json::Value = http.get(t.http_url("/v2/models/digits/stats")).send().unwrap().json().unwrap();
    let ok = stats["model_stats"][0]["inference_stats"]["success"]["count"].as_u64().unwrap();
    assert_eq!(ok, 60, "{stats}");
    // METRICS_PORT's /metrics has the readiness the engine workers publish (within a second).
    let exposition = wait_for(
        Duration::from_secs(10),
        "readiness on METRICS_PORT",
        || t.explain(),
        || {
            let text = http.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().ok()?.text().ok()?;
            text.contains("tandem_model_ready{model=\"broken\"} 0\n").then_some(text)
        },
    );
    assert!(exposition.contains("tandem_model_ready{model=\"digits\"} 1\n"), "{exposition}");
    assert!(exposition.contains("tandem_ready 0\n"), "{exposition}");

    let url = format!("http://127.0.0.1:{metrics_port}/status");
    let resp = http.get(&url).send().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let header = |k: &str| resp.headers().get(k).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert!(header("content-security-policy").starts_with("default-src 'none'"), "{:?}", resp.headers());
    assert_eq!(header("cache-control"), "no-store");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let page = resp.text().unwrap();
    // Nothing the page needs comes from elsewhere, and nothing runs.
    for outside in ["<script", "src=", "<link", "@import", "url("] {
        assert!(!page.contains(outside), "the page loads or runs something ({outside}):\n{page}");
    }
    // The model served 60 requests (30 over each port), all of them ok, and is ready; the broken one is not.
    let ok_cells = |page: &str, ok: u64| {
        let row = model_row(page, "digits");
        assert!(row.contains("<span class=\"ok\">ready</span>"), "{row}");
        assert!(row.contains(&format!("<td class=\"n\">{ok}</td><td class=\"n\">0</td>")), "ok {ok}, failed 0: {row}");
    };
    ok_cells(&page, ok);
    assert!(model_row(&page, "broken").contains("<span class=\"bad\">unavailable</span>"), "{page}");
    assert!(page.contains("<div class=\"v\">not ready</div>"), "{page}");
    for part in ["id=\"requests\"", "/v2/models/{name}/infer", "id=\"processes\"", "engine-worker", "https-worker"] {
        assert!(page.contains(part), "{part} is not on the page:\n{page}");
    }
    assert!(page.contains("certificate days left") && page.contains("GENERATE"), "{page}");
    assert!(page.contains("DNS:localhost"), "the certificate's names: {page}");
    assert!(page.contains("<polyline"), "the charts: {page}");
    // The inference ports do not serve it (it is the operator's, on the metrics port).
    assert_eq!(http.get(t.http_url("/status")).send().unwrap().status().as_u16(), 404);

    let Some(browser) = chromium() else {
        eprintln!("status page browser check skipped: Chromium is not installed (Debian's chromium package)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dom = Command::new(browser).args(headless(&dir.path().join("a"))).arg("--dump-dom").arg(&url).output().unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    // The browser parsed the tables: the DOM has the model's row as the server wrote it.
    assert!(dom.contains("<table id=\"models\">") && dom.contains("<td>digits</td>"), "Chromium's DOM:\n{dom}");
    assert!(dom.contains("<title>tandem status</title>"), "{dom}");
    ok_cells(&dom, ok);
    // More traffic, and the page a browser loads next shows it, with more points in its charts.
    let points = |page: &str| page.matches(',').count();
    for i in 0..20 {
        let r = http.post(t.http_url("/v2/models/digits/infer")).body(digits_body(i % 16)).send().unwrap();
        assert!(r.status().is_success());
    }
    std::thread::sleep(Duration::from_millis(2500));
    let again =
        Command::new(browser).args(headless(&dir.path().join("c"))).arg("--dump-dom").arg(&url).output().unwrap();
    let again = String::from_utf8_lossy(&again.stdout).into_owned();
    ok_cells(&again, ok + 20);
    assert!(points(&again) > points(&dom), "the charts did not grow");
    let shot = dir.path().join("status.png");
    let out = Command::new(browser)
        .args(headless(&dir.path().join("b")))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    let png = std::fs::read(&shot).unwrap_or_else(|_| {
        panic!("no screenshot: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // A page of tables compresses to tens of KiB; a blank one to a few hundred bytes.
    assert!(png.len() > 20_000, "the screenshot is {} bytes: blank?", png.len());
    if let Some(keep) = std::env::var_os("TANDEM_STATUS_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
