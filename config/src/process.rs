//! The processes: how many workers, how long they drain, how they log, where the cache is.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scope::always;
use crate::{values, Reader};

/// The most workers tandem ever runs (`NUM_WORKERS` and `MAX_WORKERS` are at most this).
pub const MAX_WORKERS_LIMIT: usize = 256;

crate::declare! {
    NUM_WORKERS {
        default: "1",
        doc: "engine worker processes, or WORKER_COMMAND copies (1-256)",
        accepted: "an integer 1-256",
        scope: always,
    }
    MAX_WORKERS {
        default: "256",
        doc: "most workers SIGTTIN scales up to (NUM_WORKERS-256)",
        accepted: "an integer NUM_WORKERS-256",
        scope: always,
    }
    GRACEFUL_TIMEOUT {
        default: "30",
        doc: "seconds to drain on stop before SIGKILL",
        accepted: "seconds 0-86400, as a number (30) or with a unit s, m, h or d (30s, 2m, 1h)",
        scope: always,
    }
    LOG_LEVEL {
        default: "info",
        doc: "error, warn (or warning), info, debug, trace, or LEVEL,TARGET=LEVEL directives; off is refused",
        accepted: "a level (error, warn, info, debug, trace; warning, critical and fatal are read as warn and error) or a list of LEVEL and TARGET=LEVEL directives such as info,tandem_supervisor=debug; off is refused: it would hide fatal errors",
        scope: always,
    }
    LOG_FORMAT {
        default: "text",
        doc: "log format on stderr: text or json",
        accepted: "text or json",
        scope: always,
    }
    STRICT_CONFIG {
        default: "false",
        doc: "a variable that looks like tandem's but is not one (a misspelling) stops start-up (exit 2) instead of a warning",
        accepted: values::BOOL,
        scope: always,
    }
    MODEL_CACHE_DIR {
        default: "/var/cache/tandem (root), else $XDG_CACHE_HOME/tandem or ~/.cache/tandem",
        doc: "cache root; certificates live in ssl_certificates/ below it",
        accepted: "a directory path",
        scope: always,
    }
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The process section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Workers started (engine workers, or copies of `WORKER_COMMAND`).
    pub num_workers: usize,
    /// The most workers SIGTTIN adds up to.
    pub max_workers: usize,
    /// Drain time on stop before SIGKILL.
    pub graceful_timeout: Duration,
    /// Tracing filter directive.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Cache root.
    pub cache_dir: PathBuf,
    /// Whether a variable that looks like tandem's but is not one stops start-up.
    pub strict_config: bool,
}

impl Process {
    /// The certificate cache directory below the cache root.
    pub fn cert_dir(&self) -> PathBuf {
        self.cache_dir.join("ssl_certificates")
    }
}

/// Reads the process section.
pub fn parse(r: &mut Reader) -> Process {
    let num_workers = r.get(&NUM_WORKERS, 1, |v| values::range(v, 1, MAX_WORKERS_LIMIT));
    let max_workers = r.get_accepting(
        &MAX_WORKERS,
        &format!("an integer {num_workers}-{MAX_WORKERS_LIMIT} (at least NUM_WORKERS)"),
        MAX_WORKERS_LIMIT,
        |v| values::range(v, num_workers, MAX_WORKERS_LIMIT),
    );
    let graceful_timeout = r.get(&GRACEFUL_TIMEOUT, Duration::from_secs(30), |v| values::seconds(v, 0, 86400));
    let log_level = r.get(&LOG_LEVEL, "info".to_string(), values::log_filter);
    let log_format = r.get(&LOG_FORMAT, LogFormat::Text, |v| {
        values::one_of(v, &[("text", LogFormat::Text), ("json", LogFormat::Json)])
    });
    let default_cache = values::default_cache_dir(
        nix::unistd::geteuid().is_root(),
        r.ambient("XDG_CACHE_HOME").map(String::from),
        r.ambient("HOME").map(String::from),
    );
    let cache_dir = r.get(&MODEL_CACHE_DIR, default_cache, |v| Some(PathBuf::from(v)));
    let strict_config = r.get(&STRICT_CONFIG, false, values::parse_bool);
    if strict_config {
        let given = r.value(&STRICT_CONFIG).unwrap_or("true").to_string();
        for stranger in crate::unknown::find(r.given()) {
            r.bad(&STRICT_CONFIG, &given, format!("no variable that looks like tandem's but is not one; {stranger}"));
        }
    }
    Process { num_workers, max_workers, graceful_timeout, log_level, log_format, cache_dir, strict_config }
}
