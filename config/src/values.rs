//! Value parsers the sections share: booleans, ranges, durations, names, paths.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a boolean accepts.
pub const BOOL: &str = "true/false/1/0/yes/no (any case)";

/// Parses a boolean the way operators write them.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// A number in `lo..=hi`.
pub fn range<T: std::str::FromStr + PartialOrd>(v: &str, lo: T, hi: T) -> Option<T> {
    v.parse::<T>().ok().filter(|n| *n >= lo && *n <= hi)
}

/// A duration of `lo..=hi` seconds, written as seconds (`30`) or with a unit (`30s`, `2m`, `1h`, `1d`): every duration setting reads the same way.
pub fn seconds(v: &str, lo: u64, hi: u64) -> Option<Duration> {
    let d = lifetime(v)?;
    (lo..=hi).contains(&d.as_secs()).then_some(d)
}

/// A URL as it may be shown and logged: no user or password, and no query or
/// fragment (where tokens live), so `GET /`, `tandem check` and the log never
/// leak a credential.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("redacted"));
            }
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(a URL that does not parse)".to_string(),
    }
}

/// A port number.
pub fn port(v: &str) -> Option<u16> {
    v.parse().ok()
}

/// A lifetime written as seconds (`3600`) or with a unit (`90s`, `30m`, `12h`, `7d`).
pub fn lifetime(v: &str) -> Option<Duration> {
    let (digits, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => v.split_at(i),
        None => (v, ""),
    };
    let unit = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(unit).map(Duration::from_secs)
}

/// A regular file this process can open; checked without opening anything
/// else (opening a FIFO would block start-up for ever).
pub fn is_readable_file(p: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file())
        && std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(p).is_ok()
}

/// `v` as the path of a readable regular file.
pub fn readable_file(v: &str) -> Option<PathBuf> {
    let p = PathBuf::from(v);
    is_readable_file(&p).then_some(p)
}

/// One of `choices` (`(spelling, value)`), any case.
pub fn one_of<T: Copy>(v: &str, choices: &[(&str, T)]) -> Option<T> {
    let v = v.to_ascii_lowercase();
    choices.iter().find(|(s, _)| *s == v).map(|(_, t)| *t)
}

/// A comma-separated list, items trimmed, blanks dropped.
pub fn list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// A `Strict-Transport-Security` value RFC 6797 allows: `max-age` (required,
/// once) and the `includeSubDomains` / `preload` flags, separated by `;`.
pub fn valid_hsts(v: &str) -> bool {
    let mut max_age = 0;
    for d in v.split(';').map(str::trim) {
        let lower = d.to_ascii_lowercase();
        match lower.split_once('=') {
            Some(("max-age", n)) if !n.is_empty() && n.trim_matches('"').bytes().all(|b| b.is_ascii_digit()) => {
                max_age += 1
            }
            None if lower == "includesubdomains" || lower == "preload" => {}
            _ => return false,
        }
    }
    max_age == 1 && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// A level word as operators write it, as tracing spells it.
fn level_word(w: &str) -> Option<&'static str> {
    match w.trim().to_ascii_lowercase().as_str() {
        "error" | "critical" | "fatal" => Some("error"),
        "warn" | "warning" => Some("warn"),
        "info" => Some("info"),
        "debug" => Some("debug"),
        "trace" => Some("trace"),
        _ => None,
    }
}

/// `LOG_LEVEL` as a tracing filter: each directive is a level or `target=level`
/// (levels normalised; `off` and unknown words refused, since a filter that
/// does not parse as meant silences everything).
pub fn log_filter(v: &str) -> Option<String> {
    let mut out = Vec::new();
    for d in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.split_once('=') {
            Some((target, level)) if !target.is_empty() && !target.contains(char::is_whitespace) => {
                out.push(format!("{target}={}", level_word(level)?));
            }
            None => out.push(level_word(d)?.to_string()),
            _ => return None,
        }
    }
    let joined = out.join(",");
    (!out.is_empty() && tracing_subscriber::EnvFilter::try_new(&joined).is_ok()).then_some(joined)
}

/// Why a command's program cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// No program at all.
    #[error("the command is empty")]
    Empty,
    /// A path that is not an executable file.
    #[error("{0} is not an executable file")]
    NotExecutable(String),
    /// A bare name found in no directory of `PATH`.
    #[error("{program} is not on PATH ({path})")]
    NotOnPath {
        /// The name.
        program: String,
        /// The directories looked in.
        path: String,
    },
}

/// Where `program` (the first word of a `WORKER_COMMAND`) is: a path with a
/// `/` as it is, a bare name looked up in `path` (`PATH`, else the usual
/// directories).
pub fn find_program(program: &str, path: Option<&str>) -> Result<PathBuf, ProgramError> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.is_empty() {
        return Err(ProgramError::Empty);
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if runnable(&p) { Ok(p) } else { Err(ProgramError::NotExecutable(program.to_string())) };
    }
    let path = path.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| runnable(p))
        .ok_or_else(|| ProgramError::NotOnPath { program: program.to_string(), path: path.to_string() })
}

/// The cache root when `MODEL_CACHE_DIR` is not set: never the world-writable
/// `/tmp`, where another local user could plant it. Root (a container, a
/// system service) uses `/var/cache/tandem`; a user `$XDG_CACHE_HOME/tandem`,
/// else `~/.cache/tandem`.
pub fn default_cache_dir(root: bool, xdg_cache_home: Option<String>, home: Option<String>) -> PathBuf {
    if root {
        return PathBuf::from("/var/cache/tandem");
    }
    match (xdg_cache_home, home) {
        (Some(xdg), _) if Path::new(&xdg).is_absolute() => Path::new(&xdg).join("tandem"),
        (_, Some(home)) => Path::new(&home).join(".cache/tandem"),
        // No home at all: a directory of this user's own below /tmp, still checked by the cache.
        _ => PathBuf::from(format!("/tmp/tandem-{}", nix::unistd::geteuid())),
    }
}

/// A DNS name or wildcard as accepted in a certificate SAN.
pub fn is_dns_name(n: &str) -> bool {
    let (wildcard, n) = match n.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, n),
    };
    let labels: Vec<&str> = n.split('.').collect();
    let well_formed = !n.is_empty()
        && n.len() <= 253
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    // No top-level domain is all digits (such a name is a mistyped address),
    // and a wildcard needs a registered name under it (`*.com` would cover a
    // whole top-level domain).
    let numeric_tld = labels.last().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()));
    well_formed && !numeric_tld && (!wildcard || labels.len() >= 2)
}

/// A DNS name or an IP address.
pub fn is_name_or_address(n: &str) -> bool {
    n.parse::<IpAddr>().is_ok() || is_dns_name(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_refuse_numeric_tops_and_wildcards_over_a_whole_domain() {
        for ok in ["localhost", "api.example.com", "*.example.com", "a-1.b2.io", "xn--bcher-kva.example"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in
            ["*.com", "*", "*.", "123", "1.2.3", "10.0.0.300", "host.123", "-a.com", "a..b", "a_b.com", "*.*.com"]
        {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_default_cache_is_never_in_a_shared_tmp() {
        assert_eq!(default_cache_dir(true, None, Some("/root".into())), PathBuf::from("/var/cache/tandem"));
        let user =
            |x: Option<&str>, h: Option<&str>| default_cache_dir(false, x.map(String::from), h.map(String::from));
        assert_eq!(user(Some("/home/a/.xdg"), Some("/home/a")), PathBuf::from("/home/a/.xdg/tandem"));
        assert_eq!(user(Some("relative"), Some("/home/a")), PathBuf::from("/home/a/.cache/tandem"));
        assert_eq!(user(None, Some("/home/a")), PathBuf::from("/home/a/.cache/tandem"));
        assert!(user(None, None).to_string_lossy().starts_with("/tmp/tandem-"));
    }

    #[test]
    fn log_levels_are_words_operators_use() {
        assert_eq!(log_filter("warning").as_deref(), Some("warn"));
        assert_eq!(log_filter("CRITICAL").as_deref(), Some("error"));
        assert_eq!(log_filter("info, tandem_supervisor=Debug").as_deref(), Some("info,tandem_supervisor=debug"));
        assert_eq!(log_filter("off"), None);
        assert_eq!(log_filter("verbose"), None);
        assert_eq!(log_filter("tandem=loud"), None);
        assert_eq!(log_filter(""), None);
    }

    #[test]
    fn durations_take_units_and_bare_numbers_stay_seconds() {
        let s = |v| seconds(v, 0, 86400).map(|d| d.as_secs());
        assert_eq!(s("30"), Some(30));
        assert_eq!(s("30s"), Some(30));
        assert_eq!(s("2m"), Some(120));
        assert_eq!(s("1h"), Some(3600));
        assert_eq!(s("1d"), Some(86400));
        assert_eq!(s("2d"), None, "over the range with a unit as without");
        for bad in ["", "s", "-1", "1.5s", "30x", "+5", "1h30m"] {
            assert_eq!(s(bad), None, "{bad:?}");
        }
        assert_eq!(seconds("0s", 1, 10), None, "the floor holds");
    }

    #[test]
    fn hsts_values_are_checked() {
        assert!(valid_hsts("max-age=31536000"));
        assert!(valid_hsts("max-age=31536000; includeSubDomains; preload"));
        assert!(!valid_hsts("includeSubDomains"));
        assert!(!valid_hsts("max-age=abc"));
        assert!(!valid_hsts("max-age=1; max-age=2"));
        assert!(!valid_hsts("max-age=1\r\nSet-Cookie: x"));
    }
}
