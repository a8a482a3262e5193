//! Renewal timing as pure functions of the clock: when to look at a source
//! again, how to back off after a failure, when to warn about expiry.

use std::time::Duration;

use tandem_shared::certs::status::CertInfo;

/// First retry delay after a failed look, doubled per failure up to the ceiling.
pub const RETRY_START: Duration = Duration::from_secs(2);

/// When a source wants to be looked at after a good look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Every this often: files on disk, a download whose content may change.
    Every(Duration),
    /// The source renews its own certificate once this share of the lifetime
    /// has passed (`num / den`): look then.
    AtFraction {
        /// Numerator.
        num: i64,
        /// Denominator.
        den: i64,
    },
}

impl Refresh {
    /// Renewal once two thirds of the lifetime have passed (a third left).
    pub const TWO_THIRDS: Refresh = Refresh::AtFraction { num: 2, den: 3 };
}

/// The unix time at which a certificate valid `not_before..not_after` is due
/// under `refresh`, for sources that renew at a share of the lifetime.
pub fn due_at(refresh: Refresh, not_before: i64, not_after: i64) -> Option<i64> {
    match refresh {
        Refresh::Every(_) => None,
        Refresh::AtFraction { num, den } => {
            let lifetime = (not_after - not_before).max(0);
            Some(not_before + lifetime.saturating_mul(num) / den.max(1))
        }
    }
}

/// How long to wait before the next look at the source: after `failures`
/// failed looks in a row (0 after a good one), for the served certificate
/// `served`, never longer than `ceiling` nor shorter than a second.
/// (After a failure the wait is [`backoff`] from `first_retry`.)
pub fn next_check(
    refresh: Refresh,
    served: &CertInfo,
    now: i64,
    failures: u32,
    first_retry: Duration,
    ceiling: Duration,
) -> Duration {
    let ceiling = ceiling.max(Duration::from_secs(1));
    if failures > 0 {
        return backoff(first_retry, failures, ceiling);
    }
    let wait = match refresh {
        Refresh::Every(every) => every,
        Refresh::AtFraction { .. } => {
            let due = due_at(refresh, served.not_before, served.not_after).unwrap_or(now);
            Duration::from_secs(u64::try_from(due - now).unwrap_or(0))
        }
    };
    wait.clamp(Duration::from_secs(1), ceiling)
}

/// The delay after `failures` (at least one) failed looks in a row: `first`, doubled per failure, at most `ceiling`.
pub fn backoff(first: Duration, failures: u32, ceiling: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    first.saturating_mul(1u32 << doublings).min(ceiling)
}

/// Whether the served certificate is close enough to its end to warn: for a
/// source renewed elsewhere (files, downloads), once a third of the lifetime
/// is left; for a source tandem renews itself, once half the time between
/// the renewal point and expiry has passed without a renewal.
pub fn should_warn(refresh: Refresh, served: &CertInfo, now: i64) -> bool {
    match due_at(refresh, served.not_before, served.not_after) {
        None => served.needs_renewal(now),
        Some(due) => now >= due + (served.not_after - due) / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            fingerprint: String::new(),
            subject: String::new(),
            issuer: String::new(),
            sans: Vec::new(),
            not_before,
            not_after,
            key_algorithm: String::new(),
        }
    }

    const DAY: i64 = 86400;
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_self_renewing_source_is_looked_at_when_two_thirds_have_passed() {
        let week = cert(0, 7 * DAY);
        let due = 7 * DAY * 2 / 3;
        assert_eq!(due_at(Refresh::TWO_THIRDS, 0, 7 * DAY), Some(due));
        // Long before: the ceiling (so a changed configuration or clock is noticed).
        assert_eq!(next_check(Refresh::TWO_THIRDS, &week, 0, 0, RETRY_START, HOUR), HOUR);
        // Close to the point: exactly then.
        assert_eq!(next_check(Refresh::TWO_THIRDS, &week, due - 60, 0, RETRY_START, HOUR), Duration::from_secs(60));
        // Past it (renewal due, or it just failed to change): soon, never a busy loop.
        assert_eq!(next_check(Refresh::TWO_THIRDS, &week, due + 5, 0, RETRY_START, HOUR), Duration::from_secs(1));
        // A short pebble-style lifetime: a 30 s certificate is due 20 s in.
        let short = cert(1000, 1030);
        assert_eq!(next_check(Refresh::TWO_THIRDS, &short, 1000, 0, RETRY_START, HOUR), Duration::from_secs(20));
    }

    #[test]
    fn a_polled_source_is_looked_at_every_interval_within_the_ceiling() {
        let c = cert(0, 365 * DAY);
        let five = Duration::from_secs(5);
        assert_eq!(next_check(Refresh::Every(five), &c, 10, 0, RETRY_START, HOUR), five);
        assert_eq!(next_check(Refresh::Every(2 * HOUR), &c, 10, 0, RETRY_START, HOUR), HOUR);
        assert_eq!(next_check(Refresh::Every(Duration::ZERO), &c, 10, 0, RETRY_START, HOUR), Duration::from_secs(1));
    }

    #[test]
    fn failures_back_off_exponentially_to_the_ceiling() {
        let c = cert(0, 7 * DAY);
        let waits: Vec<u64> = (1..=8)
            .map(|f| next_check(Refresh::TWO_THIRDS, &c, 0, f, RETRY_START, Duration::from_secs(60)).as_secs())
            .collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(RETRY_START, u32::MAX, HOUR), HOUR, "no overflow");
        // ACME starts at a minute: five failures take half an hour (Let's Encrypt allows five an hour).
        let acme: Duration = (1..=5).map(|f| backoff(Duration::from_secs(60), f, Duration::from_secs(86400))).sum();
        assert_eq!(acme, Duration::from_secs(60 + 120 + 240 + 480 + 960));
    }

    #[test]
    fn expiry_warnings_start_when_renewal_is_overdue() {
        let year = cert(0, 360 * DAY);
        // Files or a download: a third left.
        assert!(!should_warn(Refresh::Every(HOUR), &year, 239 * DAY));
        assert!(should_warn(Refresh::Every(HOUR), &year, 241 * DAY));
        // Renewed by tandem at two thirds (day 240): warn from day 300 on.
        assert!(!should_warn(Refresh::TWO_THIRDS, &year, 250 * DAY));
        assert!(should_warn(Refresh::TWO_THIRDS, &year, 300 * DAY));
    }
}
