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
//!
//! Batching that never loses: stacking requests pays only where the model
//! runs rows together cheaper than one by one (a matrix product does, a
//! convolution stack on a CPU core often does not, and then a batch only
//! serialises work another thread could have done). Each version learns
//! both costs per row from its own executions ([`Gain`]); while running
//! together is not at least a quarter cheaper, requests run one at a time as
//! if unbatched (no waiting for company, one request per execution, no
//! ring requests held), and once every [`EXPLORE_MS`] a batch of a few
//! ([`EXPLORE_REQUESTS`]) runs anyway so that a change (load, hardware,
//! input sizes) is seen.

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

/// How often a version on which batching was seen not to pay runs a batch
/// anyway, to keep measuring it (ms). Rarely, and small: the requests in it
/// wait for each other, and at 2,400 req/s one batch of 4 a second is 0.2%
/// of them, which leaves the p99 alone (a batch every 32nd decision, as
/// large as the queue, put 20% of `cnn`'s requests in such batches and
/// raised its p99 by 5 ms).
pub const EXPLORE_MS: u64 = 1000;

/// The most requests a batch run only to measure holds.
pub const EXPLORE_REQUESTS: usize = 4;

/// The share of a row's cost alone (in quarters) that a row run together
/// must stay under for batching to pay. The model's run is not all of a
/// request's cost (decoding, encoding, the connection), and a batch adds
/// hand-offs between threads: `cnn` over HTTP saved 10-25% of its run time
/// per row at batch 4-7 and still lost 5-9% throughput (docs/BENCHMARKS.md).
const PAYS_UNDER_QUARTERS: u64 = 3;

/// What a row costs run alone and run stacked with other requests' rows,
/// learned from a version's own executions (moving averages, ns per row):
/// whether batching pays here.
#[derive(Debug, Default)]
pub struct Gain {
    /// Executions of one request, per row.
    alone: AtomicU64,
    /// Executions of several requests stacked (stacking and splitting included), per row.
    together: AtomicU64,
    /// When a batch last ran only to measure, or batching last turned out not to pay (ms of [`now_ms`]).
    explored: AtomicU64,
    /// Whether the log was last told that batching saves nothing.
    said_no_gain: std::sync::atomic::AtomicBool,
}

impl Gain {
    /// Records an execution of `requests` requests holding `rows` rows that took `took`.
    pub fn record(&self, requests: usize, rows: usize, took: Duration) {
        let per_row = (took.as_nanos() / rows.max(1) as u128).min(u64::MAX as u128) as u64;
        let avg = if requests > 1 { &self.together } else { &self.alone };
        let old = avg.load(Ordering::Relaxed);
        // A lost update under a race costs one sample of a moving average.
        let new = if old == 0 { per_row.max(1) } else { old - old / 8 + per_row / 8 };
        avg.store(new.max(1), Ordering::Relaxed);
    }

    /// Whether stacking has been seen to cost at least a quarter less per
    /// row than running alone (or either is not known yet: batch to learn).
    pub fn pays(&self) -> bool {
        let (alone, together) = self.costs();
        alone == 0 || together == 0 || together.saturating_mul(4) < alone.saturating_mul(PAYS_UNDER_QUARTERS)
    }

    /// A row's cost alone and together (ns; 0 while not seen).
    fn costs(&self) -> (u64, u64) {
        (self.alone.load(Ordering::Relaxed), self.together.load(Ordering::Relaxed))
    }

    /// Whether to batch now, and how many requests at most: where it pays,
    /// as many as fit; where not, none but once in [`EXPLORE_MS`], a few.
    pub fn batch_now(&self, model: &str) -> Option<usize> {
        self.batch_at(model, now_ms())
    }

    fn batch_at(&self, model: &str, now: u64) -> Option<usize> {
        let pays = self.pays();
        // The verdict turned (the log last heard the other one); read first,
        // so that a lead writes the shared flag only when it turns.
        let turned = self.said_no_gain.load(Ordering::Relaxed) == pays
            && self.said_no_gain.swap(!pays, Ordering::Relaxed) == pays;
        if turned {
            let (alone, together) = self.costs();
            if pays {
                tracing::info!(
                    model,
                    alone_ns_per_row = alone,
                    together_ns_per_row = together,
                    "dynamic batching pays here again: batching"
                );
            } else {
                // The next look is a whole interval away.
                self.explored.store(now, Ordering::Relaxed);
                tracing::info!(
                    model,
                    alone_ns_per_row = alone,
                    together_ns_per_row = together,
                    look_again_ms = EXPLORE_MS,
                    "dynamic batching saves nothing per row here: requests run as they come, a small batch now and then to look again"
                );
            }
        }
        if pays {
            return Some(usize::MAX);
        }
        let last = self.explored.load(Ordering::Relaxed);
        (now.saturating_sub(last) >= EXPLORE_MS
            && self.explored.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok())
        .then_some(EXPLORE_REQUESTS)
    }
}

/// Milliseconds since the first call in this process: a clock for [`Gain`].
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
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
    /// Whether stacking pays on this version, as its executions show.
    gain: Arc<Gain>,
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
            gain: Arc::new(Gain::default()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Whether batching pays on this version as far as its executions show
    /// (see [`Gain`]): then requests are worth holding for company.
    pub fn pays(&self) -> bool {
        self.gain.pays()
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
        let job = Job { id, inputs, wanted, rows, queued: Instant::now(), reply };
        // A thread free, nobody queued and no batch of the version running
        // (or none worth waiting for): there is nothing to gather, so it runs
        // at once as it came, past the queue (a model of microseconds would
        // otherwise pay the queue's locks and wake-ups on every request).
        let nothing_to_wait_for = self.running.load(Ordering::SeqCst) == 0 || !self.gain.pays();
        let free = if nothing_to_wait_for { self.permits.clone().try_acquire_owned().ok() } else { None };
        // Decided under one look at the queue: past it when nobody is there,
        // else behind those queued first (the permit goes back at once).
        let past = {
            let mut queue = self.lock();
            match free {
                Some(permit) if queue.is_empty() => Some((permit, job)),
                _ => {
                    queue.push_back(job);
                    None
                }
            }
        };
        if let Some((permit, job)) = past {
            self.run(model, vec![job], permit, place).await;
            return answer.await.map_err(|_| RunError::Dropped)?;
        }
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
    /// it, up to the target and `most` requests (or those stacking with
    /// `batch`, when it has some); says whether request `mine` is still
    /// queued after.
    fn take(&self, batch: &mut Taken<'_>, mine: u64, most: usize) -> bool {
        let mut queue = self.lock();
        // Requests whose callers gave up are not run.
        queue.retain(|j| !j.reply.is_closed());
        let mut i = 0;
        while i < queue.len()
            && batch.rows < self.target
            && !self.policy.preferred.contains(&batch.rows)
            && batch.jobs.len() < most
        {
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
        let most = self.gain.batch_now(&model.name).unwrap_or(1);
        let pays = most == usize::MAX;
        let mut mine_queued = self.take(&mut batch, mine, most);
        let Some(first) = batch.jobs.first() else { return mine_queued };
        // Company is worth waiting for only where it pays and while another
        // batch keeps the hardware busy: until the delay is up or no other batch runs.
        let deadline = tokio::time::Instant::from_std(first.queued + self.policy.max_delay);
        while pays
            && batch.rows < self.target
            && !self.policy.preferred.contains(&batch.rows)
            && self.running.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let before = batch.jobs.len();
            mine_queued = self.take(&mut batch, mine, most);
            if batch.jobs.len() == before
                && self.running.load(Ordering::SeqCst) > 0
                && tokio::time::timeout_at(deadline, changed).await.is_err()
            {
                break;
            }
        }
        let jobs = std::mem::take(&mut batch.jobs);
        self.run(model, jobs, permit, place).await;
        mine_queued
    }

    /// Runs `jobs` as one batch under `permit`, here or in the blocking pool by `place`.
    async fn run(&self, model: &Arc<ModelVersion>, jobs: Vec<Job>, permit: OwnedSemaphorePermit, place: Place) {
        let elements: usize = jobs.iter().flat_map(|j| &j.inputs).map(|t| t.data.len()).sum();
        let inline = place.runs_here(model, elements);
        // The thread and the running count go with the execution: a caller
        // that gives up while it runs frees neither before it ends.
        let running = Running::start(self);
        let gain = self.gain.clone();
        let measured = move |model: &ModelVersion, jobs: Vec<Job>| {
            if let Some((requests, rows, took)) = execute(model, jobs) {
                gain.record(requests, rows, took);
            }
        };
        if inline {
            // A panic in the engine drops the replies (each request answers "dropped"), as in the pool.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measured(model, jobs)));
            drop((running, permit));
        } else {
            let model = model.clone();
            let _ = tokio::task::spawn_blocking(move || {
                measured(&model, jobs);
                drop((running, permit));
            })
            .await;
        }
    }
}

/// Runs `jobs` as one batch and answers each with its rows (a batch of one
/// runs as it came: nothing to stack or split); says how many requests and
/// rows ran, and how long stacking, running and splitting took, when it succeeded.
fn execute(model: &ModelVersion, jobs: Vec<Job>) -> Option<(usize, usize, Duration)> {
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
            Some((count, batch_rows, stacking + infer + splitting))
        }
        Err(e) => {
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    fn gain(alone_ns: u64, together_ns: u64) -> Gain {
        let g = Gain::default();
        if alone_ns > 0 {
            g.record(1, 1, Duration::from_nanos(alone_ns));
        }
        if together_ns > 0 {
            g.record(4, 8, Duration::from_nanos(together_ns * 8));
        }
        g
    }

    #[test]
    fn batching_is_tried_until_both_costs_are_known() {
        assert!(gain(0, 0).pays());
        assert!(gain(1000, 0).pays());
        assert!(gain(0, 1000).pays());
    }

    #[test]
    fn batching_pays_only_when_a_row_together_costs_a_quarter_less() {
        assert!(gain(1000, 500).pays());
        assert!(gain(1000, 749).pays());
        assert!(!gain(1000, 750).pays(), "25% less is not more than 25% less");
        assert!(!gain(1000, 900).pays());
        assert!(!gain(1000, 1000).pays());
        assert!(!gain(1000, 1500).pays());
    }

    #[test]
    fn rows_of_one_request_count_as_alone_per_row() {
        let g = Gain::default();
        // One request of 4 rows in 4 µs: 1 µs a row alone.
        g.record(1, 4, Duration::from_micros(4));
        // Four requests of 8 rows in all, at 1 µs a row: no gain.
        g.record(4, 8, Duration::from_micros(8));
        assert!(!g.pays());
        // Cheaper together from now on: the average follows within a few executions.
        for _ in 0..20 {
            g.record(4, 8, Duration::from_micros(4));
        }
        assert!(g.pays());
    }

    #[test]
    fn where_batching_saves_nothing_a_few_requests_batch_once_an_interval() {
        let g = gain(1000, 1000);
        // The verdict turns at 10 s: the next look is a whole interval later.
        assert_eq!(g.batch_at("m", 10_000), None);
        assert_eq!(g.batch_at("m", 10_000 + EXPLORE_MS - 1), None);
        assert_eq!(g.batch_at("m", 10_000 + EXPLORE_MS), Some(EXPLORE_REQUESTS));
        assert_eq!(g.batch_at("m", 10_000 + EXPLORE_MS), None, "one look an interval");
        assert_eq!(g.batch_at("m", 10_000 + 2 * EXPLORE_MS + 5), Some(EXPLORE_REQUESTS));
        let g = gain(1000, 100);
        assert!((0..100).all(|k| g.batch_at("m", k) == Some(usize::MAX)));
    }
}
