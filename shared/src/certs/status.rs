//! What the supervisor knows about the served certificate, as plain data: the
//! engine workers read it (for `GET /`, readiness and `/metrics`) without any
//! TLS type, and `tandem cert status` prints it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Current time as unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Whole days in `seconds` left, as people count them: a day begun counts
/// (a 7-day certificate issued a minute ago has 7 days left, one with ten
/// hours left has 1), and an expired one has 0 or fewer.
pub fn days_left(seconds: i64) -> i64 {
    if seconds > 0 {
        (seconds + 86399) / 86400
    } else {
        seconds.div_euclid(86400)
    }
}

/// What an operator wants to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// SHA-256 of the leaf certificate's DER, lower-case hex.
    pub fingerprint: String,
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Subject alternative names (`DNS:x`, `IP:y`).
    pub sans: Vec<String>,
    /// Start of validity, unix seconds.
    pub not_before: i64,
    /// End of validity, unix seconds.
    pub not_after: i64,
    /// Public key algorithm and size, e.g. `RSA-2048` or `EC-256`.
    pub key_algorithm: String,
}

impl CertInfo {
    /// Seconds left until expiry (negative once expired).
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.not_after - now
    }

    /// Whether less than a third of the lifetime is left.
    pub fn needs_renewal(&self, now: i64) -> bool {
        let lifetime = (self.not_after - self.not_before).max(1);
        self.seconds_left(now) * 3 < lifetime
    }
}

/// The served certificate's state, written by the supervisor into the cache's
/// status file after every check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertStatus {
    /// The source as operators write it: `GENERATE`, `INDIRECT`, `PATH`, `CA` or `ACME`.
    pub mode: String,
    /// Where the certificate comes from, in words (a URL, a path, a CA's name).
    #[serde(default)]
    pub source: String,
    /// The served leaf.
    #[serde(flatten)]
    pub info: CertInfo,
    /// A generated stand-in is served because the configured source has not delivered.
    pub degraded: bool,
    /// The last failure of the source, if the last check failed.
    pub last_error: Option<String>,
    /// When the source was last checked, unix seconds.
    pub checked_at: i64,
    /// When the source will be checked next, unix seconds.
    #[serde(default)]
    pub next_check_at: i64,
}

impl CertStatus {
    /// The status the supervisor last recorded at `path`, when it is there and readable.
    pub fn read(path: &std::path::Path) -> Option<CertStatus> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// A JSON view with the remaining lifetime computed now.
    pub fn to_json(&self) -> serde_json::Value {
        let now = unix_now();
        let left = self.info.seconds_left(now);
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("seconds_left".into(), left.into());
            o.insert("days_left".into(), days_left(left).into());
            o.insert("renew_soon".into(), self.info.needs_renewal(now).into());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_begun_counts_and_an_expired_certificate_has_none() {
        assert_eq!(days_left(7 * 86400 - 60), 7);
        assert_eq!(days_left(10 * 3600), 1);
        assert_eq!(days_left(86400), 1);
        assert_eq!(days_left(0), 0);
        assert_eq!(days_left(-60), -1);
        assert_eq!(days_left(-86400), -1);
    }

    fn info(not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            fingerprint: "ab".into(),
            subject: "CN=x".into(),
            issuer: "CN=y".into(),
            sans: vec!["DNS:x".into()],
            not_before,
            not_after,
            key_algorithm: "EC-256".into(),
        }
    }

    #[test]
    fn renewal_is_due_with_a_third_of_the_lifetime_left() {
        let i = info(0, 300);
        assert!(!i.needs_renewal(199));
        assert!(i.needs_renewal(201));
        assert_eq!(i.seconds_left(310), -10);
    }

    #[test]
    fn the_status_file_reads_back_and_tolerates_older_writers() {
        let s = CertStatus {
            mode: "CA".into(),
            source: "tandem CA".into(),
            info: info(0, 10),
            degraded: false,
            last_error: None,
            checked_at: 5,
            next_check_at: 7,
        };
        let text = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<CertStatus>(&text).expect("back"), s);
        let older = text.replace(",\"source\":\"tandem CA\"", "").replace(",\"next_check_at\":7", "");
        assert_eq!(serde_json::from_str::<CertStatus>(&older).expect("older").next_check_at, 0);
    }
}
