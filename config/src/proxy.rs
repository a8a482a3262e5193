//! `WORKER_COMMAND`: copies of the operator's own HTTP server behind both ports, instead of the engine.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scope::proxy;
use crate::{values, Reader};

crate::declare! {
    WORKER_COMMAND {
        default: "unset (tandem's own engine)",
        doc: "run NUM_WORKERS copies of this HTTP server command line instead of the engine, behind both ports; {port}, {socket} and {worker} are filled in per copy (docs/PROXY.md)",
        accepted: "a command line whose program can run",
        scope: crate::scope::always,
    }
    WORKER_READY_PATH {
        default: "/",
        doc: "path a WORKER_COMMAND copy must answer with 2xx or 3xx before it gets requests, and keep answering while it runs",
        accepted: "an absolute path such as / or /health (no spaces or control characters)",
        scope: proxy,
    }
    WORKER_START_TIMEOUT {
        default: "120",
        doc: "seconds a WORKER_COMMAND copy has to become ready before it is restarted (1-86400)",
        accepted: "seconds 1-86400, as a number (30) or with a unit s, m, h or d (30s, 2m, 1h)",
        scope: proxy,
    }
}

/// The proxy section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proxy {
    /// `WORKER_COMMAND` (or `tandem run -- ...`): the server whose copies replace the engine.
    pub command: Option<Vec<String>>,
    /// Readiness and health path of the copies.
    pub ready_path: String,
    /// How long a copy may take to become ready.
    pub start_timeout: Duration,
}

/// Reads the proxy section (the command's program is looked up on `PATH`).
pub fn parse(r: &mut Reader) -> Proxy {
    let command = r.value(&WORKER_COMMAND).map(String::from).and_then(|v| {
        let checked = shell_words::split(&v)
            .map_err(|e| format!("a command line with balanced quotes ({e})"))
            .and_then(|argv| match argv.first() {
                Some(program) => values::find_program(program, r.ambient("PATH"))
                    .map(|_| argv.clone())
                    .map_err(|why| format!("a command whose program can run ({why})")),
                None => Err("a command line".to_string()),
            });
        match checked {
            Ok(argv) => Some(argv),
            Err(accepted) => {
                r.bad(&WORKER_COMMAND, &v, accepted);
                None
            }
        }
    });
    let ready_path = r.get(&WORKER_READY_PATH, "/".to_string(), |v| {
        (v.starts_with('/') && v.bytes().all(|b| b.is_ascii_graphic())).then(|| v.to_string())
    });
    let start_timeout = r.get(&WORKER_START_TIMEOUT, Duration::from_secs(120), |v| values::seconds(v, 1, 86400));
    Proxy { command, ready_path, start_timeout }
}
