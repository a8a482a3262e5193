//! Configuration: every environment variable tandem reads, parsed once by the supervisor.
//!
//! The supervisor passes a map of variables (normally the process environment) to
//! [`Config::from_vars`]; tests pass their own map and never touch the process
//! environment. Every variable is checked and every problem is reported at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One documented environment variable.
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    /// The variable's name.
    pub name: &'static str,
    /// Its default, as an operator would write it.
    pub default: &'static str,
    /// What it means and what it accepts.
    pub meaning: &'static str,
}

/// The most HTTP workers tandem ever runs (`NUM_WORKERS` and `MAX_WORKERS` are at most this).
pub const MAX_WORKERS: usize = 256;

/// Every environment variable tandem reads; the README's table mirrors this list.
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar { name: "HOST", default: "0.0.0.0", meaning: "bind address (an IP address) for both listeners" },
    EnvVar { name: "PORT", default: "9001", meaning: "HTTP port (0-65535; 0 picks a free port)" },
    EnvVar { name: "NUM_WORKERS", default: "1", meaning: "HTTP inference worker processes (1-256)" },
    EnvVar { name: "MAX_WORKERS", default: "256", meaning: "most HTTP workers SIGTTIN scales up to (NUM_WORKERS-256)" },
    EnvVar { name: "ENABLE_SSL", default: "False", meaning: "also serve HTTPS (true/false/1/0/yes/no, any case)" },
    EnvVar {
        name: "SSL_PORT",
        default: "PORT+1 (443 when PORT=80)",
        meaning: "HTTPS port; an explicit value always wins",
    },
    EnvVar {
        name: "METRICS_PORT",
        default: "unset (off)",
        meaning: "also serve /metrics on this port, from the supervisor (0-65535)",
    },
    EnvVar {
        name: "SSL_CERTIFICATE",
        default: "INDIRECT",
        meaning:
            "INDIRECT, GENERATE, CA (the private CA of `tandem ca init`), ACME, or a path to a PEM certificate (chain)",
    },
    EnvVar {
        name: "SSL_KEY",
        default: "discovered",
        meaning: "private key for a custom certificate (overrides discovery)",
    },
    EnvVar {
        name: "SSL_KEY_TYPE",
        default: "rsa2048",
        meaning: "key type of generated certificates: rsa2048 or ecdsa-p256",
    },
    EnvVar {
        name: "SSL_INDIRECT_URL",
        default: "https://roboflow.host/certificate/",
        meaning: "base URL holding fullchain.pem and privkey.pem (https only)",
    },
    EnvVar {
        name: "SSL_REFRESH_INTERVAL",
        default: "86400",
        meaning: "seconds between checks of the certificate source (1-31536000)",
    },
    EnvVar {
        name: "SSL_CERT_VALIDITY",
        default: "7d",
        meaning: "lifetime of the leaves SSL_CERTIFICATE=CA issues (seconds, or with s/m/h/d; 1m-365d), renewed at 2/3",
    },
    EnvVar {
        name: "SSL_SAN",
        default: "(none)",
        meaning: "extra DNS names / IPs for generated certificates, comma-separated",
    },
    EnvVar {
        name: "SSL_CLIENT_CA",
        default: "(none)",
        meaning:
            "PEM bundle of the CAs whose client certificates the HTTPS port verifies (mTLS); reloaded when it changes",
    },
    EnvVar {
        name: "SSL_CLIENT_AUTH",
        default: "required with SSL_CLIENT_CA, else off",
        meaning: "client certificates: off, optional (verified when presented) or required",
    },
    EnvVar {
        name: "SSL_MIN_VERSION",
        default: "1.2",
        meaning: "oldest TLS version the HTTPS port accepts: 1.2 or 1.3",
    },
    EnvVar {
        name: "SSL_HSTS",
        default: "(none)",
        meaning: "Strict-Transport-Security value sent on HTTPS answers, e.g. max-age=31536000; includeSubDomains",
    },
    EnvVar {
        name: "SSL_REDIRECT_HTTP",
        default: "False",
        meaning: "answer plain HTTP with 308 to the HTTPS URL (health checks and ACME challenges excepted)",
    },
    EnvVar {
        name: "ACME_DOMAINS",
        default: "(none)",
        meaning:
            "with SSL_CERTIFICATE=ACME: the DNS names to get a certificate for, comma-separated (*.name needs dns-01)",
    },
    EnvVar { name: "ACME_EMAIL", default: "(none)", meaning: "contact address for the ACME account (expiry notices)" },
    EnvVar {
        name: "ACME_DIRECTORY",
        default: "Let's Encrypt",
        meaning: "the ACME server's directory URL (https); default Let's Encrypt production",
    },
    EnvVar {
        name: "ACME_STAGING",
        default: "False",
        meaning: "use Let's Encrypt's staging directory (untrusted certificates, generous limits)",
    },
    EnvVar {
        name: "ACME_CHALLENGE",
        default: "http-01",
        meaning: "how domains are proven: http-01 (on PORT), tls-alpn-01 (on SSL_PORT) or dns-01 (ACME_DNS_HOOK)",
    },
    EnvVar {
        name: "ACME_DNS_HOOK",
        default: "(none)",
        meaning: "dns-01: a command run as `HOOK set|clear NAME VALUE` that sets / removes the TXT record",
    },
    EnvVar {
        name: "MODEL_CACHE_DIR",
        default: "/var/cache/tandem (root), else ~/.cache/tandem",
        meaning: "cache root; certificates live in ssl_certificates/ below it",
    },
    EnvVar {
        name: "MODEL_REPOSITORY",
        default: "built-in models/",
        meaning: "Triton-style model repository (one folder per model)",
    },
    EnvVar {
        name: "ORT_DYLIB_PATH",
        default: "discovered",
        meaning: "ONNX Runtime shared library (default: the onnxruntime Python package's)",
    },
    EnvVar {
        name: "ENGINE_BACKEND",
        default: "auto",
        meaning: "default backend: auto (onnxruntime when found, else tract), onnxruntime or tract",
    },
    EnvVar {
        name: "ENGINE_DEVICE",
        default: "cpu",
        meaning: "cpu or cuda (CUDA execution provider; exit 2 if missing)",
    },
    EnvVar { name: "ENGINE_THREADS", default: "cores / NUM_WORKERS", meaning: "intra-op threads per model (1-1024)" },
    EnvVar {
        name: "STRICT_READINESS",
        default: "true",
        meaning: "/v2/health/ready is false while any model is unavailable",
    },
    EnvVar {
        name: "EXIT_ON_MODEL_ERROR",
        default: "false",
        meaning: "a model that fails to load stops start-up (exit 1)",
    },
    EnvVar {
        name: "MAX_REQUEST_BYTES",
        default: "67108864",
        meaning: "largest request body accepted (bytes); larger gets 413",
    },
    EnvVar {
        name: "MAX_INFLIGHT_BYTES",
        default: "a quarter of the memory (cgroup limit, else RAM) ÷ serving processes",
        meaning: "request bytes one worker holds at once (a body counts twice, itself and its tensors; a compressed one once plus twice what it inflates to); at least 3 x MAX_REQUEST_BYTES; past it, 503 with Retry-After",
    },
    EnvVar {
        name: "REQUEST_TIMEOUT",
        default: "60",
        meaning: "seconds an HTTPS request may wait for the engine before 504",
    },
    EnvVar {
        name: "SHM_SLOTS",
        default: "64",
        meaning: "requests in flight between the HTTPS worker and the engine (2-4096)",
    },
    EnvVar {
        name: "SHM_SLOT_BYTES",
        default: "MAX_REQUEST_BYTES + 1 MiB",
        meaning:
            "largest HTTPS request or response carried to the engine (bytes; pages past 1 MiB are returned after use)",
    },
    EnvVar {
        name: "HEADER_TIMEOUT",
        default: "30",
        meaning: "seconds a new connection has to finish its handshake and send a request's headers",
    },
    EnvVar {
        name: "KEEPALIVE_TIMEOUT",
        default: "60",
        meaning: "seconds a connection with no request in flight stays open (HTTP/1.1 and HTTP/2)",
    },
    EnvVar {
        name: "IDLE_TIMEOUT",
        default: "300",
        meaning: "seconds a connection may move no byte at all, request in flight or not (> REQUEST_TIMEOUT)",
    },
    EnvVar { name: "GRACEFUL_TIMEOUT", default: "30", meaning: "seconds to drain on stop before SIGKILL" },
    EnvVar {
        name: "LOG_LEVEL",
        default: "info",
        meaning: "error, warn (or warning), info, debug, trace, or LEVEL,TARGET=LEVEL directives; off is refused",
    },
    EnvVar { name: "LOG_FORMAT", default: "text", meaning: "log format on stderr: text or json" },
    EnvVar {
        name: "MODEL_CONTROL_MODE",
        default: "none",
        meaning: "none (models fixed at start), explicit (repository load/unload API) or poll (rescan the repository)",
    },
    EnvVar {
        name: "REPOSITORY_POLL_SECS",
        default: "15",
        meaning: "seconds between rescans of the repository with MODEL_CONTROL_MODE=poll (1-86400)",
    },
    EnvVar {
        name: "ACCESS_LOG",
        default: "False",
        meaning: "one log line per request (listener, peer, method, path, status, bytes, duration, model, worker)",
    },
    EnvVar {
        name: "WORKER_COMMAND",
        default: "unset (tandem's own engine)",
        meaning: "run NUM_WORKERS copies of this HTTP server command line instead of the engine, behind both ports; {port}, {socket} and {worker} are filled in per copy (docs/PROXY.md)",
    },
    EnvVar {
        name: "WORKER_READY_PATH",
        default: "/",
        meaning: "path a WORKER_COMMAND copy must answer with 2xx or 3xx before it gets requests, and keep answering while it runs",
    },
    EnvVar {
        name: "WORKER_START_TIMEOUT",
        default: "120",
        meaning: "seconds a WORKER_COMMAND copy has to become ready before it is restarted (1-86400)",
    },
];

/// Where the HTTPS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertSource {
    /// Downloaded from `SSL_INDIRECT_URL`.
    Indirect,
    /// Self-signed, generated and cached by tandem.
    Generate,
    /// A PEM certificate chain on disk.
    Path(PathBuf),
    /// Leaves issued by the private CA in the cache (`tandem ca init`).
    Ca,
    /// A certificate from an ACME server (Let's Encrypt), renewed by tandem.
    Acme,
}

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// How an ACME server is shown that we control a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AcmeChallenge {
    /// A file under `/.well-known/acme-challenge/` on the HTTP port.
    #[default]
    Http01,
    /// A special certificate answered on the HTTPS port for ALPN `acme-tls/1`.
    TlsAlpn01,
    /// A TXT record, set and removed by `ACME_DNS_HOOK`.
    Dns01,
}

/// The ACME settings (used with `SSL_CERTIFICATE=ACME`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AcmeSettings {
    /// The directory URL.
    pub directory: String,
    /// The account's contact address.
    pub email: Option<String>,
    /// The names to certify.
    pub domains: Vec<String>,
    /// How they are proven.
    pub challenge: AcmeChallenge,
    /// dns-01's hook command.
    pub dns_hook: Option<String>,
}

/// Key algorithm for generated certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    /// RSA with a 2048-bit modulus (the default, for the widest client support).
    Rsa2048,
    /// ECDSA on P-256 (smaller, faster handshakes).
    EcdsaP256,
}

/// Device models run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Device {
    /// The CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU through ONNX Runtime's CUDA execution provider.
    Cuda,
}

/// The default backend for models that do not name one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BackendChoice {
    /// ONNX Runtime when its library is found, else tract.
    #[default]
    Auto,
    /// ONNX Runtime; start-up fails without it.
    OnnxRuntime,
    /// tract, pure Rust.
    Tract,
}

/// Whether the HTTPS port asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ClientAuth {
    /// Never.
    #[default]
    Off,
    /// Verified when presented; clients without one are served too.
    Optional,
    /// Every client must present one signed by `SSL_CLIENT_CA`.
    Required,
}

/// The oldest TLS version the HTTPS port accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// How the served models may change while tandem runs (Triton's `--model-control-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ModelControlMode {
    /// The repository is read once at start.
    #[default]
    None,
    /// `POST /v2/repository/models/{m}/load` and `/unload` change them.
    Explicit,
    /// The repository is rescanned every `REPOSITORY_POLL_SECS`.
    Poll,
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The parsed, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Bind address for both listeners.
    pub host: IpAddr,
    /// HTTP port.
    pub port: u16,
    /// Number of HTTP inference workers.
    pub num_workers: usize,
    /// The most HTTP workers SIGTTIN adds up to.
    pub max_workers: usize,
    /// Whether the HTTPS listener is enabled.
    pub enable_ssl: bool,
    /// HTTPS port.
    pub ssl_port: u16,
    /// The supervisor's own `/metrics` port, when set.
    pub metrics_port: Option<u16>,
    /// Certificate source.
    pub ssl_certificate: CertSource,
    /// Explicit private key path for a custom certificate.
    pub ssl_key: Option<PathBuf>,
    /// Key type for generated certificates.
    pub ssl_key_type: KeyType,
    /// Base URL for INDIRECT downloads.
    pub ssl_indirect_url: String,
    /// Interval between checks of the certificate source.
    pub ssl_refresh_interval: Duration,
    /// `SSL_CERT_VALIDITY`: lifetime of the leaves the private CA issues.
    pub ssl_cert_validity: Duration,
    /// Extra subject alternative names for generated certificates.
    pub ssl_san: Vec<String>,
    /// CAs that sign accepted client certificates.
    pub ssl_client_ca: Option<PathBuf>,
    /// Whether client certificates are asked for.
    pub ssl_client_auth: ClientAuth,
    /// Oldest TLS version accepted.
    pub ssl_min_version: TlsVersion,
    /// `Strict-Transport-Security` value for HTTPS answers.
    pub ssl_hsts: Option<String>,
    /// Redirect plain HTTP to HTTPS.
    pub ssl_redirect_http: bool,
    /// `ACME_*`: the ACME account, names and challenge.
    pub acme: AcmeSettings,
    /// Cache root.
    pub model_cache_dir: PathBuf,
    /// Model repository, when set explicitly.
    pub model_repository: Option<PathBuf>,
    /// ONNX Runtime library, when set explicitly.
    pub ort_dylib_path: Option<PathBuf>,
    /// Default backend.
    pub engine_backend: BackendChoice,
    /// Device models run on.
    pub engine_device: Device,
    /// Intra-op threads per model, when set.
    pub engine_threads: Option<usize>,
    /// Readiness needs every model ready.
    pub strict_readiness: bool,
    /// One log line per request.
    pub access_log: bool,
    /// How models may change while running.
    pub model_control_mode: ModelControlMode,
    /// Between repository rescans (poll mode).
    pub repository_poll: Duration,
    /// A model that fails to load stops start-up.
    pub exit_on_model_error: bool,
    /// Largest accepted request body.
    pub max_request_bytes: u64,
    /// `MAX_INFLIGHT_BYTES`: request bytes one worker holds at once (`None`: sized from the memory).
    pub max_inflight_bytes: Option<u64>,
    /// How long an HTTPS request may wait for the engine.
    pub request_timeout: Duration,
    /// Slots of the shared-memory ring.
    pub shm_slots: u32,
    /// Bytes per request (and per response) in a slot.
    pub shm_slot_bytes: usize,
    /// Connection timeouts on both listeners.
    pub timeouts: crate::serve::Timeouts,
    /// Drain time on stop before SIGKILL.
    pub graceful_timeout: Duration,
    /// Tracing filter directive.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// `WORKER_COMMAND` (or `tandem run -- ...`): the server whose copies replace the engine.
    pub worker_command: Option<Vec<String>>,
    /// Readiness and health path of the copies.
    pub worker_ready_path: String,
    /// How long a copy may take to become ready.
    pub worker_start_timeout: Duration,
}

impl Config {
    /// The certificate cache directory below the cache root.
    pub fn cert_dir(&self) -> PathBuf {
        self.model_cache_dir.join("ssl_certificates")
    }
}

/// One variable with a value tandem cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The variable's name.
    pub var: &'static str,
    /// The value it had.
    pub value: String,
    /// What is accepted instead.
    pub accepted: String,
}

/// Every problem found in the environment, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in the order of [`ENV_VARS`].
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            write!(f, "s")?;
        }
        write!(f, ")")?;
        for p in &self.problems {
            write!(f, "\n  {}={:?}: expected {}", p.var, p.value, p.accepted)?;
        }
        Ok(())
    }
}

/// The raw variables, as strings; envy maps `PORT` to `port` and so on.
#[derive(Debug, Default, Deserialize)]
struct Raw {
    host: Option<String>,
    port: Option<String>,
    num_workers: Option<String>,
    max_workers: Option<String>,
    enable_ssl: Option<String>,
    ssl_port: Option<String>,
    metrics_port: Option<String>,
    ssl_certificate: Option<String>,
    ssl_key: Option<String>,
    ssl_key_type: Option<String>,
    ssl_indirect_url: Option<String>,
    ssl_refresh_interval: Option<String>,
    ssl_cert_validity: Option<String>,
    ssl_san: Option<String>,
    ssl_client_ca: Option<String>,
    ssl_client_auth: Option<String>,
    ssl_min_version: Option<String>,
    ssl_hsts: Option<String>,
    ssl_redirect_http: Option<String>,
    acme_domains: Option<String>,
    acme_email: Option<String>,
    acme_directory: Option<String>,
    acme_staging: Option<String>,
    acme_challenge: Option<String>,
    acme_dns_hook: Option<String>,
    model_cache_dir: Option<String>,
    model_repository: Option<String>,
    ort_dylib_path: Option<String>,
    engine_backend: Option<String>,
    engine_device: Option<String>,
    engine_threads: Option<String>,
    strict_readiness: Option<String>,
    exit_on_model_error: Option<String>,
    max_request_bytes: Option<String>,
    max_inflight_bytes: Option<String>,
    request_timeout: Option<String>,
    shm_slots: Option<String>,
    shm_slot_bytes: Option<String>,
    header_timeout: Option<String>,
    keepalive_timeout: Option<String>,
    idle_timeout: Option<String>,
    graceful_timeout: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    access_log: Option<String>,
    model_control_mode: Option<String>,
    repository_poll_secs: Option<String>,
    worker_command: Option<String>,
    worker_ready_path: Option<String>,
    worker_start_timeout: Option<String>,
}

/// Collects problems while parsing each variable.
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn bad(&mut self, var: &'static str, value: &str, accepted: impl Into<String>) {
        self.problems.push(Problem { var, value: value.to_string(), accepted: accepted.into() });
    }

    /// Parses `raw` with `parse`, or returns `default` when unset or empty.
    fn get<T>(
        &mut self,
        var: &'static str,
        raw: &Option<String>,
        default: T,
        accepted: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> T {
        match raw.as_deref().map(str::trim) {
            None | Some("") => default,
            Some(v) => match parse(v) {
                Some(t) => t,
                None => {
                    self.bad(var, v, accepted);
                    default
                }
            },
        }
    }
}

/// A `Strict-Transport-Security` value RFC 6797 allows: `max-age` (required,
/// once) and the `includeSubDomains` / `preload` flags, separated by `;`.
pub fn valid_hsts(v: &str) -> bool {
    let mut max_age = 0;
    for d in v.split(';').map(str::trim) {
        let lower = d.to_ascii_lowercase();
        match lower.split_once('=') {
            Some(("max-age", n)) if !n.is_empty() && n.trim_matches('"').bytes().all(|b| b.is_ascii_digit()) => {
                max_age += 1
            }
            None if lower == "includesubdomains" || lower == "preload" => {}
            _ => return false,
        }
    }
    max_age == 1 && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// A level word as operators write it, as tracing spells it.
fn level_word(w: &str) -> Option<&'static str> {
    match w.trim().to_ascii_lowercase().as_str() {
        "error" | "critical" | "fatal" => Some("error"),
        "warn" | "warning" => Some("warn"),
        "info" => Some("info"),
        "debug" => Some("debug"),
        "trace" => Some("trace"),
        _ => None,
    }
}

/// `LOG_LEVEL` as a tracing filter: each directive is a level or `target=level`
/// (levels normalised; `off` and unknown words refused, since a filter that
/// does not parse as meant silences everything).
pub fn log_filter(v: &str) -> Option<String> {
    let mut out = Vec::new();
    for d in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.split_once('=') {
            Some((target, level)) if !target.is_empty() && !target.contains(char::is_whitespace) => {
                out.push(format!("{target}={}", level_word(level)?));
            }
            None => out.push(level_word(d)?.to_string()),
            _ => return None,
        }
    }
    let joined = out.join(",");
    (!out.is_empty() && tracing_subscriber::EnvFilter::try_new(&joined).is_ok()).then_some(joined)
}

/// Parses a boolean the way operators write them.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_range<T: std::str::FromStr + PartialOrd>(v: &str, lo: T, hi: T) -> Option<T> {
    v.parse::<T>().ok().filter(|n| *n >= lo && *n <= hi)
}

/// A whole number of seconds in `lo..=hi`, with the phrase operators see when it is not.
fn seconds(lo: u64, hi: u64) -> (String, impl Fn(&str) -> Option<Duration>) {
    (format!("a whole number of seconds {lo}-{hi}"), move |v| parse_range(v, lo, hi).map(Duration::from_secs))
}

/// The `ACME_*` variables; with `required` (ACME is the source), the domains
/// and, for dns-01, the hook must be there.
fn parse_acme(c: &mut Checker, raw: &Raw, required: bool) -> AcmeSettings {
    let domains = c.get(
        "ACME_DOMAINS",
        &raw.acme_domains,
        Vec::new(),
        "comma-separated DNS names (e.g. api.example.com,*.example.com)",
        |v| {
            let names: Vec<String> = v
                .split(',')
                .map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect();
            (!names.is_empty()
                && names.iter().all(|n| n.contains('.') && n.parse::<IpAddr>().is_err() && is_dns_name(n)))
            .then_some(names)
        },
    );
    let email = c.get("ACME_EMAIL", &raw.acme_email, None, "an email address (name@domain)", |v| {
        let ok = v.split_once('@').is_some_and(|(u, d)| !u.is_empty() && d.contains('.'))
            && !v.chars().any(|ch| ch.is_whitespace() || ch == ',');
        ok.then(|| Some(v.to_string()))
    });
    let staging = c.get("ACME_STAGING", &raw.acme_staging, false, "true/false/1/0/yes/no (any case)", parse_bool);
    let directory = c.get("ACME_DIRECTORY", &raw.acme_directory, None, "the https URL of an ACME directory", |v| {
        let ok = v.starts_with("https://") && v.len() > "https://".len() && !v.contains(char::is_whitespace);
        ok.then(|| Some(v.to_string()))
    });
    if staging && directory.is_some() {
        c.bad(
            "ACME_STAGING",
            "true",
            "false when ACME_DIRECTORY is set (staging means Let's Encrypt's staging directory; set one or the other)",
        );
    }
    let directory = directory.unwrap_or_else(|| if staging { LETS_ENCRYPT_STAGING } else { LETS_ENCRYPT }.to_string());
    let challenge =
        c.get("ACME_CHALLENGE", &raw.acme_challenge, AcmeChallenge::Http01, "http-01, tls-alpn-01 or dns-01", |v| {
            match v.to_ascii_lowercase().as_str() {
                "http-01" | "http01" | "http" => Some(AcmeChallenge::Http01),
                "tls-alpn-01" | "tlsalpn01" | "tls-alpn" => Some(AcmeChallenge::TlsAlpn01),
                "dns-01" | "dns01" | "dns" => Some(AcmeChallenge::Dns01),
                _ => None,
            }
        });
    let dns_hook = c.get("ACME_DNS_HOOK", &raw.acme_dns_hook, None, "a command", |v| Some(Some(v.to_string())));
    if required {
        if domains.is_empty() && raw.acme_domains.as_deref().is_none_or(|v| v.trim().is_empty()) {
            c.bad(
                "ACME_DOMAINS",
                "",
                "the DNS names to certify, because SSL_CERTIFICATE=ACME (e.g. ACME_DOMAINS=api.example.com)",
            );
        }
        if challenge == AcmeChallenge::Dns01 && dns_hook.is_none() {
            c.bad("ACME_DNS_HOOK", "", "a command that sets and clears TXT records, because ACME_CHALLENGE=dns-01");
        }
        if challenge != AcmeChallenge::Dns01 {
            if let Some(w) = domains.iter().find(|d| d.starts_with("*.")) {
                c.bad(
                    "ACME_CHALLENGE",
                    raw.acme_challenge.as_deref().unwrap_or("http-01"),
                    format!("dns-01, because ACME_DOMAINS has the wildcard {w} (only dns-01 proves wildcards)"),
                );
            }
        }
    }
    AcmeSettings { directory, email, domains, challenge, dns_hook }
}

/// A lifetime written as seconds (`3600`) or with a unit (`90s`, `30m`, `12h`, `7d`).
fn parse_lifetime(v: &str) -> Option<Duration> {
    let (digits, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => v.split_at(i),
        None => (v, ""),
    };
    let unit = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(unit).map(Duration::from_secs)
}

/// A regular file this process can open; checked without opening anything
/// else (opening a FIFO would block start-up for ever).
fn is_readable_file(p: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file())
        && std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(p).is_ok()
}

impl Config {
    /// Parses the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // vars() would panic on a value that is not UTF-8, even in a variable tandem
        // never reads; read bytes, and report the ones tandem does read.
        let mut not_utf8 = Vec::new();
        let vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                match v.into_string() {
                    Ok(v) => Some((k, v)),
                    Err(v) => {
                        if let Some(e) = ENV_VARS.iter().find(|e| e.name == k) {
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
        match Self::from_vars(vars) {
            Ok(c) if not_utf8.is_empty() => Ok(c),
            Ok(_) => Err(ConfigError { problems: not_utf8 }),
            Err(mut e) => {
                not_utf8.append(&mut e.problems);
                Err(ConfigError { problems: not_utf8 })
            }
        }
    }

    /// Parses the given variables; names not listed in [`ENV_VARS`] are ignored.
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(vars: I) -> Result<Self, ConfigError> {
        let all: Vec<(String, String)> = vars.into_iter().collect();
        let ambient =
            |name: &str| all.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
        let default_cache =
            default_cache_dir(nix::unistd::geteuid().is_root(), ambient("XDG_CACHE_HOME"), ambient("HOME"));
        let known: BTreeMap<String, String> =
            all.iter().filter(|(k, _)| ENV_VARS.iter().any(|e| e.name == k)).cloned().collect();
        // Only known names with string values reach envy, so it cannot fail; keep the
        // error path anyway rather than unwrapping on operator input.
        let raw: Raw = envy::from_iter(known).unwrap_or_default();
        let mut c = Checker { problems: Vec::new() };

        let host = c.get(
            "HOST",
            &raw.host,
            IpAddr::from([0, 0, 0, 0]),
            "an IP address such as 0.0.0.0, 127.0.0.1 or ::",
            |v| v.trim_start_matches('[').trim_end_matches(']').parse().ok(),
        );
        let port = c.get("PORT", &raw.port, 9001u16, "a port number 0-65535", |v| v.parse().ok());
        let num_workers =
            c.get("NUM_WORKERS", &raw.num_workers, 1usize, "an integer 1-256", |v| parse_range(v, 1, MAX_WORKERS));
        let max_workers = c.get(
            "MAX_WORKERS",
            &raw.max_workers,
            MAX_WORKERS,
            &format!("an integer {num_workers}-{MAX_WORKERS} (at least NUM_WORKERS)"),
            |v| parse_range(v, num_workers, MAX_WORKERS),
        );
        let enable_ssl = c.get("ENABLE_SSL", &raw.enable_ssl, false, "true/false/1/0/yes/no (any case)", parse_bool);
        let default_ssl_port = match port {
            80 => Some(443),
            0 => Some(0),
            p => p.checked_add(1),
        };
        let ssl_port = match (&raw.ssl_port, default_ssl_port) {
            (Some(v), _) if !v.trim().is_empty() => {
                c.get("SSL_PORT", &raw.ssl_port, 0, "a port number 0-65535", |v| v.parse().ok())
            }
            (_, Some(p)) => p,
            (_, None) => {
                if enable_ssl {
                    c.bad("SSL_PORT", "", "an explicit port, because PORT+1 is past 65535");
                }
                0
            }
        };
        if enable_ssl && ssl_port == port && port != 0 {
            c.bad("SSL_PORT", &ssl_port.to_string(), format!("a port different from PORT ({port})"));
        }
        let metrics_port =
            c.get("METRICS_PORT", &raw.metrics_port, None, "a port number 0-65535", |v| v.parse().ok().map(Some));
        if metrics_port.is_some_and(|m| m != 0 && (m == port || (enable_ssl && m == ssl_port))) {
            c.bad("METRICS_PORT", raw.metrics_port.as_deref().unwrap_or(""), "a port different from PORT and SSL_PORT");
        }
        let ssl_certificate = c.get(
            "SSL_CERTIFICATE",
            &raw.ssl_certificate,
            CertSource::Indirect,
            "INDIRECT, GENERATE, CA, ACME, or the path of a readable PEM certificate file",
            |v| match v.to_ascii_uppercase().as_str() {
                "INDIRECT" => Some(CertSource::Indirect),
                "GENERATE" => Some(CertSource::Generate),
                "CA" => Some(CertSource::Ca),
                "ACME" => Some(CertSource::Acme),
                _ => {
                    let p = PathBuf::from(v);
                    is_readable_file(&p).then_some(CertSource::Path(p))
                }
            },
        );
        let ssl_key = c.get("SSL_KEY", &raw.ssl_key, None, "the path of a readable PEM private key file", |v| {
            let p = PathBuf::from(v);
            is_readable_file(&p).then_some(Some(p))
        });
        let ssl_key_type = c.get("SSL_KEY_TYPE", &raw.ssl_key_type, KeyType::Rsa2048, "rsa2048 or ecdsa-p256", |v| {
            match v.to_ascii_lowercase().as_str() {
                "rsa2048" | "rsa" => Some(KeyType::Rsa2048),
                "ecdsa-p256" | "ecdsa" | "p256" => Some(KeyType::EcdsaP256),
                _ => None,
            }
        });
        let ssl_indirect_url = c.get(
            "SSL_INDIRECT_URL",
            &raw.ssl_indirect_url,
            "https://roboflow.host/certificate/".to_string(),
            "an https:// URL",
            |v| (v.starts_with("https://") && v.len() > "https://".len()).then(|| v.to_string()),
        );
        let ssl_refresh_interval = c.get(
            "SSL_REFRESH_INTERVAL",
            &raw.ssl_refresh_interval,
            Duration::from_secs(86400),
            "a whole number of seconds 1-31536000 (one year)",
            |v| parse_range(v, 1u64, 31_536_000).map(Duration::from_secs),
        );
        let ssl_cert_validity = c.get(
            "SSL_CERT_VALIDITY",
            &raw.ssl_cert_validity,
            Duration::from_secs(7 * 86400),
            "a lifetime from 60 seconds to 365 days: seconds, or a number with s, m, h or d (e.g. 7d, 12h)",
            |v| parse_lifetime(v).filter(|d| (60..=365 * 86400).contains(&d.as_secs())),
        );
        let ssl_san = c.get("SSL_SAN", &raw.ssl_san, Vec::new(), "comma-separated DNS names or IP addresses", |v| {
            let names: Vec<String> = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
            names.iter().all(|n| n.parse::<IpAddr>().is_ok() || is_dns_name(n)).then_some(names)
        });
        let ssl_client_ca = c.get(
            "SSL_CLIENT_CA",
            &raw.ssl_client_ca,
            None,
            "the path of a readable PEM bundle of CA certificates",
            |v| {
                let p = PathBuf::from(v);
                is_readable_file(&p).then_some(Some(p))
            },
        );
        let auth_default = if ssl_client_ca.is_some() { ClientAuth::Required } else { ClientAuth::Off };
        let ssl_client_auth =
            c.get("SSL_CLIENT_AUTH", &raw.ssl_client_auth, auth_default, "off, optional or required", |v| {
                match v.to_ascii_lowercase().as_str() {
                    "off" | "none" => Some(ClientAuth::Off),
                    "optional" => Some(ClientAuth::Optional),
                    "required" | "require" => Some(ClientAuth::Required),
                    _ => None,
                }
            });
        if ssl_client_auth != ClientAuth::Off && ssl_client_ca.is_none() && raw.ssl_client_auth.is_some() {
            c.bad(
                "SSL_CLIENT_AUTH",
                raw.ssl_client_auth.as_deref().unwrap_or(""),
                "off, unless SSL_CLIENT_CA names the CAs to verify against",
            );
        }
        if ssl_client_ca.is_some() && !enable_ssl {
            c.bad(
                "SSL_CLIENT_CA",
                raw.ssl_client_ca.as_deref().unwrap_or(""),
                "unset, unless ENABLE_SSL=true (client certificates need the HTTPS port)",
            );
        }
        let ssl_min_version = c.get("SSL_MIN_VERSION", &raw.ssl_min_version, TlsVersion::Tls12, "1.2 or 1.3", |v| {
            match v.to_ascii_lowercase().trim_start_matches("tlsv").trim_start_matches("tls") {
                "1.2" => Some(TlsVersion::Tls12),
                "1.3" => Some(TlsVersion::Tls13),
                _ => None,
            }
        });
        let ssl_hsts = c.get(
            "SSL_HSTS",
            &raw.ssl_hsts,
            None,
            "max-age=SECONDS, optionally with ; includeSubDomains and ; preload",
            |v| valid_hsts(v).then(|| Some(v.to_string())),
        );
        let ssl_redirect_http =
            c.get("SSL_REDIRECT_HTTP", &raw.ssl_redirect_http, false, "true/false/1/0/yes/no (any case)", parse_bool);
        if ssl_redirect_http && !enable_ssl {
            c.bad("SSL_REDIRECT_HTTP", "true", "false, unless ENABLE_SSL=true (there is no HTTPS port to redirect to)");
        }
        let acme = parse_acme(&mut c, &raw, ssl_certificate == CertSource::Acme && enable_ssl);
        let model_cache_dir = c.get("MODEL_CACHE_DIR", &raw.model_cache_dir, default_cache, "a directory path", |v| {
            Some(PathBuf::from(v))
        });
        let model_repository = c.get("MODEL_REPOSITORY", &raw.model_repository, None, "an existing directory", |v| {
            let p = PathBuf::from(v);
            p.is_dir().then_some(Some(p))
        });
        let ort_dylib_path =
            c.get("ORT_DYLIB_PATH", &raw.ort_dylib_path, None, "the path of a readable ONNX Runtime library", |v| {
                let p = PathBuf::from(v);
                is_readable_file(&p).then_some(Some(p))
            });
        let engine_backend = c.get(
            "ENGINE_BACKEND",
            &raw.engine_backend,
            BackendChoice::Auto,
            "auto, onnxruntime or tract",
            |v| match v.to_ascii_lowercase().as_str() {
                "auto" => Some(BackendChoice::Auto),
                "onnxruntime" | "ort" | "onnxruntime_onnx" => Some(BackendChoice::OnnxRuntime),
                "tract" => Some(BackendChoice::Tract),
                _ => None,
            },
        );
        let engine_device = c.get("ENGINE_DEVICE", &raw.engine_device, Device::Cpu, "cpu or cuda", |v| {
            match v.to_ascii_lowercase().as_str() {
                "cpu" => Some(Device::Cpu),
                "cuda" | "gpu" => Some(Device::Cuda),
                _ => None,
            }
        });
        let engine_threads =
            c.get("ENGINE_THREADS", &raw.engine_threads, None, "auto or an integer 1-1024", |v| match v {
                "auto" => Some(None),
                n => parse_range(n, 1usize, 1024).map(Some),
            });
        if engine_backend == BackendChoice::Tract && engine_device == Device::Cuda {
            c.bad("ENGINE_DEVICE", "cuda", "cpu, because ENGINE_BACKEND=tract has no CUDA support");
        }
        let strict_readiness =
            c.get("STRICT_READINESS", &raw.strict_readiness, true, "true/false/1/0/yes/no (any case)", parse_bool);
        let exit_on_model_error = c.get(
            "EXIT_ON_MODEL_ERROR",
            &raw.exit_on_model_error,
            false,
            "true/false/1/0/yes/no (any case)",
            parse_bool,
        );
        let max_request_bytes =
            c.get("MAX_REQUEST_BYTES", &raw.max_request_bytes, 64 << 20, "a byte count from 1024 to 4294967296", |v| {
                parse_range(v, 1024u64, 1 << 32)
            });
        let max_inflight_bytes = raw.max_inflight_bytes.as_ref().and_then(|v| {
            let accepted =
                format!("a byte count of at least MAX_REQUEST_BYTES x 3 ({}), up to 2^50", max_request_bytes * 3);
            let parsed = parse_range(v.trim(), max_request_bytes * 3, 1 << 50);
            if parsed.is_none() {
                c.bad("MAX_INFLIGHT_BYTES", v, accepted);
            }
            parsed
        });
        let request_timeout = {
            let (accepted, parse) = seconds(1, 86400);
            c.get("REQUEST_TIMEOUT", &raw.request_timeout, Duration::from_secs(60), &accepted, parse)
        };
        let shm_slots = c.get("SHM_SLOTS", &raw.shm_slots, 64u32, "an integer 2-4096", |v| parse_range(v, 2, 4096));
        // By default a slot carries what HTTP accepts (plus room for the headers),
        // so HTTPS takes every body HTTP takes; pages past 1 MiB are given back after use.
        // (Within the region's 64 GiB bound: with thousands of slots, slots shrink to fit.)
        let fits = (64usize << 30) / (2 * shm_slots.max(1) as usize);
        let default_slot =
            usize::try_from(max_request_bytes).unwrap_or(usize::MAX).saturating_add(1 << 20).min(fits / 4096 * 4096);
        let shm_slot_bytes =
            c.get("SHM_SLOT_BYTES", &raw.shm_slot_bytes, default_slot, "a byte count from 65536 to 4296015872", |v| {
                parse_range(v, 65536usize, (1 << 32) + (1 << 20))
            });
        if (shm_slots as u64) * (shm_slot_bytes as u64) * 2 > 64 << 30 {
            c.bad("SHM_SLOT_BYTES", &shm_slot_bytes.to_string(), "SHM_SLOTS x SHM_SLOT_BYTES x 2 of at most 64 GiB");
        }
        let timeouts = {
            let (accepted, parse) = seconds(1, 86400);
            let header = c.get("HEADER_TIMEOUT", &raw.header_timeout, Duration::from_secs(30), &accepted, &parse);
            let keepalive =
                c.get("KEEPALIVE_TIMEOUT", &raw.keepalive_timeout, Duration::from_secs(60), &accepted, &parse);
            let idle = c.get("IDLE_TIMEOUT", &raw.idle_timeout, Duration::from_secs(300), &accepted, &parse);
            if idle <= request_timeout {
                c.bad(
                    "IDLE_TIMEOUT",
                    &idle.as_secs().to_string(),
                    format!(
                        "more seconds than REQUEST_TIMEOUT ({}), or a slow inference is cut off",
                        request_timeout.as_secs()
                    ),
                );
            }
            crate::serve::Timeouts { header, keepalive, idle, body: request_timeout }
        };
        let graceful_timeout = {
            let (accepted, parse) = seconds(0, 86400);
            c.get("GRACEFUL_TIMEOUT", &raw.graceful_timeout, Duration::from_secs(30), &accepted, parse)
        };
        let log_level = c.get(
            "LOG_LEVEL",
            &raw.log_level,
            "info".to_string(),
            "a level (error, warn, info, debug, trace; warning, critical and fatal are read as warn and error) or a list of LEVEL and TARGET=LEVEL directives such as info,tandem_supervisor=debug; off is refused: it would hide fatal errors",
            log_filter,
        );
        let log_format = c.get("LOG_FORMAT", &raw.log_format, LogFormat::Text, "text or json", |v| {
            match v.to_ascii_lowercase().as_str() {
                "text" => Some(LogFormat::Text),
                "json" => Some(LogFormat::Json),
                _ => None,
            }
        });

        let access_log = c.get("ACCESS_LOG", &raw.access_log, false, "true/false/1/0/yes/no (any case)", parse_bool);
        let model_control_mode = c.get(
            "MODEL_CONTROL_MODE",
            &raw.model_control_mode,
            ModelControlMode::None,
            "none, explicit or poll",
            |v| match v.to_ascii_lowercase().as_str() {
                "none" => Some(ModelControlMode::None),
                "explicit" => Some(ModelControlMode::Explicit),
                "poll" => Some(ModelControlMode::Poll),
                _ => None,
            },
        );
        let repository_poll = {
            let (accepted, parse) = seconds(1, 86400);
            c.get("REPOSITORY_POLL_SECS", &raw.repository_poll_secs, Duration::from_secs(15), &accepted, parse)
        };
        let worker_command = match raw.worker_command.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => {
                let checked = shell_words::split(v)
                    .map_err(|e| format!("a command line with balanced quotes ({e})"))
                    .and_then(|argv| match argv.first() {
                        Some(program) => find_program(program, ambient("PATH").as_deref())
                            .map(|_| argv.clone())
                            .map_err(|why| format!("a command whose program can run ({why})")),
                        None => Err("a command line".to_string()),
                    });
                match checked {
                    Ok(argv) => Some(argv),
                    Err(accepted) => {
                        c.bad("WORKER_COMMAND", v, accepted);
                        None
                    }
                }
            }
        };
        let worker_ready_path = c.get(
            "WORKER_READY_PATH",
            &raw.worker_ready_path,
            "/".to_string(),
            "an absolute path such as / or /health (no spaces or control characters)",
            |v| (v.starts_with('/') && v.bytes().all(|b| b.is_ascii_graphic())).then(|| v.to_string()),
        );
        let worker_start_timeout = {
            let (accepted, parse) = seconds(1, 86400);
            c.get("WORKER_START_TIMEOUT", &raw.worker_start_timeout, Duration::from_secs(120), &accepted, parse)
        };

        if !c.problems.is_empty() {
            return Err(ConfigError { problems: c.problems });
        }
        Ok(Config {
            host,
            port,
            num_workers,
            max_workers,
            enable_ssl,
            ssl_port,
            metrics_port,
            ssl_certificate,
            ssl_key,
            ssl_key_type,
            ssl_indirect_url,
            ssl_refresh_interval,
            ssl_cert_validity,
            ssl_san,
            ssl_client_ca,
            ssl_client_auth,
            ssl_min_version,
            ssl_hsts,
            ssl_redirect_http,
            acme,
            model_cache_dir,
            model_repository,
            ort_dylib_path,
            engine_backend,
            engine_device,
            engine_threads,
            strict_readiness,
            access_log,
            model_control_mode,
            repository_poll,
            exit_on_model_error,
            max_request_bytes,
            max_inflight_bytes,
            request_timeout,
            shm_slots,
            shm_slot_bytes,
            timeouts,
            graceful_timeout,
            log_level,
            log_format,
            worker_command,
            worker_ready_path,
            worker_start_timeout,
        })
    }
}

/// Where `program` (the first word of a `WORKER_COMMAND`) is: a path with a
/// `/` as it is, a bare name looked up in `path` (`PATH`, else the usual
/// directories). Err says why it cannot be run.
pub fn find_program(program: &str, path: Option<&str>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.is_empty() {
        return Err("the command is empty".into());
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if runnable(&p) { Ok(p) } else { Err(format!("{program} is not an executable file")) };
    }
    let path = path.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| runnable(p))
        .ok_or_else(|| format!("{program} is not on PATH ({path})"))
}

/// The cache root when `MODEL_CACHE_DIR` is not set: never the world-writable
/// `/tmp`, where another local user could plant it. Root (a container, a
/// system service) uses `/var/cache/tandem`; a user `$XDG_CACHE_HOME/tandem`,
/// else `~/.cache/tandem`.
pub fn default_cache_dir(root: bool, xdg_cache_home: Option<String>, home: Option<String>) -> PathBuf {
    if root {
        return PathBuf::from("/var/cache/tandem");
    }
    match (xdg_cache_home, home) {
        (Some(xdg), _) if Path::new(&xdg).is_absolute() => Path::new(&xdg).join("tandem"),
        (_, Some(home)) => Path::new(&home).join(".cache/tandem"),
        // No home at all: a directory of this user's own below /tmp, still checked by the cache.
        _ => PathBuf::from(format!("/tmp/tandem-{}", nix::unistd::geteuid())),
    }
}

/// A DNS name or wildcard as accepted in a certificate SAN.
pub fn is_dns_name(n: &str) -> bool {
    let (wildcard, n) = match n.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, n),
    };
    let labels: Vec<&str> = n.split('.').collect();
    let well_formed = !n.is_empty()
        && n.len() <= 253
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    // No top-level domain is all digits (such a name is a mistyped address),
    // and a wildcard needs a registered name under it (`*.com` would cover a
    // whole top-level domain).
    let numeric_tld = labels.last().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()));
    well_formed && !numeric_tld && (!wildcard || labels.len() >= 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn the_inflight_budget_holds_three_largest_requests_at_least() {
        assert_eq!(parse(&[]).expect("default").max_inflight_bytes, None);
        let c = parse(&[("MAX_REQUEST_BYTES", "1048576"), ("MAX_INFLIGHT_BYTES", "3145728")]).expect("3x");
        assert_eq!(c.max_inflight_bytes, Some(3 << 20));
        let err = parse(&[("MAX_REQUEST_BYTES", "1048576"), ("MAX_INFLIGHT_BYTES", "2097152")]).expect_err("2x");
        assert!(err.to_string().contains("MAX_INFLIGHT_BYTES"), "{err}");
        assert!(parse(&[("MAX_INFLIGHT_BYTES", "lots")]).is_err());
    }

    #[test]
    fn dns_names_refuse_numeric_tops_and_wildcards_over_a_whole_domain() {
        for ok in ["localhost", "api.example.com", "*.example.com", "a-1.b2.io", "xn--bcher-kva.example"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in
            ["*.com", "*", "*.", "123", "1.2.3", "10.0.0.300", "host.123", "-a.com", "a..b", "a_b.com", "*.*.com"]
        {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).expect("defaults parse");
        assert_eq!(c.port, 9001);
        assert_eq!(c.ssl_port, 9002);
        assert_eq!(c.num_workers, 1);
        assert!(!c.enable_ssl);
        assert_eq!(c.ssl_certificate, CertSource::Indirect);
        let root = nix::unistd::geteuid().is_root();
        let want = default_cache_dir(root, None, None).join("ssl_certificates");
        assert_eq!(c.cert_dir(), want);
        assert!(!c.model_cache_dir.starts_with("/tmp/cache"));
    }

    #[test]
    fn a_worker_command_is_split_like_a_shell_and_its_program_must_exist() {
        let c =
            parse(&[("WORKER_COMMAND", "python3 -m uvicorn 'my app:app' --port {port}"), ("PATH", "/usr/bin:/bin")])
                .expect("ok");
        let argv = c.worker_command.expect("set");
        assert_eq!(argv, ["python3", "-m", "uvicorn", "my app:app", "--port", "{port}"]);
        assert_eq!(c.worker_ready_path, "/");
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
        assert_eq!(parse(&[("PORT", "80")]).expect("ok").ssl_port, 443);
        assert_eq!(parse(&[("PORT", "8080")]).expect("ok").ssl_port, 8081);
        assert_eq!(parse(&[("PORT", "80"), ("SSL_PORT", "8443")]).expect("ok").ssl_port, 8443);
        let err = parse(&[("PORT", "65535"), ("ENABLE_SSL", "1")]).expect_err("overflow");
        assert_eq!(err.problems[0].var, "SSL_PORT");
    }

    #[test]
    fn booleans_any_case() {
        for (v, want) in [("TRUE", true), ("yes", true), ("1", true), ("False", false), ("NO", false), ("0", false)] {
            assert_eq!(parse(&[("ENABLE_SSL", v)]).expect("ok").enable_ssl, want, "{v}");
        }
    }

    #[test]
    fn every_problem_reported_together() {
        let err = parse(&[
            ("PORT", "abc"),
            ("NUM_WORKERS", "0"),
            ("ENABLE_SSL", "maybe"),
            ("SSL_CERTIFICATE", "/missing.pem"),
            ("LOG_FORMAT", "xml"),
        ])
        .expect_err("bad");
        let vars: Vec<_> = err.problems.iter().map(|p| p.var).collect();
        assert_eq!(vars, ["PORT", "NUM_WORKERS", "ENABLE_SSL", "SSL_CERTIFICATE", "LOG_FORMAT"]);
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
        assert_eq!(c.ssl_certificate, CertSource::Acme);
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
        assert_eq!(c.ssl_certificate, CertSource::Ca);
        assert_eq!(c.ssl_cert_validity, Duration::from_secs(12 * 3600));
        assert_eq!(parse(&[]).expect("default").ssl_cert_validity, Duration::from_secs(7 * 86400));
        assert_eq!(parse(&[("SSL_CERT_VALIDITY", "90")]).expect("s").ssl_cert_validity, Duration::from_secs(90));
        for bad in ["59", "366d", "7w", "d", "-1d", "99999999999999999999d"] {
            let err = parse(&[("SSL_CERT_VALIDITY", bad)]).expect_err(bad);
            assert_eq!(err.problems[0].var, "SSL_CERT_VALIDITY", "{bad}");
        }
    }

    #[test]
    fn the_default_cache_is_never_in_a_shared_tmp() {
        assert_eq!(default_cache_dir(true, None, Some("/root".into())), PathBuf::from("/var/cache/tandem"));
        let user =
            |x: Option<&str>, h: Option<&str>| default_cache_dir(false, x.map(String::from), h.map(String::from));
        assert_eq!(user(Some("/home/a/.xdg"), Some("/home/a")), PathBuf::from("/home/a/.xdg/tandem"));
        assert_eq!(user(Some("relative"), Some("/home/a")), PathBuf::from("/home/a/.cache/tandem"));
        assert_eq!(user(None, Some("/home/a")), PathBuf::from("/home/a/.cache/tandem"));
        assert!(user(None, None).to_string_lossy().starts_with("/tmp/tandem-"));
    }

    #[test]
    fn https_slots_carry_what_http_accepts_by_default() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.shm_slot_bytes as u64, c.max_request_bytes + (1 << 20));
        let c = parse(&[("MAX_REQUEST_BYTES", "4294967296"), ("SHM_SLOTS", "4096")]).expect("fits the region");
        assert!((c.shm_slots as u64) * (c.shm_slot_bytes as u64) * 2 <= 64 << 30);
        assert_eq!(parse(&[("SHM_SLOT_BYTES", "65536")]).expect("explicit").shm_slot_bytes, 65536);
    }

    #[test]
    fn port_out_of_range() {
        assert_eq!(parse(&[("PORT", "70000")]).expect_err("bad").problems[0].var, "PORT");
    }

    #[test]
    fn san_list() {
        let c = parse(&[("SSL_SAN", "example.com, 10.0.0.1,*.svc.local")]).expect("ok");
        assert_eq!(c.ssl_san, ["example.com", "10.0.0.1", "*.svc.local"]);
        assert!(parse(&[("SSL_SAN", "bad name!")]).is_err());
    }

    #[test]
    fn log_levels_are_words_operators_use() {
        assert_eq!(log_filter("warning").as_deref(), Some("warn"));
        assert_eq!(log_filter("CRITICAL").as_deref(), Some("error"));
        assert_eq!(log_filter("info, tandem_supervisor=Debug").as_deref(), Some("info,tandem_supervisor=debug"));
        assert_eq!(log_filter("off"), None);
        assert_eq!(log_filter("verbose"), None);
        assert_eq!(log_filter("tandem=loud"), None);
        assert_eq!(log_filter(""), None);
    }

    #[test]
    fn hsts_values_are_checked() {
        assert!(valid_hsts("max-age=31536000"));
        assert!(valid_hsts("max-age=31536000; includeSubDomains; preload"));
        assert!(!valid_hsts("includeSubDomains"));
        assert!(!valid_hsts("max-age=abc"));
        assert!(!valid_hsts("max-age=1; max-age=2"));
        assert!(!valid_hsts("max-age=1\r\nSet-Cookie: x"));
        assert!(parse(&[("SSL_REDIRECT_HTTP", "true")]).is_err(), "needs ENABLE_SSL");
    }
}

#[cfg(test)]
mod readme {
    use super::ENV_VARS;

    #[test]
    fn readme_table_lists_every_variable() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).expect("README.md beside the workspace");
        for v in ENV_VARS {
            assert!(readme.contains(&format!("| `{}` |", v.name)), "README's table lacks {}", v.name);
        }
        let rows = readme.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(rows, ENV_VARS.len(), "README's table and ENV_VARS differ in length");
    }
}
