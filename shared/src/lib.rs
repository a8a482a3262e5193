//! Code shared by tandem's processes: configuration, certificates, control
//! messages, worker settings, logging and the one module with `unsafe`.

#![deny(unsafe_code)]

pub mod access;
pub mod balance;
pub mod budget;
pub mod cert_cache;
pub mod cert_status;
pub mod control;
pub mod frame;
pub mod log_fields;
pub mod serve;
pub mod stats;
pub mod sys;
pub mod tls;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use tandem_config::engine::{BackendChoice, Device, ModelControlMode};
use tandem_config::process::LogFormat;
use tandem_config::tls::{ClientAuth, TlsVersion};

/// The crate version, reported by `GET /`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Environment variable carrying [`WorkerSettings`] as JSON from the supervisor to a worker.
pub const WORKER_SETTINGS_VAR: &str = "TANDEM_WORKER_SETTINGS";

/// Which kind of worker a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Plain HTTP with the inference engine.
    HttpWorker,
    /// TLS termination.
    HttpsWorker,
    /// With `WORKER_COMMAND`: serves both ports and forwards every request to a copy.
    ProxyWorker,
    /// With `WORKER_COMMAND`: one copy of the operator's server (not a tandem process).
    App,
}

impl Role {
    /// Whether this process serves the ports in front of the engines or copies
    /// (it drains first on stop, and gets SIGHUP for certificates).
    pub fn is_front(self) -> bool {
        matches!(self, Role::HttpsWorker | Role::ProxyWorker)
    }

    /// The hidden subcommand that starts this role.
    pub fn subcommand(self) -> &'static str {
        match self {
            Role::HttpWorker => "http-worker",
            Role::HttpsWorker => "https-worker",
            Role::ProxyWorker => "proxy-worker",
            // Never run as a tandem subcommand; the name is for logs.
            Role::App => "worker-command",
        }
    }
}

/// Everything a worker needs, given to it explicitly by the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSettings {
    /// Role of this worker.
    pub role: Role,
    /// Worker id, never reused within one supervisor's life.
    pub worker_id: u64,
    /// The supervisor's pid; the worker exits if its parent is not this.
    pub supervisor_pid: i32,
    /// Address the inherited listener is bound to (for URLs and logs).
    pub listen_addr: SocketAddr,
    /// Descriptor number of the worker's control socket.
    pub control_fd: i32,
    /// Number of HTTP workers (reported by `GET /`).
    pub num_workers: usize,
    /// Path of `live.pem` (HTTPS worker).
    pub live_cert: PathBuf,
    /// Path of the certificate status file, when HTTPS is enabled.
    pub cert_status: Option<PathBuf>,
    /// Model repository (resolved by the supervisor).
    pub model_repository: PathBuf,
    /// How the engine runs models (HTTP workers).
    pub engine: EngineSettings,
    /// Largest accepted request body in bytes.
    pub max_request_bytes: u64,
    /// This worker's budget for request bytes in flight (`MAX_INFLIGHT_BYTES`, [`budget`]).
    #[serde(default)]
    pub inflight_bytes: u64,
    /// Drain time on stop.
    pub graceful_timeout: Duration,
    /// Connection timeouts on this worker's listener.
    pub timeouts: serve::Timeouts,
    /// The shared-memory ring, when HTTPS is enabled.
    pub shm: Option<ShmSettings>,
    /// The statistics region and this worker's block in it.
    pub stats: StatsSettings,
    /// Tracing filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// One log line per request.
    pub access_log: bool,
    /// How models may change while running (engine workers).
    pub model_control: ModelControlMode,
    /// Client certificates (HTTPS worker): the CA bundle and whether they are asked for.
    pub client_ca: Option<PathBuf>,
    /// See [`ClientAuth`].
    pub client_auth: ClientAuth,
    /// Oldest TLS version accepted (HTTPS worker).
    pub tls_min_version: TlsVersion,
    /// `Strict-Transport-Security` value for HTTPS answers (HTTPS worker).
    pub hsts: Option<String>,
    /// Plain HTTP is redirected to HTTPS on this port (HTTP workers).
    pub redirect_to_https: Option<u16>,
    /// ACME: where HTTP-01 key authorizations wait, one file per token (HTTP workers serve them).
    pub acme_http01: Option<PathBuf>,
    /// ACME: where TLS-ALPN-01 certificates wait, one per name (the HTTPS worker answers `acme-tls/1`).
    pub acme_alpn01: Option<PathBuf>,
    /// Models whose load differs from the repository's files, as changed by
    /// explicit load/unload: `None` unloaded, `Some(config)` loaded with that JSON config.
    pub models_wanted: std::collections::BTreeMap<String, Option<String>>,
    /// The proxy worker's settings (`WORKER_COMMAND`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxySettings>,
}

impl WorkerSettings {
    /// This worker's memory budget for request bytes in flight: what the
    /// supervisor sized (`MAX_INFLIGHT_BYTES`), else room for one largest
    /// request (three times `MAX_REQUEST_BYTES`: [`budget`]).
    pub fn inflight_bytes_or_default(&self) -> u64 {
        if self.inflight_bytes == 0 {
            self.max_request_bytes.saturating_mul(3)
        } else {
            self.inflight_bytes
        }
    }
}

/// What the proxy worker needs beyond the common settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxySettings {
    /// Descriptor and address of the HTTPS listener, when `ENABLE_SSL` (the
    /// HTTP listener is the first, as for every worker).
    pub https: Option<(i32, SocketAddr)>,
    /// `REQUEST_TIMEOUT`: how long a copy may take to start answering.
    pub request_timeout: Duration,
    /// The copies running when the proxy worker was spawned.
    pub backends: Vec<control::Backend>,
    /// `WORKER_READY_PATH` (a health check: never redirected to HTTPS).
    pub ready_path: String,
}

/// The ONNX Runtime library the supervisor found and probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrtLibrary {
    /// The shared library.
    pub path: PathBuf,
    /// ONNX Runtime's version, as the library reports it.
    pub version: String,
    /// Whether the CUDA execution provider is compiled into this library.
    pub cuda: bool,
}

/// How the engine runs models, decided once by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSettings {
    /// ONNX Runtime, when found and loadable.
    pub onnxruntime: Option<OrtLibrary>,
    /// Why ONNX Runtime is not the default, when it is not.
    pub fallback_reason: Option<String>,
    /// The default backend (`ENGINE_BACKEND`).
    pub backend: BackendChoice,
    /// Device models run on.
    pub device: Device,
    /// Intra-op threads per model.
    pub threads: usize,
    /// Readiness needs every model ready.
    pub strict_readiness: bool,
    /// A model that fails to load stops start-up.
    pub exit_on_model_error: bool,
    /// This worker logs what the configurations ask that tandem ignores (the
    /// first engine worker does, so each note appears once per supervisor life).
    pub log_config_notes: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            onnxruntime: None,
            fallback_reason: None,
            backend: BackendChoice::Auto,
            device: Device::Cpu,
            threads: 1,
            strict_readiness: true,
            exit_on_model_error: false,
            log_config_notes: true,
        }
    }
}

/// Where and how big the shared-memory ring is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShmSettings {
    /// Descriptor number of the memfd in the worker.
    pub fd: i32,
    /// Number of slots.
    pub slots: u32,
    /// Bytes per request or response.
    pub slot_bytes: usize,
    /// How long a request may wait for the engine.
    pub request_timeout: Duration,
}

/// Where the statistics region is and which block of it a worker writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsSettings {
    /// Descriptor number of the memfd in the worker.
    pub fd: i32,
    /// Size of the region in 64-bit words.
    pub words: usize,
    /// The worker's block.
    pub block: usize,
}

/// Variables a worker process keeps from the supervisor's environment: not
/// tandem settings (those travel in [`WORKER_SETTINGS_VAR`]) but what the
/// libraries in the process read: the dynamic loader and CUDA (`LD_LIBRARY_PATH`,
/// `CUDA_VISIBLE_DEVICES`, `NVIDIA_*`), the C allocator (`GLIBC_TUNABLES`,
/// `MALLOC_*`), OpenMP threads and the time zone.
pub const INHERITED_PREFIXES: &[&str] =
    &["LD_LIBRARY_PATH", "CUDA_", "NVIDIA_", "GLIBC_TUNABLES", "MALLOC_", "OMP_", "TZ"];

/// The part of this process's environment a worker keeps ([`INHERITED_PREFIXES`]).
/// Values pass through as bytes: a value that is not UTF-8 is kept, never a panic.
pub fn inherited_env() -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| k.to_str().is_some_and(|k| INHERITED_PREFIXES.iter().any(|p| k.starts_with(p))))
        .collect()
}

static LOGGING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`init_logging`] ran (errors then go through tracing, not a bare line).
pub fn logging_ready() -> bool {
    LOGGING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets up tracing to stderr with the given filter and format.
pub fn init_logging(level: &str, format: LogFormat) {
    LOGGING.store(true, std::sync::atomic::Ordering::Relaxed);
    // Libraries that log per connection or per session stay quiet unless asked:
    // rustls warns on every handshake with an IP address as SNI, which any client can send.
    let mut directives = level.to_string();
    for (target, quiet) in [("rustls", "rustls=error"), ("ort", "ort=warn")] {
        if !level.contains(target) {
            directives.push(',');
            directives.push_str(quiet);
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error,ort=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    // A second initialisation (tests calling in-process) is harmless; ignore it.
    let _ = match format {
        LogFormat::Text => builder.fmt_fields(log_fields::EscapedFields).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Address as a URL authority (`[::1]:9001`, `127.0.0.1:9001`).
pub fn url(scheme: &str, addr: SocketAddr) -> String {
    format!("{scheme}://{addr}")
}
