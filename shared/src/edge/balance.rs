//! Balanced plain HTTP: the engine workers all accept from the one listening
//! socket the supervisor owns, and each holds back its next accept for a
//! moment while it has more connections than the least-loaded other engine
//! worker, so that one gets the connection. Counts and whether a worker is
//! idle (a serving thread of it asleep) travel through the statistics region
//! (relaxed words per worker). No connection can be lost to a worker that
//! goes away: they all wait in the same kernel queue, and a worker that holds
//! back still accepts after the pause if nobody did.
//!
//! The pause is long (1 ms per connection ahead, up to 4) only while the
//! other worker is idle: it wakes on the same connection and takes it at
//! once. A busy one takes it only when it next looks at the socket, so
//! holding back long then only makes the client wait: 16 new connections at
//! once under keep-alive load waited 7 ms (median) for their answer when
//! every pause was long, 2.6-3.0 ms with short ones for a busy worker, with
//! the per-worker spread kept (docs/BENCHMARKS.md).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::edge::serve::Pacing;
use crate::stats::{ProcessRole, Stats};

/// The longest pause before an accept (a worker far ahead waits this long).
const MAX_PAUSE: Duration = Duration::from_millis(4);
/// The pause while the least-loaded other worker is busy.
const BUSY_PAUSE: Duration = Duration::from_micros(500);

/// Accept pacing for one engine worker.
pub struct AcceptBalance {
    stats: Stats,
    role: ProcessRole,
    open: AtomicU64,
}

/// The statistics block of the process's [`AcceptBalance`], for the serving
/// threads' park hooks ([`thread_parked`], [`thread_unparked`]).
static PROCESS: OnceLock<Stats> = OnceLock::new();

thread_local! {
    /// Whether this thread counted itself asleep (so it uncounts only that).
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

impl AcceptBalance {
    /// Pacing for the process owning `stats`, against the other live processes
    /// of `role`. The first one made in a process is the one its serving
    /// threads' park hooks report to.
    pub fn new(stats: Stats, role: ProcessRole) -> Self {
        let _ = PROCESS.set(stats.clone());
        AcceptBalance { stats, role, open: AtomicU64::new(0) }
    }
}

/// A serving thread's runtime is about to sleep (tokio's `on_thread_park`):
/// this process would take a new connection at once.
pub fn thread_parked() {
    if let Some(stats) = PROCESS.get() {
        if !COUNTED.replace(true) {
            stats.serving_thread_parked(true);
        }
    }
}

/// A serving thread's runtime woke (tokio's `on_thread_unpark`).
pub fn thread_unparked() {
    if COUNTED.replace(false) {
        if let Some(stats) = PROCESS.get() {
            stats.serving_thread_parked(false);
        }
    }
}

/// How long a worker holding `mine` connections waits when the least-loaded
/// other holds `least.0` and is idle (`least.1`): 1 ms for each connection
/// it is ahead, at most [`MAX_PAUSE`]; when that one is busy, only once two
/// ahead and at most [`BUSY_PAUSE`] (it takes the connection when it next
/// looks at the socket, within a request's time).
pub fn pause(mine: u64, least: Option<(u64, bool)>) -> Duration {
    match least {
        Some((least, true)) if mine > least => (Duration::from_millis(1) * (mine - least).min(8) as u32).min(MAX_PAUSE),
        Some((least, false)) if mine > least + 1 => BUSY_PAUSE,
        _ => Duration::ZERO,
    }
}

impl Pacing for AcceptBalance {
    fn accepting(&self, on: bool) {
        self.stats.set_connections(on.then(|| self.open.load(Ordering::Relaxed)));
    }

    fn wait(&self) -> Duration {
        pause(self.open.load(Ordering::Relaxed), self.stats.least_loaded_elsewhere(self.role))
    }

    fn opened(&self) {
        let n = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.set_connections(Some(n));
    }

    fn closed(&self, accepting: bool) {
        let n = self.open.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        if accepting {
            self.stats.set_connections(Some(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_worker_ahead_of_an_idle_least_loaded_one_waits() {
        assert_eq!(pause(3, None), Duration::ZERO, "alone: never wait");
        assert_eq!(pause(3, Some((3, true))), Duration::ZERO);
        assert_eq!(pause(3, Some((5, true))), Duration::ZERO);
        assert_eq!(pause(4, Some((3, true))), Duration::from_millis(1));
        assert_eq!(pause(40, Some((0, true))), MAX_PAUSE);
        assert_eq!(pause(4, Some((3, false))), Duration::ZERO, "busy: one ahead is no reason to wait");
        assert_eq!(pause(40, Some((0, false))), BUSY_PAUSE, "busy and far behind: a short wait");
    }

    #[test]
    fn counts_cross_the_region_and_a_stopped_worker_is_not_the_least() {
        let (region, _fd) = crate::sys::counters::Counters::create(crate::stats::region_words(4)).expect("region");
        let a = Stats::attach(region.clone(), 2, ProcessRole::Engine, 1);
        let b = Stats::attach(region.clone(), 3, ProcessRole::Engine, 2);
        let b_stats = b.clone();
        let (ba, bb) = (AcceptBalance::new(a, ProcessRole::Engine), AcceptBalance::new(b, ProcessRole::Engine));
        assert_eq!(ba.wait(), Duration::ZERO, "b is not accepting yet");
        ba.accepting(true);
        bb.accepting(true);
        ba.opened();
        ba.opened();
        assert_eq!(ba.wait(), BUSY_PAUSE, "a holds two, b none, but b is busy");
        b_stats.serving_thread_parked(true);
        assert_eq!(ba.wait(), Duration::from_millis(2), "a holds two, b none and asleep");
        assert_eq!(bb.wait(), Duration::ZERO);
        b_stats.serving_thread_parked(false);
        b_stats.serving_thread_parked(false);
        assert_eq!(ba.wait(), BUSY_PAUSE, "awake again (and never counted below zero)");
        b_stats.serving_thread_parked(true);
        assert_eq!(ba.wait(), Duration::from_millis(2), "asleep again: one word, counted right");
        bb.accepting(false);
        assert_eq!(ba.wait(), Duration::ZERO, "b stopped accepting");
        ba.closed(true);
        assert_eq!(ba.open.load(Ordering::Relaxed), 1);
    }
}
