//! Model control in an engine worker. `POST /v2/repository/models/{m}/load`
//! and `/unload` ask the supervisor, which has every engine worker carry the
//! change out and answers when all have; the supervisor's commands (from a
//! client of any worker, or from the repository poller) are carried out here,
//! off the request path, while every other model keeps serving.

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

/// How long a client waits for every engine worker to carry out a change.
const ANSWER_WITHIN: Duration = Duration::from_secs(600);

/// This worker's side of model control.
#[derive(Debug)]
pub struct ModelControl {
    /// The configured mode.
    pub mode: ModelControlMode,
    control: Arc<ControlClient>,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Option<String>>>>,
}

impl ModelControl {
    /// Model control over `control`, carrying out the supervisor's commands on `engine`.
    pub fn start(mode: ModelControlMode, control: Arc<ControlClient>, engine: Arc<Engine>) -> Arc<ModelControl> {
        let mc = Arc::new(ModelControl { mode, control, next: AtomicU64::new(0), pending: Mutex::new(HashMap::new()) });
        if let Some(mut commands) = mc.control.commands() {
            let mc = mc.clone();
            tokio::spawn(async move {
                while let Some(command) = commands.recv().await {
                    mc.on_command(command, &engine).await;
                }
            });
        }
        mc
    }

    async fn on_command(&self, command: Command, engine: &Arc<Engine>) {
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
            Command::ModelChangeDone { request, error } => {
                let waiter = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&request);
                if let Some(w) = waiter {
                    let _ = w.send(error);
                }
            }
            // Meant for the proxy worker (WORKER_COMMAND); an engine has no copies.
            Command::Backends { .. } => {}
        }
    }

    /// Asks the supervisor for `change` and waits until every engine worker did it.
    pub(crate) async fn request(&self, change: ModelChange) -> Result<(), ApiError> {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(request, tx);
        let sent = self.control.send(&WorkerEvent::ModelChangeRequested { request, change });
        let forget = || {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&request);
        };
        if let Err(e) = sent {
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
}
