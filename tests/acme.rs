//! End-to-end tests of `SSL_CERTIFICATE=ACME` against a real ACME server:
//! Debian's `pebble`, validating for real (HTTP-01 on tandem's HTTP port,
//! TLS-ALPN-01 on its HTTPS port, DNS-01 through a hook that sets records in
//! `pebble-challtestsrv`, which is also pebble's DNS server). Pebble's short
//! certificate lifetime makes tandem renew within the test, and the same HTTPS
//! worker serves each new certificate.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const DOMAIN: &str = "tandem.test";

/// pebble and pebble-challtestsrv on loopback, stopped on drop.
struct Pebble {
    children: Vec<Child>,
    dir: PathBuf,
    directory: String,
    management: u16,
    dns_management: u16,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// Validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`; certificates live `validity` seconds.
    fn start(dir: &Path, http_port: u16, tls_port: u16, validity: u64) -> Pebble {
        for tool in ["pebble", "pebble-challtestsrv"] {
            let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).status().unwrap().success();
            assert!(found, "{tool} is not installed: apt-get install pebble (.ci/run does)");
        }
        let dir = dir.join("pebble");
        std::fs::create_dir_all(&dir).unwrap();
        // Pebble's own HTTPS listener certificate, from a test CA the ACME client trusts through SSL_CERT_FILE.
        let ca = pki::TestCa::new();
        ca.issue().write(&dir, "cert.pem", "key.pem");
        std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
        let (listen, management) = free_ports();
        let (dns, dns_management) = free_ports();
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}"), "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args([
                "-management",
                &format!("127.0.0.1:{dns_management}"),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pebble = Command::new("pebble")
            .args(["-config", dir.join("pebble.json").to_str().unwrap(), "-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let p = Pebble {
            children: vec![challtestsrv, pebble],
            directory: format!("https://127.0.0.1:{listen}/dir"),
            dir,
            management,
            dns_management,
        };
        let client = p.client_trusting(&std::fs::read_to_string(p.dir.join("ca.pem")).unwrap());
        wait_for(
            Duration::from_secs(20),
            "pebble's directory",
            || p.logs(),
            || client.get(&p.directory).send().ok().filter(|r| r.status().is_success()).map(|_| ()),
        );
        p
    }

    fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!("--- pebble:\n{}\n--- challtestsrv:\n{}", read("pebble.log"), read("challtestsrv.log"))
    }

    fn client_trusting(&self, pem: &str) -> reqwest::blocking::Client {
        install_provider();
        let mut b = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .tls_info(true)
            .timeout(Duration::from_secs(10));
        for c in reqwest::Certificate::from_pem_bundle(pem.as_bytes()).unwrap() {
            b = b.add_root_certificate(c);
        }
        b.build().unwrap()
    }

    /// The root pebble issues under (fetched from its management interface).
    fn issuing_root(&self) -> String {
        let client = self.client_trusting(&std::fs::read_to_string(self.dir.join("ca.pem")).unwrap());
        client.get(format!("https://127.0.0.1:{}/roots/0", self.management)).send().unwrap().text().unwrap()
    }
}

/// A tandem using the pebble `pebble_for` starts for `challenge`, with two engine workers.
fn tandem_with(
    pebble_for: impl FnOnce(&Path, u16, u16) -> Pebble,
    challenge: &str,
    domains: &str,
    extra: &[(&str, &str)],
) -> (Tandem, Pebble) {
    let mut b = TandemBuilder::new().ssl().env("NUM_WORKERS", "2");
    let (http, https) = (b_port(&b, "PORT"), b_port(&b, "SSL_PORT"));
    let pebble = pebble_for(b.dir(), http, https);
    for (k, v) in extra {
        b = b.env(k, v);
    }
    let t = b
        .env("SSL_CERTIFICATE", "ACME")
        .env("ACME_DIRECTORY", &pebble.directory)
        .env("ACME_DOMAINS", domains)
        .env("ACME_EMAIL", "ops@tandem.test")
        .env("ACME_CHALLENGE", challenge)
        .env("SSL_CERT_FILE", pebble.dir.join("ca.pem").to_str().unwrap())
        .env("SSL_KEY_TYPE", "ecdsa-p256")
        .start();
    (t, pebble)
}

fn b_port(b: &TandemBuilder, var: &str) -> u16 {
    b.env_value(var).and_then(|p| p.parse().ok()).unwrap()
}

/// Waits until the HTTPS port serves a certificate that chains to pebble's root, other than `not`.
fn wait_for_issued(t: &Tandem, pebble: &Pebble, not: Option<&str>, within: Duration) -> String {
    let root = pebble.issuing_root();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", t.https_port).parse().unwrap();
    // A new client per look: a kept-alive (or HTTP/2) connection shows the certificate of its handshake.
    let client = || {
        install_provider();
        reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap())
            .resolve(DOMAIN, addr)
            .tls_info(true)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let url = format!("https://{DOMAIN}:{}/v2/health/ready", t.https_port);
    let last = std::cell::RefCell::new(String::new());
    let explain = || format!("last answer: {}\n{}\n{}", last.borrow(), t.explain(), pebble.logs());
    wait_for(within, "a certificate from pebble", explain, || {
        let r = match client().get(&url).send() {
            Ok(r) => r,
            Err(e) => {
                *last.borrow_mut() = format!("{e:?}");
                return None;
            }
        };
        *last.borrow_mut() = format!("HTTP {}", r.status());
        let fp = served_fingerprint(&r);
        (Some(fp.as_str()) != not && r.status().is_success()).then_some(fp)
    })
}

#[test]
fn http01_issues_renews_and_the_same_https_worker_swaps_it_in() {
    // 30-second certificates: renewed at two thirds, 20 s after issue.
    let (t, pebble) = tandem_with(|d, h, s| Pebble::start(d, h, s, 30), "http-01", DOMAIN, &[]);
    let https = t.workers("https-worker");
    let first = wait_for_issued(&t, &pebble, None, Duration::from_secs(60));
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.cert_dir().join("status.json")).unwrap()).unwrap();
    assert_eq!(status["mode"], "ACME");
    assert!(status["issuer"].as_str().unwrap().contains("Pebble"), "{status}");
    let account = t.cert_dir().join("acme/account.json");
    assert_eq!(std::fs::metadata(&account).unwrap().permissions().mode() & 0o777, 0o600);
    let second = wait_for_issued(&t, &pebble, Some(&first), Duration::from_secs(60));
    assert_ne!(first, second);
    assert_eq!(t.workers("https-worker"), https, "the same HTTPS worker serves the renewed certificate");
    let err = t.stderr();
    assert_eq!(err.matches("created an ACME account").count(), 1, "the account is reused\n{}", t.explain());
    assert!(err.contains("the ACME server issued a certificate"), "{}", t.explain());
    // No challenge file is left behind.
    let left: Vec<_> = std::fs::read_dir(t.cert_dir().join("acme/http-01")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    // A token that is not being validated is a 404, and a hostile one never reads outside the directory.
    let http = Tandem::http_client();
    for token in ["nothing-here", "..%2F..%2Faccount.json"] {
        let r = http.get(t.http_url(&format!("/.well-known/acme-challenge/{token}"))).send().unwrap();
        assert_eq!(r.status(), 404, "{token}");
    }
}

#[test]
fn tls_alpn01_is_answered_by_the_https_worker() {
    let (t, pebble) = tandem_with(|d, h, s| Pebble::start(d, h, s, 3600), "tls-alpn-01", DOMAIN, &[]);
    let https = t.workers("https-worker");
    wait_for_issued(&t, &pebble, None, Duration::from_secs(60));
    assert!(t.stderr().contains("answering an ACME TLS-ALPN-01 validation"), "{}", t.explain());
    assert_eq!(t.workers("https-worker"), https);
}

#[test]
fn dns01_sets_and_clears_records_through_the_hook_and_covers_a_wildcard() {
    let hook_dir = tempfile::tempdir().unwrap();
    let (hook, calls) = (hook_dir.path().join("hook.sh"), hook_dir.path().join("calls.log"));
    let write_hook = |p: &Pebble| {
        let script = format!(
            "#!/bin/sh\necho \"$1 $2\" >> {calls}\ncase \"$1\" in\n  set) exec curl -sf -d \"{{\\\"host\\\":\\\"$2\\\",\\\"value\\\":\\\"$3\\\"}}\" http://127.0.0.1:{port}/set-txt ;;\n  clear) exec curl -sf -d \"{{\\\"host\\\":\\\"$2\\\"}}\" http://127.0.0.1:{port}/clear-txt ;;\nesac\nexit 1\n",
            calls = calls.display(),
            port = p.dns_management
        );
        std::fs::write(&hook, script).unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let domains = format!("{DOMAIN},*.{DOMAIN}");
    let (t, pebble) = tandem_with(
        |d, h, s| {
            let p = Pebble::start(d, h, s, 3600);
            write_hook(&p);
            p
        },
        "dns-01",
        &domains,
        &[("ACME_DNS_HOOK", hook.to_str().unwrap())],
    );
    wait_for_issued(&t, &pebble, None, Duration::from_secs(60));
    let live = tandem_shared::certs::primitives::Bundle::load(&t.cert_dir().join("live.pem")).unwrap();
    assert!(live.info.sans.contains(&format!("DNS:*.{DOMAIN}")), "{:?}", live.info.sans);
    let calls = std::fs::read_to_string(&calls).unwrap();
    let record = format!("_acme-challenge.{DOMAIN}.");
    assert!(calls.contains(&format!("set {record}")), "{calls}");
    assert!(calls.contains(&format!("clear {record}")), "every record set is cleared\n{calls}");
}
