//! The front door: the edge policy every request path applies the same way.
//! `CORS_ALLOW_ORIGINS` on the engine's plain HTTP and on the HTTPS worker
//! (the proxy path is in worker_command.rs), through the real binary with a
//! real client: preflights answered, allowed origins named on every answer,
//! others refused, nothing sent when CORS is off.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use common::{digits_body, Tandem, TandemBuilder};
use reqwest::blocking::Client;
use reqwest::Method;

const APP: &str = "https://app.example";

fn preflight(client: &Client, url: &str, origin: &str) -> reqwest::blocking::Response {
    client
        .request(Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type, inference-header-content-length")
        .send()
        .unwrap()
}

fn header<'a>(r: &'a reqwest::blocking::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

#[test]
fn web_pages_from_allowed_origins_may_call_the_api_on_both_ports() {
    let t = TandemBuilder::new()
        .ssl()
        .env("CORS_ALLOW_ORIGINS", &format!("{APP},http://localhost:3000"))
        .env("SSL_HSTS", "max-age=60")
        .start();
    let http = Tandem::http_client();
    let https = Tandem::https_client(&t.served_chain_pem());
    for (client, url, secure) in [
        (&http, t.http_url("/v2/models/digits/infer"), false),
        (&https, t.https_url("localhost", "/v2/models/digits/infer"), true),
    ] {
        // The preflight is answered by tandem, naming what the page may send.
        let r = preflight(client, &url, APP);
        assert_eq!(r.status(), 204, "{url}\n{}", t.explain());
        assert_eq!(header(&r, "access-control-allow-origin"), Some(APP));
        assert!(header(&r, "access-control-allow-methods").unwrap().contains("POST"));
        assert_eq!(header(&r, "access-control-allow-headers"), Some("content-type, inference-header-content-length"));
        assert_eq!(header(&r, "strict-transport-security").is_some(), secure, "HSTS on HTTPS only");
        // Another origin is refused with a JSON error.
        let r = preflight(client, &url, "https://evil.example");
        assert_eq!(r.status(), 403);
        assert!(header(&r, "access-control-allow-origin").is_none());
        let body: serde_json::Value = r.json().unwrap();
        assert!(body["error"].as_str().unwrap().contains("CORS_ALLOW_ORIGINS"), "{body}");
        // The call itself carries the origin and the headers a page may read.
        let r = client.post(&url).header("origin", APP).body(digits_body(3)).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "access-control-allow-origin"), Some(APP));
        assert!(header(&r, "access-control-expose-headers").unwrap().contains("inference-header-content-length"));
        assert!(r.headers().get_all("vary").iter().any(|v| v.to_str().unwrap().contains("Origin")));
        // Every path: an error and a health check too.
        let base = url.trim_end_matches("/v2/models/digits/infer");
        for path in ["/v2/models/nope", "/v2/health/ready"] {
            let r = client.get(format!("{base}{path}")).header("origin", "http://localhost:3000").send().unwrap();
            assert_eq!(header(&r, "access-control-allow-origin"), Some("http://localhost:3000"), "{path}");
        }
        // No Origin, no CORS answer.
        let r = client.get(format!("{base}/v2/health/ready")).send().unwrap();
        assert!(header(&r, "access-control-allow-origin").is_none());
    }
}

#[test]
fn without_cors_no_origin_is_named_and_preflights_are_not_answered() {
    let t = TandemBuilder::new().start();
    let http = Tandem::http_client();
    let r = preflight(&http, &t.http_url("/v2/models/digits/infer"), APP);
    assert_eq!(r.status(), 405, "{}", t.explain());
    assert!(header(&r, "access-control-allow-origin").is_none());
    let r = http.post(t.http_url("/v2/models/digits/infer")).header("origin", APP).body(digits_body(1)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "access-control-allow-origin").is_none());
}

#[test]
fn a_bad_origin_list_names_itself_and_exits_2() {
    let mut t = TandemBuilder::new().env("CORS_ALLOW_ORIGINS", "app.example.com").spawn();
    assert_eq!(t.wait_exit(std::time::Duration::from_secs(20)).code(), Some(2), "{}", t.explain());
    assert!(t.stderr().contains("CORS_ALLOW_ORIGINS"), "{}", t.explain());
}
