//! Triton's dynamic batching (`dynamic_batching { preferred_batch_size,
//! max_queue_delay_microseconds }`): requests for one model version that
//! arrive together in an engine worker, from its HTTP connections and from
//! the shared-memory ring alike, run as one batch and are split back.
//!
//! Adaptive, with no task of its own: every request joins the version's
//! queue and asks for an inference thread (an engine permit). Whoever gets
//! one runs a batch of what is queued then: the oldest request and every
//! queued one that stacks with it (same non-batch shapes, types and
//! requested outputs), up to the largest preferred batch size (else
//! `max_batch_size`). So a request never waits for company while the model
//! is idle, and requests gather by themselves while it is busy. The queue
//! delay holds a partial batch only while another batch of the version is
//! running (several inference threads), and no longer than that batch runs:
//! then the hardware is busy anyway and a fuller batch costs nothing. A
//! quick batch runs on the thread that led it, as an unbatched request
//! would; a long one in the blocking pool. Each execution is counted under
//! its batch size (Triton's `batch_stats`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use super::tensor::{concat_batch, split_batch, Tensor};
use super::{ModelVersion, RunError};

/// What the configuration asks of the batcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Batch sizes to form when possible (Triton's `preferred_batch_size`).
    pub preferred: Vec<usize>,
    /// How long the first request of a batch may wait for others (only while
    /// another batch of the version runs).
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
    /// Rows in the batch (its batch size).
    pub batch_rows: usize,
    /// Stacking the requests' inputs into the batch.
    pub stacking: Duration,
    /// Splitting the batch's outputs back into the requests' rows.
    pub splitting: Duration,
}

/// Where the thread asking may run a batch itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A thread that is ours to block (a ring claimer): any batch runs here.
    Block,
    /// A serving thread: a quick batch runs here, a long one in the blocking pool.
    Quick,
    /// A thread that must not block: every batch runs in the blocking pool.
    Pool,
}

impl Place {
    /// Whether a run of `model` on `elements` input elements runs on this
    /// thread (else in the blocking pool): batched or not, the same rule.
    pub fn runs_here(self, model: &ModelVersion, elements: usize) -> bool {
        match self {
            Place::Block => true,
            Place::Quick => model.runs_quickly(elements),
            Place::Pool => false,
        }
    }
}

struct Job {
    id: u64,
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
    policy: BatchPolicy,
    /// The most rows one batch may hold (`max_batch_size`).
    limit: usize,
    /// The rows a batch is complete at (the largest preferred size, else `limit`).
    target: usize,
    permits: Arc<Semaphore>,
    queue: Mutex<VecDeque<Job>>,
    /// Told when a request joins the queue or a batch ends (a leader waiting for company listens).
    changed: Arc<Notify>,
    /// Batches of this version running now.
    running: Arc<AtomicUsize>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("id", &self.id).field("rows", &self.rows).finish_non_exhaustive()
    }
}

/// A batch taken from the queue. Dropped before it runs (its leader's
/// caller gave up while it waited for company), it goes back to the front of
/// the queue, where the requests' own callers lead it again.
struct Taken<'a> {
    batcher: &'a Batcher,
    jobs: Vec<Job>,
    rows: usize,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.jobs.is_empty() {
            return;
        }
        let mut queue = self.batcher.lock();
        for job in self.jobs.drain(..).rev() {
            queue.push_front(job);
        }
    }
}

/// Counts a batch of the version as running while it lives; its end is
/// told to a leader waiting for company (which then waits no longer).
struct Running(Arc<AtomicUsize>, Arc<Notify>);

impl Running {
    fn start(b: &Batcher) -> Running {
        b.running.fetch_add(1, Ordering::SeqCst);
        Running(b.running.clone(), b.changed.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.notify_waiters();
    }
}

impl Batcher {
    /// The batcher of `model`, running batches under `permits`.
    pub fn start(model: &ModelVersion, policy: BatchPolicy, permits: Arc<Semaphore>) -> Batcher {
        let limit = model.max_batch_size.max(1);
        let target = policy.preferred.iter().copied().max().unwrap_or(limit).clamp(1, limit);
        Batcher {
            policy,
            limit,
            target,
            permits,
            queue: Mutex::new(VecDeque::new()),
            changed: Arc::new(Notify::new()),
            running: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(0),
        }
    }

    /// Queues one request of `rows` rows for `model`; resolves with its part
    /// of the batch it ran in, which this call may have led itself at `place`.
    pub async fn infer(
        &self,
        model: &Arc<ModelVersion>,
        inputs: Vec<Tensor>,
        wanted: Vec<usize>,
        rows: usize,
        place: Place,
    ) -> Result<Batched, RunError> {
        let (reply, mut answer) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push_back(Job { id, inputs, wanted, rows, queued: Instant::now(), reply });
        self.changed.notify_waiters();
        loop {
            let permit = tokio::select! {
                biased;
                done = &mut answer => return done.map_err(|_| RunError::Dropped)?,
                permit = self.permits.clone().acquire_owned() => permit.map_err(|_| RunError::Unloaded)?,
            };
            let ours_waiting = self.lead(model, permit, place, id).await;
            if !ours_waiting {
                // Ours ran in this batch or is running in another's: only its answer is left.
                return answer.await.map_err(|_| RunError::Dropped)?;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the oldest queued request and every queued one that stacks with
    /// it, up to the target (or those stacking with `batch`, when it has
    /// some); says whether request `mine` is still queued after.
    fn take(&self, batch: &mut Taken<'_>, mine: u64) -> bool {
        let mut queue = self.lock();
        // Requests whose callers gave up are not run.
        queue.retain(|j| !j.reply.is_closed());
        let mut i = 0;
        while i < queue.len() && batch.rows < self.target && !self.policy.preferred.contains(&batch.rows) {
            let fits = match batch.jobs.first() {
                Some(first) => queue[i].stacks_with(first) && batch.rows + queue[i].rows <= self.limit,
                None => true,
            };
            if fits {
                let job = queue.remove(i).expect("index checked");
                batch.rows += job.rows;
                batch.jobs.push(job);
            } else {
                i += 1;
            }
        }
        queue.iter().any(|j| j.id == mine)
    }

    /// Runs one batch of what is queued under `permit`; says whether request
    /// `mine` is still queued after (then its caller asks for a thread again).
    async fn lead(&self, model: &Arc<ModelVersion>, permit: OwnedSemaphorePermit, place: Place, mine: u64) -> bool {
        let mut batch = Taken { batcher: self, jobs: Vec::new(), rows: 0 };
        let mut mine_queued = self.take(&mut batch, mine);
        let Some(first) = batch.jobs.first() else { return mine_queued };
        // Company is worth waiting for only while another batch keeps the
        // hardware busy: until the delay is up or no other batch runs.
        let deadline = tokio::time::Instant::from_std(first.queued + self.policy.max_delay);
        while batch.rows < self.target
            && !self.policy.preferred.contains(&batch.rows)
            && self.running.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let before = batch.jobs.len();
            mine_queued = self.take(&mut batch, mine);
            if batch.jobs.len() == before
                && self.running.load(Ordering::SeqCst) > 0
                && tokio::time::timeout_at(deadline, changed).await.is_err()
            {
                break;
            }
        }
        let elements: usize = batch.jobs.iter().flat_map(|j| &j.inputs).map(|t| t.data.len()).sum();
        let inline = place.runs_here(model, elements);
        let jobs = std::mem::take(&mut batch.jobs);
        // The thread and the running count go with the execution: a caller
        // that gives up while it runs frees neither before it ends.
        let running = Running::start(self);
        if inline {
            // A panic in the engine drops the replies (each request answers "dropped"), as in the pool.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(model, jobs)));
            drop((running, permit));
        } else {
            let model = model.clone();
            let _ = tokio::task::spawn_blocking(move || {
                execute(&model, jobs);
                drop((running, permit));
            })
            .await;
        }
        mine_queued
    }
}

/// Runs `jobs` as one batch and answers each with its rows (a batch of one
/// runs as it came: nothing to stack or split).
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
    let (mut stacking, mut infer, mut splitting) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let result = (|| {
        let inputs = if rows.len() == 1 {
            per_input.into_iter().flatten().collect()
        } else {
            per_input.iter().map(|parts| concat_batch(parts)).collect::<Result<Vec<_>, _>>().map_err(RunError::Batch)?
        };
        stacking = started.elapsed();
        let outputs = model.run(inputs, &wanted)?;
        infer = started.elapsed() - stacking;
        if rows.len() == 1 {
            return Ok(vec![outputs]);
        }
        let mut split: Vec<Vec<Tensor>> = (0..rows.len()).map(|_| Vec::with_capacity(outputs.len())).collect();
        for (k, out) in outputs.into_iter().enumerate() {
            let name = model.outputs.get(wanted.get(k).copied().unwrap_or(0)).map_or("?", |m| m.name.as_str());
            let parts = split_batch(out, &rows).map_err(|why| RunError::Split { name: name.to_string(), why })?;
            for (r, p) in parts.into_iter().enumerate() {
                split[r].push(p);
            }
        }
        splitting = started.elapsed() - stacking - infer;
        Ok::<_, RunError>(split)
    })();
    let count = replies.len();
    let batch_rows = rows.iter().sum();
    match result {
        Ok(split) => {
            for (i, ((reply, queued), outputs)) in replies.into_iter().zip(split).enumerate() {
                let _ = reply.send(Ok(Batched {
                    outputs,
                    queue: started.saturating_duration_since(queued),
                    infer,
                    counts_execution: i == 0,
                    batch_requests: count,
                    batch_rows,
                    stacking,
                    splitting,
                }));
            }
        }
        Err(e) => {
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
