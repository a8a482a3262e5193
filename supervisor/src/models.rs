//! Model control across the engine workers (Triton's model control modes): the
//! changes every engine worker must carry out, who still owes an answer, the
//! load each new worker starts with, and the repository poller.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tandem_config::engine::ModelLoad;
use tandem_shared::process::control::ModelChange;
use tandem_shared::{ModelSet, Wanted};

/// Who asked for a change: an engine worker on behalf of a client (answered
/// when done), the repository poller (logged), or the supervisor putting
/// workers back after a change that failed elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Worker id and its request number.
    Client(u64, u64),
    /// `MODEL_CONTROL_MODE=poll`.
    Poll,
    /// Bringing workers in line with what is remembered: undoing a failed
    /// change where it had succeeded, or updating a worker started during a change.
    Align,
}

#[derive(Debug)]
struct Op {
    origin: Origin,
    change: ModelChange,
    /// Workers still owing an answer in the current stage.
    waiting: BTreeSet<u64>,
    /// Workers the change goes to once the first one carried it out.
    rest: BTreeSet<u64>,
    /// Workers that carried it out.
    done: BTreeSet<u64>,
    errors: Vec<String>,
}

/// A change every engine worker has carried out (or not): what to tell whom.
#[derive(Debug, PartialEq, Eq)]
pub struct Finished {
    /// Who asked.
    pub origin: Origin,
    /// The change.
    pub change: ModelChange,
    /// What failed, per worker; `None` when every worker succeeded.
    pub error: Option<String>,
    /// When it failed: the change that puts back the workers that had carried
    /// it out, and those workers (so every worker serves the same again).
    pub revert: Option<(ModelChange, BTreeSet<u64>)>,
    /// Every worker the change was sent to (a worker started meanwhile was
    /// not, and is brought up to date when the change succeeded).
    pub targets: BTreeSet<u64>,
}

/// What the supervisor does next for an operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Wait for more answers.
    Wait,
    /// Send operation `op`'s change to these workers (the first one carried it out).
    Send(u64, ModelChange, BTreeSet<u64>),
    /// The operation is over.
    Finished(Finished),
}

/// The changes under way and the load new workers start with.
///
/// A load is first carried out by one worker; only when it succeeded there is
/// it sent to the others, so a configuration that crashes a worker or fails
/// to load costs one worker one attempt. What restarted workers load
/// ([`ModelOps::wanted`]) changes only when every worker succeeded; a change
/// that failed anywhere is undone where it had succeeded, so all workers
/// agree, and is never replayed.
#[derive(Debug, Default)]
pub struct ModelOps {
    next: u64,
    ops: HashMap<u64, Op>,
    /// What restarted workers load (see `EngineWorker::models_wanted`).
    pub wanted: ModelSet,
}

impl ModelOps {
    /// What explicit model control loads at start (`MODEL_LOAD`), said in the
    /// log; a name the repository does not hold is a warning (its folder may come later).
    pub fn at_start(load: &ModelLoad, repository: &Path) -> Self {
        let names = match load {
            ModelLoad::All => {
                tracing::info!("MODEL_CONTROL_MODE=explicit with MODEL_LOAD=*: every model is loaded at start");
                return ModelOps::default();
            }
            ModelLoad::Only(names) => names,
        };
        // The folder names only (the poller's scan also reads every file's size and time).
        let held = tandem_engine_worker::engine::repository::folder_names(repository);
        for missing in names.iter().filter(|n| !held.contains(n.as_str())) {
            tracing::warn!(model = %missing, repository = %repository.display(), "MODEL_LOAD names a model the repository does not hold");
        }
        if names.is_empty() {
            tracing::info!(
                "MODEL_CONTROL_MODE=explicit: no model is loaded at start (as Triton's); load one with POST \
                 /v2/repository/models/NAME/load, or name them in MODEL_LOAD (* for all)"
            );
        } else {
            tracing::info!(models = %names.join(","), "MODEL_CONTROL_MODE=explicit: loading only the models MODEL_LOAD names");
        }
        let named = names.iter().map(|n| (n.clone(), Wanted::Files)).collect();
        ModelOps { wanted: ModelSet { named, others_loaded: false }, ..ModelOps::default() }
    }

    /// Starts `change` on the engine workers `workers`: returns its number and
    /// the workers to send it to now (one, for a load; all, for an unload).
    pub fn start(&mut self, origin: Origin, change: ModelChange, workers: BTreeSet<u64>) -> (u64, BTreeSet<u64>) {
        let first: BTreeSet<u64> = match &change {
            ModelChange::Load { .. } => workers.iter().next().copied().into_iter().collect(),
            ModelChange::Unload { .. } => workers.clone(),
        };
        let rest = workers.difference(&first).copied().collect();
        self.next += 1;
        self.ops.insert(
            self.next,
            Op { origin, change, waiting: first.clone(), rest, done: BTreeSet::new(), errors: Vec::new() },
        );
        (self.next, first)
    }

    /// Worker `worker` answered operation `op`.
    pub fn answered(&mut self, op: u64, worker: u64, error: Option<String>) -> Step {
        let Some(o) = self.ops.get_mut(&op) else { return Step::Wait };
        if o.waiting.remove(&worker) {
            match error {
                Some(e) => o.errors.push(format!("worker {worker}: {e}")),
                None => {
                    o.done.insert(worker);
                }
            }
        }
        self.advance(op)
    }

    /// Worker `worker` is gone: nothing more is owed by it. A worker that
    /// exits while it carries a change out counts as a failure of the change
    /// (it may have crashed on it). Returns what to do for each operation it
    /// took part in.
    pub fn worker_gone(&mut self, worker: u64, how: &str) -> Vec<Step> {
        let ops: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| o.waiting.contains(&worker) || o.rest.contains(&worker) || o.done.contains(&worker))
            .map(|(k, _)| *k)
            .collect();
        ops.into_iter()
            .filter_map(|op| {
                let o = self.ops.get_mut(&op)?;
                o.rest.remove(&worker);
                o.done.remove(&worker);
                if o.waiting.remove(&worker) {
                    o.errors.push(format!("worker {worker} {how} while carrying out the change"));
                }
                Some(self.advance(op))
            })
            .collect()
    }

    /// Checks whether `op` is owed nothing more in its stage (an operation
    /// started with no worker finishes at once).
    pub fn advance(&mut self, op: u64) -> Step {
        let Some(o) = self.ops.get_mut(&op) else { return Step::Wait };
        if !o.waiting.is_empty() {
            return Step::Wait;
        }
        if o.errors.is_empty() && !o.rest.is_empty() {
            o.waiting = std::mem::take(&mut o.rest);
            return Step::Send(op, o.change.clone(), o.waiting.clone());
        }
        let Some(o) = self.ops.remove(&op) else { return Step::Wait };
        let targets: BTreeSet<u64> = o.done.iter().chain(&o.rest).copied().collect();
        if o.errors.is_empty() {
            if !matches!(o.origin, Origin::Poll | Origin::Align) {
                self.remember(&o.change);
            }
            return Step::Finished(Finished { origin: o.origin, change: o.change, error: None, revert: None, targets });
        }
        let revert = (!o.done.is_empty() && matches!(o.origin, Origin::Client(..)))
            .then(|| (self.current(o.change.model()), o.done));
        Step::Finished(Finished {
            origin: o.origin,
            change: o.change,
            error: Some(o.errors.join("; ")),
            revert,
            targets,
        })
    }

    /// Makes `change` what restarted workers load.
    fn remember(&mut self, change: &ModelChange) {
        let wanted = match change {
            ModelChange::Load { config: None, .. } => Wanted::Files,
            ModelChange::Load { config: Some(c), .. } => Wanted::Config(c.clone()),
            ModelChange::Unload { .. } => Wanted::Unloaded,
        };
        self.wanted.set(change.model(), wanted);
    }

    /// The change that brings a worker to what is remembered for `model`.
    pub fn current(&self, model: &str) -> ModelChange {
        let model = model.to_string();
        match self.wanted.get(&model) {
            Wanted::Files => ModelChange::Load { model, config: None },
            Wanted::Unloaded => ModelChange::Unload { model },
            Wanted::Config(c) => ModelChange::Load { model, config: Some(c) },
        }
    }
}

/// What identifies a model folder's content: every file below it (two levels:
/// the configuration, labels, version folders and their files) with size and mtime.
type Fingerprint = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Fingerprint::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            if meta.is_dir() {
                if depth < 2 {
                    stack.push((path.clone(), depth + 1));
                }
                out.insert(path, (0, None));
            } else {
                out.insert(path, (meta.len(), meta.modified().ok()));
            }
        }
    }
    out
}

/// Every model folder of `repository` and its fingerprint (hidden entries skipped).
fn scan(repository: &Path) -> BTreeMap<String, Fingerprint> {
    let Ok(entries) = std::fs::read_dir(repository) else { return BTreeMap::new() };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            (!name.starts_with('.')).then(|| (name, fingerprint(&e.path())))
        })
        .collect()
}

/// The changes between two scans: new or changed models are loaded, removed ones unloaded.
fn changes(before: &BTreeMap<String, Fingerprint>, now: &BTreeMap<String, Fingerprint>) -> Vec<ModelChange> {
    let mut out: Vec<ModelChange> = now
        .iter()
        .filter(|(name, fp)| before.get(*name) != Some(fp))
        .map(|(name, _)| ModelChange::Load { model: name.clone(), config: None })
        .collect();
    out.extend(before.keys().filter(|n| !now.contains_key(*n)).map(|n| ModelChange::Unload { model: n.clone() }));
    out
}

/// Rescans `repository` every `every` on a thread of its own (the supervisor's
/// loop never waits on the disk) and sends each non-empty set of changes.
/// A change is sent once the folder has looked the same for two scans in a
/// row, so a model being copied in is loaded when the copy is done.
pub fn poll(
    repository: PathBuf,
    every: Duration,
) -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<Vec<ModelChange>>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new().name("repository-poll".into()).spawn(move || {
        let mut served = scan(&repository);
        let mut last = served.clone();
        loop {
            std::thread::sleep(every);
            let now = scan(&repository);
            // Settled: unchanged since the previous scan, but different from what is served.
            if now == last && now != served {
                let found = changes(&served, &now);
                served = now.clone();
                if !found.is_empty() && tx.send(found).is_err() {
                    return;
                }
            }
            last = now;
        }
    })?;
    Ok(rx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn load(m: &str) -> ModelChange {
        ModelChange::Load { model: m.into(), config: None }
    }

    fn finished(step: Step) -> Finished {
        match step {
            Step::Finished(f) => f,
            other => panic!("not finished: {other:?}"),
        }
    }

    #[test]
    fn a_load_goes_to_one_worker_first_then_to_the_rest() {
        let mut ops = ModelOps::default();
        let change = ModelChange::Load { model: "a".into(), config: Some("{}".into()) };
        let (op, first) = ops.start(Origin::Client(1, 9), change.clone(), [1, 2, 3].into());
        assert_eq!(first, [1].into());
        assert!(ops.wanted.named.is_empty(), "nothing is remembered before a worker carried it out");
        assert_eq!(ops.answered(op, 1, None), Step::Send(op, change.clone(), [2, 3].into()));
        assert_eq!(ops.answered(op, 2, None), Step::Wait);
        let done = finished(ops.answered(op, 3, None));
        assert_eq!((done.error, done.revert, done.targets), (None, None, [1, 2, 3].into()));
        assert_eq!(ops.wanted.get("a"), Wanted::Config("{}".into()));
        // Late answers for a finished operation are ignored.
        assert_eq!(ops.answered(op, 1, None), Step::Wait);
    }

    #[test]
    fn a_load_refused_by_the_first_worker_touches_no_other_and_is_not_remembered() {
        let mut ops = ModelOps::default();
        let (op, _) = ops.start(Origin::Client(1, 9), load("a"), [1, 2].into());
        let done = finished(ops.answered(op, 1, Some("boom".into())));
        assert_eq!(done.error.as_deref(), Some("worker 1: boom"));
        assert_eq!(done.revert, None);
        assert!(ops.wanted.named.is_empty());
    }

    #[test]
    fn a_worker_that_dies_carrying_out_a_load_fails_it() {
        let mut ops = ModelOps::default();
        ops.wanted.set("a", Wanted::Unloaded);
        let (op, first) = ops.start(Origin::Client(1, 9), load("a"), [1, 2].into());
        assert_eq!(first, [1].into());
        let steps = ops.worker_gone(1, "exited (signal SIGABRT)");
        let done = finished(steps.into_iter().next().expect("one op"));
        assert!(done.error.expect("failed").contains("worker 1 exited (signal SIGABRT) while"));
        assert_eq!(ops.wanted.get("a"), Wanted::Unloaded, "the unload before it still holds");
        let _ = op;
    }

    #[test]
    fn a_change_that_fails_on_some_workers_is_undone_on_the_others() {
        let mut ops = ModelOps::default();
        ops.wanted.set("a", Wanted::Config("old".into()));
        let change = ModelChange::Load { model: "a".into(), config: Some("new".into()) };
        let (op, _) = ops.start(Origin::Client(1, 9), change.clone(), [1, 2, 3].into());
        assert!(matches!(ops.answered(op, 1, None), Step::Send(..)));
        assert_eq!(ops.answered(op, 2, Some("out of memory".into())), Step::Wait);
        let done = finished(ops.answered(op, 3, None));
        assert_eq!(done.error.as_deref(), Some("worker 2: out of memory"));
        let (undo, on) = done.revert.expect("undone");
        assert_eq!(undo, ModelChange::Load { model: "a".into(), config: Some("old".into()) });
        assert_eq!(on, [1, 3].into());
        assert_eq!(ops.wanted.get("a"), Wanted::Config("old".into()));
        // The revert itself is not reverted and not remembered.
        let (r, _) = ops.start(Origin::Align, undo, on);
        assert!(matches!(ops.answered(r, 1, None), Step::Wait | Step::Send(..)));
    }

    #[test]
    fn unloads_go_to_every_worker_at_once_and_poll_changes_are_not_remembered() {
        let mut ops = ModelOps::default();
        let (op, first) = ops.start(Origin::Client(1, 1), ModelChange::Unload { model: "a".into() }, [1, 2].into());
        assert_eq!(first, [1, 2].into());
        assert_eq!(ops.answered(op, 1, None), Step::Wait);
        finished(ops.answered(op, 2, None));
        assert_eq!(ops.wanted.get("a"), Wanted::Unloaded);
        let (op, _) = ops.start(Origin::Client(1, 3), load("a"), BTreeSet::new());
        assert!(finished(ops.advance(op)).error.is_none());
        assert!(ops.wanted.named.is_empty());
        let (op, _) = ops.start(Origin::Poll, ModelChange::Unload { model: "b".into() }, BTreeSet::new());
        finished(ops.advance(op));
        assert!(ops.wanted.named.is_empty());
    }

    #[test]
    fn with_the_others_unloaded_a_load_from_files_is_remembered_by_name() {
        let mut ops =
            ModelOps { wanted: ModelSet { named: BTreeMap::new(), others_loaded: false }, ..ModelOps::default() };
        assert_eq!(ops.current("a"), ModelChange::Unload { model: "a".into() });
        let (op, _) = ops.start(Origin::Client(1, 1), load("a"), [1].into());
        finished(ops.answered(op, 1, None));
        assert_eq!(ops.wanted.named.get("a"), Some(&Wanted::Files));
        assert_eq!(ops.current("a"), load("a"));
        let (op, _) = ops.start(Origin::Client(1, 2), ModelChange::Unload { model: "a".into() }, [1].into());
        finished(ops.answered(op, 1, None));
        assert!(ops.wanted.named.is_empty(), "back to what every unnamed model is");
    }

    #[test]
    fn changes_between_scans() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/1")).unwrap();
        std::fs::write(dir.path().join("a/1/model.onnx"), b"x").unwrap();
        let before = scan(dir.path());
        std::fs::write(dir.path().join("a/1/model.onnx"), b"xy").unwrap();
        std::fs::create_dir_all(dir.path().join("b/1")).unwrap();
        let now = scan(dir.path());
        assert_eq!(changes(&before, &now), vec![load("a"), load("b")]);
        std::fs::remove_dir_all(dir.path().join("a")).unwrap();
        assert_eq!(changes(&now, &scan(dir.path())), vec![ModelChange::Unload { model: "a".into() }]);
    }
}
