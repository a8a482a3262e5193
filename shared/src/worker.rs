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

/// Reads the worker's settings from the variable the supervisor set.
pub fn settings_from_supervisor() -> Result<WorkerSettings, String> {
    let raw = std::env::var(crate::WORKER_SETTINGS_VAR).map_err(|_| {
        format!(
            "{} is not set: worker subcommands are started by the tandem supervisor, not by hand",
            crate::WORKER_SETTINGS_VAR
        )
    })?;
    serde_json::from_str(&raw).map_err(|e| format!("{} is not valid worker settings: {e}", crate::WORKER_SETTINGS_VAR))
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
