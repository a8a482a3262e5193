//! The supervisor's event loop: spawn workers, reap every child, restart the
//! ones that die, react to signals, publish certificates. See LIFECYCLE.md.
//!
//! One room per concern: [`phases`] decides (pure, unit-tested), [`signals`]
//! feeds the loop, `workers` starts, reaps and restarts processes,
//! `model_changes` carries model control across the engines, `copies` runs
//! `WORKER_COMMAND`, `listeners` holds the ports; this file is the loop.

mod copies;
mod listeners;
mod model_changes;
pub mod phases;
pub mod signals;
mod system_shm;
pub mod upgrade;
mod workers;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use tandem_config::engine::ModelControlMode;
use tandem_config::Config;
use tandem_shared::process::control::{Command as ToWorker, ModelChange, WorkerEvent};
use tandem_shared::stats::{self, ProcessRole, Stats};
use tandem_shared::sys::counters::Counters;
use tandem_shared::sys::shm::Region;
use tandem_shared::{url, EngineSettings, Role};
use tokio::sync::mpsc;

use crate::apps::{signal_group, Apps, Health};
use crate::certs::{CertChecked, CertHandle, CertKeeper};
use crate::models::{ModelOps, Origin};
use crate::process::{Slot, WorkerState};

pub use listeners::Listeners;
pub use phases::Phase;
use phases::{Order, Seen};
use signals::Signalled;

/// A message from a worker's control channel, tagged with its id.
#[derive(Debug)]
enum Control {
    Event(u64, WorkerEvent),
    Closed(u64),
}

/// Everything the event loop owns.
pub struct Supervisor {
    config: Config,
    model_repository: PathBuf,
    engine: EngineSettings,
    /// The binary's path, where an upgrade finds the new one.
    exe: PathBuf,
    /// This very binary, open (and its `/proc/self/fd` path): workers run it,
    /// so a worker restarted after a new binary replaced the file at `exe`
    /// still matches its supervisor.
    own_binary: (OwnedFd, PathBuf),
    listeners: Option<Listeners>,
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    /// The gRPC-only port's address (`GRPC_PORT`), when set.
    grpc_addr: Option<SocketAddr>,
    slots: Vec<Slot>,
    next_id: u64,
    phase: Phase,
    control_tx: mpsc::UnboundedSender<Control>,
    control_rx: mpsc::UnboundedReceiver<Control>,
    shm: Option<(Arc<Region>, OwnedFd)>,
    /// The statistics region every process counts into, and the supervisor's own block.
    stats: (Arc<Counters>, OwnedFd),
    own_stats: Stats,
    /// `WATCHDOG=1` to systemd, from this loop.
    watchdog: crate::systemd::Watchdog,
    /// The certificate thread (renewal, file watching, downloads): never on this loop.
    certs: Option<CertHandle>,
    /// Model changes under way across the engine workers.
    model_ops: ModelOps,
    /// Triton's system shared-memory registry (`SYSTEM_SHARED_MEMORY`), when on.
    system_shm: Option<system_shm::Registry>,
    /// Changes found by the repository poller (`MODEL_CONTROL_MODE=poll`).
    repository_changes: Option<mpsc::UnboundedReceiver<Vec<ModelChange>>>,
    /// `WORKER_COMMAND`: the operator's server, run instead of the engine.
    apps: Option<Apps>,
    /// What the copies' probes found.
    health: mpsc::UnboundedReceiver<(u64, Health)>,
    /// The memory tandem may use, read once at start (the default `MAX_INFLIGHT_BYTES` is a share of it).
    memory: u64,
    /// A new supervisor started by SIGUSR2, not yet serving.
    upgrade: Option<upgrade::Pending>,
    /// This supervisor is stopping because a new one serves in its place.
    replaced: bool,
    /// Workers of the binary this one replaced in place (PID 1), draining once ours serve.
    old_workers: Vec<upgrade::OldWorker>,
}

/// What woke the event loop.
enum Wake {
    Signal(Signalled),
    Control(Control),
    Cert(CertChecked),
    Repository(Vec<ModelChange>),
    Health(u64, Health),
    Upgraded(Result<u32, String>),
    Tick,
}

impl Supervisor {
    /// A supervisor for `config` with bound `listeners` and a ready certificate manager.
    pub fn new(
        config: Config,
        model_repository: PathBuf,
        engine: EngineSettings,
        listeners: Listeners,
        certs: Option<CertKeeper>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the tandem executable (/proc/self/exe)")?;
        let own_binary = std::fs::File::open("/proc/self/exe")
            .and_then(|f| tandem_shared::sys::dup_above(std::os::fd::AsFd::as_fd(&f), 64))
            .context("cannot open the tandem executable (/proc/self/exe)")?;
        let own_path = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&own_binary)));
        let http_addr = listeners.http_addr()?;
        let https_addr = listeners.https.as_ref().map(Listeners::addr).transpose()?;
        let grpc_addr = listeners.grpc.as_ref().map(Listeners::addr).transpose()?;
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (health_tx, health) = mpsc::unbounded_channel();
        let apps = config
            .proxy
            .command
            .clone()
            .map(|argv| Apps::new(argv, config.proxy.ready_path.clone(), health_tx))
            .transpose()?;
        // The ring exists only for HTTPS to the engine: the HTTPS worker hands requests to it through it.
        let shm = if https_addr.is_some() && apps.is_none() {
            let (region, fd) = Region::create(config.ring.slots, config.ring.slot_bytes, config.ring.warm_bytes)
                .context("cannot create the shared-memory region (memfd_create)")?;
            Some((region, fd))
        } else {
            None
        };
        let (counters, stats_fd) = Counters::create(stats::region_words(stats::blocks_for(config.process.max_workers)))
            .context("cannot create the statistics region (memfd_create)")?;
        stats::init_region(&counters);
        let own_stats = Stats::attach(counters.clone(), stats::SUPERVISOR_BLOCK, ProcessRole::Supervisor, 0);
        stats::spawn_gauge_thread(own_stats.clone());
        let engine_role = if apps.is_some() { Role::App } else { Role::Engine };
        let mut slots: Vec<Slot> = (0..config.process.num_workers)
            .map(|i| {
                let mut s = Slot::new(engine_role, stats::FIRST_ENGINE_BLOCK + i);
                s.number = i + 1;
                s
            })
            .collect();
        if apps.is_some() {
            // Both ports are the proxy worker's: it forwards every request to a copy.
            slots.push(Slot::new(Role::ProxyWorker, stats::HTTPS_BLOCK));
        } else if https_addr.is_some() {
            slots.push(Slot::new(Role::HttpsWorker, stats::HTTPS_BLOCK));
        }
        let certs =
            certs.map(|c| c.spawn(own_stats.clone())).transpose().context("cannot start the certificate thread")?;
        if let Some(l) = listeners.metrics.as_ref().map(TcpListener::try_clone).transpose()? {
            let addr = Listeners::addr(&l)?;
            crate::metrics_port::spawn(
                l,
                counters.clone(),
                shm.as_ref().map(|(r, _)| r.clone()),
                https_addr.map(|_| tandem_shared::certs::cache::Layout::of(&config.process.cert_dir()).status()),
                config.edge.timeouts,
                // With WORKER_COMMAND there is no engine to describe.
                if apps.is_none() {
                    tandem_engine_worker::state::engine_info(&engine, true)
                } else {
                    serde_json::Value::Null
                },
            )
            .context("cannot start the metrics port")?;
            tracing::info!(url = %url("http", addr), "serving /metrics");
        }
        let repository_changes = (config.engine.model_control_mode == ModelControlMode::Poll)
            .then(|| crate::models::poll(model_repository.clone(), config.engine.repository_poll))
            .transpose()
            .context("cannot start the repository poller")?;
        let model_ops = if apps.is_none() && config.engine.model_control_mode == ModelControlMode::Explicit {
            ModelOps::at_start(&config.engine.model_load, &model_repository)
        } else {
            ModelOps::default()
        };
        let system_shm = (apps.is_none() && config.engine.system_shared_memory).then(system_shm::Registry::default);
        Ok(Supervisor {
            config,
            model_repository,
            engine,
            exe,
            own_binary: (own_binary, own_path),
            listeners: Some(listeners),
            http_addr,
            https_addr,
            grpc_addr,
            slots,
            next_id: 1,
            phase: Phase::Starting,
            control_tx,
            control_rx,
            shm,
            stats: (counters, stats_fd),
            own_stats,
            watchdog: crate::systemd::Watchdog::from_env(),
            certs,
            model_ops,
            system_shm,
            repository_changes,
            apps,
            health,
            memory: tandem_shared::edge::budget::memory_limit().unwrap_or(tandem_shared::edge::budget::UNKNOWN_MEMORY),
            upgrade: None,
            replaced: false,
            old_workers: upgrade::take_old_workers(),
        })
    }

    /// Runs until every worker has stopped after SIGTERM/SIGINT. Errors are
    /// start-up failures (a worker that never became ready).
    pub async fn run(self) -> anyhow::Result<()> {
        let signals = signals::os()?;
        self.run_with(signals).await
    }

    /// [`Supervisor::run`] with the signals from `signals` instead of the operating system's.
    pub async fn run_with(mut self, mut signals: mpsc::UnboundedReceiver<Signalled>) -> anyhow::Result<()> {
        for i in 0..self.slots.len() {
            self.spawn(i)?;
        }
        loop {
            let wake = self.next_wake(&mut signals).await;
            match wake {
                Wake::Signal(Signalled::Child) => self.reap()?,
                Wake::Signal(Signalled::Stop) => self.stop(),
                Wake::Signal(Signalled::Hup) => {
                    tracing::info!("SIGHUP: re-checking the certificate source");
                    match &self.certs {
                        // The HTTPS worker reloads when the check is done (Wake::Cert).
                        Some(certs) => certs.check_now(),
                        // No HTTPS, nothing to reload (and the proxy worker would die of the signal).
                        None => tracing::info!("SIGHUP: HTTPS is off; nothing to reload"),
                    }
                }
                Wake::Signal(Signalled::AddWorker) => self.add_worker()?,
                Wake::Signal(Signalled::RemoveWorker) => self.remove_worker(),
                Wake::Signal(Signalled::Upgrade) => self.begin_upgrade(),
                Wake::Upgraded(result) => self.upgraded(result),
                Wake::Control(c) => self.on_control(c),
                Wake::Cert(CertChecked { published, requested }) => {
                    if (published || requested) && matches!(self.phase, Phase::Running) {
                        // READY=1 again when the HTTPS worker answers (reloaded or refused).
                        crate::systemd::reloading();
                        self.signal_role(self.tls_role(), Signal::SIGHUP);
                    }
                }
                Wake::Repository(changes) => {
                    for change in changes {
                        tracing::info!(change = %change, "the model repository changed");
                        self.start_model_change(Origin::Poll, change);
                    }
                }
                Wake::Health(id, health) => self.on_health(id, health),
                Wake::Tick => {}
            }
            self.app_timers();
            // SIGCHLD can coalesce; reaping on every wake costs one syscall.
            self.reap()?;
            self.restart_due()?;
            self.shared_memory_sweep();
            self.drain_old_workers();
            self.watchdog.ping_if_due();
            // Only a stop has orders for after every wake: no snapshot of the workers otherwise.
            let orders = if self.phase.stopping() {
                phases::while_stopping(self.phase, Instant::now(), &self.seen())
            } else {
                Vec::new()
            };
            for order in orders {
                if order == Order::Exit {
                    upgrade::remove_pid(&self.config.process.cache_dir);
                    tracing::info!("all workers stopped; exiting");
                    return Ok(());
                }
                self.carry_out(order);
            }
        }
    }

    /// What the phase decisions need of each worker.
    fn seen(&self) -> Vec<Seen> {
        self.slots
            .iter()
            .map(|s| Seen {
                front: s.role.is_front(),
                running: s.pid.is_some(),
                draining: s.state == WorkerState::Draining,
                ready: s.state == WorkerState::Ready,
            })
            .collect()
    }

    /// Carries out a phase decision on the processes.
    fn carry_out(&mut self, order: Order) {
        match order {
            Order::TermFront => {
                self.signal_role(self.tls_role(), Signal::SIGTERM);
                // Meanwhile the engines close their own door (they answer the
                // ring until their SIGTERM): kept-alive plain clients move on now.
                // Ready ones only, ours only: a worker still starting may not
                // listen for SIGUSR1 yet, whose default is to end the process.
                self.signal_where(|s| s.role == Role::Engine && s.state == WorkerState::Ready, Signal::SIGUSR1);
            }
            Order::TermAll => self.kill_all(Signal::SIGTERM),
            Order::KillAll => self.kill_all(Signal::SIGKILL),
            // The loop returns; nothing to do to a process.
            Order::Exit => {}
        }
    }

    /// A worker became ready: serving starts when every one is.
    fn became_ready(&mut self) {
        let (phase, announce) = phases::after_ready(self.phase, &self.seen());
        self.phase = phase;
        if announce {
            self.announce();
        }
    }

    async fn next_wake(&mut self, signals: &mut mpsc::UnboundedReceiver<Signalled>) -> Wake {
        let tick = tokio::time::sleep(Duration::from_millis(250));
        tokio::select! {
            Some(s) = signals.recv() => Wake::Signal(s),
            Some(c) = self.control_rx.recv() => Wake::Control(c),
            Some(checked) = async { match &mut self.certs { Some(c) => c.events.recv().await, None => std::future::pending().await } } => Wake::Cert(checked),
            Some(changes) = async { match &mut self.repository_changes { Some(r) => r.recv().await, None => std::future::pending().await } } => Wake::Repository(changes),
            Some((id, health)) = self.health.recv(), if self.apps.is_some() => Wake::Health(id, health),
            Some(result) = async { match &mut self.upgrade { Some(p) => (&mut p.outcome).await.ok(), None => std::future::pending().await } } => Wake::Upgraded(result),
            _ = tick => Wake::Tick,
        }
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::Event(id, event) => {
                let Some(slot) = self.slots.iter_mut().find(|s| s.worker_id == id) else {
                    return;
                };
                match event {
                    WorkerEvent::Ready { addr, fingerprint } => {
                        if slot.state == WorkerState::Starting {
                            slot.state = WorkerState::Ready;
                        }
                        tracing::debug!(worker_id = id, %addr, ?fingerprint, "worker ready");
                        if slot.role == Role::ProxyWorker {
                            // Whatever changed while it started.
                            self.publish_backends();
                        }
                        self.became_ready();
                    }
                    WorkerEvent::Draining => slot.state = WorkerState::Draining,
                    WorkerEvent::Reloaded { fingerprint, unchanged: true } => {
                        tracing::info!(worker_id = id, %fingerprint, "https worker re-read the certificate: unchanged");
                        crate::systemd::notify("READY=1");
                    }
                    WorkerEvent::Reloaded { fingerprint, unchanged: false } => {
                        tracing::info!(worker_id = id, %fingerprint, "https worker serves the new certificate");
                        crate::systemd::notify("READY=1");
                    }
                    WorkerEvent::ReloadFailed { reason } => {
                        tracing::error!(worker_id = id, %reason, "https worker refused the certificate; the previous one keeps serving");
                        crate::systemd::notify("READY=1");
                    }
                    WorkerEvent::ModelChangeRequested { request, change } => {
                        self.model_change_requested(id, request, change)
                    }
                    WorkerEvent::ModelChanged { op, error } => {
                        let step = self.model_ops.answered(op, id, error);
                        self.model_step(step);
                    }
                    WorkerEvent::SharedMemoryRequested { request, change } => {
                        self.shared_memory_requested(id, request, change)
                    }
                    WorkerEvent::SharedMemoryApplied { generation } => self.shared_memory_applied(id, generation),
                    WorkerEvent::BackendIdle { id: copy } => self.terminate_drained_copy(copy),
                    WorkerEvent::BackendFailing { id: copy } => self.probe_copy_now(copy),
                }
            }
            Control::Closed(id) => tracing::debug!(worker_id = id, "control channel closed"),
        }
    }

    /// Sends `command` to worker `id`; false when it could not be sent.
    fn tell(&self, id: u64, command: &ToWorker) -> bool {
        let Some(stream) = self.slots.iter().find(|s| s.worker_id == id).and_then(|s| s.control.as_ref()) else {
            return false;
        };
        match stream.send(command) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(worker_id = id, error = %e, "cannot send a command to the worker");
                false
            }
        }
    }

    /// Says where tandem serves, once every worker first answers (log and systemd).
    fn announce(&self) {
        let mode = self.config.edge.http_mode;
        let mut status = Vec::new();
        if let Some(addr) = self.http_addr {
            tracing::info!(url = %url("http", addr), workers = self.engine_slots(), mode = mode.name(), "serving HTTP");
            status.push(format!("HTTP on {addr}"));
        }
        if let Some(addr) = self.https_addr {
            tracing::info!(url = %url("https", addr), fingerprint = self.certs.as_ref().map(CertHandle::fingerprint).as_deref(), "serving HTTPS");
            status.push(format!("HTTPS on {addr}"));
        }
        if let Some(udp) = self.listeners.as_ref().and_then(|l| l.h3.as_ref()).and_then(|u| u.local_addr().ok()) {
            tracing::info!(addr = %udp, "serving HTTP/3 (QUIC) on UDP; HTTPS answers advertise it with Alt-Svc");
            status.push(format!("HTTP/3 on UDP {udp}"));
        }
        if let Some(addr) = self.grpc_addr {
            tracing::info!(addr = %addr, "serving gRPC alone on GRPC_PORT (plain HTTP/2)");
            status.push(format!("gRPC on {addr}"));
        }
        if self.http_addr.is_none() {
            tracing::info!("no plain HTTP port (HTTP_MODE=off)");
        }
        crate::systemd::notify(&format!(
            "READY=1\nSTATUS=serving {} with {} workers",
            status.join(" and "),
            self.engine_slots()
        ));
        // `tandem upgrade` finds us here; a supervisor that started us hears that we serve.
        upgrade::write_pid(&self.config.process.cache_dir);
        upgrade::tell_ready();
        if !self.old_workers.is_empty() {
            // An upgrade in place: this binary serves; the previous one's workers drain.
            tracing::info!(
                workers = self.old_workers.len(),
                "the new binary serves; the previous binary's workers drain"
            );
            upgrade::record(&self.config.process.cache_dir, &Ok(std::process::id()));
        }
        // A stand-in serves until the source delivers; a source whose proof the
        // workers answer (ACME) can try now that they do.
        if let Some(certs) = self.certs.as_ref().filter(|c| c.degraded()) {
            certs.check_now();
        }
    }

    fn kill_all(&mut self, sig: Signal) {
        for s in &mut self.slots {
            if let Some(pid) = s.pid {
                if sig == Signal::SIGKILL {
                    if s.killed {
                        // Already killed, not yet reaped: no second signal, no second line.
                        continue;
                    }
                    s.killed = true;
                    tracing::warn!(
                        worker_id = s.worker_id,
                        pid = pid.as_raw(),
                        "worker did not drain in time; killing"
                    );
                } else {
                    s.state = WorkerState::Draining;
                }
                if s.role == Role::App {
                    signal_group(pid, sig);
                } else {
                    let _ = kill(pid, sig);
                }
            }
        }
    }

    fn signal_role(&self, role: Role, sig: Signal) {
        self.signal_where(|s| s.role == role, sig);
    }

    /// Sends `sig` to the running worker of every slot `pick` chooses.
    fn signal_where(&self, pick: impl Fn(&Slot) -> bool, sig: Signal) {
        for s in self.slots.iter().filter(|s| pick(s)) {
            if let Some(pid) = s.pid {
                let _ = kill(pid, sig);
            }
        }
    }

    /// The lowest engine block no slot holds (a draining worker still holds its own).
    fn free_engine_block(&self) -> usize {
        let blocks = self.stats.0.words().len() / stats::region_words(1);
        (stats::FIRST_ENGINE_BLOCK..blocks)
            .find(|b| self.slots.iter().all(|s| s.block != *b))
            .unwrap_or(stats::FIRST_ENGINE_BLOCK)
    }

    fn engine_slots(&self) -> usize {
        self.slots.iter().filter(|s| !s.role.is_front() && !s.retired).count()
    }

    /// SIGUSR2: starts the binary at our path as a new supervisor on our
    /// listeners; this one serves on until the new one is ready (or fails).
    fn begin_upgrade(&mut self) {
        let refuse = |why: &str| {
            tracing::error!(reason = why, "SIGUSR2: no upgrade");
            upgrade::record(&self.config.process.cache_dir, &Err(why.to_string()));
        };
        if !matches!(self.phase, Phase::Running) {
            return refuse("an upgrade starts only while every worker serves");
        }
        if self.upgrade.is_some() {
            return tracing::warn!("SIGUSR2: an upgrade is already under way");
        }
        let Some(listeners) = &self.listeners else { return refuse("the listeners are already closed") };
        if std::process::id() == 1 {
            // PID 1 cannot hand over to a child and exit: it becomes the new binary.
            let workers: Vec<(nix::unistd::Pid, bool, &OwnedFd)> =
                self.slots.iter().filter_map(|s| Some((s.pid?, s.role.is_front(), s.control_fd.as_ref()?))).collect();
            let e = upgrade::exec_in_place(&self.exe, listeners, &workers);
            return refuse(&format!("{e:#}"));
        }
        match upgrade::start(&self.exe, listeners) {
            Ok(pending) => {
                tracing::info!(
                    pid = pending.pid.as_raw(),
                    binary = %self.exe.display(),
                    "SIGUSR2: started the binary at our path as a new supervisor; serving on until it is ready"
                );
                self.upgrade = Some(pending);
            }
            Err(e) => refuse(&format!("{e:#}")),
        }
    }

    /// The new supervisor serves (this one drains and exits), or failed (this one serves on).
    fn upgraded(&mut self, result: Result<u32, String>) {
        self.upgrade = None;
        upgrade::record(&self.config.process.cache_dir, &result);
        match result {
            Ok(new) => {
                tracing::info!(new_pid = new, "the new supervisor serves; this one drains and exits");
                crate::systemd::notify(&format!("MAINPID={new}"));
                self.replaced = true;
                self.stop();
            }
            Err(reason) => tracing::error!(%reason, "upgrade failed; this supervisor keeps serving"),
        }
    }

    /// After an upgrade in place, once our own workers serve: the previous
    /// binary's HTTPS worker drains first, then its engines (which answer
    /// what is still in its ring); any still there past `GRACEFUL_TIMEOUT`
    /// (and a little) is killed.
    fn drain_old_workers(&mut self) {
        if self.old_workers.is_empty() || matches!(self.phase, Phase::Starting) {
            return;
        }
        let fronts_left = self.old_workers.iter().any(|w| w.front);
        for w in self.old_workers.iter_mut().filter(|w| w.front || !fronts_left) {
            w.term();
        }
        let limit = self.config.process.graceful_timeout + Duration::from_secs(5);
        for w in &mut self.old_workers {
            if !w.killed && w.termed.is_some_and(|t| t.elapsed() > limit) {
                tracing::warn!(pid = w.pid.as_raw(), "a worker of the previous binary did not drain in time; killing");
                let _ = kill(w.pid, Signal::SIGKILL);
                w.killed = true;
            }
        }
    }

    /// The process that terminates TLS (and, with `WORKER_COMMAND`, serves both ports).
    fn tls_role(&self) -> Role {
        if self.apps.is_some() {
            Role::ProxyWorker
        } else {
            Role::HttpsWorker
        }
    }
}
