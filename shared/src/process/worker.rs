//! What every worker process does the same way: tie its life to the
//! supervisor, adopt its control socket, and wait for the stop signal.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

use crate::process::control::ControlClient;
use crate::WorkerSettings;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerStartError {
    /// The parent-death signal could not be set.
    #[error("cannot set the parent-death signal")]
    Pdeathsig(#[source] nix::Error),
    /// The supervisor died before this worker got going.
    #[error("supervisor pid {0} is gone; exiting")]
    Orphaned(i32),
    /// The control socket was not inherited.
    #[error("cannot adopt control socket fd {fd}")]
    Control {
        /// The descriptor number.
        fd: i32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Ties the worker's life to the supervisor and returns its control channel.
///
/// The parent-death signal is SIGTERM, so an orphaned worker drains like on a
/// normal stop. Checking the parent pid after setting it closes the race where
/// the supervisor died before the `prctl`.
pub fn attach(settings: &WorkerSettings) -> Result<Arc<ControlClient>, WorkerStartError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(WorkerStartError::Pdeathsig)?;
    if nix::unistd::getppid().as_raw() != settings.supervisor_pid {
        return Err(WorkerStartError::Orphaned(settings.supervisor_pid));
    }
    let fd = crate::sys::adopt_fd(settings.control_fd)
        .map_err(|source| WorkerStartError::Control { fd: settings.control_fd, source })?;
    Ok(Arc::new(ControlClient::new(UnixStream::from(fd))))
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn stop_signal() {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the worker can only be killed; wait forever.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Logs how a worker's drain ended: every request finished, or `timeout` ran out.
pub fn report_drain(drained: bool, timeout: std::time::Duration) {
    if drained {
        tracing::info!("drained");
    } else {
        tracing::warn!(timeout_s = timeout.as_secs(), "drain timed out; exiting with requests in flight");
    }
}

/// Writes `settings` into a new memfd, for a worker to read at start
/// ([`settings_from_supervisor`]): an environment variable holds at most
/// 128 KiB, and a few model configuration overrides outgrow that.
pub fn settings_memfd(settings: &WorkerSettings) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use std::io::{Seek, Write};
    let fd = memfd_create("tandem-settings", MFdFlags::MFD_CLOEXEC).map_err(std::io::Error::from)?;
    let mut file = std::fs::File::from(fd);
    serde_json::to_writer(&mut file, settings).map_err(std::io::Error::other)?;
    file.flush()?;
    file.rewind()?;
    Ok(file.into())
}

/// Why a worker found no settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Not started by the supervisor.
    #[error("{var} is not set: worker subcommands are started by the tandem supervisor, not by hand", var = crate::WORKER_SETTINGS_VAR)]
    NotSet,
    /// The variable does not name a descriptor.
    #[error("{var} must name the settings descriptor as fd:N, not {0:?}", var = crate::WORKER_SETTINGS_VAR)]
    NotADescriptor(String),
    /// The descriptor was not inherited.
    #[error("{var}: {0}", var = crate::WORKER_SETTINGS_VAR)]
    Descriptor(std::io::Error),
    /// What it holds is not worker settings.
    #[error("{var}: the descriptor holds no valid worker settings: {0}", var = crate::WORKER_SETTINGS_VAR)]
    Invalid(serde_json::Error),
}

/// Reads the worker's settings from the descriptor the supervisor's variable
/// names (`fd:N`, a memfd written by [`settings_memfd`]).
pub fn settings_from_supervisor() -> Result<WorkerSettings, SettingsError> {
    let raw = std::env::var(crate::WORKER_SETTINGS_VAR).map_err(|_| SettingsError::NotSet)?;
    let fd: std::os::fd::RawFd = raw
        .strip_prefix("fd:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| SettingsError::NotADescriptor(raw.clone()))?;
    let fd = crate::sys::adopt_fd(fd).map_err(SettingsError::Descriptor)?;
    let file = std::io::BufReader::new(std::fs::File::from(fd));
    serde_json::from_reader(file).map_err(SettingsError::Invalid)
}

/// Maps the shared-memory ring the supervisor handed down.
pub fn open_region(shm: &crate::ShmSettings) -> std::io::Result<Arc<crate::sys::shm::Region>> {
    let fd = crate::sys::adopt_fd(shm.fd)?;
    crate::sys::shm::Region::open(&fd, shm.slots, shm.slot_bytes)
}

/// Maps the statistics region and claims this worker's block in it.
pub fn open_stats(
    settings: &crate::StatsSettings,
    role: crate::stats::ProcessRole,
    worker_id: u64,
) -> std::io::Result<crate::stats::Stats> {
    let fd = crate::sys::adopt_fd(settings.fd)?;
    let region = crate::sys::counters::Counters::open(&fd, settings.words)?;
    let stats = crate::stats::Stats::attach(region, settings.block, role, worker_id);
    crate::stats::spawn_gauge_thread(stats.clone());
    Ok(stats)
}

/// One kind of worker, as the skeleton needs to know it.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// How logs name it (`engine worker`: "engine worker ready").
    pub name: &'static str,
    /// Its statistics role.
    pub role: crate::stats::ProcessRole,
    /// Keep freed large allocations mapped (workers that move request bodies).
    pub keep_large_allocations: bool,
    /// Run by the main runtime's thread each time it is about to sleep.
    pub on_park: Option<fn()>,
    /// Run by the main runtime's thread each time it wakes.
    pub on_unpark: Option<fn()>,
}

/// What a worker kind is given to start serving.
pub struct Started {
    /// Its settings.
    pub settings: WorkerSettings,
    /// The control channel to the supervisor.
    pub control: Arc<ControlClient>,
    /// Its statistics block.
    pub stats: crate::stats::Stats,
    /// The listener at `LISTEN_FDS_START`, non-blocking, when it was given one.
    pub listener: Option<std::net::TcpListener>,
}

/// A worker kind that serves: what it reports ready with, and how it stops.
pub struct Running {
    /// The certificate it serves, when it terminates TLS.
    pub fingerprint: Option<String>,
    /// What the ready line says besides (`max_connections=… threads=…`).
    pub details: String,
    /// Stops accepting and drains when first polled (after the stop signal);
    /// resolves to whether every request finished within `GRACEFUL_TIMEOUT`.
    pub drain: std::pin::Pin<Box<dyn std::future::Future<Output = bool>>>,
}

/// Why the skeleton could not run a worker.
#[derive(Debug, thiserror::Error)]
pub enum SkeletonError {
    /// Attaching to the supervisor failed.
    #[error(transparent)]
    Start(#[from] WorkerStartError),
    /// A resource every worker needs is missing.
    #[error("{what}")]
    Io {
        /// What could not be done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The supervisor could not be told.
    #[error("cannot report {0} to the supervisor")]
    Report(&'static str, #[source] std::io::Error),
}

/// Takes the inherited listener at `fd`, non-blocking (every listener a worker gets).
pub fn adopt_listener(fd: std::os::fd::RawFd) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::from(crate::sys::adopt_fd(fd)?);
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Every worker's life, the same way for each kind: tie it to the supervisor,
/// adopt its listener, open its statistics block, let the kind `start`
/// serving, report Ready, wait for the stop signal, report Draining, drain,
/// and log how the drain ended. The kind supplies only what it serves.
pub fn run_worker<S, E>(settings: WorkerSettings, kind: Kind, start: S) -> Result<(), E>
where
    S: AsyncFnOnce(Started) -> Result<Running, E>,
    E: From<SkeletonError>,
{
    if kind.keep_large_allocations {
        crate::sys::keep_large_allocations(settings.edge.inflight_bytes);
    }
    let control = attach(&settings).map_err(SkeletonError::from)?;
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if let Some(park) = kind.on_park {
        builder.on_thread_park(park);
    }
    if let Some(unpark) = kind.on_unpark {
        builder.on_thread_unpark(unpark);
    }
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|source| SkeletonError::Io { what: "cannot start the tokio runtime", source })?;
    runtime.block_on(async move {
        let io = |what| move |source| SkeletonError::Io { what, source };
        let stats = open_stats(&settings.stats, kind.role, settings.worker_id)
            .map_err(io("cannot map the statistics region"))?;
        let listener = match settings.listen_addr {
            Some(_) => Some(
                adopt_listener(crate::sys::LISTEN_FDS_START).map_err(io("cannot take the inherited listener"))?,
            ),
            None => None,
        };
        let (id, graceful) = (settings.worker_id, settings.graceful_timeout);
        let addr = settings.listen_addr.map_or_else(|| "-".to_string(), |a| a.to_string());
        let running = start(Started { settings, control: control.clone(), stats, listener }).await?;
        control
            .send(&crate::process::control::WorkerEvent::Ready {
                addr: addr.clone(),
                fingerprint: running.fingerprint.clone(),
            })
            .map_err(|e| SkeletonError::Report("ready", e))?;
        tracing::info!(worker_id = id, pid = std::process::id(), %addr, fingerprint = running.fingerprint, details = %running.details, "{} ready", kind.name);
        stop_signal().await;
        tracing::info!(worker_id = id, "draining in-flight requests");
        let _ = control.send(&crate::process::control::WorkerEvent::Draining);
        report_drain(running.drain.await, graceful);
        Ok(())
    })
}
