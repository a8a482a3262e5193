//! Memory as a budget: the bytes of request bodies a process holds at once
//! (`MAX_INFLIGHT_BYTES`). A request takes its share before its body is read
//! (its declared length, or as it arrives) and gives it back when its answer
//! is made; one that cannot get it within a short wait is answered 503 with
//! `Retry-After`, so no mix of concurrent uploads can grow a worker past what
//! the machine (or its cgroup) gives it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per unit of the budget (reservations round up to it).
const UNIT: u64 = 1024;

/// How long a request waits for its share before it is answered 503.
pub const WAIT: Duration = Duration::from_secs(2);

/// One process's budget for request bodies in flight.
#[derive(Debug)]
pub struct Budget {
    units: Arc<Semaphore>,
    bytes: u64,
    /// A request that holds a share waits for more now. Only one may: two
    /// that each hold part of the budget and wait for the other's would both
    /// be refused when their wait ran out, and a run of concurrent uploads
    /// growing as they inflate was refused whole (every answer 503).
    growing: std::sync::atomic::AtomicBool,
}

/// [`Budget::growing`] held by the one holder waiting for more; given up
/// when dropped, so a wait cut short (its request cancelled mid-wait) never
/// leaves it set and every later holder refused without a wait.
struct Growing<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Growing<'a> {
    fn claim(flag: &'a std::sync::atomic::AtomicBool) -> Option<Growing<'a>> {
        use std::sync::atomic::Ordering::SeqCst;
        flag.compare_exchange(false, true, SeqCst, SeqCst).is_ok().then_some(Growing(flag))
    }
}

impl Drop for Growing<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Why a share was not given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// The request alone is larger than the whole budget.
    #[error("the request needs {need} bytes of memory in flight but this worker has {budget} (MAX_INFLIGHT_BYTES)")]
    TooLarge {
        /// What it asked for.
        need: u64,
        /// The budget.
        budget: u64,
    },
    /// Others hold the budget; try again shortly.
    #[error("the server is holding as many request bodies as its memory allows (MAX_INFLIGHT_BYTES); retry shortly")]
    Busy,
}

/// A request's share of the budget, given back when dropped; it grows as the
/// request's body does.
#[derive(Debug, Default)]
pub struct Share {
    permit: Option<OwnedSemaphorePermit>,
}

impl Refused {
    /// The status a request refused so is answered with: 413 when it alone
    /// is larger than the budget, 503 (with `Retry-After`) while others hold it.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refused::TooLarge { .. } => http::StatusCode::PAYLOAD_TOO_LARGE,
            Refused::Busy => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A share this large, given back, is followed by a look at what the
/// allocator keeps ([`crate::sys::give_back_freed_memory`]).
const LARGE_SHARE: u64 = 1 << 20;

impl Drop for Share {
    fn drop(&mut self) {
        if self.bytes() >= LARGE_SHARE {
            give_back_freed();
        }
    }
}

/// Has the allocator give back what it keeps past its bound, on the blocking
/// pool (a trim can take milliseconds): a large body's memory, freed, is
/// otherwise not counted by any budget, and after a run of concurrent
/// uploads a worker kept hundreds of MiB the budget had already handed on.
/// One look at a time; a share given back meanwhile asks for another.
fn give_back_freed() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    static ASKED: AtomicBool = AtomicBool::new(false);
    // A worker that keeps no large allocations (the proxy's) spawns no look.
    if !crate::sys::bounds_freed_memory() || ASKED.swap(true, SeqCst) {
        return;
    }
    let look = || {
        ASKED.store(false, SeqCst);
        if let Some(held) = crate::sys::give_back_freed_memory() {
            tracing::debug!(held, "gave freed memory back to the kernel");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(look)),
        Err(_) => look(),
    }
}

impl Share {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.permit.as_ref().map_or(0, |p| p.num_permits() as u64 * UNIT)
    }
}

impl Budget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: u64) -> Arc<Budget> {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        Arc::new(Budget {
            units: Arc::new(Semaphore::new(units as usize)),
            bytes: units * UNIT,
            growing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The budget's size.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes not held by any request now.
    pub fn free(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }

    /// Grows `share` until it holds at least `total` bytes (nothing to do when
    /// it does already): what a body read so far needs, whatever was taken before.
    pub async fn reserve(&self, share: &mut Share, total: u64, wait: Duration) -> Result<(), Refused> {
        let held = share.bytes();
        if total <= held {
            return Ok(());
        }
        self.take(share, total - held, wait).await
    }

    /// Grows `share` by `bytes`, waiting up to `wait` for others to give
    /// theirs back. A share that already holds something waits only while no
    /// other such share does (see `growing`); otherwise it is refused at once
    /// and, given back, lets the others go on.
    pub async fn take(&self, share: &mut Share, bytes: u64, wait: Duration) -> Result<(), Refused> {
        if bytes == 0 {
            return Ok(());
        }
        let need = share.bytes().saturating_add(bytes);
        if need > self.bytes {
            return Err(Refused::TooLarge { need, budget: self.bytes });
        }
        let units = u32::try_from(bytes.div_ceil(UNIT)).map_err(|_| Refused::TooLarge { need, budget: self.bytes })?;
        let got = match self.units.clone().try_acquire_many_owned(units) {
            Ok(p) => p,
            Err(_) => {
                let _growing = match share.permit {
                    Some(_) => Some(Growing::claim(&self.growing).ok_or(Refused::Busy)?),
                    None => None,
                };
                match tokio::time::timeout(wait, self.units.clone().acquire_many_owned(units)).await {
                    Ok(Ok(p)) => p,
                    _ => return Err(Refused::Busy),
                }
            }
        };
        match &mut share.permit {
            Some(p) => p.merge(got),
            None => share.permit = Some(got),
        }
        Ok(())
    }
}

/// What [`share`] assumes when [`memory_limit`] cannot tell.
pub const UNKNOWN_MEMORY: u64 = 4 << 30;

/// The default budget of one process: a quarter of `memory` (what tandem may
/// use: [`memory_limit`]), shared by the `processes` that serve requests,
/// and never below `floor` (one largest request).
pub fn share(memory: u64, processes: usize, floor: u64) -> u64 {
    (memory / 4 / processes.max(1) as u64).max(floor)
}

/// The memory this process may use: the smallest of its cgroup's limit (v2
/// `memory.max` or v1 `memory.limit_in_bytes`) and the machine's total.
pub fn memory_limit() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|text| cgroup_limit(&text));
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

fn cgroup_limit(proc_self_cgroup: &str) -> Option<u64> {
    let read = |path: String| {
        std::fs::read_to_string(path).ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|&v| v < (1 << 60))
    };
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            if let Some(v) = read(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")) {
                return Some(v);
            }
        } else if controllers.is_empty() {
            if let Some(v) = read(format!("/sys/fs/cgroup{path}/memory.max")) {
                return Some(v);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shares_grow_wait_and_come_back() {
        let b = Budget::new(10 * UNIT);
        let mut a = Share::default();
        b.take(&mut a, 6 * UNIT, WAIT).await.expect("fits");
        b.take(&mut a, 1, WAIT).await.expect("a byte rounds up to a unit");
        assert_eq!((a.bytes(), b.free()), (7 * UNIT, 3 * UNIT));
        let mut c = Share::default();
        assert_eq!(b.take(&mut c, 4 * UNIT, Duration::from_millis(50)).await, Err(Refused::Busy));
        // Reserving a total takes only what is missing.
        b.reserve(&mut c, 2 * UNIT, WAIT).await.expect("two units");
        b.reserve(&mut c, 2 * UNIT - 10, WAIT).await.expect("covered");
        b.reserve(&mut c, 3 * UNIT, WAIT).await.expect("one more");
        assert_eq!((c.bytes(), b.free()), (3 * UNIT, 0));
        drop(c);
        let mut c = Share::default();
        assert_eq!(
            b.take(&mut c, 11 * UNIT, WAIT).await,
            Err(Refused::TooLarge { need: 11 * UNIT, budget: 10 * UNIT })
        );
        // A share given back lets the waiting one in.
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move {
                let mut c = Share::default();
                b.take(&mut c, 4 * UNIT, WAIT).await.map(|()| c.bytes())
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        assert_eq!(waiting.await.expect("task"), Ok(4 * UNIT));
        assert_eq!(b.free(), 10 * UNIT);
    }

    #[tokio::test]
    async fn only_one_holder_at_a_time_waits_for_more() {
        let b = Budget::new(10 * UNIT);
        let (mut a, mut c) = (Share::default(), Share::default());
        b.take(&mut a, 5 * UNIT, WAIT).await.expect("fits");
        b.take(&mut c, 5 * UNIT, WAIT).await.expect("fits");
        // a waits for more, holding its half; c, holding the other half, is
        // refused at once instead of waiting for a's (both would time out).
        let first = {
            let b = b.clone();
            tokio::spawn(async move { b.take(&mut a, 2 * UNIT, WAIT).await.map(|()| a.bytes()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let began = std::time::Instant::now();
        assert_eq!(b.take(&mut c, 2 * UNIT, WAIT).await, Err(Refused::Busy));
        assert!(began.elapsed() < Duration::from_millis(500), "refused at once");
        drop(c);
        assert_eq!(first.await.expect("task"), Ok(7 * UNIT), "c's share given back lets a grow");
        assert_eq!(b.free(), 10 * UNIT);
    }

    #[tokio::test]
    async fn a_holder_s_wait_cut_short_lets_the_next_holder_wait() {
        let b = Budget::new(10 * UNIT);
        let (mut a, mut c, mut d) = (Share::default(), Share::default(), Share::default());
        b.take(&mut a, 3 * UNIT, WAIT).await.expect("fits");
        b.take(&mut c, 3 * UNIT, WAIT).await.expect("fits");
        b.take(&mut d, 4 * UNIT, WAIT).await.expect("fits");
        // a's request is cancelled while it waits for more.
        let cancelled = {
            let b = b.clone();
            tokio::spawn(async move { b.take(&mut a, 2 * UNIT, WAIT).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        cancelled.abort();
        let _ = cancelled.await;
        // c may now wait in its turn (it is refused when its own wait runs out, not at once).
        let began = std::time::Instant::now();
        assert_eq!(b.take(&mut c, 4 * UNIT, Duration::from_millis(200)).await, Err(Refused::Busy));
        assert!(began.elapsed() >= Duration::from_millis(200), "c waited");
        drop(d);
        assert_eq!(b.take(&mut c, 4 * UNIT, WAIT).await, Ok(()), "and grows once there is room");
    }

    #[test]
    fn the_default_follows_the_memory_and_never_falls_below_one_request() {
        assert!(memory_limit().is_some_and(|m| m > 0));
        assert_eq!(share(8 << 30, 1_000_000, 64 << 20), 64 << 20);
        assert_eq!(share(8 << 30, 2, 64 << 20), 1 << 30);
        assert!(cgroup_limit("0::/nonexistent-group").is_none());
    }
}
