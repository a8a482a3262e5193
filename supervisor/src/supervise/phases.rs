//! The supervisor's phases as pure decisions: from the phase, the clock and
//! what the loop has seen of each worker, when serving starts, what a stop
//! signal does and what a stop does next. The event loop carries the orders
//! out on real processes; the tests here need none.

use std::time::{Duration, Instant};

/// The supervisor's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for every worker's first `ready`.
    Starting,
    /// Serving.
    Running,
    /// Draining after SIGTERM/SIGINT, SIGKILL at the deadline.
    Stopping {
        /// When the remaining workers are killed.
        deadline: Instant,
    },
}

impl Phase {
    /// Whether a stop is under way.
    pub fn stopping(self) -> bool {
        matches!(self, Phase::Stopping { .. })
    }
}

/// What the loop has seen of one worker, as far as these decisions go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// It holds the front (the HTTPS worker, or the proxy worker with `WORKER_COMMAND`).
    pub front: bool,
    /// Its process runs (not yet reaped).
    pub running: bool,
    /// It was told to drain (or said it drains).
    pub draining: bool,
    /// It reported ready (or its probe did).
    pub ready: bool,
}

/// What the loop must do to the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// SIGTERM to the front only: it drains first, its requests in flight still need the engines.
    TermFront,
    /// SIGTERM to every running worker (each marked draining).
    TermAll,
    /// SIGKILL to every running worker not yet killed.
    KillAll,
    /// Every worker has stopped: the supervisor exits.
    Exit,
}

/// The phase after a worker became ready: serving starts (and is announced)
/// when every worker has been ready.
pub fn after_ready(phase: Phase, workers: &[Seen]) -> (Phase, bool) {
    if phase == Phase::Starting && workers.iter().all(|w| w.ready) {
        (Phase::Running, true)
    } else {
        (phase, false)
    }
}

/// A stop signal (SIGTERM, SIGINT): the first starts a drain of at most
/// `grace`, the front first when one runs; a second kills at once.
pub fn on_stop(phase: Phase, now: Instant, grace: Duration, workers: &[Seen]) -> (Phase, Order) {
    if phase.stopping() {
        return (phase, Order::KillAll);
    }
    let first = if workers.iter().any(|w| w.front && w.running) { Order::TermFront } else { Order::TermAll };
    (Phase::Stopping { deadline: now + grace }, first)
}

/// What a stop does next, checked after every wake: the engines' turn once
/// the front has gone, the exit once everyone has, SIGKILL at the deadline.
pub fn while_stopping(phase: Phase, now: Instant, workers: &[Seen]) -> Vec<Order> {
    let Phase::Stopping { deadline } = phase else { return Vec::new() };
    let mut orders = Vec::new();
    let front_gone = workers.iter().all(|w| !w.front || !w.running);
    if front_gone && workers.iter().any(|w| !w.front && w.running && !w.draining) {
        orders.push(Order::TermAll);
    }
    if workers.iter().all(|w| !w.running) {
        orders.push(Order::Exit);
        return orders;
    }
    if now >= deadline {
        orders.push(Order::KillAll);
    }
    orders
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Seen {
        Seen { running: true, ready: true, ..Seen::default() }
    }

    fn front() -> Seen {
        Seen { front: true, ..engine() }
    }

    #[test]
    fn serving_starts_when_the_last_worker_is_ready_and_only_then() {
        let starting = Seen { ready: false, ..engine() };
        assert_eq!(after_ready(Phase::Starting, &[engine(), starting, front()]), (Phase::Starting, false));
        assert_eq!(after_ready(Phase::Starting, &[engine(), engine(), front()]), (Phase::Running, true));
        // A restarted worker's ready later announces nothing again.
        assert_eq!(after_ready(Phase::Running, &[engine(), front()]), (Phase::Running, false));
        let deadline = Instant::now();
        let stopping = Phase::Stopping { deadline };
        assert_eq!(after_ready(stopping, &[engine()]), (stopping, false));
    }

    #[test]
    fn a_stop_drains_the_front_first_and_a_second_signal_kills() {
        let now = Instant::now();
        let grace = Duration::from_secs(30);
        let (phase, order) = on_stop(Phase::Running, now, grace, &[engine(), engine(), front()]);
        assert_eq!(phase, Phase::Stopping { deadline: now + grace });
        assert_eq!(order, Order::TermFront);
        // No front running (plain HTTP, or it already died): everyone at once.
        let dead_front = Seen { running: false, ..front() };
        assert_eq!(on_stop(Phase::Starting, now, grace, &[engine(), dead_front]).1, Order::TermAll);
        // The second signal keeps the deadline and kills.
        assert_eq!(on_stop(phase, now + grace / 2, grace, &[engine()]), (phase, Order::KillAll));
    }

    #[test]
    fn the_engines_stop_after_the_front_and_the_deadline_kills_what_remains() {
        let now = Instant::now();
        let phase = Phase::Stopping { deadline: now + Duration::from_secs(10) };
        let draining_front = Seen { draining: true, ..front() };
        assert_eq!(while_stopping(phase, now, &[engine(), draining_front]), [], "the front still drains");
        let gone_front = Seen { running: false, ..front() };
        assert_eq!(while_stopping(phase, now, &[engine(), gone_front]), [Order::TermAll]);
        let draining = Seen { draining: true, ..engine() };
        assert_eq!(while_stopping(phase, now, &[draining, gone_front]), [], "told once");
        let stopped = Seen { running: false, ..engine() };
        assert_eq!(while_stopping(phase, now, &[stopped, gone_front]), [Order::Exit]);
        let late = now + Duration::from_secs(11);
        assert_eq!(while_stopping(phase, late, &[draining, gone_front]), [Order::KillAll]);
        assert_eq!(while_stopping(phase, late, &[stopped, gone_front]), [Order::Exit], "nothing left to kill");
        assert_eq!(while_stopping(Phase::Running, late, &[engine()]), [], "not stopping: nothing to do");
    }
}
