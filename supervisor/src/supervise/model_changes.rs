//! Model changes across the engine workers (load and unload from a client or
//! the repository poller): one worker first, then the rest, a failure put
//! back (the bookkeeping is `crate::models::ModelOps`; this is the loop's side).

use std::collections::BTreeSet;

use tandem_config::engine::ModelControlMode;
use tandem_shared::process::control::{Command as ToWorker, ModelChange, MAX_MODEL_CONFIG_BYTES};
use tandem_shared::Role;

use super::Supervisor;
use crate::models::{Finished, Origin, Step};
use crate::process::WorkerState;

impl Supervisor {
    /// Worker `id` asks for `change` for its client's `request`.
    pub(super) fn model_change_requested(&mut self, id: u64, request: u64, change: ModelChange) {
        let too_big = matches!(&change, ModelChange::Load { config: Some(c), .. } if c.len() > MAX_MODEL_CONFIG_BYTES);
        if self.config.engine.model_control_mode != ModelControlMode::Explicit {
            let error = Some("model load and unload need MODEL_CONTROL_MODE=explicit".to_string());
            self.tell(id, &ToWorker::ModelChangeDone { request, error });
        } else if too_big {
            let error = Some(format!("a configuration may hold at most {MAX_MODEL_CONFIG_BYTES} bytes"));
            self.tell(id, &ToWorker::ModelChangeDone { request, error });
        } else {
            self.start_model_change(Origin::Client(id, request), change);
        }
    }

    /// The engine workers that take part in model changes now.
    pub(super) fn engine_ids(&self) -> BTreeSet<u64> {
        self.slots
            .iter()
            .filter(|s| s.role == Role::Engine && s.pid.is_some() && s.state != WorkerState::Draining)
            .map(|s| s.worker_id)
            .collect()
    }

    /// Has every engine worker carry out `change` (first one, then the rest:
    /// `ModelOps`); `origin` is told when all have.
    pub(super) fn start_model_change(&mut self, origin: Origin, change: ModelChange) {
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

    pub(super) fn model_step(&mut self, step: Step) {
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
}
