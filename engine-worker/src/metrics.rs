//! The whole server's numbers, as whichever engine worker is asked sums them
//! from the statistics region: `/metrics` in the Prometheus text format (0.0.4)
//! and Triton's statistics extension (`/v2/models/stats` and friends).

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tandem_shared::stats::{
    ModelCounter, ModelState, ModelTotals, Snapshot, DURATION_BOUNDS, RESTART_CAUSES, RING_EVENTS, TLS_ALPN,
    TLS_FAILURES, TLS_PROTOCOLS,
};

use tandem_shared::sys::counters::Counters;
use tandem_shared::sys::shm::Region;

use crate::engine::VersionState;
use crate::infer::ApiError;
use crate::state::{AppState, ModelPath};

/// The exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value (backslash, quote, newline), as the text format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes metric families: `# HELP` / `# TYPE` once, then samples.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A histogram's `_bucket` (cumulative, with `+Inf`), `_sum` and `_count` samples.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], buckets: &[u64], sum_seconds: f64) {
        let mut cumulative = 0u64;
        for (i, n) in buckets.iter().enumerate() {
            cumulative += n;
            let le = DURATION_BOUNDS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, cumulative);
        }
        self.sample(&format!("{name}_sum"), labels, sum_seconds);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

/// API keys, rate limits and model concurrency caps.
fn access_families(e: &mut Exposition, snap: &Snapshot) {
    e.family("tandem_auth_failures_total", "counter", "Requests answered 401: no API key, or one that is not valid.");
    use tandem_shared::stats::access_event as ev;
    e.sample("tandem_auth_failures_total", &[("reason", "missing")], snap.access[ev::MISSING_KEY]);
    e.sample("tandem_auth_failures_total", &[("reason", "invalid")], snap.access[ev::INVALID_KEY]);
    e.family(
        "tandem_rate_limited_total",
        "counter",
        "Requests answered 429 by RATE_LIMIT, by what the client was known by.",
    );
    for (event, by) in [
        (ev::RATE_LIMITED_KEY, "key"),
        (ev::RATE_LIMITED_CERTIFICATE, "certificate"),
        (ev::RATE_LIMITED_ADDRESS, "address"),
    ] {
        e.sample("tandem_rate_limited_total", &[("by", by)], snap.access[event]);
    }
    e.family(
        "tandem_model_busy_total",
        "counter",
        "Inference requests answered 429 because their model had max_inflight requests running.",
    );
    e.sample("tandem_model_busy_total", &[], snap.access[ev::MODEL_BUSY]);
    if snap.clients.is_empty() {
        return;
    }
    e.family(
        "tandem_client_requests_total",
        "counter",
        "Requests answered per API key name (at most 63 names, then \"(other)\"), by status class.",
    );
    for (name, counts) in &snap.clients {
        for (i, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            if counts[i] > 0 {
                e.sample("tandem_client_requests_total", &[("client", name), ("class", class)], counts[i]);
            }
        }
    }
    e.family("tandem_client_rate_limited_total", "counter", "Requests answered 429 by RATE_LIMIT, per API key name.");
    for (name, counts) in &snap.clients {
        e.sample(
            "tandem_client_rate_limited_total",
            &[("client", name)],
            counts[tandem_shared::stats::CLIENT_RATE_LIMITED],
        );
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The Prometheus text for `snap`; `ring_busy` is `(busy, total)` slots when HTTPS is on,
/// `cert_source` the certificate mode from the status file.
pub fn render(snap: &Snapshot, ring_busy: Option<(u32, u32)>, cert_source: Option<&str>) -> String {
    let mut e = Exposition { out: String::with_capacity(16 << 10) };

    e.family(
        "tandem_http_requests_total",
        "counter",
        "Requests answered, by listener, protocol (http, grpc), route template (a gRPC call's path), method and status.",
    );
    for r in &snap.requests {
        let code = if r.status == 0 { "other".to_string() } else { r.status.to_string() };
        e.sample(
            "tandem_http_requests_total",
            &[
                ("listener", r.listener),
                ("protocol", r.protocol),
                ("route", r.route),
                ("method", r.method),
                ("code", &code),
            ],
            r.count,
        );
    }
    e.family(
        "tandem_http_request_duration_seconds",
        "histogram",
        "Time to answer a request (to its response headers).",
    );
    for d in &snap.durations {
        e.histogram(
            "tandem_http_request_duration_seconds",
            &[("listener", d.listener), ("protocol", d.protocol), ("route", d.route)],
            &d.buckets,
            seconds(d.sum_ns),
        );
    }

    model_families(&mut e, snap);

    e.family("tandem_shm_slots", "gauge", "Slots of the shared-memory ring between the HTTPS worker and the engines.");
    e.family("tandem_shm_slots_busy", "gauge", "Ring slots holding a request now.");
    if let Some((busy, total)) = ring_busy {
        e.sample("tandem_shm_slots", &[], total);
        e.sample("tandem_shm_slots_busy", &[], busy);
    }
    let ring_help = [
        ("tandem_shm_waits_total", "Requests that waited for a free ring slot."),
        ("tandem_shm_busy_rejections_total", "Requests answered 503 because every ring slot stayed busy."),
        ("tandem_shm_timeouts_total", "Requests answered 504 because no engine answered within REQUEST_TIMEOUT."),
        ("tandem_shm_resubmissions_total", "Requests resubmitted because the engine holding them died."),
        ("tandem_shm_too_large_total", "Requests answered 413 by the HTTPS worker."),
        ("tandem_shm_engine_failures_total", "Requests answered 503 after their engines died on every retry."),
    ];
    debug_assert_eq!(ring_help.len(), RING_EVENTS.len());
    for (i, (name, help)) in ring_help.iter().enumerate() {
        e.family(name, "counter", help);
        e.sample(name, &[], snap.ring[i]);
    }

    access_families(&mut e, snap);

    // With WORKER_COMMAND the copies stand where the engines do, the proxy where the HTTPS worker does.
    let proxied = snap.processes.iter().any(|p| p.role == tandem_shared::stats::ProcessRole::Proxy);
    let roles = if proxied { ["worker-command", "proxy-worker"] } else { ["engine-worker", "https-worker"] };
    e.family(
        "tandem_requests_in_flight",
        "gauge",
        "Requests the engine workers are answering now (plain HTTP and HTTPS, to their response headers).",
    );
    e.sample("tandem_requests_in_flight", &[], snap.in_flight);
    e.family("tandem_workers", "gauge", "Worker processes running now, by role.");
    for role in roles {
        let n = snap.processes.iter().filter(|p| p.role.label() == role).count();
        e.sample("tandem_workers", &[("role", role)], n);
    }
    if !snap.slots.is_empty() {
        e.family(
            "tandem_worker_requests_total",
            "counter",
            "Requests each engine worker slot answered (kept across its restarts), by listener.",
        );
        for sl in &snap.slots {
            let slot = sl.slot.to_string();
            for (l, listener) in ["http", "https"].iter().enumerate() {
                e.sample("tandem_worker_requests_total", &[("slot", &slot), ("listener", listener)], sl.answered[l]);
            }
        }
        e.family("tandem_worker_connections", "gauge", "Plain HTTP connections each accepting engine worker holds.");
        for sl in &snap.slots {
            if let Some(n) = sl.connections {
                e.sample("tandem_worker_connections", &[("slot", &sl.slot.to_string())], n);
            }
        }
    }
    e.family("tandem_worker_restarts_total", "counter", "Workers restarted after dying, by role and cause.");
    for (r, role) in roles.iter().enumerate() {
        for (c, cause) in RESTART_CAUSES.iter().enumerate() {
            e.sample("tandem_worker_restarts_total", &[("role", role), ("cause", cause)], snap.restarts[r][c]);
        }
    }
    e.family("tandem_process_resident_memory_bytes", "gauge", "Resident memory, summed by role.");
    e.family("tandem_process_open_fds", "gauge", "Open file descriptors, summed by role.");
    // (A copy's memory is its own business: tandem does not measure it.)
    for role in ["supervisor", "engine-worker", "https-worker", "proxy-worker"] {
        let of = snap.processes.iter().filter(|p| p.role.label() == role);
        if of.clone().next().is_none() {
            continue;
        }
        e.sample(
            "tandem_process_resident_memory_bytes",
            &[("role", role)],
            of.clone().map(|p| p.rss_bytes).sum::<u64>(),
        );
        e.sample("tandem_process_open_fds", &[("role", role)], of.map(|p| p.fds).sum::<u64>());
    }

    e.family("tandem_tls_handshakes_total", "counter", "Completed TLS handshakes, by protocol and ALPN.");
    for (p, proto) in TLS_PROTOCOLS.iter().enumerate() {
        for (a, alpn) in TLS_ALPN.iter().enumerate() {
            let n = snap.tls_handshakes[p][a];
            if n > 0 {
                e.sample("tandem_tls_handshakes_total", &[("protocol", proto), ("alpn", alpn)], n);
            }
        }
    }
    e.family("tandem_tls_handshake_failures_total", "counter", "Failed TLS handshakes, by reason.");
    for (i, reason) in TLS_FAILURES.iter().enumerate() {
        e.sample("tandem_tls_handshake_failures_total", &[("reason", reason)], snap.tls_failures[i]);
    }

    if let Some(source) = cert_source {
        let l = [("source", source)];
        e.family("tandem_certificate_reloads_total", "counter", "Certificate reloads in the HTTPS worker, by result.");
        e.sample("tandem_certificate_reloads_total", &[("result", "ok")], snap.tls_reloads[0]);
        e.sample("tandem_certificate_reloads_total", &[("result", "refused")], snap.tls_reloads[1]);
        e.family("tandem_certificate_checks_total", "counter", "Checks of the certificate source.");
        e.sample("tandem_certificate_checks_total", &l, snap.cert_checks[0]);
        e.family("tandem_certificate_source_errors_total", "counter", "Checks of the certificate source that failed.");
        e.sample("tandem_certificate_source_errors_total", &l, snap.cert_checks[1]);
        e.family("tandem_certificate_published_total", "counter", "New certificates published to the HTTPS worker.");
        e.sample("tandem_certificate_published_total", &l, snap.cert_checks[2]);
        if let Some(not_after) = snap.cert_not_after {
            e.family(
                "tandem_certificate_not_after_timestamp_seconds",
                "gauge",
                "When the served certificate expires (Unix time).",
            );
            e.sample("tandem_certificate_not_after_timestamp_seconds", &l, not_after);
            let now = tandem_shared::certs::status::unix_now();
            e.family("tandem_certificate_seconds_left", "gauge", "Seconds until the served certificate expires.");
            e.sample("tandem_certificate_seconds_left", &l, not_after as i64 - now);
        }
    }
    e.out
}

fn model_families(e: &mut Exposition, snap: &Snapshot) {
    use ModelCounter::*;
    let counters: [(&str, &str, ModelCounter, bool); 9] = [
        ("tandem_model_inferences_total", "Inferences (batch items) run, per model version.", InferenceCount, false),
        (
            "tandem_model_executions_total",
            "Model executions (one per batch), per model version.",
            ExecutionCount,
            false,
        ),
        ("tandem_model_success_total", "Successful inference requests, per model version.", SuccessCount, false),
        ("tandem_model_failures_total", "Failed inference requests, per model version.", FailCount, false),
        (
            "tandem_model_queue_duration_seconds_total",
            "Time requests spent reading their body and waiting for an inference thread.",
            QueueNs,
            true,
        ),
        ("tandem_model_compute_input_duration_seconds_total", "Time spent decoding inputs.", InputNs, true),
        ("tandem_model_compute_infer_duration_seconds_total", "Time spent running the model.", InferNs, true),
        ("tandem_model_compute_output_duration_seconds_total", "Time spent encoding outputs.", OutputNs, true),
        (
            "tandem_model_last_inference_timestamp_seconds",
            "When the model version last ran (Unix time).",
            LastInferenceMs,
            false,
        ),
    ];
    for (name, help, c, ns) in counters {
        let kind = if c == LastInferenceMs { "gauge" } else { "counter" };
        e.family(name, kind, help);
        for ((model, version), t) in &snap.models {
            let v = version.to_string();
            let l = [("model", model.as_str()), ("version", v.as_str())];
            match (ns, c) {
                (true, _) => e.sample(name, &l, seconds(t.get(c))),
                (_, LastInferenceMs) => e.sample(name, &l, t.get(c) as f64 / 1e3),
                _ => e.sample(name, &l, t.get(c)),
            }
        }
    }
    e.family(
        "tandem_model_request_duration_seconds",
        "histogram",
        "Time to answer an inference request, per model version.",
    );
    for ((model, version), t) in &snap.models {
        let v = version.to_string();
        e.histogram(
            "tandem_model_request_duration_seconds",
            &[("model", model.as_str()), ("version", v.as_str())],
            &t.buckets,
            seconds(t.get(SuccessNs) + t.get(FailNs)),
        );
    }
}

/// Busy and total slots of the ring.
pub fn ring_busy(r: &Region) -> (u32, u32) {
    ((0..r.slots()).filter(|&s| r.state(s) != 0).count() as u32, r.slots())
}

/// The certificate source named in the status file (`GENERATE`, `INDIRECT`, `PATH`).
pub fn cert_source(status_file: &std::path::Path) -> Option<String> {
    tandem_shared::certs::status::CertStatus::read(status_file).map(|s| s.mode)
}

/// The whole `/metrics` response for `counters`, with readiness and model
/// state when an engine worker answers (`engine`; the supervisor's
/// `METRICS_PORT` has none).
pub fn response(
    counters: &Counters,
    ring: Option<&Region>,
    cert_status: Option<&std::path::Path>,
    engine: Option<&crate::engine::Engine>,
) -> Response {
    let snap = Snapshot::read(counters);
    let ring = ring.map(ring_busy);
    let source = cert_status.map(|p| cert_source(p).unwrap_or_else(|| "unknown".into()));
    let mut text = render(&snap, ring, source.as_deref());
    match engine {
        Some(engine) => text.push_str(&readiness(engine.ready(), &model_states(engine))),
        // The supervisor's port: what the live engine workers last published.
        None => {
            if let Some(ready) = snap.ready {
                let states: Vec<(String, ModelState)> =
                    snap.model_states.iter().map(|(n, s)| (n.clone(), *s)).collect();
                text.push_str(&readiness(ready, &states));
            }
        }
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Each model's state as this engine worker sees it.
pub fn model_states(engine: &crate::engine::Engine) -> Vec<(String, ModelState)> {
    engine
        .models()
        .iter()
        .map(|(name, m)| {
            let state = if m.ready() {
                ModelState::Ready
            } else if m.reason().as_deref() == Some(crate::engine::UNLOADED) {
                ModelState::Unloaded
            } else {
                ModelState::Unavailable
            };
            (name.clone(), state)
        })
        .collect()
}

/// How often an engine worker publishes its readiness and model states into
/// the statistics region (for `METRICS_PORT` and its status page).
const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Publishes `engine`'s readiness and model states into `stats` now and every
/// [`PUBLISH_EVERY`], from a small thread, for as long as the process lives.
pub fn spawn_state_publisher(engine: std::sync::Arc<crate::engine::Engine>, stats: tandem_shared::stats::Stats) {
    let _ = std::thread::Builder::new().name("model-states".into()).spawn(move || loop {
        let states = model_states(&engine);
        let named: Vec<(&str, ModelState)> = states.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        stats.publish_models(engine.ready(), &named);
        std::thread::sleep(PUBLISH_EVERY);
    });
}

/// `tandem_ready` and `tandem_model_ready`: as the answering engine worker
/// sees them (model control keeps every engine worker's models alike), or as
/// the engine workers published them. Models unloaded on purpose are not
/// listed: they are not an outage.
pub fn readiness(ready: bool, models: &[(String, ModelState)]) -> String {
    let mut e = Exposition { out: String::new() };
    e.family("tandem_ready", "gauge", "1 when the server is ready (GET /v2/health/ready answers 200), else 0.");
    e.sample("tandem_ready", &[], u8::from(ready));
    e.family(
        "tandem_model_ready",
        "gauge",
        "1 for a model with a version that serves, 0 for one that is unavailable (GET /v2/health/ready lists its reason).",
    );
    for (name, state) in models {
        if *state != ModelState::Unloaded {
            e.sample("tandem_model_ready", &[("model", name)], u8::from(*state == ModelState::Ready));
        }
    }
    e.out
}

/// `GET /metrics`: every process's counters, summed.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    response(state.stats().region(), state.ring(), state.cert_status(), Some(state.engine()))
}

fn duration(count: u64, ns: u64) -> serde_json::Value {
    json!({ "count": count, "ns": ns })
}

/// One model version in Triton's statistics shape.
fn triton_entry(name: &str, version: &str, t: &ModelTotals) -> serde_json::Value {
    use ModelCounter::*;
    json!({
        "name": name,
        "version": version,
        "last_inference": t.get(LastInferenceMs),
        "inference_count": t.get(InferenceCount),
        "execution_count": t.get(ExecutionCount),
        "inference_stats": {
            "success": duration(t.get(SuccessCount), t.get(SuccessNs)),
            "fail": duration(t.get(FailCount), t.get(FailNs)),
            "queue": duration(t.get(QueueCount), t.get(QueueNs)),
            "compute_input": duration(t.get(InputCount), t.get(InputNs)),
            "compute_infer": duration(t.get(InferCount), t.get(InferNs)),
            "compute_output": duration(t.get(OutputCount), t.get(OutputNs)),
            "cache_hit": duration(0, 0),
            "cache_miss": duration(0, 0),
        },
        // Executions by batch size, each with the times of the request that stands for it.
        "batch_stats": t.batches.iter().map(|(size, &[count, input, infer, output])| json!({
            "batch_size": size,
            "compute_input": duration(count, input),
            "compute_infer": duration(count, infer),
            "compute_output": duration(count, output),
        })).collect::<Vec<_>>(),
        "memory_usage": [],
    })
}

/// Triton's statistics extension, `GET /v2/models/stats`: every ready model
/// version, its totals over every engine worker.
pub(crate) async fn all_model_stats(State(state): State<AppState>) -> Response {
    stats_of(&state, None)
}

/// `GET /v2/models/{m}/stats` and `/v2/models/{m}/versions/{v}/stats`.
pub(crate) async fn model_stats(State(state): State<AppState>, Path(p): Path<ModelPath>) -> Response {
    if let Err(e) = crate::state::find(&state, &p) {
        return e.into_response();
    }
    stats_of(&state, Some(&p))
}

fn stats_of(state: &AppState, only: Option<&ModelPath>) -> Response {
    match stats_entries(state, only) {
        Ok(entries) => {
            let out: Vec<_> = entries.iter().map(|(name, version, t)| triton_entry(name, version, t)).collect();
            Json(json!({ "model_stats": out })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Every ready model version (or those `only` names) with its totals over
/// every engine worker: what both faces' statistics answer.
pub(crate) fn stats_entries(
    state: &AppState,
    only: Option<&ModelPath>,
) -> Result<Vec<(String, String, ModelTotals)>, ApiError> {
    let snap = Snapshot::read(state.stats().region());
    let mut out = Vec::new();
    for (name, model) in state.engine().models().iter() {
        if only.is_some_and(|p| &p.name != name) {
            continue;
        }
        for (v, s) in &model.versions {
            let label = v.to_string();
            if !matches!(s, VersionState::Ready(_))
                || only.is_some_and(|p| p.version.as_ref().is_some_and(|want| *want != label))
            {
                continue;
            }
            let totals = snap.models.get(&(name.clone(), *v)).cloned().unwrap_or_default();
            out.push((name.clone(), label, totals));
        }
    }
    if out.is_empty() && only.is_some() {
        return Err(ApiError { status: StatusCode::NOT_FOUND, message: "no ready model version matches".into() });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn an_empty_snapshot_renders_every_family_once() {
        let text = render(&Snapshot::default(), Some((0, 64)), Some("generate"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name} typed twice");
        }
        assert!(text.contains("tandem_shm_slots 64"));
    }
}
