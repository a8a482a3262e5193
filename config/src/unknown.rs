//! Variables that look like tandem's but are not one: a misspelling
//! (`ENABLE_SLL=true`) would otherwise do nothing, silently. They are found by
//! tandem's prefixes or by being one or two keystrokes from a declared name,
//! and named with the declared name they are closest to; start-up warns,
//! `tandem check` lists them and `STRICT_CONFIG=true` refuses to start.

use std::fmt;

/// Prefixes of tandem's variables: a variable with one of them that tandem
/// does not declare is most likely a misspelling.
pub const PREFIXES: &[&str] = &[
    "ACME_",
    "CORS_",
    "ENABLE_",
    "ENGINE_",
    "LOG_",
    "MAX_",
    "METRICS_",
    "MODEL_",
    "NUM_",
    "REPOSITORY_",
    "SHM_",
    "SSL_",
    "STRICT_",
    "TANDEM_",
    "WORKER_",
];

/// Variables with those prefixes that belong to someone else: OpenSSL's and
/// rustls' trust store, build tools' parallelism, tandem's own hand-over to
/// its workers.
const OTHERS: &[&str] = &["SSL_CERT_FILE", "SSL_CERT_DIR", "MAX_JOBS", "TANDEM_WORKER_SETTINGS"];

/// Common variables of a shell or a container that sit near a declared name
/// (`HOME` is two keystrokes from `HOST`).
const AMBIENT: &[&str] = &["HOME", "HOSTNAME", "HOSTTYPE", "PATH", "PWD", "OLDPWD", "TERM", "USER", "LANG", "SHELL"];

/// A variable that looks like tandem's and is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown {
    /// Its name as set.
    pub name: String,
    /// The declared name it is closest to, when it is close enough to be a misspelling.
    pub suggestion: Option<&'static str>,
}

impl fmt::Display for Unknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not one of tandem's variables", self.name.escape_debug())?;
        match self.suggestion {
            Some(s) => write!(f, " (did you mean {s}?)"),
            None => write!(f, " (tandem check lists them all)"),
        }
    }
}

/// Every variable of `vars` (name, value) that looks like tandem's and is not
/// one, sorted by name.
pub fn find<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Unknown> {
    let mut found: Vec<Unknown> = vars
        .into_iter()
        .filter(|(name, _)| !declared(name) && !OTHERS.contains(name) && !AMBIENT.contains(name))
        .filter(|(name, value)| !service_link(name, value))
        .filter_map(|(name, _)| {
            let suggestion = closest(name);
            let prefixed = PREFIXES.iter().any(|p| name.starts_with(p));
            (prefixed || suggestion.is_some()).then(|| Unknown { name: name.to_string(), suggestion })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found.dedup();
    found
}

/// [`find`] over the process environment (names and values that are not
/// UTF-8 are read as lossily as they are shown).
pub fn in_env() -> Vec<Unknown> {
    let vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    find(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

fn declared(name: &str) -> bool {
    crate::vars().any(|v| v.name == name)
}

/// The variables Kubernetes sets for every Service in the namespace
/// (`TANDEM_SERVICE_HOST`, `TANDEM_PORT=tcp://…`, `TANDEM_PORT_8080_TCP_ADDR`):
/// a Service named like a prefix must not read as a misspelling.
fn service_link(name: &str, value: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.contains("_SERVICE_PORT") {
        return true;
    }
    let url = ["tcp://", "udp://", "sctp://"].iter().any(|s| value.starts_with(s));
    if name.ends_with("_PORT") && url {
        return true;
    }
    // NAME_PORT_<number>_<PROTOCOL>[_PROTO|_PORT|_ADDR]
    name.split_once("_PORT_").is_some_and(|(_, rest)| {
        let mut parts = rest.split('_');
        parts.next().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && parts.next().is_some_and(|p| matches!(p, "TCP" | "UDP" | "SCTP"))
    })
}

/// The declared name `name` is a likely misspelling of: one keystroke away
/// (a letter wrong, missing, extra, or two swapped) for short names, two for
/// names of eight letters or more.
fn closest(name: &str) -> Option<&'static str> {
    let allowed = if name.len() >= 8 { 2 } else { 1 };
    crate::vars()
        .map(|v| (distance(name, v.name), v.name))
        .filter(|&(d, _)| d <= allowed)
        .min_by_key(|&(d, n)| (d, n))
        .map(|(_, n)| n)
}

/// The edit distance with adjacent swaps counted as one (optimal string alignment).
fn distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best =
                (d[(i - 1) * width + j] + 1).min(d[i * width + j - 1] + 1).min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(vars: &[(&str, &str)]) -> Vec<(String, Option<&'static str>)> {
        find(vars.iter().copied()).into_iter().map(|u| (u.name, u.suggestion)).collect()
    }

    #[test]
    fn misspellings_are_named_with_what_was_meant() {
        let found = names(&[
            ("ENABLE_SLL", "true"),
            ("NUM_WORKER", "2"),
            ("PROT", "8080"),
            ("SSL_CERTIFICAT", "GENERATE"),
            ("MODEL_NAME", "yolo"),
        ]);
        assert_eq!(
            found,
            [
                ("ENABLE_SLL".into(), Some("ENABLE_SSL")),
                ("MODEL_NAME".into(), None),
                ("NUM_WORKER".into(), Some("NUM_WORKERS")),
                ("PROT".into(), Some("PORT")),
                ("SSL_CERTIFICAT".into(), Some("SSL_CERTIFICATE")),
            ]
        );
        let text = find([("ENABLE_SLL", "true")])[0].to_string();
        assert_eq!(text, "ENABLE_SLL is not one of tandem's variables (did you mean ENABLE_SSL?)");
    }

    #[test]
    fn tandems_own_other_programs_and_kubernetes_variables_are_left_alone() {
        let quiet = [
            ("ENABLE_SSL", "true"),
            ("PORT", "8080"),
            ("HOME", "/root"),
            ("HOSTNAME", "pod-1"),
            ("PATH", "/usr/bin"),
            ("SSL_CERT_FILE", "/etc/ssl/certs/ca.pem"),
            ("TANDEM_WORKER_SETTINGS", "fd:3"),
            ("TANDEM_SERVICE_HOST", "10.0.0.1"),
            ("TANDEM_SERVICE_PORT_HTTP", "80"),
            ("TANDEM_PORT", "tcp://10.0.0.1:80"),
            ("TANDEM_PORT_80_TCP_ADDR", "10.0.0.1"),
            ("RUST_LOG", "debug"),
            ("LANG", "C.UTF-8"),
        ];
        assert_eq!(names(&quiet), []);
        // A prefix alone is enough; the same shape with another value is not a service link.
        assert_eq!(names(&[("TANDEM_PORT", "8080")]), [("TANDEM_PORT".into(), None)]);
    }

    #[test]
    fn the_distance_counts_a_swap_as_one_keystroke() {
        assert_eq!(distance("PORT", "PROT"), 1);
        assert_eq!(distance("ENABLE_SSL", "ENABLE_SLL"), 1);
        assert_eq!(distance("HOME", "HOST"), 2);
        assert_eq!(distance("", "PORT"), 4);
        assert_eq!(distance("PORT", "PORT"), 0);
    }
}
