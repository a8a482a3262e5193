//! Model control in an engine worker. `POST /v2/repository/models/{m}/load`
//! and `/unload` ask the supervisor, which has every engine worker carry the
//! change out and answers when all have; the supervisor's commands (from a
//! client of any worker, or from the repository poller) are carried out here,
//! off the request path, while every other model keeps serving. The same
//! reader takes the supervisor's other commands for this worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use tandem_config::engine::ModelControlMode;
use tandem_shared::process::control::{Command, ControlClient, ModelChange, WorkerEvent};
use tokio::sync::oneshot;

use crate::engine::Engine;
use crate::infer::ApiError;
use crate::system_shm::SystemShm;

/// How long a client waits for every engine worker to carry out a change.
const ANSWER_WITHIN: Duration = Duration::from_secs(600);

/// Questions this worker put to the supervisor on its clients' behalf, each
/// waiting for its answer (model changes, shared-memory registrations).
#[derive(Debug, Default)]
pub(crate) struct Asks {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Option<String>>>>,
}

impl Asks {
    /// Sends the event `ask` makes of a new request number and waits for
    /// [`Asks::answered`] with that number: `Ok` when the supervisor said done,
    /// its reason as a 400 when it refused.
    pub(crate) async fn ask(
        &self,
        control: &ControlClient,
        ask: impl FnOnce(u64) -> WorkerEvent,
    ) -> Result<(), ApiError> {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(request, tx);
        let forget = || {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&request);
        };
        if let Err(e) = control.send(&ask(request)) {
            forget();
            return Err(ApiError::unavailable(format!("cannot reach the supervisor: {e}")));
        }
        match tokio::time::timeout(ANSWER_WITHIN, rx).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(e))) => Err(ApiError::bad(e)),
            Ok(Err(_)) => Err(ApiError::unavailable("the worker is stopping")),
            Err(_) => {
                forget();
                Err(ApiError {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    message: format!("the change took longer than {} s", ANSWER_WITHIN.as_secs()),
                })
            }
        }
    }

    /// The supervisor's answer to `request`.
    fn answered(&self, request: u64, error: Option<String>) {
        let waiter = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&request);
        if let Some(w) = waiter {
            let _ = w.send(error);
        }
    }
}

/// This worker's side of model control, and the reader of the supervisor's
/// commands (model changes; the system shared-memory registry, handed to
/// [`SystemShm`]).
#[derive(Debug)]
pub struct ModelControl {
    /// The configured mode.
    pub mode: ModelControlMode,
    control: Arc<ControlClient>,
    asks: Asks,
}

impl ModelControl {
    /// Model control over `control`, carrying out the supervisor's commands on
    /// `engine` and, when the extension is on, `shm`.
    pub fn start(
        mode: ModelControlMode,
        control: Arc<ControlClient>,
        engine: Arc<Engine>,
        shm: Option<Arc<SystemShm>>,
    ) -> Arc<ModelControl> {
        let mc = Arc::new(ModelControl { mode, control, asks: Asks::default() });
        if let Some(mut commands) = mc.control.commands() {
            let mc = mc.clone();
            tokio::spawn(async move {
                while let Some(command) = commands.recv().await {
                    mc.on_command(command, &engine, shm.as_deref()).await;
                }
            });
        }
        mc
    }

    async fn on_command(&self, command: Command, engine: &Arc<Engine>, shm: Option<&SystemShm>) {
        match command {
            Command::ApplyModelChange { op, change } => {
                let engine = engine.clone();
                let result = tokio::task::spawn_blocking(move || match &change {
                    ModelChange::Load { model, config } => engine.load_model(model, config.as_deref()),
                    ModelChange::Unload { model } => engine.unload_model(model),
                })
                .await
                .map_or_else(|e| Err(format!("the load crashed: {e}")), |done| done.map_err(|e| e.to_string()));
                let _ = self.control.send(&WorkerEvent::ModelChanged { op, error: result.err() });
            }
            Command::ModelChangeDone { request, error } => self.asks.answered(request, error),
            Command::SharedMemoryRegions(set) => {
                if let Some(shm) = shm {
                    shm.apply(set, &self.control);
                }
            }
            Command::SharedMemoryDone { request, error } => {
                if let Some(shm) = shm {
                    shm.asks.answered(request, error);
                }
            }
            // Meant for the proxy worker (WORKER_COMMAND); an engine has no copies.
            Command::Backends { .. } => {}
        }
    }

    /// Asks the supervisor for `change` and waits until every engine worker did it.
    pub(crate) async fn request(&self, change: ModelChange) -> Result<(), ApiError> {
        self.asks.ask(&self.control, |request| WorkerEvent::ModelChangeRequested { request, change }).await
    }
}
