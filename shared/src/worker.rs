//! What every worker process does the same way: tie its life to the
//! supervisor, adopt its control socket, and wait for the stop signal.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

use crate::control::ControlClient;
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

/// Reads the worker's settings from the descriptor the supervisor's variable
/// names (`fd:N`, a memfd written by [`settings_memfd`]).
pub fn settings_from_supervisor() -> Result<WorkerSettings, String> {
    let var = crate::WORKER_SETTINGS_VAR;
    let raw = std::env::var(var).map_err(|_| {
        format!("{var} is not set: worker subcommands are started by the tandem supervisor, not by hand")
    })?;
    let fd: std::os::fd::RawFd = raw
        .strip_prefix("fd:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{var} must name the settings descriptor as fd:N, not {raw:?}"))?;
    let fd = crate::sys::adopt_fd(fd).map_err(|e| format!("{var}: {e}"))?;
    let file = std::io::BufReader::new(std::fs::File::from(fd));
    serde_json::from_reader(file).map_err(|e| format!("{var}: the descriptor holds no valid worker settings: {e}"))
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
