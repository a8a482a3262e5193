//! `WORKER_COMMAND`: the copies' lives as the event loop sees them (started,
//! probed, put in and out of the proxy worker's rotation, drained, timed out).

use std::time::Instant;

use nix::sys::signal::Signal;
use tandem_shared::process::control::Command as ToWorker;
use tandem_shared::stats::{ProcessRole, Stats};
use tandem_shared::Role;

use super::phases::Phase;
use super::Supervisor;
use crate::apps::{signal_group, Health};
use crate::process::WorkerState;

impl Supervisor {
    pub(super) fn spawn_app(&mut self, index: usize) -> anyhow::Result<()> {
        let Some(apps) = &self.apps else { anyhow::bail!("no WORKER_COMMAND to run") };
        let worker_id = self.next_id;
        self.next_id += 1;
        let number = self.slots[index].number;
        let (pid, running) = apps.spawn(number, worker_id)?;
        tracing::info!(
            worker_id,
            worker = number,
            pid = pid.as_raw(),
            listen = %running.addr,
            restarts = self.slots[index].restarts,
            "worker command started"
        );
        // Counted as a running worker (the copy itself writes nothing there).
        Stats::attach_for(
            self.stats.0.clone(),
            self.slots[index].block,
            ProcessRole::App,
            worker_id,
            pid.as_raw() as u32,
        );
        let slot = &mut self.slots[index];
        slot.worker_id = worker_id;
        slot.pid = Some(pid);
        slot.killed = false;
        slot.state = WorkerState::Starting;
        slot.started = Instant::now();
        slot.restart_at = None;
        slot.app = Some(running);
        Ok(())
    }

    /// What a copy's probe found.
    pub(super) fn on_health(&mut self, id: u64, health: Health) {
        let Some(slot) = self.slots.iter_mut().find(|s| s.worker_id == id && s.pid.is_some()) else { return };
        let (number, started) = (slot.number, slot.started);
        let Some(app) = slot.app.as_mut() else { return };
        match health {
            Health::Ready => {
                app.was_ready = true;
                app.healthy = true;
                if slot.state == WorkerState::Starting {
                    slot.state = WorkerState::Ready;
                }
                tracing::info!(
                    worker_id = id,
                    worker = number,
                    took_ms = started.elapsed().as_millis() as u64,
                    "worker command ready"
                );
            }
            Health::Unhealthy(why) => {
                app.healthy = false;
                // A copy tandem is stopping (SIGTTOU, shutdown) stops answering on purpose.
                let stopping = slot.state == WorkerState::Draining
                    || app.draining_since.is_some()
                    || app.terminated_at.is_some()
                    || matches!(self.phase, Phase::Stopping { .. });
                if stopping {
                    tracing::debug!(worker_id = id, worker = number, %why, "a copy being stopped no longer answers");
                } else {
                    tracing::warn!(worker_id = id, worker = number, %why, "worker command stopped answering; out of rotation");
                }
            }
            Health::Recovered => {
                app.healthy = true;
                tracing::info!(worker_id = id, worker = number, "worker command answers again; back in rotation");
            }
        }
        self.publish_backends();
        self.became_ready();
    }

    /// Every copy that runs and has been ready, as the proxy worker routes to them.
    pub(super) fn backends(&self) -> Vec<tandem_shared::process::control::Backend> {
        use tandem_shared::process::control::{Backend, BackendState};
        self.slots
            .iter()
            .filter(|s| s.pid.is_some())
            .filter_map(|s| {
                let app = s.app.as_ref().filter(|a| a.was_ready)?;
                let state = match (s.state, app.healthy) {
                    (WorkerState::Draining, _) => BackendState::Draining,
                    (_, true) => BackendState::Ready,
                    (_, false) => BackendState::Unhealthy,
                };
                Some(Backend { id: s.worker_id, worker: s.number, addr: app.addr.clone(), state })
            })
            .collect()
    }

    /// Tells the proxy worker the current set of copies.
    pub(super) fn publish_backends(&self) {
        if self.apps.is_none() {
            return;
        }
        let command = ToWorker::Backends { backends: self.backends() };
        for s in self.slots.iter().filter(|s| s.role == Role::ProxyWorker && s.pid.is_some()) {
            if let Some(stream) = &s.control {
                if let Err(e) = stream.send(&command) {
                    tracing::warn!(worker_id = s.worker_id, error = %e, "cannot tell the proxy worker the copies");
                }
            }
        }
    }

    /// A copy exited: say why, the first failure to start with its last output.
    pub(super) fn app_exited(&self, index: usize, app: &crate::apps::Running, how: &str) {
        let slot = &self.slots[index];
        if app.was_ready || matches!(self.phase, Phase::Stopping { .. }) || slot.retired {
            return;
        }
        if self.phase == Phase::Starting && !app.start_timed_out && slot.restarts == 0 {
            // Start-up stops here, with this report as its error.
            return;
        }
        let why = if app.start_timed_out {
            format!("did not answer {} within WORKER_START_TIMEOUT", self.config.proxy.ready_path)
        } else {
            format!("exited before it was ready ({how})")
        };
        if slot.restarts == 0 || app.start_timed_out {
            tracing::error!(worker = slot.number, "worker command {why}; its last output:{}", app.tail_text());
        }
    }

    /// The proxy could not reach copy `id`: its prober looks now.
    pub(super) fn probe_copy_now(&self, id: u64) {
        if let Some(app) = self.slots.iter().find(|s| s.worker_id == id).and_then(|s| s.app.as_ref()) {
            app.probe_now();
        }
    }

    /// The proxy has no request left on draining copy `id`: stop it.
    pub(super) fn terminate_drained_copy(&mut self, id: u64) {
        let Some(slot) = self.slots.iter_mut().find(|s| s.worker_id == id) else { return };
        if let (Some(pid), Some(app)) = (slot.pid, slot.app.as_mut()) {
            if slot.state == WorkerState::Draining && app.terminated_at.is_none() {
                tracing::info!(worker_id = id, worker = slot.number, "worker command drained; stopping it");
                app.terminated_at = Some(Instant::now());
                signal_group(pid, Signal::SIGTERM);
            }
        }
    }

    /// Deadlines of the copies: a start that takes too long, a drain or a stop that does.
    pub(super) fn app_timers(&mut self) {
        if self.apps.is_none() {
            return;
        }
        let now = Instant::now();
        let (start_timeout, grace) = (self.config.proxy.start_timeout, self.config.process.graceful_timeout);
        let mut drained = Vec::new();
        for s in &mut self.slots {
            let (Some(pid), Some(app)) = (s.pid, s.app.as_mut()) else { continue };
            if s.state == WorkerState::Starting && !app.start_timed_out && now.duration_since(s.started) > start_timeout
            {
                app.start_timed_out = true;
                tracing::warn!(
                    worker_id = s.worker_id,
                    worker = s.number,
                    timeout_s = start_timeout.as_secs(),
                    "worker command not ready within WORKER_START_TIMEOUT; killing it to start again"
                );
                signal_group(pid, Signal::SIGKILL);
            }
            if app.draining_since.is_some_and(|t| now.duration_since(t) > grace) && app.terminated_at.is_none() {
                drained.push(s.worker_id);
            }
            if app.terminated_at.is_some_and(|t| now.duration_since(t) > grace) && !s.killed {
                s.killed = true;
                tracing::warn!(
                    worker_id = s.worker_id,
                    worker = s.number,
                    "worker command did not stop in time; killing"
                );
                signal_group(pid, Signal::SIGKILL);
            }
        }
        for id in drained {
            self.terminate_drained_copy(id);
        }
    }
}
