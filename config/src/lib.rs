//! tandem's settings: every environment variable declared once — name, shown
//! default, doc line, accepted values, scope, parser — in the section of the
//! capability that uses it, each section parsing straight into its own type.
//!
//! The supervisor passes a map of variables (normally the process environment)
//! to [`Config::from_vars`]; tests pass their own map and never touch the
//! process environment. Every variable is checked and every problem is
//! reported at once. This crate depends on no other tandem crate.
//!
//! A new setting is one declaration in its section's `declare!` block, its
//! parse in that section's `parse`, and its row in the README's table.

#![deny(unsafe_code)]

mod decl;

pub mod access;
pub mod acme;
pub mod certs;
pub mod check;
pub mod edge;
pub mod engine;
pub mod listen;
pub mod process;
pub mod proxy;
pub mod ring;
pub mod tls;
pub mod unknown;
pub mod values;

pub use decl::{ConfigError, Problem, Reader, Scope, Var};

use serde::{Deserialize, Serialize};

/// The parsed, validated configuration, by section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Where tandem listens.
    pub listen: listen::Listen,
    /// Worker counts, draining, logging, the cache.
    pub process: process::Process,
    /// The HTTPS port's TLS.
    pub tls: tls::Tls,
    /// Where the certificate comes from.
    pub certs: certs::Certs,
    /// The ACME account (`SSL_CERTIFICATE=ACME`).
    pub acme: acme::Acme,
    /// The front door's policy on every request path.
    pub edge: edge::Edge,
    /// tandem's own engine.
    pub engine: engine::Engine,
    /// The shared-memory ring behind the HTTPS port.
    pub ring: ring::Ring,
    /// `WORKER_COMMAND`.
    pub proxy: proxy::Proxy,
}

/// Every declared variable, section by section, in declaration order.
pub fn vars() -> impl Iterator<Item = &'static Var> {
    [
        listen::VARS,
        process::VARS,
        tls::VARS,
        certs::VARS,
        acme::VARS,
        edge::VARS,
        access::VARS,
        engine::VARS,
        ring::VARS,
        proxy::VARS,
    ]
    .into_iter()
    .flatten()
    .copied()
}

/// Scopes the sections share: when a variable acts, else why it is ignored.
pub mod scope {
    use crate::Config;

    /// Without an HTTPS port.
    pub const NO_HTTPS: &str = "ENABLE_SSL is false, so there is no HTTPS port; set ENABLE_SSL=true to use it";
    /// With `WORKER_COMMAND`.
    pub const NO_ENGINE: &str =
        "WORKER_COMMAND runs your server instead of tandem's engine; engine settings do nothing";
    /// Without `WORKER_COMMAND`.
    pub const NO_COPIES: &str = "WORKER_COMMAND is not set; this is for the copies of your own server";

    /// Acts in every configuration.
    pub fn always(_: &Config) -> Option<&'static str> {
        None
    }

    /// Acts when there is an HTTPS port.
    pub fn https(c: &Config) -> Option<&'static str> {
        (!c.tls.enabled).then_some(NO_HTTPS)
    }

    /// Acts when tandem's own engine serves.
    pub fn engine(c: &Config) -> Option<&'static str> {
        c.proxy.command.is_some().then_some(NO_ENGINE)
    }

    /// Acts when copies of `WORKER_COMMAND` serve.
    pub fn proxy(c: &Config) -> Option<&'static str> {
        c.proxy.command.is_none().then_some(NO_COPIES)
    }
}

impl Config {
    /// Parses the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // vars() would panic on a value that is not UTF-8, even in a variable tandem
        // never reads; read bytes, and report the ones tandem does read.
        let mut not_utf8 = Vec::new();
        let given: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                match v.into_string() {
                    Ok(v) => Some((k, v)),
                    Err(v) => {
                        if let Some(e) = vars().find(|e| e.name == k) {
                            not_utf8.push(Problem {
                                var: e.name,
                                value: v.to_string_lossy().into_owned(),
                                accepted: "valid UTF-8 text".into(),
                            });
                        }
                        None
                    }
                }
            })
            .collect();
        match Self::from_vars(given) {
            Ok(c) if not_utf8.is_empty() => Ok(c),
            Ok(_) => Err(ConfigError { problems: not_utf8 }),
            Err(mut e) => {
                not_utf8.append(&mut e.problems);
                Err(ConfigError { problems: not_utf8 })
            }
        }
    }

    /// Parses the given variables; names no section declares are read only
    /// where a default depends on them (`HOME`, `XDG_CACHE_HOME`, `PATH`).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(given: I) -> Result<Self, ConfigError> {
        let mut r = Reader::new(given);
        let listen = listen::parse(&mut r);
        let process = process::parse(&mut r);
        let tls = tls::parse(&mut r, listen.port);
        let certs = certs::parse(&mut r);
        let acme = acme::parse(&mut r, tls.enabled && certs.source == certs::CertSource::Acme);
        let edge = edge::parse(&mut r, tls.enabled);
        let engine = engine::parse(&mut r);
        let ring = ring::parse(&mut r, edge.max_request_bytes);
        let proxy = proxy::parse(&mut r);
        // Across sections: the metrics and gRPC ports are ports of their own (0 picks a free one).
        let taken = |p: u16| p == listen.port || (tls.enabled && p == tls.port);
        if let Some(m) = listen.metrics_port.filter(|&m| m != 0) {
            if taken(m) {
                let v = r.value(&listen::METRICS_PORT).unwrap_or_default().to_string();
                r.bad(&listen::METRICS_PORT, &v, "a port different from PORT and SSL_PORT");
            }
        }
        if let Some(g) = listen.grpc_port.filter(|&g| g != 0) {
            if taken(g) || listen.metrics_port == Some(g) {
                let v = r.value(&listen::GRPC_PORT).unwrap_or_default().to_string();
                r.bad(&listen::GRPC_PORT, &v, "a port different from PORT, SSL_PORT and METRICS_PORT");
            }
        }
        // The CA asks for HTTP-01 challenges on the plain port.
        if edge.http_mode == edge::HttpMode::Off
            && acme.challenge == acme::AcmeChallenge::Http01
            && tls.enabled
            && certs.source == certs::CertSource::Acme
        {
            r.bad(&edge::HTTP_MODE, "off", "full, health or redirect with ACME_CHALLENGE=http-01 (the CA fetches its challenge from the plain port), or ACME_CHALLENGE=tls-alpn-01 or dns-01");
        }
        r.finish()?;
        Ok(Config { listen, process, tls, certs, acme, edge, engine, ring, proxy })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::acme::{AcmeChallenge, LETS_ENCRYPT, LETS_ENCRYPT_STAGING};
    use super::certs::CertSource;
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn every_variable_is_declared_once_with_its_doc_and_accepted_values() {
        let names: Vec<&str> = vars().map(|v| v.name).collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "a variable declared twice: {names:?}");
        for v in vars() {
            assert!(!v.doc.is_empty() && !v.accepted.is_empty() && !v.default.is_empty(), "{}", v.name);
            assert!(v.name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'), "{}", v.name);
        }
    }

    #[test]
    fn a_bad_value_names_what_its_declaration_accepts() {
        // Each variable given a value nothing accepts is refused, naming itself;
        // the words come from its declaration (or from the settings it depends on).
        for v in vars() {
            let err = match parse(&[(v.name, "\u{7f}not a value\u{7f}")]) {
                Err(e) => e,
                // Free text (a command, a directory, a hook) may take anything.
                Ok(_) => continue,
            };
            assert_eq!(err.problems.len(), 1, "{}: {err}", v.name);
            assert_eq!(err.problems[0].var, v.name, "{err}");
        }
    }

    #[test]
    fn the_inflight_budget_holds_three_largest_requests_at_least() {
        assert_eq!(parse(&[]).expect("default").edge.max_inflight_bytes, None);
        let c = parse(&[("MAX_REQUEST_BYTES", "1048576"), ("MAX_INFLIGHT_BYTES", "3145728")]).expect("3x");
        assert_eq!(c.edge.max_inflight_bytes, Some(3 << 20));
        let err = parse(&[("MAX_REQUEST_BYTES", "1048576"), ("MAX_INFLIGHT_BYTES", "2097152")]).expect_err("2x");
        assert!(err.to_string().contains("MAX_INFLIGHT_BYTES") && err.to_string().contains("3145728"), "{err}");
        assert!(parse(&[("MAX_INFLIGHT_BYTES", "lots")]).is_err());
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).expect("defaults parse");
        assert_eq!(c.listen.port, 9001);
        assert_eq!(c.tls.port, 9002);
        assert_eq!(c.process.num_workers, 1);
        assert!(!c.tls.enabled);
        assert_eq!(c.certs.source, CertSource::Indirect);
        let root = nix::unistd::geteuid().is_root();
        let want = values::default_cache_dir(root, None, None).join("ssl_certificates");
        assert_eq!(c.process.cert_dir(), want);
        assert!(!c.process.cache_dir.starts_with("/tmp/cache"));
    }

    #[test]
    fn a_worker_command_is_split_like_a_shell_and_its_program_must_exist() {
        let c =
            parse(&[("WORKER_COMMAND", "python3 -m uvicorn 'my app:app' --port {port}"), ("PATH", "/usr/bin:/bin")])
                .expect("ok");
        let argv = c.proxy.command.expect("set");
        assert_eq!(argv, ["python3", "-m", "uvicorn", "my app:app", "--port", "{port}"]);
        assert_eq!(c.proxy.ready_path, "/");
        for (value, says) in [
            ("python3 'unbalanced", "balanced quotes"),
            ("no-such-program-here --port {port}", "not on PATH"),
            ("/etc/passwd", "not an executable file"),
        ] {
            let err = parse(&[("WORKER_COMMAND", value), ("PATH", "/usr/bin:/bin")]).expect_err(value);
            assert_eq!(err.problems[0].var, "WORKER_COMMAND");
            assert!(err.problems[0].accepted.contains(says), "{value}: {}", err.problems[0].accepted);
        }
        let err = parse(&[("WORKER_READY_PATH", "health"), ("WORKER_START_TIMEOUT", "0")]).expect_err("bad");
        let vars: Vec<&str> = err.problems.iter().map(|p| p.var).collect();
        assert_eq!(vars, ["WORKER_READY_PATH", "WORKER_START_TIMEOUT"]);
    }

    #[test]
    fn ssl_port_follows_port() {
        assert_eq!(parse(&[("PORT", "80")]).expect("ok").tls.port, 443);
        assert_eq!(parse(&[("PORT", "8080")]).expect("ok").tls.port, 8081);
        assert_eq!(parse(&[("PORT", "80"), ("SSL_PORT", "8443")]).expect("ok").tls.port, 8443);
        let err = parse(&[("PORT", "65535"), ("ENABLE_SSL", "1")]).expect_err("overflow");
        assert_eq!(err.problems[0].var, "SSL_PORT");
        let err = parse(&[("PORT", "8080"), ("METRICS_PORT", "8080")]).expect_err("same port");
        assert_eq!(err.problems[0].var, "METRICS_PORT");
    }

    #[test]
    fn grpc_port_is_a_port_of_its_own() {
        assert_eq!(parse(&[("GRPC_PORT", "8001")]).expect("ok").listen.grpc_port, Some(8001));
        assert_eq!(parse(&[("GRPC_PORT", "0")]).expect("ok").listen.grpc_port, Some(0));
        assert_eq!(parse(&[]).expect("ok").listen.grpc_port, None);
        for bad in [
            &[("GRPC_PORT", "65536")][..],
            &[("GRPC_PORT", "-1")],
            &[("GRPC_PORT", "8001x")],
            &[("GRPC_PORT", "99999999999999999999")],
            &[("PORT", "8001"), ("GRPC_PORT", "8001")],
            &[("ENABLE_SSL", "1"), ("SSL_PORT", "8443"), ("GRPC_PORT", "8443")],
            &[("METRICS_PORT", "9100"), ("GRPC_PORT", "9100")],
        ] {
            let err = parse(bad).expect_err("refused");
            assert!(err.problems.iter().any(|p| p.var == "GRPC_PORT"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn booleans_any_case() {
        for (v, want) in [("TRUE", true), ("yes", true), ("1", true), ("False", false), ("NO", false), ("0", false)] {
            assert_eq!(parse(&[("ENABLE_SSL", v)]).expect("ok").tls.enabled, want, "{v}");
        }
    }

    #[test]
    fn every_problem_reported_together_in_declaration_order() {
        let err = parse(&[
            ("LOG_FORMAT", "xml"),
            ("SSL_CERTIFICATE", "/missing.pem"),
            ("PORT", "abc"),
            ("NUM_WORKERS", "0"),
            ("ENABLE_SSL", "maybe"),
        ])
        .expect_err("bad");
        let vars: Vec<_> = err.problems.iter().map(|p| p.var).collect();
        assert_eq!(vars, ["PORT", "NUM_WORKERS", "LOG_FORMAT", "ENABLE_SSL", "SSL_CERTIFICATE"]);
        let text = err.to_string();
        assert!(text.contains("PORT=\"abc\": expected a port number 0-65535"), "{text}");
    }

    #[test]
    fn a_refresh_interval_past_a_year_is_refused_not_overflowed() {
        assert!(parse(&[("SSL_REFRESH_INTERVAL", "31536000")]).is_ok());
        let err = parse(&[("SSL_REFRESH_INTERVAL", "9223372036854775807")]).expect_err("too long");
        assert_eq!(err.problems[0].var, "SSL_REFRESH_INTERVAL");
    }

    #[test]
    fn acme_settings_are_checked_together() {
        let acme = |extra: &[(&str, &str)]| {
            let mut v = vec![("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "acme")];
            v.extend_from_slice(extra);
            parse(&v)
        };
        let c = acme(&[("ACME_DOMAINS", "API.example.com, b.example.com."), ("ACME_EMAIL", "ops@example.com")])
            .expect("ok");
        assert_eq!(c.certs.source, CertSource::Acme);
        assert_eq!(c.acme.domains, ["api.example.com", "b.example.com"]);
        assert_eq!(c.acme.directory, LETS_ENCRYPT);
        assert_eq!(c.acme.challenge, AcmeChallenge::Http01);
        let staging = acme(&[("ACME_DOMAINS", "a.example.com"), ("ACME_STAGING", "yes")]).expect("staging");
        assert_eq!(staging.acme.directory, LETS_ENCRYPT_STAGING);
        let refused = |extra: &[(&str, &str)], var: &str| {
            let err = acme(extra).expect_err(var);
            assert!(err.problems.iter().any(|p| p.var == var), "{var}: {err}");
        };
        refused(&[], "ACME_DOMAINS");
        refused(&[("ACME_DOMAINS", "10.0.0.1")], "ACME_DOMAINS");
        refused(&[("ACME_DOMAINS", "bad name!.example.com")], "ACME_DOMAINS");
        refused(&[("ACME_DOMAINS", "a.example.com"), ("ACME_CHALLENGE", "dns-01")], "ACME_DNS_HOOK");
        refused(&[("ACME_DOMAINS", "*.example.com")], "ACME_CHALLENGE");
        refused(&[("ACME_DOMAINS", "a.example.com"), ("ACME_CHALLENGE", "smoke-signals")], "ACME_CHALLENGE");
        refused(&[("ACME_DOMAINS", "a.example.com"), ("ACME_EMAIL", "nobody")], "ACME_EMAIL");
        refused(
            &[("ACME_DOMAINS", "a.example.com"), ("ACME_DIRECTORY", "http://insecure.example/dir")],
            "ACME_DIRECTORY",
        );
        refused(
            &[
                ("ACME_DOMAINS", "a.example.com"),
                ("ACME_STAGING", "true"),
                ("ACME_DIRECTORY", "https://ca.example/dir"),
            ],
            "ACME_STAGING",
        );
        let dns = acme(&[
            ("ACME_DOMAINS", "*.example.com,example.com"),
            ("ACME_CHALLENGE", "DNS-01"),
            ("ACME_DNS_HOOK", "/bin/hook"),
        ]);
        assert_eq!(dns.expect("dns-01 with a hook").acme.challenge, AcmeChallenge::Dns01);
        // Without ACME as the source nothing is required (tandem check reports them as ignored).
        assert!(parse(&[("ACME_CHALLENGE", "dns-01")]).is_ok());
    }

    #[test]
    fn ca_leaf_lifetimes_take_units_and_stay_in_range() {
        let c = parse(&[("SSL_CERTIFICATE", "ca"), ("SSL_CERT_VALIDITY", "12h")]).expect("ok");
        assert_eq!(c.certs.source, CertSource::Ca);
        assert_eq!(c.certs.validity, Duration::from_secs(12 * 3600));
        assert_eq!(parse(&[]).expect("default").certs.validity, Duration::from_secs(7 * 86400));
        assert_eq!(parse(&[("SSL_CERT_VALIDITY", "90")]).expect("s").certs.validity, Duration::from_secs(90));
        for bad in ["59", "366d", "7w", "d", "-1d", "99999999999999999999d"] {
            let err = parse(&[("SSL_CERT_VALIDITY", bad)]).expect_err(bad);
            assert_eq!(err.problems[0].var, "SSL_CERT_VALIDITY", "{bad}");
        }
    }

    #[test]
    fn https_slots_carry_what_http_accepts_by_default() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.ring.slot_bytes as u64, c.edge.max_request_bytes + (1 << 20));
        let c = parse(&[("MAX_REQUEST_BYTES", "4294967296"), ("SHM_SLOTS", "4096")]).expect("fits the region");
        assert!((c.ring.slots as u64) * (c.ring.slot_bytes as u64) * 2 <= 64 << 30);
        assert_eq!(parse(&[("SHM_SLOT_BYTES", "65536")]).expect("explicit").ring.slot_bytes, 65536);
    }

    #[test]
    fn shm_warm_bytes_is_a_bounded_byte_count() {
        assert_eq!(parse(&[]).expect("defaults").ring.warm_bytes, 64 << 20);
        assert_eq!(parse(&[("SHM_WARM_BYTES", "0")]).expect("off").ring.warm_bytes, 0);
        assert_eq!(parse(&[("SHM_WARM_BYTES", "68719476736")]).expect("the most").ring.warm_bytes, 64 << 30);
        for bad in ["-1", "lots", "68719476737", "1e9", "18446744073709551616", "0x10", "1,5"] {
            let err = parse(&[("SHM_WARM_BYTES", bad)]).expect_err(bad);
            assert_eq!(err.problems[0].var, "SHM_WARM_BYTES", "{bad}");
            assert!(err.to_string().contains("68719476736"), "the accepted range is named: {err}");
        }
    }

    #[test]
    fn port_out_of_range() {
        assert_eq!(parse(&[("PORT", "70000")]).expect_err("bad").problems[0].var, "PORT");
    }

    #[test]
    fn san_list() {
        let c = parse(&[("SSL_SAN", "example.com, 10.0.0.1,*.svc.local")]).expect("ok");
        assert_eq!(c.certs.san, ["example.com", "10.0.0.1", "*.svc.local"]);
        assert!(parse(&[("SSL_SAN", "bad name!")]).is_err());
    }

    #[test]
    fn a_redirect_needs_an_https_port() {
        assert!(parse(&[("SSL_REDIRECT_HTTP", "true")]).is_err());
        let redirect = parse(&[("SSL_REDIRECT_HTTP", "true"), ("ENABLE_SSL", "true")]).expect("redirect");
        assert_eq!(redirect.edge.http_mode, edge::HttpMode::Redirect);
    }

    #[test]
    fn the_plain_port_serves_less_only_beside_an_https_port() {
        use edge::HttpMode;
        assert_eq!(parse(&[]).expect("default").edge.http_mode, HttpMode::Full);
        for (v, mode) in [
            ("full", HttpMode::Full),
            ("Health", HttpMode::Health),
            ("redirect", HttpMode::Redirect),
            ("OFF", HttpMode::Off),
        ] {
            let c = parse(&[("HTTP_MODE", v), ("ENABLE_SSL", "true")]).expect(v);
            assert_eq!(c.edge.http_mode, mode);
        }
        for v in ["health", "redirect", "off"] {
            let err = parse(&[("HTTP_MODE", v)]).expect_err(v);
            assert!(err.problems[0].var == "HTTP_MODE" && err.to_string().contains("ENABLE_SSL=true"), "{err}");
        }
        assert!(parse(&[("HTTP_MODE", "closed"), ("ENABLE_SSL", "true")]).is_err());
        // The older spelling agrees with HTTP_MODE or is refused.
        let both = [("ENABLE_SSL", "true"), ("SSL_REDIRECT_HTTP", "true"), ("HTTP_MODE", "redirect")];
        assert_eq!(parse(&both).expect("agree").edge.http_mode, HttpMode::Redirect);
        let clash =
            parse(&[("ENABLE_SSL", "true"), ("SSL_REDIRECT_HTTP", "true"), ("HTTP_MODE", "off")]).expect_err("clash");
        assert_eq!(clash.problems[0].var, "SSL_REDIRECT_HTTP");
        // ACME's HTTP-01 challenge is fetched from the plain port.
        let acme = [
            ("ENABLE_SSL", "true"),
            ("SSL_CERTIFICATE", "ACME"),
            ("ACME_DOMAINS", "a.example"),
            ("ACME_EMAIL", "a@a.example"),
        ];
        let off = [&acme[..], &[("HTTP_MODE", "off")]].concat();
        assert_eq!(parse(&off).expect_err("http-01").problems[0].var, "HTTP_MODE");
        let alpn = [&off[..], &[("ACME_CHALLENGE", "tls-alpn-01")]].concat();
        assert_eq!(parse(&alpn).expect("alpn").edge.http_mode, HttpMode::Off);
    }

    #[test]
    fn readme_table_lists_every_variable() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).expect("README.md beside the workspace");
        for v in vars() {
            assert!(readme.contains(&format!("| `{}` |", v.name)), "README's table lacks {}", v.name);
            // Its default as declared (the README may set names in `code`).
            let row = readme.lines().find(|l| l.starts_with(&format!("| `{}` |", v.name))).unwrap_or_default();
            let shown = row.split('|').nth(2).unwrap_or_default().trim().replace('`', "");
            assert_eq!(shown, v.default, "README's default for {} differs from its declaration", v.name);
        }
        let rows = readme.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(rows, vars().count(), "README's table and the declarations differ in length");
    }
}
