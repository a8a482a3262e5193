//! Model control across the engine workers (Triton's model control modes): the
//! changes every engine worker must carry out, who still owes an answer, the
//! load each new worker starts with, and the repository poller.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tandem_shared::control::ModelChange;

/// Who asked for a change: an engine worker on behalf of a client (answered
/// when done), or the repository poller (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Worker id and its request number.
    Client(u64, u64),
    /// `MODEL_CONTROL_MODE=poll`.
    Poll,
}

#[derive(Debug)]
struct Op {
    origin: Origin,
    change: ModelChange,
    waiting: BTreeSet<u64>,
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
}

/// The changes under way and the load new workers start with.
#[derive(Debug, Default)]
pub struct ModelOps {
    next: u64,
    ops: HashMap<u64, Op>,
    /// Per model, how it differs from the repository's files (see `WorkerSettings::models_wanted`).
    pub wanted: BTreeMap<String, Option<String>>,
}

impl ModelOps {
    /// Starts `change` on the engine workers `workers`; returns its number.
    /// New workers load what the change asks for, so a restart never undoes it.
    pub fn start(&mut self, origin: Origin, change: ModelChange, workers: BTreeSet<u64>) -> u64 {
        if origin != Origin::Poll {
            match &change {
                ModelChange::Load { model, config: None } => {
                    self.wanted.remove(model);
                }
                ModelChange::Load { model, config: Some(c) } => {
                    self.wanted.insert(model.clone(), Some(c.clone()));
                }
                ModelChange::Unload { model } => {
                    self.wanted.insert(model.clone(), None);
                }
            }
        }
        self.next += 1;
        self.ops.insert(self.next, Op { origin, change, waiting: workers, errors: Vec::new() });
        self.next
    }

    /// Worker `worker` answered operation `op`; returns the operation if it is now finished.
    pub fn answered(&mut self, op: u64, worker: u64, error: Option<String>) -> Option<Finished> {
        let o = self.ops.get_mut(&op)?;
        if o.waiting.remove(&worker) {
            if let Some(e) = error {
                o.errors.push(format!("worker {worker}: {e}"));
            }
        }
        self.finish_if_done(op)
    }

    /// Worker `worker` is gone: nothing more is owed by it. Returns the operations it finishes.
    pub fn worker_gone(&mut self, worker: u64) -> Vec<Finished> {
        let ops: Vec<u64> = self.ops.iter().filter(|(_, o)| o.waiting.contains(&worker)).map(|(k, _)| *k).collect();
        ops.into_iter()
            .filter_map(|op| {
                self.ops.get_mut(&op)?.waiting.remove(&worker);
                self.finish_if_done(op)
            })
            .collect()
    }

    /// Checks whether `op` is owed nothing more (an operation started with no worker finishes at once).
    pub fn finish_if_done(&mut self, op: u64) -> Option<Finished> {
        if !self.ops.get(&op)?.waiting.is_empty() {
            return None;
        }
        let o = self.ops.remove(&op)?;
        let error = (!o.errors.is_empty()).then(|| o.errors.join("; "));
        Some(Finished { origin: o.origin, change: o.change, error })
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
mod tests {
    use super::*;

    fn load(m: &str) -> ModelChange {
        ModelChange::Load { model: m.into(), config: None }
    }

    #[test]
    fn an_operation_finishes_when_every_worker_answered_or_is_gone() {
        let mut ops = ModelOps::default();
        let op = ops.start(Origin::Client(1, 9), load("a"), [1, 2, 3].into());
        assert_eq!(ops.answered(op, 1, None), None);
        assert_eq!(ops.answered(op, 2, Some("boom".into())), None);
        let done = ops.worker_gone(3);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].origin, Origin::Client(1, 9));
        assert_eq!(done[0].error.as_deref(), Some("worker 2: boom"));
        // Late answers for a finished operation are ignored.
        assert_eq!(ops.answered(op, 1, None), None);
    }

    #[test]
    fn what_new_workers_load_follows_explicit_changes_only() {
        let mut ops = ModelOps::default();
        ops.start(Origin::Client(1, 1), ModelChange::Unload { model: "a".into() }, BTreeSet::new());
        assert_eq!(ops.wanted.get("a"), Some(&None));
        ops.start(
            Origin::Client(1, 2),
            ModelChange::Load { model: "a".into(), config: Some("{}".into()) },
            BTreeSet::new(),
        );
        assert_eq!(ops.wanted.get("a"), Some(&Some("{}".into())));
        ops.start(Origin::Client(1, 3), load("a"), BTreeSet::new());
        assert!(ops.wanted.is_empty());
        ops.start(Origin::Poll, ModelChange::Unload { model: "b".into() }, BTreeSet::new());
        assert!(ops.wanted.is_empty());
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
