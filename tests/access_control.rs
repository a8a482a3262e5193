//! End-to-end tests of access control at the front door: `RESTRICTED_API`
//! (Triton's restricted categories) on plain HTTP, HTTPS through the ring and
//! the proxy in front of `WORKER_COMMAND`, with the stock tritonclient, a
//! secret file swapped while serving and hostile header values; and
//! `METRICS_PUBLIC=false` keeping `/metrics` on `METRICS_PORT` only.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn write_secret(path: &Path, value: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn status(r: reqwest::Result<reqwest::blocking::Response>) -> (u16, String) {
    let r = r.unwrap();
    (r.status().as_u16(), r.text().unwrap_or_default())
}

#[test]
fn restricted_categories_need_their_header_on_every_port_and_follow_the_secret_file() {
    let b =
        TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("MODEL_CONTROL_MODE", "explicit").env("MODEL_LOAD", "*");
    let key = b.dir().join("admin.key");
    write_secret(&key, "first-secret-value");
    let rule = format!("model-repository,statistics:X-Admin-Key=@{}", key.display());
    let t = b.env("RESTRICTED_API", &rule).env("HOST", "0.0.0.0").start();
    let ca = t.dir.path().join("ca.pem");
    std::fs::write(&ca, t.served_chain_pem()).unwrap();
    let (http, https) = (Tandem::http_client(), Tandem::https_client(&t.served_chain_pem()));
    let ports: [(&reqwest::blocking::Client, String); 2] =
        [(&http, t.http_url("")), (&https, format!("https://localhost:{}", t.https_port))];
    for (client, base) in &ports {
        let (code, body) = status(client.post(format!("{base}/v2/repository/index")).send());
        assert_eq!(code, 403, "{base}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        let said = error["error"].as_str().unwrap();
        assert!(said.contains("model-repository") && said.contains("x-admin-key"), "{said}");
        assert!(!said.contains("first-secret"), "the secret leaked: {said}");
        assert_eq!(status(client.get(format!("{base}/v2/models/digits/stats")).send()).0, 403);
        let ok = client.post(format!("{base}/v2/repository/index")).header("x-admin-key", "first-secret-value").send();
        assert_eq!(status(ok).0, 200, "{base}");
        // Open categories need nothing.
        let r = client.post(format!("{base}/v2/models/digits/infer")).body(digits_body(1)).send();
        assert_eq!(status(r).0, 200);
        // Wrong, near and hostile values are refused; the worker lives on.
        for bad in ["first-secret-valu", "first-secret-valuee", "FIRST-SECRET-VALUE", &"x".repeat(60_000)] {
            let r = client.get(format!("{base}/v2/models/stats")).header("x-admin-key", bad).send();
            assert_ne!(status(r).0, 200, "{bad:.20}");
        }
    }
    // A path spelled to slip past its category is refused, not classified elsewhere.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", "-X", "POST"])
        .arg(t.http_url("/v2/models/digits/../../repository/index"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    // The stock tritonclient: refused without headers=, served with them.
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/restricted_api.py"))
        .arg(format!("127.0.0.1:{}", t.http_port))
        .args(["--header", "x-admin-key", "--key", "first-secret-value"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(seen["without"].as_str().unwrap().contains("model-repository"), "{seen}");
    assert_eq!(seen["with"], serde_json::json!(["digits"]), "{seen}");
    assert_eq!(seen["ready"], true);

    // The secret file replaced while serving: the new value within seconds, the old one refused.
    write_secret(&key, "second-secret-value");
    wait_for(
        Duration::from_secs(5),
        "the new secret to apply",
        || t.explain(),
        || {
            let r = http.post(t.http_url("/v2/repository/index")).header("x-admin-key", "second-secret-value").send();
            (status(r).0 == 200).then_some(())
        },
    );
    let old = http.post(t.http_url("/v2/repository/index")).header("x-admin-key", "first-secret-value").send();
    assert_eq!(status(old).0, 403);
    // No caution: the repository API is restricted.
    assert!(!t.stderr().contains("lets anyone who reaches"), "{}", t.explain());
}

#[test]
fn a_restricted_health_category_is_probed_by_tandem_health_with_its_header() {
    let t = TandemBuilder::new().ssl().env("RESTRICTED_API", "health:x-probe=p1;status:x-status=s1").spawn();
    let http = Tandem::http_client();
    wait_for(
        Duration::from_secs(60),
        "readiness, with the header",
        || t.explain(),
        || {
            let r = http.get(t.http_url("/v2/health/ready")).header("x-probe", "p1").send().ok()?;
            (r.status() == 200).then_some(())
        },
    );
    assert_eq!(status(http.get(t.http_url("/v2/health/ready")).send()).0, 403);
    wait_for(
        Duration::from_secs(30),
        "HTTPS readiness, with the header",
        || t.explain(),
        || {
            let https = Tandem::https_client(&std::fs::read_to_string(t.cert_dir().join("live.pem")).ok()?);
            let r = https.get(t.https_url("localhost", "/v2/health/ready")).header("x-probe", "p1").send().ok()?;
            (r.status() == 200).then_some(())
        },
    );
    let out = Command::new(TANDEM).arg("health").env_clear().envs(&t.env).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn an_open_repository_api_on_the_network_is_a_caution() {
    let t = TandemBuilder::new().env("MODEL_CONTROL_MODE", "explicit").env("HOST", "0.0.0.0").start();
    t.wait_for_log(Duration::from_secs(5), "lets anyone who reaches 0.0.0.0 load and unload models", 1);
}

#[test]
fn the_proxy_path_enforces_the_same_restrictions_and_metrics_can_stay_private() {
    let metrics = free_port();
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let command = format!("python3 -m uvicorn app:app --app-dir {} --port {{port}} --log-level warning", app.display());
    let b = TandemBuilder::new();
    let keys = b.dir().join("keys");
    let (key, _) = new_key("app-client", Some(&keys));
    let t = b
        .env("WORKER_COMMAND", &command)
        .env("WORKER_READY_PATH", "/whoami")
        .env("API_KEYS_FILE", keys.to_str().unwrap())
        .env("RESTRICTED_API", "status:x-k=let-me-in")
        .env("METRICS_PUBLIC", "false")
        .env("METRICS_PORT", &metrics.to_string())
        .spawn();
    let http = Tandem::http_client();
    wait_for(
        Duration::from_secs(60),
        "the copy",
        || t.explain(),
        || http.get(t.http_url("/whoami")).send().ok().filter(|r| r.status() == 200).map(|_| ()),
    );
    // The ready path is the copies' health check: open without a key. Anything else needs one.
    assert_eq!(status(http.get(t.http_url("/echo")).send()).0, 401);
    assert_eq!(status(http.get(t.http_url("/")).header("x-k", "let-me-in").send()).0, 401, "a key first");
    assert_eq!(status(http.get(t.http_url("/")).bearer_auth(&key).send()).0, 403, "GET / is the status category");
    let r = http.get(t.http_url("/")).header("x-k", "let-me-in").bearer_auth(&key).send();
    assert_eq!(status(r).0, 200, "passed to the copy");
    // The copy learns the key's name (never from the client), and the key itself travels on untouched.
    let seen: Value = http
        .get(t.http_url("/whoami"))
        .bearer_auth(&key)
        .header("x-tandem-api-key-name", "admin")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(seen["headers"]["x-tandem-api-key-name"], "app-client", "{seen}");
    let forged: Value =
        http.get(t.http_url("/whoami")).header("x-tandem-api-key-name", "admin").send().unwrap().json().unwrap();
    assert!(forged["headers"].get("x-tandem-api-key-name").is_none(), "{forged}");
    let (code, body) = status(http.get(t.http_url("/metrics")).bearer_auth(&key).send());
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("METRICS_PORT"), "{body}");
    let scrape = http.get(format!("http://127.0.0.1:{metrics}/metrics")).send().unwrap();
    assert_eq!(scrape.status(), 200);
    assert!(scrape.text().unwrap().contains("tandem_http_requests_total"));
}

/// `tandem apikey new NAME [--append FILE]`: the key on stdout (and the line, without `--append`).
fn new_key(name: &str, append: Option<&Path>) -> (String, Option<String>) {
    let mut cmd = Command::new(TANDEM);
    cmd.args(["apikey", "new", name]);
    if let Some(f) = append {
        cmd.arg("--append").arg(f);
    }
    let out = cmd.env_clear().output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().map(String::from);
    (lines.next().unwrap(), lines.next())
}

fn json_lines(t: &Tandem, message: &str) -> Vec<Value> {
    t.stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

#[test]
fn api_keys_admit_named_clients_on_both_ports_and_a_revoked_key_is_refused_within_two_seconds() {
    let b = TandemBuilder::new().ssl().env("NUM_WORKERS", "2");
    let keys = b.dir().join("keys");
    let (ci, none) = new_key("ci-runner", Some(&keys));
    assert!(none.is_none() && ci.starts_with("tdm_"), "{ci}");
    let mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is created readable by its owner only");
    let (web, line) = new_key("web", None);
    let line = line.expect("the line for the file");
    assert!(line.starts_with("sha256:") && line.ends_with(" web") && !line.contains(&web), "{line}");
    let mut file = std::fs::read_to_string(&keys).unwrap();
    assert!(!file.contains(&ci), "the file holds the hash, never the key");
    file.push_str(&format!("# the web front end\n{line}\n"));
    write_secret(&keys, file.trim_end());
    let t = b.env("API_KEYS_FILE", keys.to_str().unwrap()).env("ACCESS_LOG", "true").env("LOG_FORMAT", "json").start();
    let (http, https) = (Tandem::http_client(), Tandem::https_client(&t.served_chain_pem()));
    let ports: [(&reqwest::blocking::Client, String); 2] =
        [(&http, t.http_url("")), (&https, format!("https://localhost:{}", t.https_port))];
    for (client, base) in &ports {
        let infer = |headers: &[(&str, &str)]| {
            let mut r = client.post(format!("{base}/v2/models/digits/infer")).body(digits_body(1));
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.send().unwrap()
        };
        let missing = infer(&[]);
        assert_eq!(missing.status(), 401, "{base}");
        assert_eq!(missing.headers()["www-authenticate"], "Bearer");
        let said: Value = missing.json().unwrap();
        assert!(said["error"].as_str().unwrap().contains("Authorization: Bearer"), "{said}");
        let wrong = infer(&[("authorization", "Bearer tdm_not-a-key")]);
        assert_eq!(wrong.status(), 401);
        assert_eq!(wrong.headers()["www-authenticate"], "Bearer error=\"invalid_token\"");
        // Every spelling of both headers, for both keys.
        for (k, v) in [
            ("Authorization", format!("Bearer {ci}")),
            ("authorization", format!("bearer   {ci}")),
            ("X-API-Key", web.clone()),
            ("x-api-key", ci.clone()),
        ] {
            assert_eq!(infer(&[(k, &v), ("x-tandem-api-key-name", "forged")]).status(), 200, "{base} {k}");
        }
        // Hostile values: refused, never served, the workers live on.
        let long = "k".repeat(20_000);
        for bad in [
            vec![("authorization", format!("Bearer {ci}")), ("authorization", format!("Bearer {ci}"))],
            vec![("authorization", format!("Bearer {ci}")), ("x-api-key", web.clone())],
            vec![("x-api-key", format!("{ci}x"))],
            vec![("x-api-key", ci[..ci.len() - 1].to_string())],
            vec![("authorization", format!("Bearer {long}"))],
            vec![("authorization", format!("Basic {ci}"))],
        ] {
            let pairs: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let code = infer(&pairs).status().as_u16();
            assert!(code == 401 || code == 431, "{base}: {:.60?} got {code}", pairs);
        }
        // Health checks stay open; nothing else under /v2/health is one.
        for path in ["/v2/health/ready", "/v2/health/live", "/v2/models/digits/ready"] {
            assert_eq!(status(client.get(format!("{base}{path}")).send()).0, 200, "{path}");
        }
        assert_eq!(status(client.get(format!("{base}/v2/health/other")).send()).0, 401);
        assert_eq!(status(client.get(format!("{base}/v2/health/../models")).send()).0, 401, "normalised by reqwest");
    }
    // The stock tritonclient: 401 without headers=, served with them.
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/restricted_api.py"))
        .arg(format!("127.0.0.1:{}", t.http_port))
        .args(["--header", "Authorization", "--key", &format!("Bearer {web}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(seen["without"].as_str().unwrap().contains("needs a key"), "{seen}");
    assert_eq!(seen["with"], serde_json::json!(["digits"]), "{seen}");
    assert_eq!(seen["ready"], true);

    // The name, never the key, in the access log (plain and through the ring) and the metrics.
    let lines = json_lines(&t, "access");
    for listener in ["http", "https"] {
        assert!(
            lines.iter().any(|l| l["listener"] == listener && l["api_key"] == "ci-runner" && l["status"] == 200),
            "no {listener} line names ci-runner\n{}",
            t.explain()
        );
    }
    assert!(!t.stderr().contains(&ci) && !t.stderr().contains(&web), "a key reached the log");
    assert!(!lines.iter().any(|l| l["api_key"] == "forged"), "a client named its own key\n{}", t.explain());
    let metrics = http.get(t.http_url("/metrics")).header("x-api-key", &ci).send().unwrap().text().unwrap();
    assert!(metrics.contains("tandem_client_requests_total{client=\"ci-runner\",class=\"2xx\"}"), "{metrics}");
    assert!(!metrics.contains("tandem_auth_failures_total{reason=\"missing\"} 0"), "{metrics}");

    // Revoked by editing the file: refused on both ports within 2 s, no restart; the other key serves on.
    write_secret(&keys, &line);
    let revoked = std::time::Instant::now();
    wait_for(
        Duration::from_secs(2),
        "the revoked key to be refused everywhere",
        || t.explain(),
        || {
            let refused = ports.iter().all(|(c, base)| {
                (0..4).all(|_| {
                    let r = c.get(format!("{base}/v2/models/digits")).header("x-api-key", &ci).send();
                    r.is_ok_and(|r| r.status() == 401)
                })
            });
            refused.then_some(())
        },
    );
    eprintln!("revocation took {:?}", revoked.elapsed());
    assert_eq!(
        status(
            https.get(format!("https://localhost:{}/v2/models/digits", t.https_port)).header("x-api-key", &web).send()
        )
        .0,
        200
    );
    // A broken file keeps the last good keys, and says why.
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&keys, "not a key file\n").unwrap();
    // (The file is looked at when requests come: keep asking for 2.5 s.)
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < until {
        assert_eq!(status(http.get(t.http_url("/v2/models/digits")).header("x-api-key", &web).send()).0, 200);
        std::thread::sleep(Duration::from_millis(50));
    }
    t.wait_for_log(Duration::from_secs(5), "API_KEYS_FILE refused; the previous one stays", 1);
    assert!(!t.stderr().contains("not a key file"), "the file's text reached the log");
}

#[test]
fn protected_health_needs_a_key_that_tandem_health_sends_and_a_client_certificate_can_stand_in() {
    let b = TandemBuilder::new().ssl();
    let pki = b.dir().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    common::pki::ca_and_client(&pki, "ca1", "alice");
    let keys = b.dir().join("keys");
    let (key, _) = new_key("probe", Some(&keys));
    let probe_key = b.dir().join("probe.key");
    write_secret(&probe_key, &key);
    let t = b
        .env("API_KEYS_FILE", keys.to_str().unwrap())
        .env("API_KEYS_PROTECT_HEALTH", "true")
        .env("HEALTH_API_KEY", &format!("@{}", probe_key.display()))
        .env("API_KEYS_ALLOW_MTLS", "true")
        .env("SSL_CLIENT_CA", pki.join("ca1.pem").to_str().unwrap())
        .env("SSL_CLIENT_AUTH", "optional")
        .spawn();
    let http = Tandem::http_client();
    wait_for(
        Duration::from_secs(60),
        "readiness, with the key",
        || t.explain(),
        || {
            let r = http.get(t.http_url("/v2/health/ready")).bearer_auth(&key).send().ok()?;
            (r.status() == 200).then_some(())
        },
    );
    assert_eq!(status(http.get(t.http_url("/v2/health/ready")).send()).0, 401);
    wait_for(
        Duration::from_secs(30),
        "tandem health",
        || t.explain(),
        || {
            let out = Command::new(TANDEM).arg("health").env_clear().envs(&t.env).output().ok()?;
            out.status.success().then_some(())
        },
    );
    let out =
        Command::new(TANDEM).arg("health").env_clear().envs(&t.env).env_remove("HEALTH_API_KEY").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "without the key tandem health must fail: {out:?}");
    // A verified client certificate stands in for a key over HTTPS; none at all does not.
    let server_ca = pki.join("server.pem");
    std::fs::write(&server_ca, std::fs::read_to_string(t.cert_dir().join("live.pem")).unwrap()).unwrap();
    let curl = |cert: bool| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"]).arg(&server_ca);
        if cert {
            cmd.arg("--cert").arg(pki.join("alice.pem")).arg("--key").arg(pki.join("alice.key"));
        }
        cmd.arg(t.https_url("localhost", "/v2/models/digits"));
        String::from_utf8(cmd.output().unwrap().stdout).unwrap()
    };
    assert_eq!(curl(true), "200");
    assert_eq!(curl(false), "401");
}

#[test]
fn a_rate_limit_is_one_budget_per_client_across_workers_and_ports() {
    // One request a minute after a burst of 8: within the test, each client gets 8 (9 if a minute passes).
    let b = TandemBuilder::new().ssl().env("NUM_WORKERS", "2");
    let keys = b.dir().join("keys");
    let (a, _) = new_key("a", Some(&keys));
    let (bkey, _) = new_key("b", Some(&keys));
    let (ops, _) = new_key("ops", Some(&keys));
    let t = b.env("API_KEYS_FILE", keys.to_str().unwrap()).env("RATE_LIMIT", "1/m,burst=8").start();
    let (http, https) = (Tandem::http_client(), Tandem::https_client(&t.served_chain_pem()));
    let https_base = format!("https://localhost:{}", t.https_port);
    // Plain HTTP on a new connection each time (they spread over both engine
    // workers), HTTPS through the HTTPS worker and the ring.
    let send = |key: &str, i: usize| {
        let fresh = Tandem::http_client();
        let (client, base) = if i.is_multiple_of(2) { (&fresh, t.http_url("")) } else { (&https, https_base.clone()) };
        let r =
            client.post(format!("{base}/v2/models/digits/infer")).bearer_auth(key).body(digits_body(1)).send().unwrap();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        (r.status().as_u16(), retry)
    };
    let answers: Vec<_> = (0..24).map(|i| send(&a, i)).collect();
    let served = answers.iter().filter(|(s, _)| *s == 200).count();
    assert!((8..=9).contains(&served), "client a: {answers:?}");
    for (s, retry) in &answers {
        assert!(*s == 200 || (*s == 429 && retry.is_some_and(|r| (1..=60).contains(&r))), "{answers:?}");
    }
    // Another client is not touched by a's budget.
    let b_answers: Vec<_> = (0..8).map(|i| send(&bkey, i)).collect();
    assert!(b_answers.iter().all(|(s, _)| *s == 200), "client b: {b_answers:?}");
    // Health checks are never limited.
    assert_eq!(status(http.get(t.http_url("/v2/health/ready")).send()).0, 200);
    let (code, body) = status(http.get(t.http_url("/v2/models/digits")).bearer_auth(&a).send());
    assert_eq!(code, 429);
    assert!(body.contains("this API key is over its rate limit (RATE_LIMIT=1/m,burst=8)"), "{body}");
    let metrics = http.get(t.http_url("/metrics")).bearer_auth(&ops).send().unwrap().text().unwrap();
    let limited = metrics
        .lines()
        .find(|l| l.starts_with("tandem_rate_limited_total{by=\"key\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(limited >= 15, "{metrics}");
    assert!(metrics.contains("tandem_client_rate_limited_total{client=\"a\"}"), "{metrics}");
}

#[test]
fn a_forwarded_address_is_believed_only_from_a_trusted_proxy() {
    let t = TandemBuilder::new().env("RATE_LIMIT", "1/m,burst=3").env("TRUSTED_PROXIES", "127.0.0.2").start();
    let from = |ip: &str| {
        reqwest::blocking::Client::builder().local_address(ip.parse::<std::net::IpAddr>().unwrap()).build().unwrap()
    };
    let (proxy, direct) = (from("127.0.0.2"), from("127.0.0.1"));
    let get = |c: &reqwest::blocking::Client, xff: &str| {
        c.get(t.http_url("/v2/models/digits")).header("x-forwarded-for", xff).send().unwrap().status().as_u16()
    };
    // Through the trusted proxy, two clients: each has its own three.
    let through: Vec<u16> = (0..8usize)
        .map(|i| get(&proxy, if i.is_multiple_of(2) { "203.0.113.1" } else { "198.51.100.7, 203.0.113.2" }))
        .collect();
    assert_eq!(through.iter().filter(|&&s| s == 200).count(), 6, "{through:?}");
    // A client that is not a trusted proxy names whoever it likes: it is still itself.
    let spoofed: Vec<u16> = (0..6).map(|i| get(&direct, &format!("192.0.2.{i}"))).collect();
    assert_eq!(spoofed.iter().filter(|&&s| s == 200).count(), 3, "{spoofed:?}");
    assert!(spoofed[3..].iter().all(|&s| s == 429), "{spoofed:?}");
}

#[test]
fn a_model_past_its_max_inflight_answers_429_instead_of_queueing() {
    let b = TandemBuilder::new().env("NUM_WORKERS", "1");
    let repo = b.dir().join("repo");
    // Each inference takes about 1.5 s: two requests hold both places meanwhile.
    copy_slow(&repo, "slow", 1.5, "parameters { key: \"max_inflight\" value { string_value: \"2\" } }\n");
    let t = b.env("MODEL_REPOSITORY", repo.to_str().unwrap()).start();
    let url = t.http_url("/v2/models/slow/infer");
    let send = |delay_ms: u64| {
        let url = url.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            let r = Tandem::http_client().post(url).body(digits_body(1)).send().unwrap();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry, r.text().unwrap())
        })
    };
    let first = [send(0), send(0)];
    // The third comes while the first two wait: refused at once.
    let third = send(400).join().unwrap();
    assert_eq!(third.0, 429, "{third:?}");
    assert_eq!(third.1.as_deref(), Some("1"));
    assert!(third.2.contains("max_inflight of 2"), "{third:?}");
    for h in first {
        let (code, _, body) = h.join().unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // Places are given back: the next one is served.
    assert_eq!(send(0).join().unwrap().0, 200);
    let metrics = Tandem::http_client().get(t.http_url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("tandem_model_busy_total 1"), "{metrics}");
}
