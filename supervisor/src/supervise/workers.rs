//! Worker processes: starting one with its descriptors and settings, reading
//! its control channel, reaping and restarting it, adding and removing engine
//! workers (SIGTTIN/SIGTTOU), and stopping them all.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use command_fds::{CommandFdExt, FdMapping};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tandem_shared::process::control::{parse_event, CommandSender};
use tandem_shared::stats::Stats;
use tandem_shared::sys::LISTEN_FDS_START;
use tandem_shared::{Role, StatsSettings, WORKER_SETTINGS_VAR};

use super::phases::{self, Phase};
use super::{Control, Supervisor};
use crate::apps::signal_group;
use crate::process::{describe_exit, Slot, WorkerState};
use crate::worker_settings::{CONTROL_FD, GRPC_FD, PROXY_HTTPS_FD, SETTINGS_FD, SHM_FD, STATS_FD};

impl Supervisor {
    pub(super) fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let Some(listeners) = &self.listeners else {
            return Ok(());
        };
        let role = self.slots[index].role;
        if role == Role::App {
            return self.spawn_app(index);
        }
        // The plain listener is absent with HTTP_MODE=off: the engines serve the ring only.
        let (listener, addr) = match role {
            Role::Engine | Role::ProxyWorker | Role::App => (listeners.http.as_ref(), self.http_addr),
            Role::HttpsWorker => match (&listeners.https, self.https_addr) {
                (Some(l), Some(a)) => (Some(l), Some(a)),
                _ => anyhow::bail!("no HTTPS listener for the HTTPS worker"),
            },
        };
        let proxy_https = match (role, &listeners.https, self.https_addr) {
            (Role::ProxyWorker, Some(l), Some(a)) => {
                Some((l.try_clone().context("cannot duplicate the HTTPS listener")?, a))
            }
            _ => None,
        };
        let listener_fd =
            listener.map(TcpListener::try_clone).transpose().context("cannot duplicate the listener for a worker")?;
        // The gRPC-only port is the engine workers' second listener.
        let grpc = match (role, &listeners.grpc) {
            (Role::Engine, Some(l)) => Some(l.try_clone().context("cannot duplicate the gRPC listener")?),
            _ => None,
        };
        let grpc_addr = grpc.as_ref().and(self.grpc_addr);
        // HTTP/3's UDP socket goes to the worker that serves HTTPS (the HTTPS or the proxy worker).
        let h3 = match (role, &listeners.h3) {
            (Role::HttpsWorker | Role::ProxyWorker, Some(u)) => {
                Some(u.try_clone().context("cannot duplicate the HTTP/3 socket")?)
            }
            _ => None,
        };
        let h3_addr =
            h3.as_ref().map(|u| u.local_addr()).transpose().context("cannot read the HTTP/3 socket's address")?;
        let (ours, theirs) = UnixStream::pair().context("cannot create a control socketpair")?;
        let worker_id = self.next_id;
        self.next_id += 1;
        let settings = crate::worker_settings::for_worker(
            &self.config,
            crate::worker_settings::Spawn {
                role,
                worker_id,
                listen_addr: addr,
                stats: StatsSettings {
                    fd: STATS_FD,
                    words: self.stats.0.words().len(),
                    block: self.slots[index].block,
                },
                engine_workers: self.engine_slots(),
                https_addr: self.https_addr,
                grpc_addr,
                h3_addr,
                ring: self.shm.is_some(),
                model_repository: &self.model_repository,
                engine: &self.engine,
                models_wanted: &self.model_ops.wanted,
                system_shm: self.system_shm.as_ref().map(|r| r.set()),
                backends: if role == Role::ProxyWorker { self.backends() } else { Vec::new() },
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                memory: self.memory,
            },
        );
        let settings_fd = tandem_shared::process::worker::settings_memfd(&settings)
            .context("cannot write the worker's settings into a memfd")?;
        let mut fds = vec![
            FdMapping { parent_fd: settings_fd, child_fd: SETTINGS_FD },
            FdMapping { parent_fd: theirs.into(), child_fd: CONTROL_FD },
            FdMapping {
                parent_fd: self.stats.1.try_clone().context("cannot duplicate the statistics memfd")?,
                child_fd: STATS_FD,
            },
        ];
        if let Some(l) = listener_fd {
            fds.push(FdMapping { parent_fd: l.into(), child_fd: LISTEN_FDS_START });
        }
        if let Some((_, memfd)) = &self.shm {
            fds.push(FdMapping {
                parent_fd: memfd.try_clone().context("cannot duplicate the memfd")?,
                child_fd: SHM_FD,
            });
        }
        if let Some(l) = grpc {
            fds.push(FdMapping { parent_fd: l.into(), child_fd: GRPC_FD });
        }
        if let Some(u) = h3 {
            fds.push(FdMapping { parent_fd: u.into(), child_fd: crate::worker_settings::H3_FD });
        }
        if let Some((l, _)) = proxy_https {
            fds.push(FdMapping { parent_fd: l.into(), child_fd: PROXY_HTTPS_FD });
        }
        // This binary itself (not whatever is at its path now), named `tandem`.
        let mut cmd = Command::new(&self.own_binary.1);
        cmd.arg0("tandem")
            .arg(role.subcommand())
            .env_clear()
            .envs(tandem_shared::inherited_env())
            .env(WORKER_SETTINGS_VAR, format!("fd:{SETTINGS_FD}"))
            .env("LISTEN_FDS", if addr.is_some() { "1" } else { "0" })
            .env("LISTEN_FDNAMES", if role == Role::HttpsWorker { "https" } else { "http" })
            .stdin(Stdio::null())
            .fd_mappings(fds)
            .context("descriptor mapping collision")?;
        let child =
            cmd.spawn().with_context(|| format!("cannot start {} {}", self.exe.display(), role.subcommand()))?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped by waitpid(-1) in `reap`, never through this handle.
        drop(child);
        let slot = &mut self.slots[index];
        slot.worker_id = worker_id;
        slot.pid = Some(pid);
        slot.killed = false;
        slot.control = ours.try_clone().and_then(|s| CommandSender::start(s, worker_id)).ok();
        slot.control_fd = ours.try_clone().ok().map(std::os::fd::OwnedFd::from);
        slot.state = WorkerState::Starting;
        slot.started = Instant::now();
        slot.restart_at = None;
        tracing::info!(
            worker_id,
            pid = pid.as_raw(),
            role = role.subcommand(),
            restarts = slot.restarts,
            "worker started"
        );
        self.read_control(worker_id, ours);
        Ok(())
    }

    /// Forwards a worker's control messages to the event loop from a thread:
    /// the socket is blocking and messages are rare.
    fn read_control(&self, worker_id: u64, stream: UnixStream) {
        let tx = self.control_tx.clone();
        let spawned = std::thread::Builder::new().name(format!("control-{worker_id}")).spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                match parse_event(&line) {
                    Ok(ev) => {
                        if tx.send(Control::Event(worker_id, ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(worker_id, error = %e, line, "unreadable control message"),
                }
            }
            let _ = tx.send(Control::Closed(worker_id));
        });
        if let Err(e) = spawned {
            tracing::error!(worker_id, error = %e, "cannot start the control reader thread");
        }
    }

    /// Reaps every exited child: workers are scheduled for restart, orphans
    /// re-parented to us are simply collected so no zombie remains.
    pub(super) fn reap(&mut self) -> anyhow::Result<()> {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waitpid failed"),
            };
            let Some(pid) = status.pid() else { continue };
            let Some(index) = self.slots.iter().position(|s| s.pid == Some(pid)) else {
                if let Some(i) = self.old_workers.iter().position(|w| w.pid == pid) {
                    let old = self.old_workers.remove(i);
                    tracing::info!(pid = pid.as_raw(), front = old.front, how = %describe_exit(&status), "a worker of the previous binary drained and exited");
                } else if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
                    tracing::error!(pid = pid.as_raw(), how = %describe_exit(&status), "the new supervisor exited");
                } else {
                    tracing::debug!(pid = pid.as_raw(), how = %describe_exit(&status), "reaped an orphan");
                }
                continue;
            };
            self.worker_exited(index, &status)?;
        }
    }

    fn worker_exited(&mut self, index: usize, status: &WaitStatus) -> anyhow::Result<()> {
        let how = describe_exit(status);
        // Requests the dead engine worker held go back to the HTTPS worker, intact, to retry.
        if let (Some((region, _)), Role::Engine) = (&self.shm, self.slots[index].role) {
            let failed = region.fail_claims(self.slots[index].worker_id);
            if failed > 0 {
                tracing::warn!(
                    worker_id = self.slots[index].worker_id,
                    requests = failed,
                    "failed the requests a dead worker held; the HTTPS worker retries them"
                );
            }
        }
        Stats::vacate(&self.stats.0, self.slots[index].block);
        self.slots[index].control = None;
        self.slots[index].control_fd = None;
        let app = self.slots[index].app.take();
        if let (Some(app), Some(pid)) = (&app, self.slots[index].pid) {
            // What the copy started and left behind goes with it (a restart must find its port free).
            signal_group(pid, Signal::SIGKILL);
            app.settle();
            self.app_exited(index, app, &how);
            self.publish_backends();
        }
        for step in self.model_ops.worker_gone(self.slots[index].worker_id, &format!("exited ({how})")) {
            self.model_step(step);
        }
        let slot = &mut self.slots[index];
        let (worker_id, pid) = (slot.worker_id, slot.pid.map_or(0, Pid::as_raw));
        let role = slot.role.subcommand();
        if matches!(self.phase, Phase::Stopping { .. }) || slot.retired {
            slot.pid = None;
            slot.state = WorkerState::Stopped;
            tracing::info!(worker_id, pid, role, %how, "worker stopped");
            if slot.retired {
                self.slots.remove(index);
            }
            return Ok(());
        }
        // A copy already restarted (after a start timeout) keeps being restarted.
        let retrying = app.as_ref().is_some_and(|a| a.start_timed_out) || (app.is_some() && slot.restarts > 0);
        if self.phase == Phase::Starting && slot.state == WorkerState::Starting && !retrying {
            if let Some(app) = &app {
                let number = slot.number;
                anyhow::bail!(
                    "WORKER_COMMAND copy {number} (pid {pid}) exited before it was ready ({how}); its last output:{}",
                    app.tail_text()
                );
            }
            anyhow::bail!("{role} {worker_id} (pid {pid}) exited before it was ready ({how}); its log above says why");
        }
        let delay = slot.exited(Instant::now());
        slot.restarts += 1;
        self.own_stats.restart(
            matches!(slot.role, Role::HttpsWorker | Role::ProxyWorker),
            matches!(status, WaitStatus::Signaled(..)),
        );
        tracing::warn!(worker_id, pid, role, %how, restarts = slot.restarts, delay_ms = delay.as_millis() as u64, "worker died; restarting");
        Ok(())
    }

    pub(super) fn restart_due(&mut self) -> anyhow::Result<()> {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return Ok(());
        }
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if self.slots[i].restart_at.is_some_and(|at| at <= now) {
                if let Err(e) = self.spawn(i) {
                    tracing::error!(error = format!("{e:#}"), "restart failed; will retry");
                    let s = &mut self.slots[i];
                    s.exited(now);
                }
            }
        }
        Ok(())
    }

    /// A stop signal: the first drains (the front first), a second kills.
    pub(super) fn stop(&mut self) {
        let (phase, order) =
            phases::on_stop(self.phase, Instant::now(), self.config.process.graceful_timeout, &self.seen());
        if self.phase.stopping() {
            tracing::warn!("second stop signal: killing workers now");
            self.carry_out(order);
            return;
        }
        self.phase = phase;
        tracing::info!(timeout_s = self.config.process.graceful_timeout.as_secs(), "stopping: draining workers");
        if !self.replaced {
            // (Replaced by an upgrade, the service goes on: systemd already has the new MAINPID.)
            crate::systemd::notify("STOPPING=1");
        }
        // Our copies of the listeners go; each worker closes its own as it drains.
        self.listeners = None;
        for s in &mut self.slots {
            s.restart_at = None;
        }
        for old in &mut self.old_workers {
            old.term();
        }
        // The HTTPS worker drains first: its in-flight requests still need the
        // engine workers to claim them from the ring. The engine workers get
        // SIGTERM once it is gone (phases::while_stopping).
        self.carry_out(order);
    }

    pub(super) fn add_worker(&mut self) -> anyhow::Result<()> {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return Ok(());
        }
        if self.engine_slots() >= self.config.process.max_workers {
            tracing::warn!(
                workers = self.engine_slots(),
                max_workers = self.config.process.max_workers,
                "SIGTTIN ignored: already at MAX_WORKERS engine workers"
            );
            return Ok(());
        }
        let at = self.slots.iter().rposition(|s| !s.role.is_front()).map_or(0, |i| i + 1);
        let block = self.free_engine_block();
        let role = if self.apps.is_some() { Role::App } else { Role::Engine };
        let mut slot = Slot::new(role, block);
        slot.number = (1..).find(|n| self.slots.iter().all(|s| s.number != *n)).unwrap_or(1);
        self.slots.insert(at, slot);
        tracing::info!(workers = self.engine_slots(), "SIGTTIN: adding an engine worker");
        self.spawn(at)
    }

    pub(super) fn remove_worker(&mut self) {
        if self.engine_slots() <= 1 || matches!(self.phase, Phase::Stopping { .. }) {
            tracing::info!("SIGTTOU ignored: at least one engine worker must remain");
            return;
        }
        let Some(i) = self.slots.iter().rposition(|s| !s.role.is_front() && !s.retired) else {
            return;
        };
        let slot = &mut self.slots[i];
        slot.retired = true;
        slot.restart_at = None;
        match (slot.pid, slot.app.as_mut()) {
            (Some(_), Some(app)) => {
                // The proxy stops routing to it and says when its last request ended; SIGTERM then.
                slot.state = WorkerState::Draining;
                app.draining_since = Some(Instant::now());
                self.publish_backends();
            }
            (Some(pid), None) => {
                slot.state = WorkerState::Draining;
                let _ = kill(pid, Signal::SIGTERM);
            }
            (None, _) => {
                self.slots.remove(i);
            }
        }
        tracing::info!(workers = self.engine_slots(), "SIGTTOU: removing an engine worker");
    }
}
