//! The front door's policy, the same on every request path: what the plain
//! port serves, limits, timeouts, CORS and the access log.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scope::{always, https};
use crate::{values, Reader};

crate::declare! {
    HTTP_MODE {
        default: "full",
        doc: "what the plain HTTP port serves when there is an HTTPS port: full (everything), health (health checks, model readiness and ACME challenges only; the rest 403), redirect (308 to the HTTPS URL, health checks and ACME challenges excepted) or off (no plain listener)",
        accepted: "full, health, redirect or off (health, redirect and off need ENABLE_SSL=true)",
        scope: always,
    }
    SSL_REDIRECT_HTTP {
        default: "False",
        doc: "true is HTTP_MODE=redirect (the older spelling)",
        accepted: values::BOOL,
        scope: https,
    }
    MAX_REQUEST_BYTES {
        default: "67108864",
        doc: "largest request body accepted (bytes); larger gets 413",
        accepted: "a byte count from 1024 to 4294967296",
        scope: always,
    }
    MAX_INFLIGHT_BYTES {
        default: "a quarter of the memory (cgroup limit, else RAM) ÷ serving processes, at least 3 × MAX_REQUEST_BYTES",
        doc: "request bytes one worker holds at once (a body counts twice, itself and its tensors; a compressed one once plus twice what it inflates to); at least 3 x MAX_REQUEST_BYTES; past it, 503 with Retry-After",
        accepted: "a byte count of at least MAX_REQUEST_BYTES x 3, up to 2^50",
        scope: always,
    }
    REQUEST_TIMEOUT {
        default: "60",
        doc: "seconds an HTTPS request may wait for the engine before 504",
        accepted: "seconds 1-86400, as a number (30) or with a unit s, m, h or d (30s, 2m, 1h)",
        scope: always,
    }
    HEADER_TIMEOUT {
        default: "30",
        doc: "seconds a new connection has to finish its handshake and send a request's headers",
        accepted: "seconds 1-86400, as a number (30) or with a unit s, m, h or d (30s, 2m, 1h)",
        scope: always,
    }
    KEEPALIVE_TIMEOUT {
        default: "60",
        doc: "seconds a connection with no request in flight stays open (HTTP/1.1 and HTTP/2)",
        accepted: "seconds 1-86400, as a number (30) or with a unit s, m, h or d (30s, 2m, 1h)",
        scope: always,
    }
    IDLE_TIMEOUT {
        default: "300",
        doc: "seconds a connection may move no byte at all, request in flight or not (> REQUEST_TIMEOUT)",
        accepted: "seconds 1-86400, as a number (30) or with a unit s, m, h or d (30s, 2m, 1h)",
        scope: always,
    }
    CORS_ALLOW_ORIGINS {
        default: "(none: no cross-origin answers)",
        doc: "web origins whose pages may call the API from a browser, comma-separated (https://app.example.com), or * for any; preflight OPTIONS is answered and Access-Control-* headers are sent on every path",
        accepted: "* or comma-separated origins such as https://app.example.com,http://localhost:3000 (scheme, host and optional port; no path)",
        scope: always,
    }
    RESTRICTED_API {
        default: "(none: every API open, as in Triton)",
        doc: "API categories that answer only requests carrying a header with a secret value, as Triton's --http-restricted-api: groups `categories:header=value` separated by ;, the value literal or @/path/to/file (0600, re-read when it changes); categories health, metadata, inference, shared-memory, model-config, model-repository, statistics, trace, logging, metrics, status",
        accepted: "groups such as model-repository,statistics:x-admin-key=SECRET;metrics:x-scrape-key=@/etc/tandem/scrape.key (known categories, each in one group; a header name; a value or @ and a file only its owner can read)",
        scope: always,
    }
    METRICS_PUBLIC {
        default: "true",
        doc: "serve /metrics on PORT and SSL_PORT too; false serves it only on METRICS_PORT",
        accepted: values::BOOL,
        scope: always,
    }
    ACCESS_LOG {
        default: "False",
        doc: "one log line per request (listener, peer, method, path, status, bytes, duration, model, worker)",
        accepted: values::BOOL,
        scope: always,
    }
}

/// The timeouts every connection gets (`HEADER_TIMEOUT`, `KEEPALIVE_TIMEOUT`, `IDLE_TIMEOUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// A new connection must send a request's headers within this, and any
    /// request's headers must arrive within this once they start.
    pub header: Duration,
    /// A connection with no request in flight is closed after this (HTTP/1.1
    /// keep-alive and idle HTTP/2 alike).
    pub keepalive: Duration,
    /// A connection on which no byte moves either way for this long is closed,
    /// request in flight or not.
    pub idle: Duration,
    /// A request's whole body must arrive within this (`REQUEST_TIMEOUT`), or
    /// it is answered 408: a body sent a byte at a time moves often enough to
    /// pass `idle`, and would hold its place for ever.
    pub body: Duration,
}

impl Default for Timeouts {
    /// The declared defaults.
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(30),
            keepalive: Duration::from_secs(60),
            idle: Duration::from_secs(300),
            body: Duration::from_secs(60),
        }
    }
}

/// What the plain HTTP port serves (`HTTP_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// Everything, as the HTTPS port does.
    #[default]
    Full,
    /// Health checks, model readiness and ACME challenges; the rest 403.
    Health,
    /// 308 to the HTTPS URL, health checks and ACME challenges excepted.
    Redirect,
    /// No plain listener at all.
    Off,
}

impl HttpMode {
    /// As the setting spells it.
    pub fn name(self) -> &'static str {
        match self {
            HttpMode::Full => "full",
            HttpMode::Health => "health",
            HttpMode::Redirect => "redirect",
            HttpMode::Off => "off",
        }
    }
}

/// The edge section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    /// What the plain HTTP port serves.
    pub http_mode: HttpMode,
    /// Largest accepted request body.
    pub max_request_bytes: u64,
    /// Request bytes one worker holds at once (`None`: sized from the memory).
    pub max_inflight_bytes: Option<u64>,
    /// How long a request may wait for the engine (and its body may take to arrive).
    pub request_timeout: Duration,
    /// Connection timeouts on every listener.
    pub timeouts: Timeouts,
    /// Web origins whose pages may call the API (`CORS_ALLOW_ORIGINS`).
    pub cors: Cors,
    /// One log line per request.
    pub access_log: bool,
    /// API categories open only to a header and its secret (`RESTRICTED_API`).
    pub restricted: Vec<Restriction>,
    /// `/metrics` on the inference ports too (`METRICS_PUBLIC`).
    pub metrics_public: bool,
    /// API keys and rate limits.
    pub access: crate::access::Access,
}

/// The API categories, as Triton names them, and tandem's own `metrics` and `status`.
pub const API_CATEGORIES: &[&str] = &[
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
    "metrics",
    "status",
];

/// One `RESTRICTED_API` group: these categories answer only requests whose
/// `header` carries the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restriction {
    /// Names from [`API_CATEGORIES`].
    pub categories: Vec<String>,
    /// The header, lower case.
    pub header: String,
    /// The value it must carry.
    pub secret: Secret,
}

/// Where a restriction's secret is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Secret {
    /// Given in the setting.
    Value(String),
    /// In a file only its owner can read, re-read when it changes (`@/path`).
    File(std::path::PathBuf),
}

/// The secret in a file (trimmed), or why the file cannot be used: it must
/// be a regular file, not readable by group or others, holding a non-empty
/// value of at most 4096 bytes.
pub fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    match read_private_file(path, 4096) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Err(format!("{} is empty", path.display())),
        Err(e) => Err(e),
    }
}

/// The text of a file that may hold secrets, or why it cannot be used: a
/// regular file, not readable by group or others, of at most `max` bytes.
pub fn read_private_file(path: &std::path::Path, max: u64) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} can be read by other users (mode {:o}); chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    if meta.len() > max {
        return Err(format!("{} is longer than {max} bytes", path.display()));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A header name as HTTP allows it (RFC 9110 token), lower case.
fn header_name(v: &str) -> Option<String> {
    let v = v.trim().to_ascii_lowercase();
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    (!v.is_empty() && v.len() <= 64 && v.chars().all(token)).then_some(v)
}

/// `RESTRICTED_API`'s groups, or why not.
fn restrictions(v: &str) -> Result<Vec<Restriction>, String> {
    let mut out: Vec<Restriction> = Vec::new();
    // No message repeats the text it found wrong: a secret may be in it.
    for (n, group) in v.split(';').map(str::trim).filter(|g| !g.is_empty()).enumerate() {
        let n = n + 1;
        let (cats, rule) = group.split_once(':').ok_or(format!("group {n} has no `:header=value`"))?;
        let (header, value) = rule.split_once('=').ok_or(format!("group {n} has no `=value` after its header"))?;
        let header = header_name(header).ok_or(format!("group {n}'s header is not a header name"))?;
        let mut categories = Vec::new();
        for c in values::list(cats) {
            let c = c.to_ascii_lowercase();
            if !API_CATEGORIES.contains(&c.as_str()) {
                return Err(format!("group {n} names a category that does not exist"));
            }
            if out.iter().any(|r| r.categories.contains(&c)) || categories.contains(&c) {
                return Err(format!("{c:?} is in two groups"));
            }
            categories.push(c);
        }
        if categories.is_empty() {
            return Err(format!("group {n} names no category"));
        }
        let value = value.trim();
        let secret = match value.strip_prefix('@') {
            Some(path) => {
                let path = std::path::PathBuf::from(path);
                read_secret_file(&path)?;
                Secret::File(path)
            }
            None if value.is_empty() => return Err(format!("group {n} has an empty value")),
            None => Secret::Value(value.to_string()),
        };
        out.push(Restriction { categories, header, secret });
    }
    Ok(out)
}

/// Which web origins may call the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Cors {
    /// None: no `Access-Control-*` header is sent, preflight requests are not answered.
    #[default]
    #[serde(rename = "(none)")]
    Off,
    /// Any origin (`*`).
    #[serde(rename = "*")]
    Any,
    /// These origins, as browsers send them (`https://app.example.com`, lower case).
    #[serde(rename = "origins")]
    Origins(Vec<String>),
}

impl Cors {
    /// Whether a page from `origin` (an `Origin` header's value) may call the API.
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Cors::Off => false,
            Cors::Any => true,
            Cors::Origins(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

/// An origin as browsers write it: `http` or `https`, `://`, a host (a name
/// or an IP address, `[...]` for IPv6) and an optional port; no path.
fn origin(v: &str) -> Option<String> {
    let v = v.trim().trim_end_matches('/').to_ascii_lowercase();
    let rest = v.strip_prefix("https://").or_else(|| v.strip_prefix("http://"))?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.parse::<std::net::Ipv4Addr>().is_ok() || values::is_dns_name(host),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    (host_ok && port_ok && !host.starts_with("*.")).then_some(v)
}

/// `HTTP_MODE`, and `SSL_REDIRECT_HTTP=true` as its older spelling of
/// `redirect`; anything but `full` needs an HTTPS port.
fn http_mode(r: &mut Reader, https: bool) -> HttpMode {
    let choices = [
        ("full", HttpMode::Full),
        ("health", HttpMode::Health),
        ("redirect", HttpMode::Redirect),
        ("off", HttpMode::Off),
    ];
    let given = r.value(&HTTP_MODE).is_some();
    let mut mode = r.get(&HTTP_MODE, HttpMode::Full, |v| values::one_of(v, &choices));
    if r.get(&SSL_REDIRECT_HTTP, false, values::parse_bool) {
        if given && mode != HttpMode::Redirect {
            r.bad(
                &SSL_REDIRECT_HTTP,
                "true",
                format!("false with HTTP_MODE={} (true means HTTP_MODE=redirect)", mode.name()),
            );
        } else if !https {
            r.bad(&SSL_REDIRECT_HTTP, "true", "false, unless ENABLE_SSL=true (there is no HTTPS port to redirect to)");
        }
        mode = HttpMode::Redirect;
    }
    if mode != HttpMode::Full && !https && given {
        r.bad(
            &HTTP_MODE,
            mode.name(),
            "full, unless ENABLE_SSL=true (without an HTTPS port the plain port is the only one, and serves everything)",
        );
    }
    mode
}

/// Reads the edge section; `https` says whether there is an HTTPS port.
pub fn parse(r: &mut Reader, https: bool) -> Edge {
    let http_mode = http_mode(r, https);
    let max_request_bytes = r.get(&MAX_REQUEST_BYTES, 64 << 20, |v| values::range(v, 1024u64, 1 << 32));
    let max_inflight_bytes = r.get_accepting(
        &MAX_INFLIGHT_BYTES,
        &format!("a byte count of at least MAX_REQUEST_BYTES x 3 ({}), up to 2^50", max_request_bytes * 3),
        None,
        |v| values::range(v, max_request_bytes * 3, 1 << 50).map(Some),
    );
    let secs = |v: &str| values::seconds(v, 1, 86400);
    let d = Timeouts::default();
    let request_timeout = r.get(&REQUEST_TIMEOUT, d.body, secs);
    let header = r.get(&HEADER_TIMEOUT, d.header, secs);
    let keepalive = r.get(&KEEPALIVE_TIMEOUT, d.keepalive, secs);
    let idle = r.get(&IDLE_TIMEOUT, d.idle, secs);
    if idle <= request_timeout {
        r.bad(
            &IDLE_TIMEOUT,
            &idle.as_secs().to_string(),
            format!(
                "more seconds than REQUEST_TIMEOUT ({}), or a slow inference is cut off",
                request_timeout.as_secs()
            ),
        );
    }
    let cors = r.get(&CORS_ALLOW_ORIGINS, Cors::Off, |v| {
        if v == "*" {
            return Some(Cors::Any);
        }
        let list: Option<Vec<String>> = values::list(v).iter().map(|o| origin(o)).collect();
        list.filter(|l| !l.is_empty()).map(Cors::Origins)
    });
    let access_log = r.get(&ACCESS_LOG, false, values::parse_bool);
    let restricted = match r.value(&RESTRICTED_API).map(restrictions) {
        None => Vec::new(),
        Some(Ok(groups)) => groups,
        Some(Err(why)) => {
            // The value may hold secrets: the problem names what is wrong, not the value.
            r.bad(&RESTRICTED_API, "(not shown: it may hold secrets)", format!("{}; {why}", RESTRICTED_API.accepted));
            Vec::new()
        }
    };
    let metrics_public = r.get(&METRICS_PUBLIC, true, values::parse_bool);
    let access = crate::access::parse(r);
    Edge {
        http_mode,
        max_request_bytes,
        max_inflight_bytes,
        request_timeout,
        timeouts: Timeouts { header, keepalive, idle, body: request_timeout },
        cors,
        access_log,
        restricted,
        metrics_public,
        access,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn cors(v: &str) -> Result<Cors, crate::ConfigError> {
        crate::Config::from_vars([("CORS_ALLOW_ORIGINS".to_string(), v.to_string())]).map(|c| c.edge.cors)
    }

    #[test]
    fn cors_origins_are_scheme_host_and_port() {
        assert_eq!(cors("*").unwrap(), Cors::Any);
        let c = cors("https://App.Example.com, http://localhost:3000/,http://[::1]:8080,http://10.0.0.1").unwrap();
        assert_eq!(
            c,
            Cors::Origins(vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into(),
                "http://[::1]:8080".into(),
                "http://10.0.0.1".into()
            ])
        );
        assert!(c.allows("https://app.example.com") && c.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(
            !c.allows("https://app.example.com.evil.test") && !c.allows("null") && !c.allows("http://app.example.com")
        );
        for bad in [
            "app.example.com",
            "ftp://x.example",
            "https://x.example/path",
            "https://*.example.com",
            "https://x:0",
            "https://x:99999",
            "*,https://a.example",
        ] {
            assert!(cors(bad).is_err(), "{bad}");
        }
        assert!(!Cors::Off.allows("https://a.example") && Cors::Any.allows("null"));
    }
}
