//! What tandem's processes are built from, by what it holds: [`process`]
//! (what makes a worker process: the skeleton, the control channel, the
//! settings it receives, log fields), [`edge`] (what every request path does
//! at the front: the front door, serving connections, the access log,
//! balancing, the memory budget), [`certs`] (the certificate cache, what the
//! served certificate is, certificate primitives), [`stats`] (the statistics
//! region's meaning), [`frame`] (the ring's frame format) and [`sys`], the one
//! module with `unsafe`.

#![deny(unsafe_code)]

pub mod certs;
pub mod edge;
pub mod frame;
pub mod process;
pub mod stats;
pub mod sys;
pub mod system_shm;

use std::net::SocketAddr;

use tandem_config::process::LogFormat;

pub use process::settings::{
    EdgeSettings, EngineSettings, EngineWorker, ModelSet, OrtLibrary, ProxySettings, Role, ShmSettings, StatsSettings,
    TlsSettings, Wanted, WorkerSettings,
};

/// The crate version, reported by `GET /`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Environment variable carrying [`WorkerSettings`] as JSON from the supervisor to a worker.
pub const WORKER_SETTINGS_VAR: &str = "TANDEM_WORKER_SETTINGS";

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
        LogFormat::Text => builder.fmt_fields(process::log_fields::EscapedFields).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Address as a URL authority (`[::1]:9001`, `127.0.0.1:9001`).
pub fn url(scheme: &str, addr: SocketAddr) -> String {
    format!("{scheme}://{addr}")
}
