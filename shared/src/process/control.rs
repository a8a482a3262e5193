//! Control channel messages between the supervisor and a worker.
//!
//! Each worker holds one end of a Unix socketpair. Messages are one JSON
//! object per line, both ways: workers report events ([`WorkerEvent`]), the
//! supervisor sends commands ([`Command`]: model changes to carry out).
//! Signals trigger the other actions; this channel acknowledges them.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// A message from a worker to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    /// The worker's listener and engine are up.
    Ready {
        /// Listener address the worker serves.
        addr: String,
        /// Fingerprint of the certificate served, for the HTTPS worker.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
    },
    /// The worker has stopped accepting and is draining in-flight requests.
    Draining,
    /// A certificate reload succeeded.
    Reloaded {
        /// SHA-256 fingerprint of the certificate now served.
        fingerprint: String,
        /// It is the certificate that was already served (a SIGHUP with nothing new).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        unchanged: bool,
    },
    /// A certificate reload was refused; the old certificate keeps serving.
    ReloadFailed {
        /// Why.
        reason: String,
    },
    /// A client asked this engine worker to load or unload a model; the
    /// supervisor has every engine worker do it and answers with
    /// [`Command::ModelChangeDone`].
    ModelChangeRequested {
        /// The worker's number for the request, echoed in the answer.
        request: u64,
        /// What to change.
        change: ModelChange,
    },
    /// This engine worker carried out [`Command::ApplyModelChange`] `op`.
    ModelChanged {
        /// The supervisor's operation number.
        op: u64,
        /// Why it failed here, if it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The proxy worker has no request left in flight on backend `id`, which
    /// the supervisor marked [`BackendState::Draining`]: it can be stopped.
    BackendIdle {
        /// The backend (the copy's worker id).
        id: u64,
    },
    /// A client asked this engine worker to change the system shared-memory
    /// registry; the supervisor has every engine worker apply the new set and
    /// answers with [`Command::SharedMemoryDone`].
    SharedMemoryRequested {
        /// The worker's number for the request, echoed in the answer.
        request: u64,
        /// What to change.
        change: crate::system_shm::Change,
    },
    /// This engine worker now uses the registry of [`Command::SharedMemoryRegions`]
    /// `generation` (and no region missing from it).
    SharedMemoryApplied {
        /// The registry's generation.
        generation: u64,
    },
    /// The proxy worker could not reach backend `id` (a refused or broken
    /// connection): the supervisor probes it now rather than at its next turn.
    BackendFailing {
        /// The backend (the copy's worker id).
        id: u64,
    },
}

/// Where a `WORKER_COMMAND` copy listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "at", rename_all = "snake_case")]
pub enum BackendAddr {
    /// A loopback TCP port (`{port}`).
    Tcp(std::net::SocketAddr),
    /// A Unix socket (`{socket}`).
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAddr::Tcp(a) => write!(f, "http://{a}"),
            BackendAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Whether the proxy worker sends a copy requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Ready and answering its health probe: in rotation.
    Ready,
    /// Running but not answering its probe: out of rotation (used only when no copy is ready).
    Unhealthy,
    /// Being stopped: no new requests; the proxy reports [`WorkerEvent::BackendIdle`] when its last one ends.
    Draining,
}

/// One `WORKER_COMMAND` copy, as the proxy worker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// The copy's worker id (never reused, so a restarted copy is a new backend).
    pub id: u64,
    /// Its worker number (1-based slot, kept across restarts; `{worker}`).
    pub worker: usize,
    /// Where it listens.
    pub addr: BackendAddr,
    /// Whether it gets requests.
    pub state: BackendState,
}

/// Largest model configuration a load request may carry (bytes): it travels
/// to every engine worker and is replayed to restarted ones.
pub const MAX_MODEL_CONFIG_BYTES: usize = 64 << 10;

/// A change to the served models (Triton's repository load and unload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ModelChange {
    /// Load or reload a model from the repository.
    Load {
        /// The model (its folder name).
        model: String,
        /// A JSON `ModelConfig` used instead of the model's configuration files.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<String>,
    },
    /// Stop serving a model.
    Unload {
        /// The model.
        model: String,
    },
}

impl std::fmt::Display for ModelChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelChange::Load { model, config: None } => write!(f, "load {model}"),
            ModelChange::Load { model, config: Some(_) } => write!(f, "load {model} (configuration override)"),
            ModelChange::Unload { model } => write!(f, "unload {model}"),
        }
    }
}

impl ModelChange {
    /// The model it changes.
    pub fn model(&self) -> &str {
        match self {
            ModelChange::Load { model, .. } | ModelChange::Unload { model } => model,
        }
    }
}

/// A message from the supervisor to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Carry out a model change and report [`WorkerEvent::ModelChanged`].
    ApplyModelChange {
        /// The supervisor's operation number.
        op: u64,
        /// What to change.
        change: ModelChange,
    },
    /// The answer to this worker's [`WorkerEvent::ModelChangeRequested`]: every
    /// engine worker has carried it out, or some failed.
    ModelChangeDone {
        /// The worker's request number.
        request: u64,
        /// What failed, per worker, if anything did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Every registered system shared-memory region: use these and no other,
    /// then report [`WorkerEvent::SharedMemoryApplied`].
    SharedMemoryRegions(crate::system_shm::RegionSet),
    /// The answer to this worker's [`WorkerEvent::SharedMemoryRequested`]:
    /// every engine worker applied it, or why it was refused.
    SharedMemoryDone {
        /// The worker's request number.
        request: u64,
        /// Why it was refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The `WORKER_COMMAND` copies the proxy worker routes to: the whole set,
    /// sent whenever one changes (a copy missing from it is gone).
    Backends {
        /// Every copy that is running.
        backends: Vec<Backend>,
    },
}

/// The worker's end of the control channel.
#[derive(Debug)]
pub struct ControlClient {
    stream: Mutex<UnixStream>,
    /// The supervisor's end closed (it is gone).
    gone: Arc<AtomicBool>,
    gone_notify: Arc<tokio::sync::Notify>,
    commands: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Command>>>,
}

impl ControlClient {
    /// Wraps the worker's end of the socketpair and starts reading the
    /// supervisor's commands on a small thread of its own.
    pub fn new(stream: UnixStream) -> Self {
        let gone = Arc::new(AtomicBool::new(false));
        let gone_notify = Arc::new(tokio::sync::Notify::new());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(reader) = stream.try_clone() {
            let (gone, notify) = (gone.clone(), gone_notify.clone());
            let spawned = std::thread::Builder::new().name("control-reader".into()).spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Command>(&line) {
                        Ok(c) => {
                            let _ = tx.send(c);
                        }
                        Err(e) => tracing::warn!(error = %e, line, "unreadable command from the supervisor"),
                    }
                }
                gone.store(true, Ordering::SeqCst);
                notify.notify_waiters();
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the control reader thread");
            }
        }
        ControlClient { stream: Mutex::new(stream), gone, gone_notify, commands: Mutex::new(Some(rx)) }
    }

    /// Sends one event; a write error means the supervisor is gone.
    pub fn send(&self, event: &WorkerEvent) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        s.write_all(&line)
    }

    /// The supervisor's commands, in order (the receiver can be taken once).
    pub fn commands(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Command>> {
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Resolves when the supervisor's end of the channel closes: the supervisor
    /// is gone (killed), not merely asking this worker to stop.
    pub async fn closed(&self) {
        loop {
            let notified = self.gone_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.gone.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// Commands waiting for a slow worker before [`CommandSender::send`] refuses more.
const QUEUED_COMMANDS: usize = 256;

/// The supervisor's sending side of one worker's channel: commands are queued
/// and written whole, in order, by a thread of their own, so the supervisor's
/// loop never waits on a worker and a command larger than the socket's buffer
/// is never cut in the middle of its line (which would garble every command
/// after it).
#[derive(Debug, Clone)]
pub struct CommandSender {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl CommandSender {
    /// Starts the writer thread for `stream` (worker `worker_id`'s channel).
    pub fn start(stream: UnixStream, worker_id: u64) -> io::Result<CommandSender> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUED_COMMANDS);
        std::thread::Builder::new().name(format!("commands-{worker_id}")).spawn(move || {
            let mut stream = stream;
            for line in rx {
                if let Err(e) = stream.write_all(&line) {
                    tracing::debug!(worker_id, error = %e, "the worker's control channel closed");
                    return;
                }
            }
        })?;
        Ok(CommandSender { tx })
    }

    /// Queues `command`; an error when the worker is gone or has not read the
    /// last [`QUEUED_COMMANDS`] commands (the command is then lost, the caller
    /// decides what that means).
    pub fn send(&self, command: &Command) -> io::Result<()> {
        let mut line = serde_json::to_vec(command).map_err(io::Error::other)?;
        line.push(b'\n');
        self.tx.try_send(line).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => {
                io::Error::new(io::ErrorKind::WouldBlock, "the worker's control channel is full")
            }
            std::sync::mpsc::TrySendError::Disconnected(_) => {
                io::Error::new(io::ErrorKind::BrokenPipe, "the worker's control channel is closed")
            }
        })
    }
}

/// Parses one line received from a worker.
pub fn parse_event(line: &str) -> Result<WorkerEvent, serde_json::Error> {
    serde_json::from_str(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn events_cross_a_socketpair() {
        let (a, b) = UnixStream::pair().expect("pair");
        let client = ControlClient::new(a);
        let sent = WorkerEvent::Reloaded { fingerprint: "ab".into(), unchanged: false };
        client.send(&sent).expect("send");
        let mut line = String::new();
        BufReader::new(b).read_line(&mut line).expect("read");
        assert_eq!(parse_event(line.trim()).expect("parse"), sent);
        assert!(line.contains("\"event\":\"reloaded\""), "{line}");
    }

    #[tokio::test]
    async fn commands_reach_the_worker_and_a_closed_end_is_noticed() {
        let (worker, supervisor) = UnixStream::pair().expect("pair");
        let client = ControlClient::new(worker);
        let mut commands = client.commands().expect("first take");
        let sender = CommandSender::start(supervisor, 1).expect("sender");
        let cmd = Command::ModelChangeDone { request: 7, error: None };
        sender.send(&cmd).expect("send");
        assert_eq!(commands.recv().await, Some(cmd.clone()));
        // A command far larger than the socket's buffer arrives whole, and the next one after it.
        let big = Command::ApplyModelChange {
            op: 1,
            change: ModelChange::Load { model: "m".into(), config: Some("\u{1}".repeat(300_000)) },
        };
        sender.send(&big).expect("send big");
        sender.send(&cmd).expect("send after");
        assert_eq!(commands.recv().await, Some(big));
        assert_eq!(commands.recv().await, Some(cmd));
        drop(sender);
        tokio::time::timeout(std::time::Duration::from_secs(5), client.closed()).await.expect("closed noticed");
    }
}
