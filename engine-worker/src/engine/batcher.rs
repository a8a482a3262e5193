//! Triton's dynamic batching (`dynamic_batching { preferred_batch_size,
//! max_queue_delay_microseconds }`): requests for one model version that
//! arrive together in an engine worker, from its HTTP connections and from
//! the shared-memory ring alike, run as one batch and are split back.
//!
//! One task per batched model version takes the queue in order. It first
//! waits for an inference thread (an engine permit), so requests gather while
//! the model is busy; then it takes every waiting request that stacks with
//! the first (same non-batch shapes, types and requested outputs) up to the
//! largest preferred batch size (else `max_batch_size`), waiting at most the
//! queue delay after the first request arrived for more, and runs them as one.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::tensor::{concat_batch, split_batch, Tensor};
use super::{ModelVersion, RunError};

/// What the configuration asks of the batcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Batch sizes to form when possible (Triton's `preferred_batch_size`).
    pub preferred: Vec<usize>,
    /// How long the first request of a batch may wait for others.
    pub max_delay: Duration,
}

/// One request's answer from a batch.
#[derive(Debug)]
pub struct Batched {
    /// This request's outputs.
    pub outputs: Vec<Tensor>,
    /// From submission to the batch starting.
    pub queue: Duration,
    /// The batch's execution time.
    pub infer: Duration,
    /// Whether this request stands for the batch's execution in the statistics (the first one does).
    pub counts_execution: bool,
    /// Requests in the batch.
    pub batch_requests: usize,
}

struct Job {
    inputs: Vec<Tensor>,
    wanted: Vec<usize>,
    rows: usize,
    queued: Instant,
    reply: oneshot::Sender<Result<Batched, RunError>>,
}

impl Job {
    fn stacks_with(&self, other: &Job) -> bool {
        self.wanted == other.wanted
            && self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(a, b)| a.shape.get(1..) == b.shape.get(1..) && a.datatype() == b.datatype())
    }
}

/// The queue of one batched model version.
#[derive(Debug)]
pub struct Batcher {
    queue: mpsc::UnboundedSender<Job>,
}

impl Batcher {
    /// Starts the batching task of `model` (held weakly: the task ends with the
    /// version), running batches under `permits`.
    pub fn start(model: &Arc<ModelVersion>, policy: BatchPolicy, permits: Arc<Semaphore>) -> Batcher {
        let (queue, rx) = mpsc::unbounded_channel();
        let limit = model.max_batch_size.max(1);
        let target = policy.preferred.iter().copied().max().unwrap_or(limit).clamp(1, limit);
        tokio::spawn(run(Arc::downgrade(model), policy, permits, rx, limit, target));
        Batcher { queue }
    }

    /// Queues one request of `rows` rows; resolves with its part of the batch.
    pub async fn infer(&self, inputs: Vec<Tensor>, wanted: Vec<usize>, rows: usize) -> Result<Batched, RunError> {
        let (reply, rx) = oneshot::channel();
        let job = Job { inputs, wanted, rows, queued: Instant::now(), reply };
        self.queue.send(job).map_err(|_| RunError::Unloaded)?;
        rx.await.map_err(|_| RunError::Dropped)?
    }
}

async fn run(
    model: Weak<ModelVersion>,
    policy: BatchPolicy,
    permits: Arc<Semaphore>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    limit: usize,
    target: usize,
) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let deadline = tokio::time::Instant::from_std(first.queued + policy.max_delay);
        let mut rows = first.rows;
        let mut jobs = vec![first];
        while rows < target && !policy.preferred.contains(&rows) {
            let next = match rx.try_recv() {
                Ok(j) => Some(j),
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten()
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(job) = next else { break };
            if job.stacks_with(&jobs[0]) && rows + job.rows <= limit {
                rows += job.rows;
                jobs.push(job);
            } else {
                carried = Some(job);
                break;
            }
        }
        let Some(model) = model.upgrade() else { return };
        tokio::task::spawn_blocking(move || {
            execute(&model, jobs);
            drop(permit);
        });
    }
}

/// Runs `jobs` as one batch and answers each with its rows.
fn execute(model: &ModelVersion, jobs: Vec<Job>) {
    let started = Instant::now();
    let rows: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
    let wanted = jobs[0].wanted.clone();
    let n_inputs = jobs[0].inputs.len();
    let mut replies = Vec::with_capacity(jobs.len());
    let mut per_input: Vec<Vec<Tensor>> = (0..n_inputs).map(|_| Vec::with_capacity(jobs.len())).collect();
    for job in jobs {
        replies.push((job.reply, job.queued));
        for (i, t) in job.inputs.into_iter().enumerate() {
            per_input[i].push(t);
        }
    }
    let result = (|| {
        let inputs = per_input
            .iter()
            .map(|parts| concat_batch(parts))
            .collect::<Result<Vec<_>, _>>()
            .map_err(RunError::Batch)?;
        let outputs = model.run(inputs, &wanted)?;
        let mut split: Vec<Vec<Tensor>> = (0..rows.len()).map(|_| Vec::with_capacity(outputs.len())).collect();
        for (k, out) in outputs.into_iter().enumerate() {
            let name = model.outputs.get(wanted.get(k).copied().unwrap_or(0)).map_or("?", |m| m.name.as_str());
            let parts = split_batch(out, &rows).map_err(|why| RunError::Split { name: name.to_string(), why })?;
            for (r, p) in parts.into_iter().enumerate() {
                split[r].push(p);
            }
        }
        Ok::<_, RunError>(split)
    })();
    let infer = started.elapsed();
    let count = replies.len();
    match result {
        Ok(split) => {
            for (i, ((reply, queued), outputs)) in replies.into_iter().zip(split).enumerate() {
                let queue = started.saturating_duration_since(queued);
                let _ =
                    reply.send(Ok(Batched { outputs, queue, infer, counts_execution: i == 0, batch_requests: count }));
            }
        }
        Err(e) => {
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
