//! Balanced plain HTTP: the engine workers all accept from the one listening
//! socket the supervisor owns, and each holds back its next accept for a
//! moment while it has more connections than the least-loaded other engine
//! worker, so that one gets the connection. Counts travel through the
//! statistics region (one relaxed word per worker). No connection can be
//! lost to a worker that goes away: they all wait in the same kernel queue,
//! and a worker that holds back still accepts after the pause if nobody did.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::edge::serve::Pacing;
use crate::stats::{ProcessRole, Stats};

/// The longest pause before an accept (a worker far ahead waits this long).
const MAX_PAUSE: Duration = Duration::from_millis(4);

/// Accept pacing for one engine worker.
pub struct AcceptBalance {
    stats: Stats,
    role: ProcessRole,
    open: AtomicU64,
}

impl AcceptBalance {
    /// Pacing for the process owning `stats`, against the other live processes of `role`.
    pub fn new(stats: Stats, role: ProcessRole) -> Self {
        AcceptBalance { stats, role, open: AtomicU64::new(0) }
    }
}

/// How long a worker holding `mine` connections waits when the least-loaded other holds `least`.
pub fn pause(mine: u64, least: Option<u64>) -> Duration {
    match least {
        Some(least) if mine > least => (Duration::from_millis(1) * (mine - least).min(8) as u32).min(MAX_PAUSE),
        _ => Duration::ZERO,
    }
}

impl Pacing for AcceptBalance {
    fn accepting(&self, on: bool) {
        self.stats.set_connections(on.then(|| self.open.load(Ordering::Relaxed)));
    }

    fn wait(&self) -> Duration {
        pause(self.open.load(Ordering::Relaxed), self.stats.least_connections_elsewhere(self.role))
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
    fn only_a_worker_ahead_of_the_least_loaded_waits() {
        assert_eq!(pause(3, None), Duration::ZERO, "alone: never wait");
        assert_eq!(pause(3, Some(3)), Duration::ZERO);
        assert_eq!(pause(3, Some(5)), Duration::ZERO);
        assert_eq!(pause(4, Some(3)), Duration::from_millis(1));
        assert_eq!(pause(40, Some(0)), MAX_PAUSE);
    }

    #[test]
    fn counts_cross_the_region_and_a_stopped_worker_is_not_the_least() {
        let (region, _fd) = crate::sys::counters::Counters::create(crate::stats::region_words(4)).expect("region");
        let a = Stats::attach(region.clone(), 2, ProcessRole::Engine, 1);
        let b = Stats::attach(region.clone(), 3, ProcessRole::Engine, 2);
        let (ba, bb) = (AcceptBalance::new(a, ProcessRole::Engine), AcceptBalance::new(b, ProcessRole::Engine));
        assert_eq!(ba.wait(), Duration::ZERO, "b is not accepting yet");
        ba.accepting(true);
        bb.accepting(true);
        ba.opened();
        ba.opened();
        assert_eq!(ba.wait(), Duration::from_millis(2), "a holds two, b none");
        assert_eq!(bb.wait(), Duration::ZERO);
        bb.accepting(false);
        assert_eq!(ba.wait(), Duration::ZERO, "b stopped accepting");
        ba.closed(true);
        assert_eq!(ba.open.load(Ordering::Relaxed), 1);
    }
}
