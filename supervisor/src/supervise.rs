//! The supervisor's event loop: spawn workers, reap every child, restart the
//! ones that die, react to signals, publish certificates. See LIFECYCLE.md.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use command_fds::{CommandFdExt, FdMapping};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tandem_config::engine::ModelControlMode;
use tandem_config::Config;
use tandem_shared::control::{
    parse_event, Command as ToWorker, CommandSender, ModelChange, WorkerEvent, MAX_MODEL_CONFIG_BYTES,
};
use tandem_shared::stats::{self, ProcessRole, Stats};
use tandem_shared::sys::counters::Counters;
use tandem_shared::sys::shm::Region;
use tandem_shared::sys::LISTEN_FDS_START;
use tandem_shared::{url, EngineSettings, Role, StatsSettings, WORKER_SETTINGS_VAR};
use tokio::signal::unix::{signal, Signal as TokioSignal, SignalKind};
use tokio::sync::mpsc;

use crate::apps::{signal_group, Apps, Health};
use crate::certs::{CertChecked, CertHandle, CertKeeper};
use crate::models::{Finished, ModelOps, Origin, Step};
use crate::process::{describe_exit, Slot, WorkerState};

use crate::worker_settings::{CONTROL_FD, PROXY_HTTPS_FD, SETTINGS_FD, SHM_FD, STATS_FD};

/// The supervisor's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for every worker's first `ready`.
    Starting,
    /// Serving.
    Running,
    /// Draining after SIGTERM/SIGINT, SIGKILL at the deadline.
    Stopping {
        /// When the remaining workers are killed.
        deadline: Instant,
    },
}

/// A message from a worker's control channel, tagged with its id.
#[derive(Debug)]
enum Control {
    Event(u64, WorkerEvent),
    Closed(u64),
}

/// Listeners bound by the supervisor, held for the life of the service so
/// that a worker restart never closes a port.
#[derive(Debug)]
pub struct Listeners {
    /// Plain HTTP.
    pub http: TcpListener,
    /// HTTPS, when enabled.
    pub https: Option<TcpListener>,
    /// The supervisor's own `/metrics` port (`METRICS_PORT`), when set.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener; a taken port is one error naming the address.
    /// Listeners systemd passed (socket activation) are used as they are.
    pub fn bind(config: &Config) -> anyhow::Result<Self> {
        if let Some(passed) = crate::systemd::passed_listeners(config)? {
            return Self::from_passed(config, passed);
        }
        let bind = |port: u16, what: &str| {
            let addr = SocketAddr::new(config.listen.host, port);
            let l = TcpListener::bind(addr).with_context(|| {
                format!("cannot bind the {what} listener on {addr}\nhint: another process may hold the port; choose another with {}", match what { "HTTP" => "PORT", "HTTPS" => "SSL_PORT", _ => "METRICS_PORT" })
            })?;
            if let Err(e) = tandem_shared::sys::deepen_backlog(&l) {
                tracing::warn!(%addr, error = %e, "cannot deepen the listener's backlog; new connections beyond 128 queued are dropped");
            }
            Ok::<_, anyhow::Error>(l)
        };
        let http = bind(config.listen.port, "HTTP")?;
        let https = if config.tls.enabled { Some(bind(config.tls.port, "HTTPS")?) } else { None };
        let metrics = config.listen.metrics_port.map(|p| bind(p, "metrics")).transpose()?;
        Ok(Listeners { http, https, metrics })
    }

    fn from_passed(config: &Config, passed: Vec<(crate::systemd::Which, TcpListener)>) -> anyhow::Result<Self> {
        use crate::systemd::Which;
        let (mut http, mut https, mut metrics) = (None, None, None);
        for (which, l) in passed {
            tracing::info!(listener = ?which, addr = %Self::addr(&l)?, "using a listener passed by systemd");
            match which {
                Which::Http => http = Some(l),
                Which::Https => https = Some(l),
                Which::Metrics => metrics = Some(l),
            }
        }
        let http = http.context("systemd passed no HTTP listener (name it FileDescriptorName=http)")?;
        if config.tls.enabled && https.is_none() {
            anyhow::bail!("ENABLE_SSL=true but systemd passed no HTTPS listener\nhint: add a ListenStream for SSL_PORT named https");
        }
        if config.listen.metrics_port.is_some() && metrics.is_none() {
            anyhow::bail!("METRICS_PORT is set but systemd passed no metrics listener\nhint: add a ListenStream named metrics, or unset METRICS_PORT");
        }
        Ok(Listeners { http, https: https.filter(|_| config.tls.enabled), metrics })
    }

    fn addr(l: &TcpListener) -> anyhow::Result<SocketAddr> {
        l.local_addr().context("cannot read the listener's address")
    }
}

/// Everything the event loop owns.
pub struct Supervisor {
    config: Config,
    model_repository: PathBuf,
    engine: EngineSettings,
    exe: PathBuf,
    listeners: Option<Listeners>,
    http_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
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
    /// Changes found by the repository poller (`MODEL_CONTROL_MODE=poll`).
    repository_changes: Option<mpsc::UnboundedReceiver<Vec<ModelChange>>>,
    /// `WORKER_COMMAND`: the operator's server, run instead of the engine.
    apps: Option<Apps>,
    /// What the copies' probes found.
    health: mpsc::UnboundedReceiver<(u64, Health)>,
    /// The memory tandem may use, read once at start (the default `MAX_INFLIGHT_BYTES` is a share of it).
    memory: u64,
}

/// Signals the supervisor handles, registered before any child exists.
struct Signals {
    chld: TokioSignal,
    term: TokioSignal,
    int: TokioSignal,
    hup: TokioSignal,
    ttin: TokioSignal,
    ttou: TokioSignal,
}

impl Signals {
    fn register() -> anyhow::Result<Self> {
        let s = |k: SignalKind| signal(k).with_context(|| format!("cannot handle signal {}", k.as_raw_value()));
        Ok(Signals {
            chld: s(SignalKind::child())?,
            term: s(SignalKind::terminate())?,
            int: s(SignalKind::interrupt())?,
            hup: s(SignalKind::hangup())?,
            ttin: s(SignalKind::from_raw(Signal::SIGTTIN as i32))?,
            ttou: s(SignalKind::from_raw(Signal::SIGTTOU as i32))?,
        })
    }
}

/// What woke the event loop.
enum Wake {
    Child,
    Stop,
    Hup,
    AddWorker,
    RemoveWorker,
    Control(Control),
    Cert(CertChecked),
    Repository(Vec<ModelChange>),
    Health(u64, Health),
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
        let http_addr = Listeners::addr(&listeners.http)?;
        let https_addr = listeners.https.as_ref().map(Listeners::addr).transpose()?;
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
            let (region, fd) = Region::create(config.ring.slots, config.ring.slot_bytes)
                .context("cannot create the shared-memory region (memfd_create)")?;
            Some((region, fd))
        } else {
            None
        };
        let (counters, stats_fd) = Counters::create(stats::region_words(stats::blocks_for(config.process.max_workers)))
            .context("cannot create the statistics region (memfd_create)")?;
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
                https_addr.map(|_| tandem_shared::cert_cache::Layout::of(&config.process.cert_dir()).status()),
                config.edge.timeouts,
            )
            .context("cannot start the metrics port")?;
            tracing::info!(url = %url("http", addr), "serving /metrics");
        }
        let repository_changes = (config.engine.model_control_mode == ModelControlMode::Poll)
            .then(|| crate::models::poll(model_repository.clone(), config.engine.repository_poll))
            .transpose()
            .context("cannot start the repository poller")?;
        Ok(Supervisor {
            config,
            model_repository,
            engine,
            exe,
            listeners: Some(listeners),
            http_addr,
            https_addr,
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
            model_ops: ModelOps::default(),
            repository_changes,
            apps,
            health,
            memory: tandem_shared::budget::memory_limit().unwrap_or(tandem_shared::budget::UNKNOWN_MEMORY),
        })
    }

    /// Runs until every worker has stopped after SIGTERM/SIGINT. Errors are
    /// start-up failures (a worker that never became ready).
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut signals = Signals::register()?;
        for i in 0..self.slots.len() {
            self.spawn(i)?;
        }
        loop {
            let wake = self.next_wake(&mut signals).await;
            match wake {
                Wake::Child => self.reap()?,
                Wake::Stop => self.stop(),
                Wake::Hup => {
                    tracing::info!("SIGHUP: re-checking the certificate source");
                    match &self.certs {
                        // The HTTPS worker reloads when the check is done (Wake::Cert).
                        Some(certs) => certs.check_now(),
                        // No HTTPS, nothing to reload (and the proxy worker would die of the signal).
                        None => tracing::info!("SIGHUP: HTTPS is off; nothing to reload"),
                    }
                }
                Wake::AddWorker => self.add_worker()?,
                Wake::RemoveWorker => self.remove_worker(),
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
            self.watchdog.ping_if_due();
            if let Phase::Stopping { deadline } = self.phase {
                self.stop_engines_when_https_drained();
                if self.slots.iter().all(|s| s.pid.is_none()) {
                    tracing::info!("all workers stopped; exiting");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    self.kill_all(Signal::SIGKILL);
                }
            }
        }
    }

    async fn next_wake(&mut self, s: &mut Signals) -> Wake {
        let tick = tokio::time::sleep(Duration::from_millis(250));
        tokio::select! {
            _ = s.chld.recv() => Wake::Child,
            _ = s.term.recv() => Wake::Stop,
            _ = s.int.recv() => Wake::Stop,
            _ = s.hup.recv() => Wake::Hup,
            _ = s.ttin.recv() => Wake::AddWorker,
            _ = s.ttou.recv() => Wake::RemoveWorker,
            Some(c) = self.control_rx.recv() => Wake::Control(c),
            Some(checked) = async { match &mut self.certs { Some(c) => c.events.recv().await, None => std::future::pending().await } } => Wake::Cert(checked),
            Some(changes) = async { match &mut self.repository_changes { Some(r) => r.recv().await, None => std::future::pending().await } } => Wake::Repository(changes),
            Some((id, health)) = self.health.recv(), if self.apps.is_some() => Wake::Health(id, health),
            _ = tick => Wake::Tick,
        }
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let Some(listeners) = &self.listeners else {
            return Ok(());
        };
        let role = self.slots[index].role;
        if role == Role::App {
            return self.spawn_app(index);
        }
        let (listener, addr) = match role {
            Role::Engine | Role::ProxyWorker | Role::App => (&listeners.http, self.http_addr),
            Role::HttpsWorker => match (&listeners.https, self.https_addr) {
                (Some(l), Some(a)) => (l, a),
                _ => anyhow::bail!("no HTTPS listener for the HTTPS worker"),
            },
        };
        let proxy_https = match (role, &listeners.https, self.https_addr) {
            (Role::ProxyWorker, Some(l), Some(a)) => {
                Some((l.try_clone().context("cannot duplicate the HTTPS listener")?, a))
            }
            _ => None,
        };
        let listener_fd = listener.try_clone().context("cannot duplicate the listener for a worker")?;
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
                ring: self.shm.is_some(),
                model_repository: &self.model_repository,
                engine: &self.engine,
                models_wanted: &self.model_ops.wanted,
                backends: if role == Role::ProxyWorker { self.backends() } else { Vec::new() },
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                memory: self.memory,
            },
        );
        let settings_fd = tandem_shared::worker::settings_memfd(&settings)
            .context("cannot write the worker's settings into a memfd")?;
        let mut fds = vec![
            FdMapping { parent_fd: settings_fd, child_fd: SETTINGS_FD },
            FdMapping { parent_fd: listener_fd.into(), child_fd: LISTEN_FDS_START },
            FdMapping { parent_fd: theirs.into(), child_fd: CONTROL_FD },
            FdMapping {
                parent_fd: self.stats.1.try_clone().context("cannot duplicate the statistics memfd")?,
                child_fd: STATS_FD,
            },
        ];
        if let Some((_, memfd)) = &self.shm {
            fds.push(FdMapping {
                parent_fd: memfd.try_clone().context("cannot duplicate the memfd")?,
                child_fd: SHM_FD,
            });
        }
        if let Some((l, _)) = proxy_https {
            fds.push(FdMapping { parent_fd: l.into(), child_fd: PROXY_HTTPS_FD });
        }
        let mut cmd = Command::new(&self.exe);
        cmd.arg0("tandem")
            .arg(role.subcommand())
            .env_clear()
            .envs(tandem_shared::inherited_env())
            .env(WORKER_SETTINGS_VAR, format!("fd:{SETTINGS_FD}"))
            .env("LISTEN_FDS", "1")
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
                        if self.phase == Phase::Starting && self.slots.iter().all(|s| s.state == WorkerState::Ready) {
                            self.phase = Phase::Running;
                            self.announce();
                        }
                    }
                    WorkerEvent::Draining => slot.state = WorkerState::Draining,
                    WorkerEvent::Reloaded { fingerprint } => {
                        tracing::info!(worker_id = id, %fingerprint, "https worker serves the new certificate");
                        crate::systemd::notify("READY=1");
                    }
                    WorkerEvent::ReloadFailed { reason } => {
                        tracing::error!(worker_id = id, %reason, "https worker refused the certificate; the previous one keeps serving");
                        crate::systemd::notify("READY=1");
                    }
                    WorkerEvent::ModelChangeRequested { request, change } => {
                        let too_big = matches!(&change, ModelChange::Load { config: Some(c), .. } if c.len() > MAX_MODEL_CONFIG_BYTES);
                        if self.config.engine.model_control_mode != ModelControlMode::Explicit {
                            let error = Some("model load and unload need MODEL_CONTROL_MODE=explicit".to_string());
                            self.tell(id, &ToWorker::ModelChangeDone { request, error });
                        } else if too_big {
                            let error =
                                Some(format!("a configuration may hold at most {MAX_MODEL_CONFIG_BYTES} bytes"));
                            self.tell(id, &ToWorker::ModelChangeDone { request, error });
                        } else {
                            self.start_model_change(Origin::Client(id, request), change);
                        }
                    }
                    WorkerEvent::ModelChanged { op, error } => {
                        let step = self.model_ops.answered(op, id, error);
                        self.model_step(step);
                    }
                    WorkerEvent::BackendIdle { id: copy } => self.terminate_drained_copy(copy),
                }
            }
            Control::Closed(id) => tracing::debug!(worker_id = id, "control channel closed"),
        }
    }

    /// The engine workers that take part in model changes now.
    fn engine_ids(&self) -> BTreeSet<u64> {
        self.slots
            .iter()
            .filter(|s| s.role == Role::Engine && s.pid.is_some() && s.state != WorkerState::Draining)
            .map(|s| s.worker_id)
            .collect()
    }

    /// Has every engine worker carry out `change` (first one, then the rest:
    /// `ModelOps`); `origin` is told when all have.
    fn start_model_change(&mut self, origin: Origin, change: ModelChange) {
        let (op, first) = self.model_ops.start(origin, change.clone(), self.engine_ids());
        self.send_model_change(op, change, first);
    }

    /// Sends operation `op`'s change to `workers`; one that cannot be told has failed it.
    fn send_model_change(&mut self, op: u64, change: ModelChange, workers: BTreeSet<u64>) {
        let command = ToWorker::ApplyModelChange { op, change };
        let mut step = Step::Wait;
        for id in workers {
            if !self.tell(id, &command) {
                step = self.model_ops.answered(op, id, Some("its control channel is unusable".into()));
            }
        }
        if step == Step::Wait {
            step = self.model_ops.advance(op);
        }
        self.model_step(step);
    }

    fn model_step(&mut self, step: Step) {
        match step {
            Step::Wait => {}
            Step::Send(op, change, workers) => self.send_model_change(op, change, workers),
            Step::Finished(done) => self.model_change_finished(done),
        }
    }

    fn model_change_finished(&mut self, done: Finished) {
        if let Origin::Client(worker, request) = done.origin {
            self.tell(worker, &ToWorker::ModelChangeDone { request, error: done.error.clone() });
        }
        match &done.error {
            None if done.origin == Origin::Align => {
                tracing::info!(change = %done.change, "engine workers brought in line with the remembered models");
            }
            None => tracing::info!(change = %done.change, "every engine worker carried out the model change"),
            Some(e) => tracing::error!(change = %done.change, error = %e, "a model change failed"),
        }
        if let Some((undo, workers)) = done.revert {
            tracing::warn!(change = %undo, ?workers, "putting back the workers that had carried out the failed change");
            let (op, first) = self.model_ops.start(Origin::Align, undo.clone(), workers);
            self.send_model_change(op, undo, first);
        } else if done.error.is_none() && matches!(done.origin, Origin::Client(..)) {
            // Workers started while the change was under way loaded what was remembered before it.
            let late: BTreeSet<u64> = self.engine_ids().difference(&done.targets).copied().collect();
            if !late.is_empty() {
                let current = self.model_ops.current(done.change.model());
                let (op, first) = self.model_ops.start(Origin::Align, current.clone(), late);
                self.send_model_change(op, current, first);
            }
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

    /// The cache layout, when ACME is the certificate source (its challenges are answered by the workers).
    fn announce(&self) {
        tracing::info!(url = %url("http", self.http_addr), workers = self.engine_slots(), "serving HTTP");
        crate::systemd::notify(&format!(
            "READY=1\nSTATUS=serving HTTP on {} with {} workers",
            self.http_addr,
            self.engine_slots()
        ));
        if let Some(addr) = self.https_addr {
            tracing::info!(url = %url("https", addr), fingerprint = self.certs.as_ref().map(CertHandle::fingerprint).as_deref(), "serving HTTPS");
        }
        // A stand-in serves until the source delivers; a source whose proof the
        // workers answer (ACME) can try now that they do.
        if let Some(certs) = self.certs.as_ref().filter(|c| c.degraded()) {
            certs.check_now();
        }
    }

    /// Reaps every exited child: workers are scheduled for restart, orphans
    /// re-parented to us are simply collected so no zombie remains.
    fn reap(&mut self) -> anyhow::Result<()> {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waitpid failed"),
            };
            let Some(pid) = status.pid() else { continue };
            let Some(index) = self.slots.iter().position(|s| s.pid == Some(pid)) else {
                tracing::debug!(pid = pid.as_raw(), how = %describe_exit(&status), "reaped an orphan");
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

    fn restart_due(&mut self) -> anyhow::Result<()> {
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

    fn stop(&mut self) {
        if let Phase::Stopping { .. } = self.phase {
            tracing::warn!("second stop signal: killing workers now");
            self.kill_all(Signal::SIGKILL);
            return;
        }
        let deadline = Instant::now() + self.config.process.graceful_timeout;
        self.phase = Phase::Stopping { deadline };
        tracing::info!(timeout_s = self.config.process.graceful_timeout.as_secs(), "stopping: draining workers");
        crate::systemd::notify("STOPPING=1");
        // Our copies of the listeners go; each worker closes its own as it drains.
        self.listeners = None;
        for s in &mut self.slots {
            s.restart_at = None;
        }
        // The HTTPS worker drains first: its in-flight requests still need the
        // engine workers to claim them from the ring. The engine workers get
        // SIGTERM once it is gone (see `run`).
        if self.slots.iter().any(|s| s.role.is_front() && s.pid.is_some()) {
            self.signal_role(self.tls_role(), Signal::SIGTERM);
        } else {
            self.kill_all(Signal::SIGTERM);
        }
    }

    /// During a stop, the engine workers' turn comes when the HTTPS worker has exited.
    fn stop_engines_when_https_drained(&mut self) {
        let https_gone = self.slots.iter().all(|s| !s.role.is_front() || s.pid.is_none());
        let engines_running =
            self.slots.iter().any(|s| !s.role.is_front() && s.pid.is_some() && s.state != WorkerState::Draining);
        if https_gone && engines_running {
            self.kill_all(Signal::SIGTERM);
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
        for s in self.slots.iter().filter(|s| s.role == role) {
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

    /// The process that terminates TLS (and, with `WORKER_COMMAND`, serves both ports).
    fn tls_role(&self) -> Role {
        if self.apps.is_some() {
            Role::ProxyWorker
        } else {
            Role::HttpsWorker
        }
    }

    fn add_worker(&mut self) -> anyhow::Result<()> {
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

    fn remove_worker(&mut self) {
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

/// `WORKER_COMMAND`: the copies' lives, as the event loop sees them.
impl Supervisor {
    fn spawn_app(&mut self, index: usize) -> anyhow::Result<()> {
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
    fn on_health(&mut self, id: u64, health: Health) {
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
                tracing::warn!(worker_id = id, worker = number, %why, "worker command stopped answering; out of rotation");
            }
            Health::Recovered => {
                app.healthy = true;
                tracing::info!(worker_id = id, worker = number, "worker command answers again; back in rotation");
            }
        }
        self.publish_backends();
        if self.phase == Phase::Starting && self.slots.iter().all(|s| s.state == WorkerState::Ready) {
            self.phase = Phase::Running;
            self.announce();
        }
    }

    /// Every copy that runs and has been ready, as the proxy worker routes to them.
    fn backends(&self) -> Vec<tandem_shared::control::Backend> {
        use tandem_shared::control::{Backend, BackendState};
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
    fn publish_backends(&self) {
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
    fn app_exited(&self, index: usize, app: &crate::apps::Running, how: &str) {
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

    /// The proxy has no request left on draining copy `id`: stop it.
    fn terminate_drained_copy(&mut self, id: u64) {
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
    fn app_timers(&mut self) {
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
