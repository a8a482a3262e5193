//! The `tandem` supervisor: reads the configuration, prepares certificates,
//! binds the listeners and supervises the worker processes. `main.rs` only
//! calls [`main`]; LIFECYCLE.md walks through the whole life of the process.

#![forbid(unsafe_code)]

mod apikey;
pub mod apps;
pub mod certs;
pub mod engine_runtime;
mod health;
pub mod metrics_port;
pub mod models;
pub mod process;
mod status_page;
pub mod supervise;
mod systemd;
pub mod worker_settings;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tandem_config::Config;
use tandem_shared::process::worker::settings_from_supervisor;

use crate::supervise::{Listeners, Supervisor};

/// Exit status: clean stop.
pub const EXIT_OK: u8 = 0;
/// Exit status: runtime failure.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit status: bad configuration; nothing was started or written.
pub const EXIT_CONFIG: u8 = 2;

/// How a run ended: the status and, for failures, the message.
#[derive(Debug)]
pub enum Outcome {
    /// Clean stop.
    Ok,
    /// Bad configuration or unusable certificate at start.
    Config(anyhow::Error),
    /// Anything else.
    Runtime(anyhow::Error),
}

/// Entry point: dispatches on the (hidden) subcommand and maps the outcome to an exit status.
pub fn main(args: &[String]) -> ExitCode {
    let outcome = match args.first().map(String::as_str) {
        None => supervisor(None),
        Some("run") => match run_args(&args[1..]) {
            Ok(argv) => supervisor(Some(argv)),
            Err(e) => Outcome::Config(e),
        },
        Some("engine-worker") => worker(tandem_engine_worker::run),
        Some("https-worker") => worker(tandem_https_worker::run),
        Some("proxy-worker") => worker(tandem_proxy_worker::run),
        Some("cert") => return cert_command(&args[1..]),
        Some("ca") => return certs::ca::command(&args[1..]),
        Some("health") => return health::command(&args[1..]),
        Some("apikey") => return apikey::command(&args[1..]),
        Some("check") => return check_command(&args[1..]),
        Some("upgrade") => return supervise::upgrade::command(&args[1..]),
        Some("engine-probe") => return engine_probe(&args[1..]),
        Some("--version" | "-V") => {
            println!("tandem {}", tandem_shared::VERSION);
            Outcome::Ok
        }
        Some("--help" | "-h" | "help") => {
            println!("{}", usage());
            Outcome::Ok
        }
        Some(other) => Outcome::Config(anyhow::anyhow!("unknown command {other:?}\n{}", usage())),
    };
    match outcome {
        Outcome::Ok => ExitCode::from(EXIT_OK),
        Outcome::Config(e) => {
            eprintln!("tandem: error: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Outcome::Runtime(e) => {
            // A fatal error always reaches stderr, whatever the filter lets through.
            if tandem_shared::logging_ready() && tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{e:#}");
            } else {
                eprintln!("tandem: error: {e:#}");
            }
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `tandem check`: the serve mode, the effective configuration and the ignored
/// variables; exit 2 (with every problem) when the configuration is refused.
fn check_command(args: &[String]) -> ExitCode {
    if !args.is_empty() {
        eprintln!("tandem: error: usage: tandem check");
        return ExitCode::from(EXIT_CONFIG);
    }
    match Config::from_env() {
        Ok(c) => {
            print!(
                "{}",
                tandem_config::check::report(&c, &tandem_config::check::set_in_env, &tandem_config::unknown::in_env())
            );
            ExitCode::from(EXIT_OK)
        }
        Err(e) => {
            eprintln!("tandem: error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `tandem cert status [--json]`: exit 0 when the certificate is usable, 1 when not, 2 on bad usage.
fn cert_command(args: &[String]) -> ExitCode {
    let json = args.iter().any(|a| a == "--json");
    if args.first().map(String::as_str) != Some("status") || args.iter().skip(1).any(|a| a != "--json") {
        eprintln!("tandem: error: usage: tandem cert status [--json]");
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem: error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let report = certs::status::report(&config);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", certs::status::render(&report));
    }
    ExitCode::from(if report.usable { EXIT_OK } else { EXIT_RUNTIME })
}

/// `tandem engine-probe PATH` (hidden): loads ONNX Runtime from PATH and prints its facts as JSON.
fn engine_probe(args: &[String]) -> ExitCode {
    let [path] = args else {
        eprintln!("tandem: error: usage: tandem engine-probe LIBRARY");
        return ExitCode::from(EXIT_CONFIG);
    };
    match tandem_engine_worker::engine::onnx_runtime::probe(Path::new(path)) {
        Ok(info) => {
            println!("{}", serde_json::to_string(&info).unwrap_or_default());
            ExitCode::from(EXIT_OK)
        }
        Err(e) => {
            eprintln!("tandem: error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn usage() -> String {
    let mut s = String::from(
        "usage: tandem                     run the supervisor (configured by the environment)\n       tandem run -- CMD ARGS...    run NUM_WORKERS copies of an HTTP server command behind both ports (as WORKER_COMMAND)\n       tandem cert status [--json]  inspect the configured certificate (exit 0 usable, 1 not)\n       tandem ca init|status|export|issue  the private CA (SSL_CERTIFICATE=CA); `tandem ca` for usage\n       tandem health [--live]       probe the local server's readiness (liveness) over HTTP and HTTPS; exit 0 healthy, 1 not\n       tandem check                 the serve mode, effective configuration and ignored variables\n       tandem upgrade               replace the running supervisor by the binary now at its path, without a refused connection (SIGUSR2)\n       tandem apikey new NAME [--append FILE]  a new API key (shown once) and its API_KEYS_FILE line\n       tandem --version\n\nenvironment:\n",
    );
    for v in tandem_config::vars() {
        s.push_str(&format!("  {:<22} {} (default: {})\n", v.name, v.doc, v.default));
    }
    s
}

fn worker(run: fn(tandem_shared::WorkerSettings) -> anyhow::Result<()>) -> Outcome {
    let settings = match settings_from_supervisor() {
        Ok(s) => s,
        Err(e) => return Outcome::Config(anyhow::anyhow!(e)),
    };
    tandem_shared::init_logging(&settings.log_level, settings.log_format);
    let role = settings.role.subcommand();
    let id = settings.worker_id;
    match run(settings) {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Runtime(e.context(format!("{role} {id} failed"))),
    }
}

/// The command of `tandem run [--] CMD ARGS...`, checked like `WORKER_COMMAND`.
fn run_args(args: &[String]) -> anyhow::Result<Vec<String>> {
    let argv = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    let Some(program) = argv.first() else {
        anyhow::bail!("usage: tandem run -- COMMAND [ARGS...]  (the server to run NUM_WORKERS copies of)");
    };
    tandem_config::values::find_program(program, std::env::var("PATH").ok().as_deref())
        .map_err(|why| anyhow::anyhow!("tandem run: cannot run {program:?}: {why}"))?;
    Ok(argv.to_vec())
}

fn supervisor(command: Option<Vec<String>>) -> Outcome {
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return Outcome::Config(anyhow::Error::new(e)),
    };
    if command.is_some() {
        // `tandem run -- ...` wins over WORKER_COMMAND.
        config.proxy.command = command;
    }
    tandem_shared::init_logging(&config.process.log_level, config.process.log_format);
    // Started by SIGUSR2 of a running supervisor: the pipe to tell it we serve.
    if let Err(e) = supervise::upgrade::adopt() {
        return Outcome::Runtime(e);
    }
    for n in tandem_config::check::ignored(&config, &tandem_config::check::set_in_env) {
        tracing::warn!(variable = n.var, hint = %n.hint, "variable set but ignored");
    }
    for caution in tandem_config::check::cautions(&config) {
        tracing::warn!("{caution}");
    }
    for u in tandem_config::unknown::in_env() {
        let hint = u
            .suggestion
            .map_or_else(|| "tandem check lists every variable".to_string(), |s| format!("did you mean {s}?"));
        tracing::warn!(variable = %u.name.escape_debug(), %hint, "variable looks like tandem's but is not one; it does nothing (STRICT_CONFIG=true refuses it)");
    }
    // One crypto provider for everything (rustls server, reqwest client).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return Outcome::Runtime(anyhow::Error::new(e).context("cannot start the tokio runtime")),
    };
    runtime.block_on(start(config))
}

/// The model repository: `MODEL_REPOSITORY`, else the one shipped with tandem,
/// looked up beside the binary, then in the source tree it was built from.
pub fn model_repository(config: &Config) -> Result<PathBuf, Vec<PathBuf>> {
    if let Some(p) = &config.engine.model_repository {
        return Ok(p.clone());
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        candidates.push(dir.join("models"));
        candidates.push(dir.join("../share/tandem/models"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"));
    match candidates.iter().find(|p| p.is_dir()) {
        Some(p) => Ok(p.canonicalize().unwrap_or_else(|_| p.clone())),
        None => Err(candidates),
    }
}

async fn start(config: Config) -> Outcome {
    let (repository, engine) = if config.proxy.command.is_some() {
        // The operator's server replaces the engine: no models, no ONNX Runtime.
        (PathBuf::new(), tandem_shared::EngineSettings::default())
    } else {
        match engine_setup(&config) {
            Ok(r) => r,
            Err(o) => return o,
        }
    };
    // The keeper checks its source before anything is written (a bad custom
    // pair or a missing CA is exit 2 with no cache created), then obtains and
    // publishes the first certificate.
    let certs = if config.tls.enabled {
        match certs::CertKeeper::start(&config).await {
            Ok(k) => Some(k),
            Err(certs::StartError::Config(e)) => return Outcome::Config(e),
            Err(certs::StartError::Runtime(e)) => return Outcome::Runtime(e),
        }
    } else {
        None
    };
    let listeners = match Listeners::bind(&config) {
        Ok(l) => l,
        Err(e) => return Outcome::Runtime(e),
    };
    if let Err(e) = become_reaper() {
        return Outcome::Runtime(e);
    }
    let supervisor = match Supervisor::new(config, repository, engine, listeners, certs) {
        Ok(s) => s,
        Err(e) => return Outcome::Runtime(e),
    };
    match supervisor.run().await {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Runtime(e),
    }
}

/// The model repository and the engine's runtime, for tandem's own engine.
fn engine_setup(config: &Config) -> Result<(PathBuf, tandem_shared::EngineSettings), Outcome> {
    let repository = match model_repository(config) {
        Ok(r) => r,
        Err(tried) => {
            let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
            return Err(Outcome::Config(anyhow::anyhow!(
                "MODEL_REPOSITORY is not set and no built-in model repository was found; tried {}\nhint: set MODEL_REPOSITORY to a directory of <model>/<version>/model.onnx",
                tried.join(", ")
            )));
        }
    };
    let engine = engine_runtime::resolve(config).map_err(|e| Outcome::Config(anyhow::Error::new(e)))?;
    engine_runtime::announce(&engine);
    Ok((repository, engine))
}

/// PID 1 reaps orphans by definition; anywhere else, ask the kernel to
/// re-parent our orphaned descendants to us so we can reap them.
fn become_reaper() -> anyhow::Result<()> {
    if std::process::id() != 1 {
        nix::sys::prctl::set_child_subreaper(true).context("cannot become a child subreaper")?;
    }
    Ok(())
}
