//! The `/status` page on METRICS_PORT: served as a self-contained HTML page
//! under a policy that runs nothing, showing the numbers of a real tandem
//! after load, and rendered by a real browser (headless Chromium: its DOM
//! holds the tables and numbers, and a screenshot is made).
//!
//! The browser half is skipped, saying so, where Chromium is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::process::Command;

use common::*;

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
    let t = TandemBuilder::new()
        .ssl()
        .env("NUM_WORKERS", "2")
        .env("METRICS_PORT", &metrics_port.to_string())
        .env("MODEL_REPOSITORY", repo.path().to_str().unwrap())
        .start();
    let http = Tandem::http_client();
    let https = Tandem::https_client(&t.served_chain_pem());
    for i in 0..30 {
        let r = http.post(t.http_url("/v2/models/digits/infer")).body(digits_body(i % 16)).send().unwrap();
        assert!(r.status().is_success());
        let r =
            https.post(t.https_url("localhost", "/v2/models/digits/infer")).body(digits_body(i % 16)).send().unwrap();
        assert!(r.status().is_success());
    }
    let missing = http.get(t.http_url("/v2/models/nosuch")).send().unwrap();
    assert_eq!(missing.status().as_u16(), 404);

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
    // The model served 60 requests (30 over each port), all of them ok.
    let row = page.split("<tr>").find(|r| r.contains("<td>digits</td>")).unwrap_or_else(|| panic!("{page}"));
    assert!(row.contains("<td class=\"n\">60</td><td class=\"n\">0</td>"), "ok 60, failed 0: {row}");
    for part in ["id=\"requests\"", "/v2/models/{name}/infer", "id=\"processes\"", "engine-worker", "https-worker"] {
        assert!(page.contains(part), "{part} is not on the page:\n{page}");
    }
    assert!(page.contains("certificate days left") && page.contains("GENERATE"), "{page}");
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
