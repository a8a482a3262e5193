//! The process table: one slot per worker position, its lifecycle and restart policy.

use std::time::{Duration, Instant};

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tandem_shared::Role;

/// First restart delay.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that lived this long is healthy; its backoff starts over.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned, not yet reported ready.
    Starting,
    /// Serving.
    Ready,
    /// Told to stop; finishing in-flight requests.
    Draining,
    /// Exited; waiting for its restart (or retired).
    Stopped,
}

/// One worker position: a process, or the wait before its restart.
#[derive(Debug)]
pub struct Slot {
    /// Role of the worker in this slot.
    pub role: Role,
    /// Id of the current (or last) worker; ids are never reused.
    pub worker_id: u64,
    /// The current process, when one runs.
    pub pid: Option<Pid>,
    /// Lifecycle state.
    pub state: WorkerState,
    /// When the current process was spawned.
    pub started: Instant,
    /// Restarts so far.
    pub restarts: u32,
    /// Delay before the next restart.
    pub backoff: Duration,
    /// When to restart, if a restart is pending.
    pub restart_at: Option<Instant>,
    /// Removed by SIGTTOU: do not restart when it exits.
    pub retired: bool,
    /// The current process was sent SIGKILL (once, and said once).
    pub killed: bool,
    /// The slot's block in the statistics region, kept across restarts so totals never go back.
    pub block: usize,
    /// The supervisor's writing end of the current process's control channel.
    pub control: Option<tandem_shared::process::control::CommandSender>,
    /// The supervisor's end of that channel, held open (an upgrade in place
    /// hands it to the new binary, so the worker never sees its supervisor go).
    pub control_fd: Option<std::os::fd::OwnedFd>,
    /// A `WORKER_COMMAND` copy's number (1-based, kept across restarts; `{worker}`); 0 otherwise.
    pub number: usize,
    /// The running `WORKER_COMMAND` copy, for [`Role::App`] slots.
    pub app: Option<crate::apps::Running>,
}

impl Slot {
    /// A slot about to get its first process, counting into statistics block `block`.
    pub fn new(role: Role, block: usize) -> Self {
        Slot {
            role,
            worker_id: 0,
            pid: None,
            state: WorkerState::Stopped,
            started: Instant::now(),
            restarts: 0,
            backoff: BACKOFF_START,
            restart_at: None,
            retired: false,
            killed: false,
            block,
            control: None,
            control_fd: None,
            number: 0,
            app: None,
        }
    }

    /// Records that the process exited at `now` and schedules its restart
    /// with exponential backoff, reset when it had been healthy long enough.
    /// Returns the delay chosen.
    pub fn exited(&mut self, now: Instant) -> Duration {
        self.pid = None;
        self.state = WorkerState::Stopped;
        if now.duration_since(self.started) >= HEALTHY_AFTER {
            self.backoff = BACKOFF_START;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.restart_at = Some(now + delay);
        delay
    }
}

/// How a process ended, for logs.
pub fn describe_exit(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            format!("signal {sig}{}", if *core { " (core dumped)" } else { "" })
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_health() {
        let mut s = Slot::new(Role::Engine, 2);
        let t0 = Instant::now();
        s.started = t0;
        let delays: Vec<_> = (0..12).map(|_| s.exited(t0)).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[2], Duration::from_millis(400));
        assert_eq!(*delays.last().expect("some"), BACKOFF_MAX);
        s.started = t0;
        assert_eq!(s.exited(t0 + HEALTHY_AFTER), BACKOFF_START);
    }
}
