//! Whole-server statistics: the layout of the shared counters region
//! ([`crate::sys::counters`]), the writers each process uses on its hot path,
//! and the reader that sums every process into one [`Snapshot`].
//!
//! The region holds one fixed-size block per process (the supervisor, the
//! HTTPS worker, one per engine worker slot). A process only adds to its own
//! block with relaxed atomic adds, so nothing on the hot path takes a lock. A
//! restarted worker gets its slot's block back and carries on adding, so the
//! totals never go backwards. Whoever answers `/metrics` or `/stats` sums every
//! block in use.
//!
//! Every word is a counter updated with `fetch_add`, except the few gauges in
//! a block's header, so two processes sharing a block (only when more workers
//! run than blocks exist) still count correctly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::sys::counters::Counters;

/// Upper bounds (seconds) of the request-duration histograms; a last bucket takes the rest.
pub const DURATION_BOUNDS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BUCKETS: usize = DURATION_BOUNDS.len() + 1;

/// The API's route templates, literal ones before the templates they would also
/// match (`/v2/models/stats` before `/v2/models/{name}`); a path that matches
/// none is counted as `other`.
pub const ROUTES: &[&str] = &[
    "/",
    "/metrics",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/repository/index",
    "/v2/repository/models/{name}/load",
    "/v2/repository/models/{name}/unload",
    "/v2/models/stats",
    "/v2/models/{name}",
    "/v2/models/{name}/ready",
    "/v2/models/{name}/config",
    "/v2/models/{name}/stats",
    "/v2/models/{name}/infer",
    "/v2/models/{name}/versions/{version}",
    "/v2/models/{name}/versions/{version}/ready",
    "/v2/models/{name}/versions/{version}/config",
    "/v2/models/{name}/versions/{version}/stats",
    "/v2/models/{name}/versions/{version}/infer",
    "/v2/systemsharedmemory/status",
    "/v2/systemsharedmemory/unregister",
    "/v2/systemsharedmemory/region/{name}/status",
    "/v2/systemsharedmemory/region/{name}/register",
    "/v2/systemsharedmemory/region/{name}/unregister",
    "/v2/cudasharedmemory/status",
    "/v2/cudasharedmemory/unregister",
    "/v2/cudasharedmemory/region/{name}/status",
    "/v2/cudasharedmemory/region/{name}/register",
    "/v2/cudasharedmemory/region/{name}/unregister",
    // The gRPC face, by call (each path is its own template; an unknown call is `{method}`).
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/inference.GRPCInferenceService/ModelConfig",
    "/inference.GRPCInferenceService/ModelStatistics",
    "/inference.GRPCInferenceService/RepositoryIndex",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
    "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
    "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
    "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
    "/inference.GRPCInferenceService/CudaSharedMemoryStatus",
    "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
    "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
    "/inference.GRPCInferenceService/TraceSetting",
    "/inference.GRPCInferenceService/LogSettings",
    "/inference.GRPCInferenceService/{method}",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/{method}",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "other",
];

/// The protocol a route of [`ROUTES`] is served in: `grpc` or `http`.
pub fn protocol(route: &str) -> &'static str {
    if route.starts_with("/inference.") || route.starts_with("/grpc.") {
        "grpc"
    } else {
        "http"
    }
}
const NR: usize = ROUTES.len();
/// Methods counted by name; the rest are `other`.
pub const METHODS: &[&str] = &["GET", "POST", "HEAD", "other"];
const NM: usize = METHODS.len();
/// Status codes counted by number; the rest are `other` (index `STATUSES.len()`).
pub const STATUSES: &[u16] = &[200, 204, 308, 400, 401, 403, 404, 405, 408, 413, 415, 429, 500, 501, 502, 503, 504];
const NS: usize = STATUSES.len() + 1;
/// Where a request arrived: the plain port, the HTTPS port over TCP, or the
/// HTTPS port's number over UDP (HTTP/3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `PORT` (and `GRPC_PORT`).
    Http = 0,
    /// `SSL_PORT`, TLS over TCP.
    Https = 1,
    /// `SSL_PORT`, QUIC over UDP (`SSL_HTTP3`).
    H3 = 2,
}

/// The `listener` label of each [`Listener`]: HTTP/3 arrives on the HTTPS port.
pub const LISTENERS: [&str; 3] = ["http", "https", "https"];
const NL: usize = LISTENERS.len();

/// The `protocol` label of a request counted under `listener` for `route`:
/// `h3` for HTTP/3, else `grpc` or `http` ([`protocol`]).
fn protocol_of(listener: usize, route: &str) -> &'static str {
    if listener == Listener::H3 as usize {
        "h3"
    } else {
        protocol(route)
    }
}

/// Ring events the HTTPS worker counts.
pub const RING_EVENTS: &[&str] =
    &["waits", "busy_503", "timeout_504", "resubmissions", "too_large_413", "engine_failed_502"];
/// TLS protocol versions counted by name.
pub const TLS_PROTOCOLS: [&str; 2] = ["TLSv1.2", "TLSv1.3"];
/// ALPN results counted by name.
pub const TLS_ALPN: [&str; 4] = ["h2", "http/1.1", "h3", "none"];
/// Why a TLS handshake failed.
pub const TLS_FAILURES: &[&str] = &[
    "eof",
    "reset",
    "timeout",
    "invalid_message",
    "incompatible",
    "alert_received",
    "bad_certificate",
    "plain_http",
    "other",
];
#[cfg(test)]
mod documented {
    /// OBSERVABILITY.md explains every reason a handshake is counted under.
    #[test]
    fn every_handshake_failure_reason_is_documented() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OBSERVABILITY.md");
        let doc = std::fs::read_to_string(path).expect("docs/OBSERVABILITY.md");
        for reason in super::TLS_FAILURES {
            assert!(doc.contains(&format!("| `{reason}` |")), "OBSERVABILITY.md does not explain reason {reason}");
        }
        for cause in super::RESTART_CAUSES {
            assert!(doc.contains(&format!("`{cause}`")), "OBSERVABILITY.md does not name restart cause {cause}");
        }
    }
}

/// What the front door's access control counts (API keys, rate limits, model concurrency caps).
pub const ACCESS_EVENTS: &[&str] = &[
    "missing_key",
    "invalid_key",
    "rate_limited_key",
    "rate_limited_certificate",
    "rate_limited_address",
    "model_busy",
];

/// Indices into [`ACCESS_EVENTS`], for [`Stats::access`] and [`Snapshot::access`].
pub mod access_event {
    /// A 401: no API key.
    pub const MISSING_KEY: usize = 0;
    /// A 401: a key that is not valid (or not a key at all).
    pub const INVALID_KEY: usize = 1;
    /// A 429 from `RATE_LIMIT`, to a client known by its API key.
    pub const RATE_LIMITED_KEY: usize = 2;
    /// A 429 from `RATE_LIMIT`, to a client known by its certificate.
    pub const RATE_LIMITED_CERTIFICATE: usize = 3;
    /// A 429 from `RATE_LIMIT`, to a client known by its address.
    pub const RATE_LIMITED_ADDRESS: usize = 4;
    /// A 429 from a model's `max_inflight`.
    pub const MODEL_BUSY: usize = 5;
}
const _: () = assert!(
    ACCESS_EVENTS[access_event::MODEL_BUSY].len() == "model_busy".len()
        && ACCESS_EVENTS[access_event::RATE_LIMITED_ADDRESS].len() == "rate_limited_address".len()
);

/// Why a worker was restarted.
pub const RESTART_CAUSES: [&str; 2] = ["exited", "signalled"];

/// Which process a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProcessRole {
    /// The supervisor.
    Supervisor = 1,
    /// The HTTPS worker.
    Https = 2,
    /// An engine (HTTP) worker.
    Engine = 3,
    /// The proxy worker in front of `WORKER_COMMAND` copies.
    Proxy = 4,
    /// A `WORKER_COMMAND` copy (its block is claimed by the supervisor; it counts nothing itself).
    App = 5,
}

impl ProcessRole {
    /// The label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ProcessRole::Supervisor => "supervisor",
            ProcessRole::Https => "https-worker",
            ProcessRole::Engine => "engine-worker",
            ProcessRole::Proxy => "proxy-worker",
            ProcessRole::App => "worker-command",
        }
    }

    fn from_word(w: u64) -> Option<ProcessRole> {
        match w {
            1 => Some(ProcessRole::Supervisor),
            2 => Some(ProcessRole::Https),
            3 => Some(ProcessRole::Engine),
            4 => Some(ProcessRole::Proxy),
            5 => Some(ProcessRole::App),
            _ => None,
        }
    }
}

// ---- block layout (in 64-bit words) ----
const H_ROLE: usize = 0;
const H_PID: usize = 1;
const H_WORKER_ID: usize = 2;
const H_RSS: usize = 3;
const H_FDS: usize = 4;
const H_STARTED_MS: usize = 5;
const H_MODELS_USED: usize = 6;
/// Requests this block's process answered, plain HTTP then HTTPS (two words).
const H_ANSWERED: usize = 7;
/// Connections the process holds now; [`NOT_ACCEPTING`] while it does not accept.
const H_CONNS: usize = 9;
/// An engine worker's readiness as it last published it: 0 not yet, 1 ready, 2 not ready.
const H_READY: usize = 10;
/// Requests the process is answering now (to their response headers).
const H_IN_FLIGHT: usize = 11;
/// The process's serving threads asleep now, waiting for work (engine workers).
const H_PARKED: usize = 12;
const HEADER: usize = 16;

/// [`H_CONNS`] of a process that is not accepting (starting, draining, gone).
const NOT_ACCEPTING: u64 = u64::MAX;
const REQ: usize = HEADER;
const REQ_WORDS: usize = NL * NR * NM * NS;
const DUR: usize = REQ + REQ_WORDS;
/// Per listener and route: the buckets, then the sum in nanoseconds.
const DUR_WORDS: usize = NL * NR * (BUCKETS + 1);
const RING: usize = DUR + DUR_WORDS;
const RING_WORDS: usize = 8;
const TLS_OK: usize = RING + RING_WORDS;
const TLS_FAIL: usize = TLS_OK + TLS_PROTOCOLS.len() * TLS_ALPN.len();
const TLS_FAIL_WORDS: usize = 12;
const TLS_RELOAD: usize = TLS_FAIL + TLS_FAIL_WORDS; // ok, refused, unix time of the last ok
const SUP: usize = TLS_RELOAD + 3;
const SUP_RESTARTS: usize = SUP; // [role 2][cause 2]
const SUP_CERT_NOT_AFTER: usize = SUP + 4;
const SUP_CERT_CHECKS: usize = SUP + 5;
const SUP_CERT_SOURCE_ERRORS: usize = SUP + 6;
const SUP_CERT_PUBLISHED: usize = SUP + 7;
const ACCESS: usize = SUP + 8;
const ACCESS_WORDS: usize = 8;
const MODELS: usize = (ACCESS + ACCESS_WORDS).next_multiple_of(8);
/// Model versions counted per process; more are served but not counted (logged once).
pub const MODEL_ENTRIES: usize = 256;
const NAME_WORDS: usize = 32;
const E_STATE: usize = 0;
const E_VERSION: usize = 1;
const E_NAME_LEN: usize = 2;
const E_NAME: usize = 3;
const E_COUNTERS: usize = E_NAME + NAME_WORDS;
/// Where a model entry's batch sizes start: [`BATCH_SLOTS`] of [`BATCH_WORDS`]
/// (the size, its executions, and their input, infer and output nanoseconds).
const E_BATCH: usize = 72;
/// Distinct batch sizes counted per model version and process (Triton's
/// `batch_stats`); executions of further sizes count everywhere else.
pub const BATCH_SLOTS: usize = 16;
const BATCH_WORDS: usize = 5;
const ENTRY_WORDS: usize = E_BATCH + BATCH_SLOTS * BATCH_WORDS;
/// Named API keys counted one by one in each block; the rest count as [`OTHER_CLIENTS`].
pub const CLIENT_ENTRIES: usize = 64;
/// The `client` label of keys past [`CLIENT_ENTRIES`].
pub const OTHER_CLIENTS: &str = "(other)";
const CLIENTS: usize = MODELS + MODEL_ENTRIES * ENTRY_WORDS;
const CLIENT_NAME_WORDS: usize = 8;
/// Answers to one client by class (2xx, 3xx, 4xx, 5xx), then its 429s from the rate limit.
const CLIENT_COUNTERS: usize = 5;
/// Where a client's 429s from the rate limit are among its counters ([`Snapshot::clients`]).
pub const CLIENT_RATE_LIMITED: usize = 4;
const CLIENT_ENTRY_WORDS: usize = 16;
/// The states of an engine worker's models, as it last published them
/// ([`Stats::publish_models`]): for readers without an engine of their own
/// (the supervisor's `METRICS_PORT`).
const STATES: usize = CLIENTS + CLIENT_ENTRIES * CLIENT_ENTRY_WORDS;
/// Models whose state each engine worker publishes; more serve, unlisted there.
pub const STATE_ENTRIES: usize = 128;
const E_MODEL_STATE: usize = E_NAME + NAME_WORDS;
const STATE_ENTRY_WORDS: usize = 40;
const BLOCK_WORDS: usize = (STATES + STATE_ENTRIES * STATE_ENTRY_WORDS).next_multiple_of(512);
const _: () = assert!(E_MODEL_STATE < STATE_ENTRY_WORDS);
const _: () = assert!(E_NAME + CLIENT_NAME_WORDS + CLIENT_COUNTERS <= CLIENT_ENTRY_WORDS);
const _: () = assert!(tandem_config::access::MAX_KEY_NAME <= CLIENT_NAME_WORDS * 8);
const _: () = assert!(ACCESS_EVENTS.len() <= ACCESS_WORDS);
const _: () = assert!(TLS_FAILURES.len() <= TLS_FAIL_WORDS && RING_EVENTS.len() <= RING_WORDS);
const _: () = assert!(E_COUNTERS + ModelCounter::COUNT + BUCKETS <= E_BATCH);

/// A model's state as an engine worker publishes it; a greater one is better
/// (over several workers, the best is the server's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ModelState {
    /// Unloaded on purpose (model control): not an outage.
    Unloaded = 1,
    /// Meant to serve but cannot (its reason is in the repository index).
    Unavailable = 2,
    /// A version serves.
    Ready = 3,
}

impl ModelState {
    /// The word for it in the region.
    fn from_word(w: u64) -> Option<ModelState> {
        match w {
            1 => Some(ModelState::Unloaded),
            2 => Some(ModelState::Unavailable),
            3 => Some(ModelState::Ready),
            _ => None,
        }
    }

    /// How people read it.
    pub fn label(self) -> &'static str {
        match self {
            ModelState::Unloaded => "unloaded",
            ModelState::Unavailable => "unavailable",
            ModelState::Ready => "ready",
        }
    }
}

const ENTRY_FREE: u64 = 0;
const ENTRY_WRITING: u64 = 1;
const ENTRY_READY: u64 = 2;

/// A request counted in flight ([`Stats::in_flight`]) until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// The counters kept per model version (Triton's statistics, plus a histogram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelCounter {
    /// Inferences (batch items) run.
    InferenceCount,
    /// Executions of the model (one per batch).
    ExecutionCount,
    /// Successful requests and their total time.
    SuccessCount,
    /// Nanoseconds of successful requests.
    SuccessNs,
    /// Failed requests.
    FailCount,
    /// Nanoseconds of failed requests.
    FailNs,
    /// Requests that waited for the engine, and how long.
    QueueCount,
    /// Nanoseconds waiting.
    QueueNs,
    /// Input decoding.
    InputCount,
    /// Nanoseconds decoding inputs.
    InputNs,
    /// Model execution.
    InferCount,
    /// Nanoseconds executing.
    InferNs,
    /// Output encoding.
    OutputCount,
    /// Nanoseconds encoding outputs.
    OutputNs,
    /// Unix time in milliseconds of the last inference.
    LastInferenceMs,
}

impl ModelCounter {
    /// How many counters there are.
    pub const COUNT: usize = 15;
}

/// Buckets of the rate limiter's table, shared by every process (after the blocks).
pub const LIMIT_BUCKETS: usize = 8192;
/// The limiter's area: a header (word 0: the seed of its hash), then two words
/// per bucket (the client's hash, its theoretical arrival time), then one
/// overflow bucket for clients that find no place.
const LIMIT_HEADER: usize = 8;
const LIMIT_WORDS: usize = LIMIT_HEADER + 2 * (LIMIT_BUCKETS + 1);

/// How many words a region for `blocks` processes needs.
pub fn region_words(blocks: usize) -> usize {
    blocks * BLOCK_WORDS + LIMIT_WORDS
}

fn blocks_in(words: &[AtomicU64]) -> usize {
    words.len().saturating_sub(LIMIT_WORDS) / BLOCK_WORDS
}

/// Prepares a new region (the supervisor, once): the rate limiter's random
/// seed, so that no client can choose addresses that share its buckets.
pub fn init_region(region: &Counters) {
    let mut seed = [0u8; 8];
    // Without the system's randomness the seed is the clock: still not known from outside.
    if aws_lc_rs::rand::fill(&mut seed).is_err() {
        seed = unix_ms().wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes();
    }
    if let Some(w) = region.words().get(blocks_in(region.words()) * BLOCK_WORDS) {
        w.store(u64::from_le_bytes(seed) | 1, Relaxed);
    }
}

/// The rate limiter's area of `region`: its seed, and the bucket words after [`LIMIT_HEADER`].
pub fn limiter_area(region: &Counters) -> (u64, &[AtomicU64]) {
    let words = region.words();
    let start = blocks_in(words) * BLOCK_WORDS;
    let area = &words[start.min(words.len())..];
    let seed = area.first().map_or(0, |w| w.load(Relaxed));
    (seed, area.get(LIMIT_HEADER..).unwrap_or_default())
}

/// Blocks the supervisor creates for `max_workers` engine workers: its own, the
/// HTTPS worker's, one per engine worker and a few for workers still draining
/// when their replacements start.
pub fn blocks_for(max_workers: usize) -> usize {
    2 + max_workers + 4
}

/// The supervisor's block.
pub const SUPERVISOR_BLOCK: usize = 0;
/// The HTTPS worker's block.
pub const HTTPS_BLOCK: usize = 1;
/// The first engine worker block.
pub const FIRST_ENGINE_BLOCK: usize = 2;

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn bucket(d: Duration) -> usize {
    let s = d.as_secs_f64();
    DURATION_BOUNDS.iter().position(|&b| s <= b).unwrap_or(DURATION_BOUNDS.len())
}

/// The index of `path`'s route template in [`ROUTES`] (`other` when none matches).
pub fn route_index(path: &str) -> usize {
    // The common case first, with no scan of the table: an inference.
    if let Some(rest) = path.strip_prefix("/v2/models/") {
        if let Some(name) = rest.strip_suffix("/infer") {
            if !name.is_empty() && !name.contains('/') {
                return INFER_ROUTE;
            }
        }
    }
    let path = path.trim_end_matches('/');
    // A route without a parameter (every gRPC call) is its own template: an
    // exact comparison, no split (the split scan was 3% of an engine
    // worker's time under gRPC load).
    if let Some(i) = ROUTES.iter().position(|t| *t == path) {
        return i;
    }
    ROUTES
        .iter()
        .position(|t| {
            let (mut ts, mut ps) = (t.trim_end_matches('/').split('/'), path.split('/'));
            loop {
                match (ts.next(), ps.next()) {
                    (None, None) => return true,
                    (Some(t), Some(p)) if (t.starts_with('{') && !p.is_empty()) || t == p => {}
                    _ => return false,
                }
            }
        })
        .unwrap_or(NR - 1)
}

/// `/v2/models/{name}/infer` in [`ROUTES`].
const INFER_ROUTE: usize = 13;
const _: () = assert!(ROUTES[INFER_ROUTE].len() == "/v2/models/{name}/infer".len());

fn method_index(m: &str) -> usize {
    METHODS.iter().position(|x| *x == m).unwrap_or(NM - 1)
}

fn status_index(s: u16) -> usize {
    STATUSES.iter().position(|x| *x == s).unwrap_or(NS - 1)
}

/// One process's handle on its block.
#[derive(Debug, Clone)]
pub struct Stats {
    region: Arc<Counters>,
    base: usize,
}

impl Stats {
    /// The handle on block `block` of `region`, claimed for the calling process.
    pub fn attach(region: Arc<Counters>, block: usize, role: ProcessRole, worker_id: u64) -> Stats {
        Self::attach_for(region, block, role, worker_id, std::process::id())
    }

    /// The handle on block `block`, claimed for process `pid` (the supervisor
    /// claims the blocks of `WORKER_COMMAND` copies, which know nothing of them).
    pub fn attach_for(region: Arc<Counters>, block: usize, role: ProcessRole, worker_id: u64, pid: u32) -> Stats {
        let blocks = blocks_in(region.words());
        let s = Stats { region, base: block.min(blocks.saturating_sub(1)) * BLOCK_WORDS };
        s.set(H_ROLE, role as u64);
        s.set(H_PID, u64::from(pid));
        s.set(H_WORKER_ID, worker_id);
        s.set(H_STARTED_MS, unix_ms());
        s.set(H_CONNS, NOT_ACCEPTING);
        s.set(H_READY, 0);
        s.set(H_IN_FLIGHT, 0);
        s.set(H_PARKED, 0);
        s
    }

    /// Counts a request in flight until the guard is dropped (answered, or
    /// given up when its client went away).
    pub fn in_flight(&self) -> InFlight<'_> {
        let word = self.w(H_IN_FLIGHT);
        word.fetch_add(1, Relaxed);
        InFlight(word)
    }

    /// The whole region, for reading a [`Snapshot`].
    pub fn region(&self) -> &Counters {
        &self.region
    }

    fn w(&self, i: usize) -> &AtomicU64 {
        &self.region.words()[self.base + i]
    }

    fn add(&self, i: usize, n: u64) {
        self.w(i).fetch_add(n, Relaxed);
    }

    fn set(&self, i: usize, v: u64) {
        self.w(i).store(v, Relaxed);
    }

    /// Counts one HTTP request answered by this process.
    pub fn request(&self, listener: Listener, route: usize, method: &str, status: u16, took: Duration) {
        let l = listener as usize;
        self.add(H_ANSWERED + l.min(1), 1);
        let route = route.min(NR - 1);
        self.add(REQ + ((l * NR + route) * NM + method_index(method)) * NS + status_index(status), 1);
        let d = DUR + (l * NR + route) * (BUCKETS + 1);
        self.add(d + bucket(took), 1);
        self.add(d + BUCKETS, nanos(took));
    }

    /// Publishes how many connections this process holds (None: it does not accept).
    pub fn set_connections(&self, open: Option<u64>) {
        self.set(H_CONNS, open.unwrap_or(NOT_ACCEPTING));
    }

    /// One of this process's serving threads goes to sleep (`parked`) or wakes.
    pub fn serving_thread_parked(&self, parked: bool) {
        let word = self.w(H_PARKED);
        if parked {
            word.fetch_add(1, Relaxed);
        } else {
            // Never below zero: a wrapped count would read as idle for ever.
            let _ = word.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
    }

    /// The least-loaded other live, accepting process of `role`: the
    /// connections it holds, and whether one of its serving threads is asleep
    /// now (it would take a new connection at once). Among equals, one that
    /// is asleep.
    pub fn least_loaded_elsewhere(&self, role: ProcessRole) -> Option<(u64, bool)> {
        let words = self.region.words();
        (0..blocks_in(words))
            .map(|b| b * BLOCK_WORDS)
            .filter(|&b| b != self.base)
            .filter(|&b| words[b + H_ROLE].load(Relaxed) == role as u64 && words[b + H_PID].load(Relaxed) != 0)
            .map(|b| (words[b + H_CONNS].load(Relaxed), words[b + H_PARKED].load(Relaxed) > 0))
            .filter(|&(n, _)| n != NOT_ACCEPTING)
            .min_by_key(|&(n, idle)| (n, !idle))
    }

    /// Counts a ring event (index into [`RING_EVENTS`]).
    pub fn ring(&self, event: usize) {
        self.add(RING + event.min(RING_WORDS - 1), 1);
    }

    /// Counts a completed TLS handshake.
    pub fn tls_handshake(&self, protocol: usize, alpn: usize) {
        self.add(TLS_OK + protocol.min(1) * TLS_ALPN.len() + alpn.min(TLS_ALPN.len() - 1), 1);
    }

    /// Counts a failed TLS handshake (index into [`TLS_FAILURES`]).
    pub fn tls_failure(&self, reason: usize) {
        self.add(TLS_FAIL + reason.min(TLS_FAILURES.len() - 1), 1);
    }

    /// Counts a certificate reload in the HTTPS worker.
    pub fn tls_reload(&self, ok: bool) {
        self.add(TLS_RELOAD + usize::from(!ok), 1);
        if ok {
            self.w(TLS_RELOAD + 2).fetch_max(unix_ms() / 1000, Relaxed);
        }
    }

    /// Publishes this engine worker's readiness and the state of each of its
    /// models (what `/v2/health/ready` and the repository index say), for
    /// readers that have no engine (`METRICS_PORT`). A model no longer listed
    /// is taken off; past [`STATE_ENTRIES`] names, the rest are not published.
    pub fn publish_models(&self, ready: bool, models: &[(&str, ModelState)]) {
        for (name, state) in models {
            if let Some((_, e)) = self.claim(STATES, STATE_ENTRIES, STATE_ENTRY_WORDS, NAME_WORDS, name, 0) {
                self.set(e + E_MODEL_STATE, *state as u64);
            }
        }
        for i in 0..STATE_ENTRIES {
            let e = STATES + i * STATE_ENTRY_WORDS;
            if self.w(e + E_STATE).load(std::sync::atomic::Ordering::Acquire) == ENTRY_READY
                && !models.iter().any(|(name, _)| self.name_is(e, name.as_bytes()))
            {
                self.set(e + E_MODEL_STATE, 0);
            }
        }
        self.set(H_READY, if ready { 1 } else { 2 });
    }

    /// Counts a worker restart (supervisor).
    pub fn restart(&self, https: bool, signalled: bool) {
        self.add(SUP_RESTARTS + usize::from(https) * 2 + usize::from(signalled), 1);
    }

    /// Records a check of the certificate source and, when known, the served certificate's expiry.
    pub fn cert_checked(&self, not_after_unix: Option<i64>, error: bool, published: bool) {
        if let Some(t) = not_after_unix {
            self.set(SUP_CERT_NOT_AFTER, t.max(0) as u64);
        }
        self.add(SUP_CERT_CHECKS, 1);
        if error {
            self.add(SUP_CERT_SOURCE_ERRORS, 1);
        }
        if published {
            self.add(SUP_CERT_PUBLISHED, 1);
        }
    }

    /// Stores this process's resident memory and open descriptors.
    pub fn process_gauges(&self, rss_bytes: u64, fds: u64) {
        self.set(H_RSS, rss_bytes);
        self.set(H_FDS, fds);
    }

    /// Marks block `block` as no longer run by a live process (the supervisor, on reaping it).
    pub fn vacate(region: &Counters, block: usize) {
        let base = block * BLOCK_WORDS;
        if let Some(words) = region.words().get(base..base + HEADER) {
            for i in [H_PID, H_RSS, H_FDS, H_READY, H_IN_FLIGHT, H_PARKED] {
                words[i].store(0, Relaxed);
            }
            words[H_CONNS].store(NOT_ACCEPTING, Relaxed);
        }
    }

    /// The counters of model `name` version `version` in this block, claiming an
    /// entry the first time. `None` when every entry is taken or the name is too long.
    pub fn model(&self, name: &str, version: u64) -> Option<ModelStats> {
        let (i, e) = self.claim(MODELS, MODEL_ENTRIES, ENTRY_WORDS, NAME_WORDS, name, version)?;
        self.w(H_MODELS_USED).fetch_max(i as u64 + 1, Relaxed);
        Some(ModelStats { stats: self.clone(), entry: e })
    }

    /// Counts an answer (`status`) to the client of the API key `name`.
    pub fn client_answer(&self, name: &str, status: u16) {
        let class = match status {
            300..=399 => 1,
            400..=499 => 2,
            500.. => 3,
            _ => 0,
        };
        if let Some(e) = self.client_entry(name) {
            self.add(e + E_NAME + CLIENT_NAME_WORDS + class, 1);
        }
    }

    /// Counts a 429 the rate limit gave the client of the API key `name`.
    pub fn client_limited(&self, name: &str) {
        if let Some(e) = self.client_entry(name) {
            self.add(e + E_NAME + CLIENT_NAME_WORDS + CLIENT_RATE_LIMITED, 1);
        }
    }

    /// The entry of the API key `name`; past [`CLIENT_ENTRIES`] names, [`OTHER_CLIENTS`]'s.
    fn client_entry(&self, name: &str) -> Option<usize> {
        let named = self.claim(CLIENTS, CLIENT_ENTRIES - 1, CLIENT_ENTRY_WORDS, CLIENT_NAME_WORDS, name, 0);
        let other = || {
            let last = CLIENTS + (CLIENT_ENTRIES - 1) * CLIENT_ENTRY_WORDS;
            self.claim(last, 1, CLIENT_ENTRY_WORDS, CLIENT_NAME_WORDS, OTHER_CLIENTS, 0)
        };
        named.or_else(other).map(|(_, e)| e)
    }

    /// The region this handle writes into, shared (the rate limiter's buckets are in it).
    pub fn shared_region(&self) -> Arc<Counters> {
        self.region.clone()
    }

    /// Counts an access-control event (index into [`ACCESS_EVENTS`]).
    pub fn access(&self, event: usize) {
        self.add(ACCESS + event.min(ACCESS_WORDS - 1), 1);
    }

    /// The entry named `name` tagged `tag` in the table at `table` (`count`
    /// entries of `entry_words`, names of up to `name_words` words), claimed
    /// the first time: its index and offset in the block.
    fn claim(
        &self,
        table: usize,
        count: usize,
        entry_words: usize,
        name_words: usize,
        name: &str,
        tag: u64,
    ) -> Option<(usize, usize)> {
        let bytes = name.as_bytes();
        if bytes.len() > name_words * 8 {
            return None;
        }
        for i in 0..count {
            let e = table + i * entry_words;
            match self.w(e + E_STATE).load(std::sync::atomic::Ordering::Acquire) {
                ENTRY_READY if self.w(e + E_VERSION).load(Relaxed) == tag && self.name_is(e, bytes) => {
                    return Some((i, e));
                }
                ENTRY_FREE => {
                    if self.w(e + E_STATE).compare_exchange(ENTRY_FREE, ENTRY_WRITING, Relaxed, Relaxed).is_err() {
                        continue;
                    }
                    self.set(e + E_VERSION, tag);
                    self.set(e + E_NAME_LEN, bytes.len() as u64);
                    for (k, chunk) in bytes.chunks(8).enumerate() {
                        self.set(e + E_NAME + k, name_word(chunk));
                    }
                    self.w(e + E_STATE).store(ENTRY_READY, std::sync::atomic::Ordering::Release);
                    return Some((i, e));
                }
                _ => {}
            }
        }
        None
    }

    /// Whether the entry at `e` is named `bytes` (compared word by word, no copy).
    fn name_is(&self, e: usize, bytes: &[u8]) -> bool {
        self.w(e + E_NAME_LEN).load(Relaxed) == bytes.len() as u64
            && bytes.chunks(8).enumerate().all(|(k, chunk)| self.w(e + E_NAME + k).load(Relaxed) == name_word(chunk))
    }
}

/// Up to eight bytes of a name as one word (zero-padded).
fn name_word(chunk: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word[..chunk.len()].copy_from_slice(chunk);
    u64::from_le_bytes(word)
}

fn read_name(words: &[AtomicU64], e: usize, name_words: usize) -> String {
    let len = (words[e + E_NAME_LEN].load(Relaxed) as usize).min(name_words * 8);
    let mut bytes = Vec::with_capacity(name_words * 8);
    for k in 0..name_words {
        bytes.extend_from_slice(&words[e + E_NAME + k].load(Relaxed).to_le_bytes());
    }
    bytes.truncate(len);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A model version's counters in one process's block.
#[derive(Debug, Clone)]
pub struct ModelStats {
    stats: Stats,
    entry: usize,
}

/// Where one successful inference request spent its time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Waiting for the engine.
    pub queue: Duration,
    /// Decoding the inputs.
    pub input: Duration,
    /// Running the model.
    pub infer: Duration,
    /// Encoding the outputs.
    pub output: Duration,
}

impl ModelStats {
    fn add(&self, c: ModelCounter, n: u64) {
        self.stats.add(self.entry + E_COUNTERS + c as usize, n);
    }

    fn hist(&self, took: Duration) {
        self.stats.add(self.entry + E_COUNTERS + ModelCounter::COUNT + bucket(took), 1);
    }

    /// Counts a successful request of `batch` inferences that stands for
    /// the model execution of `execution` rows, if it stands for one (every
    /// unbatched request does; under dynamic batching one request of each
    /// batch carries its execution, the others none), that execution under
    /// its batch size with this request's times.
    pub fn success(&self, batch: u64, execution: Option<u64>, t: Timings, total: Duration) {
        use ModelCounter::*;
        self.add(InferenceCount, batch);
        if let Some(rows) = execution {
            self.add(ExecutionCount, 1);
            self.batch_size(rows, &t);
        }
        self.add(SuccessCount, 1);
        self.add(SuccessNs, nanos(total));
        for (count, ns, d) in [
            (QueueCount, QueueNs, t.queue),
            (InputCount, InputNs, t.input),
            (InferCount, InferNs, t.infer),
            (OutputCount, OutputNs, t.output),
        ] {
            self.add(count, 1);
            self.add(ns, nanos(d));
        }
        self.stats.set(self.entry + E_COUNTERS + LastInferenceMs as usize, unix_ms());
        self.hist(total);
    }

    /// Counts one execution of `rows` rows in its batch size's slot (the
    /// first free one claims the size), unless every slot holds another size.
    fn batch_size(&self, rows: u64, t: &Timings) {
        for k in 0..BATCH_SLOTS {
            let slot = self.entry + E_BATCH + k * BATCH_WORDS;
            let size = self.stats.w(slot);
            let held = match size.compare_exchange(0, rows, Relaxed, Relaxed) {
                Ok(_) => rows,
                Err(other) => other,
            };
            if held == rows {
                self.stats.add(slot + 1, 1);
                self.stats.add(slot + 2, nanos(t.input));
                self.stats.add(slot + 3, nanos(t.infer));
                self.stats.add(slot + 4, nanos(t.output));
                return;
            }
        }
    }

    /// Counts a failed request.
    pub fn failure(&self, total: Duration) {
        self.add(ModelCounter::FailCount, 1);
        self.add(ModelCounter::FailNs, nanos(total));
        self.hist(total);
    }
}

/// One live process, as its block says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Its role.
    pub role: ProcessRole,
    /// Its pid.
    pub pid: u32,
    /// Its worker id (0 for the supervisor).
    pub worker_id: u64,
    /// When it attached to its block (Unix milliseconds).
    pub started_ms: u64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Open descriptors.
    pub fds: u64,
}

/// A model version's totals over every process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelTotals {
    /// The counters, indexed by [`ModelCounter`] (the last inference is the latest, not a sum).
    pub counters: [u64; ModelCounter::COUNT],
    /// Request-duration histogram (not cumulative), one per bucket.
    pub buckets: [u64; BUCKETS],
    /// Executions by batch size: their count, then input, infer and output nanoseconds.
    pub batches: BTreeMap<u64, [u64; 4]>,
}

impl ModelTotals {
    /// One counter.
    pub fn get(&self, c: ModelCounter) -> u64 {
        self.counters[c as usize]
    }
}

/// One engine slot's share of the work (its block, kept across restarts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLoad {
    /// The slot, 1-based.
    pub slot: usize,
    /// Requests answered over plain HTTP and over HTTPS (through the ring).
    pub answered: [u64; 2],
    /// Connections held now (plain HTTP), when its process accepts.
    pub connections: Option<u64>,
}

/// A request counter: listener, route, method and status with its count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestCount {
    /// `http` or `https`.
    pub listener: &'static str,
    /// `http`, `grpc` or `h3`.
    pub protocol: &'static str,
    /// Route template.
    pub route: &'static str,
    /// Method.
    pub method: &'static str,
    /// Status code, `other` as 0.
    pub status: u16,
    /// How many.
    pub count: u64,
}

/// A request-duration histogram per listener and route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationHistogram {
    /// `http` or `https`.
    pub listener: &'static str,
    /// `http`, `grpc` or `h3`.
    pub protocol: &'static str,
    /// Route template.
    pub route: &'static str,
    /// Not cumulative, one per bucket.
    pub buckets: [u64; BUCKETS],
    /// Total nanoseconds.
    pub sum_ns: u64,
}

/// Everything the region holds, summed over every process.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Non-zero request counters.
    pub requests: Vec<RequestCount>,
    /// Request-duration histograms with at least one request.
    pub durations: Vec<DurationHistogram>,
    /// Ring events, by [`RING_EVENTS`].
    pub ring: [u64; RING_WORDS],
    /// Completed handshakes by protocol and ALPN.
    pub tls_handshakes: [[u64; TLS_ALPN.len()]; TLS_PROTOCOLS.len()],
    /// Failed handshakes by [`TLS_FAILURES`].
    pub tls_failures: [u64; TLS_FAIL_WORDS],
    /// Certificate reloads in the HTTPS worker: ok, refused.
    pub tls_reloads: [u64; 2],
    /// When the HTTPS worker last swapped in a certificate (Unix seconds).
    pub tls_last_reload: Option<u64>,
    /// Requests the live engine workers are answering now.
    pub in_flight: u64,
    /// Server readiness as the live engine workers published it: ready when
    /// one is (it would answer `/v2/health/ready` with 200); `None` before any has.
    pub ready: Option<bool>,
    /// Each model's best state over the live engine workers that published one.
    pub model_states: BTreeMap<String, ModelState>,
    /// Worker restarts by role (engine, https) and [`RESTART_CAUSES`].
    pub restarts: [[u64; 2]; 2],
    /// The served certificate's expiry (Unix seconds), when known.
    pub cert_not_after: Option<u64>,
    /// Checks of the certificate source, errors among them, certificates published.
    pub cert_checks: [u64; 3],
    /// Live processes.
    pub processes: Vec<Process>,
    /// Per model and version.
    pub models: BTreeMap<(String, u64), ModelTotals>,
    /// Per engine slot.
    pub slots: Vec<SlotLoad>,
    /// Access-control events, by [`ACCESS_EVENTS`].
    pub access: [u64; ACCESS_WORDS],
    /// Per API key name: answers by class (2xx, 3xx, 4xx, 5xx) and 429s from the rate limit.
    pub clients: BTreeMap<String, [u64; CLIENT_COUNTERS]>,
}

impl Snapshot {
    /// Sums every block of `region` in use.
    pub fn read(region: &Counters) -> Snapshot {
        let words = region.words();
        let mut s = Snapshot::default();
        let mut req = vec![0u64; REQ_WORDS];
        let mut dur = vec![0u64; DUR_WORDS];
        let sum = |acc: &mut [u64], base: usize| {
            for (a, w) in acc.iter_mut().zip(&words[base..]) {
                *a = a.wrapping_add(w.load(Relaxed));
            }
        };
        for block in 0..blocks_in(words) {
            let b = block * BLOCK_WORDS;
            let get = |i: usize| words[b + i].load(Relaxed);
            let Some(role) = ProcessRole::from_word(get(H_ROLE)) else { continue };
            if get(H_PID) != 0 {
                s.processes.push(Process {
                    role,
                    pid: get(H_PID) as u32,
                    worker_id: get(H_WORKER_ID),
                    started_ms: get(H_STARTED_MS),
                    rss_bytes: get(H_RSS),
                    fds: get(H_FDS),
                });
            }
            if role == ProcessRole::Engine {
                let conns = get(H_CONNS);
                s.slots.push(SlotLoad {
                    slot: block.saturating_sub(FIRST_ENGINE_BLOCK) + 1,
                    answered: [get(H_ANSWERED), get(H_ANSWERED + 1)],
                    connections: (get(H_PID) != 0 && conns != NOT_ACCEPTING).then_some(conns),
                });
            }
            sum(&mut req, b + REQ);
            sum(&mut dur, b + DUR);
            sum(&mut s.ring, b + RING);
            for p in 0..2 {
                sum(&mut s.tls_handshakes[p], b + TLS_OK + p * TLS_ALPN.len());
                sum(&mut s.restarts[p], b + SUP_RESTARTS + p * 2);
            }
            sum(&mut s.tls_failures, b + TLS_FAIL);
            sum(&mut s.tls_reloads, b + TLS_RELOAD);
            if get(TLS_RELOAD + 2) != 0 {
                s.tls_last_reload = s.tls_last_reload.max(Some(get(TLS_RELOAD + 2)));
            }
            if role == ProcessRole::Engine && get(H_PID) != 0 {
                s.in_flight += get(H_IN_FLIGHT);
            }
            let published = get(H_READY);
            if role == ProcessRole::Engine && get(H_PID) != 0 && published != 0 {
                s.ready = Some(s.ready == Some(true) || published == 1);
                for i in 0..STATE_ENTRIES {
                    let e = b + STATES + i * STATE_ENTRY_WORDS;
                    if words[e + E_STATE].load(std::sync::atomic::Ordering::Acquire) != ENTRY_READY {
                        break;
                    }
                    if let Some(state) = ModelState::from_word(words[e + E_MODEL_STATE].load(Relaxed)) {
                        let best = s.model_states.entry(read_name(words, e, NAME_WORDS)).or_insert(state);
                        *best = (*best).max(state);
                    }
                }
            }
            sum(&mut s.cert_checks, b + SUP_CERT_CHECKS);
            if get(SUP_CERT_NOT_AFTER) != 0 {
                s.cert_not_after = Some(get(SUP_CERT_NOT_AFTER));
            }
            sum(&mut s.access, b + ACCESS);
            for i in 0..CLIENT_ENTRIES {
                let e = b + CLIENTS + i * CLIENT_ENTRY_WORDS;
                if words[e + E_STATE].load(std::sync::atomic::Ordering::Acquire) != ENTRY_READY {
                    continue;
                }
                let c = s.clients.entry(read_name(words, e, CLIENT_NAME_WORDS)).or_default();
                sum(c, e + E_NAME + CLIENT_NAME_WORDS);
            }
            let used = (get(H_MODELS_USED) as usize).min(MODEL_ENTRIES);
            for i in 0..used {
                let e = b + MODELS + i * ENTRY_WORDS;
                if words[e + E_STATE].load(std::sync::atomic::Ordering::Acquire) != ENTRY_READY {
                    continue;
                }
                let key = (read_name(words, e, NAME_WORDS), words[e + E_VERSION].load(Relaxed));
                let t = s.models.entry(key).or_default();
                let last = t.counters[ModelCounter::LastInferenceMs as usize];
                sum(&mut t.counters, e + E_COUNTERS);
                let this_last = words[e + E_COUNTERS + ModelCounter::LastInferenceMs as usize].load(Relaxed);
                t.counters[ModelCounter::LastInferenceMs as usize] = last.max(this_last);
                sum(&mut t.buckets, e + E_COUNTERS + ModelCounter::COUNT);
                for k in 0..BATCH_SLOTS {
                    let slot = e + E_BATCH + k * BATCH_WORDS;
                    let size = words[slot].load(Relaxed);
                    if size == 0 {
                        break;
                    }
                    sum(t.batches.entry(size).or_default(), slot + 1);
                }
            }
        }
        for l in 0..NL {
            for r in 0..NR {
                for m in 0..NM {
                    for st in 0..NS {
                        let count = req[((l * NR + r) * NM + m) * NS + st];
                        if count > 0 {
                            s.requests.push(RequestCount {
                                listener: LISTENERS[l],
                                protocol: protocol_of(l, ROUTES[r]),
                                route: ROUTES[r],
                                method: METHODS[m],
                                status: STATUSES.get(st).copied().unwrap_or(0),
                                count,
                            });
                        }
                    }
                }
                let d = (l * NR + r) * (BUCKETS + 1);
                let mut buckets = [0u64; BUCKETS];
                buckets.copy_from_slice(&dur[d..d + BUCKETS]);
                if buckets.iter().any(|&n| n > 0) {
                    s.durations.push(DurationHistogram {
                        listener: LISTENERS[l],
                        protocol: protocol_of(l, ROUTES[r]),
                        route: ROUTES[r],
                        buckets,
                        sum_ns: dur[d + BUCKETS],
                    });
                }
            }
        }
        s
    }
}

/// Resident memory and open descriptors of the calling process, from `/proc/self`.
pub fn own_process_gauges() -> (u64, u64) {
    let page = 4096u64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |pages| pages * page);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    (rss, fds)
}

/// Keeps this process's memory and descriptor gauges fresh (every 5 s) from a small thread.
pub fn spawn_gauge_thread(stats: Stats) {
    let _ = std::thread::Builder::new().name("stats-gauges".into()).spawn(move || loop {
        let (rss, fds) = own_process_gauges();
        stats.process_gauges(rss, fds);
        std::thread::sleep(Duration::from_secs(5));
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn region(blocks: usize) -> Arc<Counters> {
        Counters::create(region_words(blocks)).unwrap().0
    }

    #[test]
    fn routes_match_their_templates() {
        let r = |p| ROUTES[route_index(p)];
        assert_eq!(r("/"), "/");
        assert_eq!(r("/v2/models/digits/infer"), "/v2/models/{name}/infer");
        assert_eq!(ROUTES[INFER_ROUTE], "/v2/models/{name}/infer");
        assert_eq!(r("/v2/models/stats/infer"), "/v2/models/{name}/infer");
        assert_eq!(r("/v2/models/digits/versions/3/infer"), "/v2/models/{name}/versions/{version}/infer");
        assert_eq!(r("/v2/models/stats"), "/v2/models/stats");
        assert_eq!(r("/v2/models/digits"), "/v2/models/{name}");
        assert_eq!(r("/v2/models/digits/stats"), "/v2/models/{name}/stats");
        assert_eq!(r("/nope/x"), "other");
        assert_eq!(r("/v2/models//infer"), "other");
        assert_eq!(r("/inference.GRPCInferenceService/ModelInfer"), "/inference.GRPCInferenceService/ModelInfer");
        assert_eq!(r("/inference.GRPCInferenceService/Nope"), "/inference.GRPCInferenceService/{method}");
        assert_eq!(r("/grpc.health.v1.Health/Watch"), "/grpc.health.v1.Health/Watch");
        assert_eq!(protocol(r("/grpc.health.v1.Health/Check")), "grpc");
        assert_eq!(protocol(r("/v2/models/x/infer")), "http");
        assert_eq!(r("/grpc.health.v1.Health/List"), "/grpc.health.v1.Health/{method}");
        assert_eq!(r("/v2/systemsharedmemory/region/in0/register"), "/v2/systemsharedmemory/region/{name}/register");
        // No earlier template takes a literal route from itself.
        for route in ROUTES.iter().filter(|t| !t.contains('{')) {
            assert_eq!(r(route), *route);
        }
    }

    #[test]
    fn model_states_are_the_best_over_live_engines_and_go_with_them() {
        let reg = region(4);
        let a = Stats::attach(reg.clone(), 2, ProcessRole::Engine, 1);
        let b = Stats::attach(reg.clone(), 3, ProcessRole::Engine, 2);
        // Nothing published yet: readiness unknown.
        assert_eq!(Snapshot::read(&reg).ready, None);
        a.publish_models(false, &[("digits", ModelState::Ready), ("broken", ModelState::Unavailable)]);
        b.publish_models(true, &[("digits", ModelState::Unavailable), ("old", ModelState::Unloaded)]);
        let s = Snapshot::read(&reg);
        assert_eq!(s.ready, Some(true), "one engine ready is a ready server");
        assert_eq!(s.model_states["digits"], ModelState::Ready);
        assert_eq!(s.model_states["broken"], ModelState::Unavailable);
        assert_eq!(s.model_states["old"], ModelState::Unloaded);
        // A model no longer listed is taken off; a dead worker's states go with it.
        a.publish_models(false, &[("digits", ModelState::Ready)]);
        Stats::vacate(&reg, 3);
        let s = Snapshot::read(&reg);
        assert_eq!(s.ready, Some(false));
        assert_eq!(s.model_states.keys().collect::<Vec<_>>(), ["digits"]);
        // Its replacement counts again once it has published.
        let b2 = Stats::attach(reg.clone(), 3, ProcessRole::Engine, 3);
        assert_eq!(Snapshot::read(&reg).model_states.len(), 1);
        b2.publish_models(true, &[("digits", ModelState::Ready)]);
        assert_eq!(Snapshot::read(&reg).ready, Some(true));
        // Requests in flight count until their guard goes, and a dead worker's go with it.
        let one = a.in_flight();
        let two = b2.in_flight();
        assert_eq!(Snapshot::read(&reg).in_flight, 2);
        drop(one);
        assert_eq!(Snapshot::read(&reg).in_flight, 1);
        std::mem::forget(two);
        Stats::vacate(&reg, 3);
        assert_eq!(Snapshot::read(&reg).in_flight, 0);
        // A reload is timed.
        let h = Stats::attach(reg.clone(), 1, ProcessRole::Https, 0);
        assert_eq!(Snapshot::read(&reg).tls_last_reload, None);
        h.tls_reload(false);
        assert_eq!(Snapshot::read(&reg).tls_last_reload, None);
        h.tls_reload(true);
        assert!(Snapshot::read(&reg).tls_last_reload.is_some_and(|t| t > 1_700_000_000));
    }

    #[test]
    fn blocks_sum_and_a_returning_process_carries_on() {
        let reg = region(4);
        let a = Stats::attach(reg.clone(), 2, ProcessRole::Engine, 1);
        let b = Stats::attach(reg.clone(), 3, ProcessRole::Engine, 2);
        a.request(Listener::Http, 13, "POST", 200, Duration::from_millis(2));
        b.request(Listener::Https, 13, "POST", 200, Duration::from_millis(20));
        b.request(Listener::Https, 13, "POST", 400, Duration::from_micros(10));
        let ma = a.model("digits", 1).unwrap();
        let mb = b.model("digits", 1).unwrap();
        ma.success(4, Some(4), Timings::default(), Duration::from_millis(1));
        mb.success(1, Some(1), Timings::default(), Duration::from_millis(1));
        mb.failure(Duration::from_millis(1));
        // Worker 1 dies and is replaced in its block: its counts stay.
        Stats::vacate(&reg, 2);
        let a2 = Stats::attach(reg.clone(), 2, ProcessRole::Engine, 3);
        a2.model("digits", 1).unwrap().success(1, Some(1), Timings::default(), Duration::from_millis(1));

        let s = Snapshot::read(&reg);
        let total: u64 = s.requests.iter().map(|r| r.count).sum();
        assert_eq!(total, 3);
        assert_eq!(s.requests.iter().filter(|r| r.listener == "https").map(|r| r.count).sum::<u64>(), 2);
        let m = &s.models[&("digits".to_string(), 1)];
        assert_eq!(m.get(ModelCounter::InferenceCount), 6);
        assert_eq!(m.get(ModelCounter::ExecutionCount), 3);
        assert_eq!(m.get(ModelCounter::FailCount), 1);
        assert_eq!(m.buckets.iter().sum::<u64>(), 4);
        // Executions by batch size, over both processes (a request in a batch led by another adds none).
        let t = Timings { infer: Duration::from_micros(7), ..Timings::default() };
        mb.success(3, Some(8), t, Duration::from_millis(1));
        mb.success(5, None, t, Duration::from_millis(1));
        let m = Snapshot::read(&reg).models[&("digits".to_string(), 1)].clone();
        let sizes: Vec<(u64, u64)> = m.batches.iter().map(|(size, c)| (*size, c[0])).collect();
        assert_eq!(sizes, [(1, 2), (4, 1), (8, 1)]);
        assert_eq!(m.batches[&8][2], 7000);
        assert_eq!(m.get(ModelCounter::ExecutionCount), 4);
        assert_eq!(s.processes.len(), 2, "{:?}", s.processes);
        assert_eq!(s.durations.iter().map(|d| d.buckets.iter().sum::<u64>()).sum::<u64>(), 3);
    }

    #[test]
    fn a_shared_block_still_counts_every_add_and_finds_one_entry_per_model() {
        let reg = region(3);
        let a = Stats::attach(reg.clone(), 2, ProcessRole::Engine, 1);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        a.model("m", 2).unwrap().success(1, Some(1), Timings::default(), Duration::ZERO);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let s = Snapshot::read(&reg);
        assert_eq!(s.models[&("m".to_string(), 2)].get(ModelCounter::SuccessCount), 4000);
    }
}
