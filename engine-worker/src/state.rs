//! What every request of one engine worker shares (`AppState`), and the
//! pieces every handler uses: the JSON error, reading a body within its
//! limits and budget, finding a model version. Handlers live in `router`
//! (the API), `metrics`, `control_api` and `compression`; nothing here
//! imports them, so the modules form no circle.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tandem_shared::edge::budget::{Budget, Refused, Share};
use tandem_shared::stats::{ModelStats, Stats};
use tandem_shared::sys::shm::Region;
use tandem_shared::WorkerSettings;

use crate::engine::{Engine, ModelVersion, VersionState};
use crate::infer::ApiError;

/// Which listener a request arrived on; the HTTPS side inserts `Scheme::Https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTPS (TLS terminated by the HTTPS worker).
    Https,
}

impl Scheme {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// State shared by every request of one worker.
#[derive(Debug, Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) worker_id: u64,
    pub(crate) num_workers: usize,
    pub(crate) max_request_bytes: usize,
    /// `REQUEST_TIMEOUT`: a plain-HTTP body must arrive within it (HTTPS bodies
    /// arrive whole, read by the HTTPS worker under the same rule).
    pub(crate) body_timeout: std::time::Duration,
    /// Request bytes this worker holds at once (`MAX_INFLIGHT_BYTES`).
    pub(crate) budget: Arc<Budget>,
    pub(crate) engine: Arc<Engine>,
    pub(crate) engine_info: serde_json::Value,
    pub(crate) cert_status: Option<std::path::PathBuf>,
    /// This worker's block of the whole-server statistics.
    pub(crate) stats: Stats,
    /// Write one log line per request.
    pub(crate) access_log: bool,
    /// The plain HTTP listener's edge policy (HTTPS requests met the HTTPS worker's).
    pub(crate) door: Arc<tandem_shared::edge::front::FrontDoor>,
    /// The ring, when HTTPS is on (its busy slots are a metric).
    pub(crate) ring: Option<Arc<Region>>,
    /// Load and unload through the supervisor.
    pub(crate) model_control: Arc<crate::model_control::ModelControl>,
    /// Triton's system shared memory, when `SYSTEM_SHARED_MEMORY` is on.
    pub(crate) system_shm: Option<Arc<crate::system_shm::SystemShm>>,
}

impl AppState {
    /// State for the worker described by `settings`, serving `engine`, counting into `stats`.
    /// `control` carries model load and unload to the supervisor.
    pub fn new(
        settings: &WorkerSettings,
        section: &tandem_shared::EngineWorker,
        door: tandem_shared::edge::front::FrontDoor,
        engine: Arc<Engine>,
        stats: Stats,
        ring: Option<Arc<Region>>,
        control: Arc<tandem_shared::process::control::ControlClient>,
    ) -> Self {
        let system_shm =
            section.system_shared_memory.clone().map(|set| crate::system_shm::SystemShm::new(set, control.clone()));
        let model_control = crate::model_control::ModelControl::start(
            section.model_control,
            control,
            engine.clone(),
            system_shm.clone(),
        );
        AppState {
            inner: Arc::new(Inner {
                worker_id: settings.worker_id,
                num_workers: section.num_workers,
                max_request_bytes: usize::try_from(settings.edge.policy.max_request_bytes).unwrap_or(usize::MAX),
                body_timeout: settings.edge.policy.timeouts.body,
                budget: Budget::new(settings.edge.inflight_bytes),
                engine,
                engine_info: engine_info(&section.runtime, false),
                cert_status: section.cert_status.clone(),
                stats,
                access_log: settings.edge.policy.access_log,
                door: Arc::new(door),
                ring,
                model_control,
                system_shm,
            }),
        }
    }

    /// This worker's statistics block (and through it the whole region).
    pub(crate) fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The certificate status file, when HTTPS is on.
    pub(crate) fn cert_status(&self) -> Option<&std::path::Path> {
        self.inner.cert_status.as_deref()
    }

    /// The shared-memory ring, when HTTPS is on.
    pub(crate) fn ring(&self) -> Option<&Region> {
        self.inner.ring.as_deref()
    }

    /// `MAX_REQUEST_BYTES`.
    pub(crate) fn max_request_bytes(&self) -> usize {
        self.inner.max_request_bytes
    }

    /// This worker's memory budget for request bodies.
    pub(crate) fn budget(&self) -> &Budget {
        &self.inner.budget
    }

    /// Model load and unload.
    pub(crate) fn model_control(&self) -> &crate::model_control::ModelControl {
        &self.inner.model_control
    }

    /// Triton's system shared memory, when on.
    pub(crate) fn system_shm(&self) -> Option<&crate::system_shm::SystemShm> {
        self.inner.system_shm.as_deref()
    }

    /// Where tensors in shared memory are read and written (refused when the extension is off).
    pub(crate) fn shared_memory(&self) -> &dyn crate::infer::SharedMemory {
        match self.system_shm() {
            Some(s) => s,
            None => &crate::infer::NoSharedMemory,
        }
    }

    /// The models this worker serves.
    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The counters of `v` in this worker's block, found once per model version.
    pub(crate) fn model_stats<'v>(&self, v: &'v ModelVersion) -> Option<&'v ModelStats> {
        v.stats
            .get_or_init(|| {
                let entry = self.inner.stats.model(&v.name, v.version.parse().unwrap_or(0));
                if entry.is_none() {
                    tracing::warn!(model = %v.name, version = %v.version, "no statistics entry left for this model version; it is served but not counted");
                }
                entry
            })
            .as_ref()
    }
}

/// What `GET /` says about the engine: backend, library and version, device, threads.
/// How the engine runs models, as `GET /` says it. The library's path (where
/// Python lives on this machine) only with `paths`: on `METRICS_PORT`, never
/// to the inference ports' clients.
pub fn engine_info(e: &tandem_shared::EngineSettings, paths: bool) -> serde_json::Value {
    json!({
        "default_backend": if e.onnxruntime.is_some() && e.backend != tandem_config::engine::BackendChoice::Tract { "onnxruntime" } else { "tract" },
        "onnxruntime": e.onnxruntime.as_ref().map(|o| {
            let mut lib = json!({ "version": o.version, "found_by": o.found_by, "cuda": o.cuda });
            if paths {
                lib["library"] = json!(o.path);
            }
            lib
        }),
        "fallback_reason": e.fallback_reason,
        "device": match e.device { tandem_config::engine::Device::Cpu => "cpu", tandem_config::engine::Device::Cuda => "cuda" },
        "threads": e.threads,
    })
}

/// A JSON error response `{"error": "..."}` ([`tandem_shared::edge::front::error`]).
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    tandem_shared::edge::front::error(status, &message.into()).map(Body::new)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

/// Reads a request body of at most `limit` bytes, taking its share of this
/// worker's memory budget as it arrives (twice its size, the body and what
/// is decoded from it; once when it is compressed: [`crate::compression::inflate`]
/// counts what it inflates to; [`tandem_shared::edge::budget`]): 413 past the limit (at once
/// when `Content-Length` says so), 503 with `Retry-After` when the budget stays
/// taken (once the rest of the body is read and dropped, up to
/// [`tandem_shared::edge::front::DRAIN_BYTES`]), 408 when the body does not arrive within `REQUEST_TIMEOUT`
/// ([`tandem_shared::edge::serve::BodyDeadline`]), 400 when it breaks off. The share
/// is held until the caller drops it (after the answer is made).
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
    budget: &Budget,
) -> Result<(axum::body::Bytes, Share), ApiError> {
    use tandem_shared::edge::front::{self, BodyError};
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: front::too_large_message(&front::max_request_bytes(limit as u64)),
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // A compressed body is held once (what it inflates to is counted as it
    // inflates); a plain one twice, for the tensors decoded from it.
    let compressed = crate::compression::coding(headers)?.is_some();
    let factor = if compressed { 1 } else { 2 };
    let mut share = Share::default();
    // A large body that comes in one chunk (every request from the ring) is
    // kept as it is (front::Collected): gathering it into a buffer was a
    // second copy of a 4 MiB HTTPS body in the engine.
    match front::read_body(body, limit, declared, factor, budget, &mut share).await {
        Ok(body) => Ok((body.into_bytes(), share)),
        Err(BodyError::TooLarge) => Err(too_large()),
        Err(BodyError::Budget(e)) => Err(refused(e)),
        Err(BodyError::Read(e)) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
            while let Some(s) = source {
                if let Some(t) = s.downcast_ref::<tandem_shared::edge::serve::BodyTimedOut>() {
                    return Err(ApiError { status: StatusCode::REQUEST_TIMEOUT, message: t.to_string() });
                }
                source = s.source();
            }
            Err(ApiError::bad(format!("cannot read the request body: {e}")))
        }
    }
}

/// The answer to a request the memory budget cannot take.
pub(crate) fn refused(e: Refused) -> ApiError {
    ApiError { status: e.status(), message: e.to_string() }
}

/// Path parameters: model name and optional version.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ModelPath {
    pub(crate) name: String,
    pub(crate) version: Option<String>,
}

pub(crate) fn find(state: &AppState, p: &ModelPath) -> Result<Arc<ModelVersion>, ApiError> {
    let not_found = |message| ApiError { status: StatusCode::NOT_FOUND, message };
    let models = state.inner.engine.models_now();
    let model = models.get(&p.name).ok_or_else(|| not_found(format!("unknown model {:?}", p.name)))?;
    let unavailable = |reason: &str| ApiError::unavailable(format!("model {:?} is unavailable: {reason}", p.name));
    if let Some(reason) = &model.error {
        return Err(unavailable(reason));
    }
    match model.version(p.version.as_deref()) {
        Some(VersionState::Ready(v)) => Ok(v.clone()),
        Some(VersionState::Unavailable(reason)) => Err(unavailable(reason)),
        None => Err(not_found(format!(
            "model {:?} has no version {:?}; it has {:?}",
            p.name,
            p.version.as_deref().unwrap_or(""),
            model.labels()
        ))),
    }
}

/// The served certificate as the supervisor last recorded it, with its remaining lifetime.
pub(crate) async fn certificate(state: &AppState) -> serde_json::Value {
    let Some(path) = &state.inner.cert_status else { return serde_json::Value::Null };
    match tokio::fs::read(path)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<tandem_shared::certs::status::CertStatus>(&b).ok())
    {
        Some(status) => status.to_json(),
        None => json!({ "error": "certificate status not available yet" }),
    }
}
