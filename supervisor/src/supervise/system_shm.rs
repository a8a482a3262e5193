//! Triton's system shared-memory registry across the engine workers
//! (`SYSTEM_SHARED_MEMORY`): the supervisor keeps the registered regions, so
//! a restarted worker starts with them; every change goes to every engine
//! worker, and the client's worker is answered only once all have applied it,
//! so a region registered is usable on whichever worker the next request
//! reaches, and one unregistered is touched by none.

use std::collections::BTreeSet;

use tandem_shared::process::control::Command as ToWorker;
use tandem_shared::system_shm::{self, Change, RegionSet, MAX_REGIONS};

use super::Supervisor;

/// A client's change still owed an answer.
#[derive(Debug)]
struct Pending {
    worker: u64,
    request: u64,
    generation: u64,
    /// Engine workers that have not applied `generation` yet.
    waiting: BTreeSet<u64>,
}

/// The registered regions and the answers owed.
#[derive(Debug, Default)]
pub struct Registry {
    set: RegionSet,
    pending: Vec<Pending>,
}

impl Registry {
    /// The regions registered now.
    pub fn set(&self) -> &RegionSet {
        &self.set
    }

    /// Applies `change` to the registry: whether it changed anything, or why it is refused.
    fn change(&mut self, change: Change) -> Result<bool, String> {
        let regions = &mut self.set.regions;
        match change {
            Change::Register(region) => {
                system_shm::check_name(&region.name)?;
                system_shm::key_file(&region.key)?;
                if regions.iter().any(|r| r.name == region.name) {
                    return Err(format!(
                        "shared-memory region {:?} is already registered; unregister it first",
                        region.name
                    ));
                }
                if regions.len() >= MAX_REGIONS {
                    return Err(format!(
                        "{MAX_REGIONS} shared-memory regions are registered, the most tandem keeps; unregister one first"
                    ));
                }
                let at = regions.partition_point(|r| r.name < region.name);
                regions.insert(at, region);
            }
            Change::Unregister { name: Some(name) } => {
                let before = regions.len();
                regions.retain(|r| r.name != name);
                if regions.len() == before {
                    // As Triton: unregistering a name that is not registered is no error.
                    return Ok(false);
                }
            }
            Change::Unregister { name: None } => {
                if regions.is_empty() {
                    return Ok(false);
                }
                regions.clear();
            }
        }
        self.set.generation += 1;
        Ok(true)
    }

    /// The answers due once `done` holds: `(worker, request)` of each change
    /// no engine worker owes anything for any more.
    fn settle(&mut self, done: impl Fn(&mut Pending)) -> Vec<(u64, u64)> {
        let mut due = Vec::new();
        self.pending.retain_mut(|p| {
            done(p);
            let settled = p.waiting.is_empty();
            if settled {
                due.push((p.worker, p.request));
            }
            !settled
        });
        due
    }
}

impl Supervisor {
    /// Engine worker `id` asks for `change` for its client's `request`.
    pub(super) fn shared_memory_requested(&mut self, id: u64, request: u64, change: Change) {
        let engines = self.engine_ids();
        let Some(registry) = self.system_shm.as_mut() else {
            let error = Some("system shared memory is off (SYSTEM_SHARED_MEMORY=false)".to_string());
            self.tell(id, &ToWorker::SharedMemoryDone { request, error });
            return;
        };
        let what = format!("{change:?}");
        match registry.change(change) {
            Err(error) => {
                self.tell(id, &ToWorker::SharedMemoryDone { request, error: Some(error) });
            }
            Ok(false) => {
                self.tell(id, &ToWorker::SharedMemoryDone { request, error: None });
            }
            Ok(true) => {
                let set = registry.set.clone();
                let generation = set.generation;
                tracing::info!(worker_id = id, change = %what, regions = set.regions.len(), "system shared-memory registry changed");
                let command = ToWorker::SharedMemoryRegions(set);
                let waiting: BTreeSet<u64> = engines.into_iter().filter(|&w| self.tell(w, &command)).collect();
                if let Some(r) = self.system_shm.as_mut() {
                    r.pending.push(Pending { worker: id, request, generation, waiting });
                }
                self.shared_memory_settle(|_| {});
            }
        }
    }

    /// Engine worker `id` applied the registry up to `generation`.
    pub(super) fn shared_memory_applied(&mut self, id: u64, generation: u64) {
        self.shared_memory_settle(|p| {
            if p.generation <= generation {
                p.waiting.remove(&id);
            }
        });
    }

    /// Every tick: a worker that exited owes nothing (its successor starts with the registry).
    pub(super) fn shared_memory_sweep(&mut self) {
        if self.system_shm.as_ref().is_none_or(|r| r.pending.is_empty()) {
            return;
        }
        let alive = self.engine_ids();
        self.shared_memory_settle(|p| p.waiting.retain(|w| alive.contains(w)));
    }

    fn shared_memory_settle(&mut self, done: impl Fn(&mut Pending)) {
        let due = self.system_shm.as_mut().map(|r| r.settle(done)).unwrap_or_default();
        for (worker, request) in due {
            self.tell(worker, &ToWorker::SharedMemoryDone { request, error: None });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;
    use tandem_shared::system_shm::Region;

    fn region(name: &str) -> Region {
        Region { name: name.into(), key: format!("/{name}"), offset: 0, byte_size: 64 }
    }

    #[test]
    fn names_are_unique_and_bounded_and_each_change_is_numbered() {
        let mut r = Registry::default();
        assert_eq!(r.change(Change::Register(region("b"))), Ok(true));
        assert_eq!(r.change(Change::Register(region("a"))), Ok(true));
        assert!(r.change(Change::Register(region("a"))).unwrap_err().contains("already registered"));
        assert!(r.change(Change::Register(Region { key: "/../x".into(), ..region("c") })).is_err());
        assert_eq!(r.set().generation, 2);
        let names: Vec<&str> = r.set().regions.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(r.change(Change::Unregister { name: Some("zz".into()) }), Ok(false));
        assert_eq!(r.change(Change::Unregister { name: Some("a".into()) }), Ok(true));
        assert_eq!(r.change(Change::Unregister { name: None }), Ok(true));
        assert_eq!(r.change(Change::Unregister { name: None }), Ok(false));
        assert_eq!(r.set().generation, 4);
        for i in 0..MAX_REGIONS {
            r.change(Change::Register(region(&format!("r{i}")))).unwrap();
        }
        assert!(r.change(Change::Register(region("one-more"))).unwrap_err().contains("the most tandem keeps"));
    }

    #[test]
    fn an_answer_waits_for_every_engine_worker() {
        let mut r = Registry::default();
        r.pending.push(Pending { worker: 1, request: 7, generation: 3, waiting: [1, 2].into() });
        assert!(r
            .settle(|p| if p.generation <= 2 {
                p.waiting.clear()
            })
            .is_empty());
        assert!(r
            .settle(|p| {
                p.waiting.remove(&1);
            })
            .is_empty());
        assert_eq!(
            r.settle(|p| {
                p.waiting.remove(&2);
            }),
            vec![(1, 7)]
        );
        assert!(r.pending.is_empty());
    }
}
