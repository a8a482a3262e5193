//! The API router, a plain function so that every listener serves the very same API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use tandem_shared::WorkerSettings;

use crate::engine::{Engine, ModelVersion, TensorMeta, VersionState, PLATFORM};
use crate::infer::{build_inputs, decode_body, encode_response, requested_outputs, ApiError, HEADER_LENGTH};

/// Which listener a request arrived on; the HTTPS side inserts `Scheme::Https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTPS (TLS terminated by the HTTPS worker).
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// State shared by every request of one worker.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    worker_id: u64,
    num_workers: usize,
    max_request_bytes: usize,
    engine: Arc<Engine>,
    engine_info: serde_json::Value,
    cert_status: Option<std::path::PathBuf>,
    started: Instant,
    metrics: Metrics,
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    infer_ok: AtomicU64,
    infer_client_error: AtomicU64,
    infer_server_error: AtomicU64,
    infer_micros: AtomicU64,
    inferences: AtomicU64,
}

impl AppState {
    /// State for the worker described by `settings`, serving `engine`.
    pub fn new(settings: &WorkerSettings, engine: Arc<Engine>) -> Self {
        AppState {
            inner: Arc::new(Inner {
                worker_id: settings.worker_id,
                num_workers: settings.num_workers,
                max_request_bytes: usize::try_from(settings.max_request_bytes).unwrap_or(usize::MAX),
                engine,
                engine_info: engine_info(&settings.engine),
                cert_status: settings.cert_status.clone(),
                started: Instant::now(),
                metrics: Metrics::default(),
            }),
        }
    }
}

/// What `GET /` says about the engine: backend, library and version, device, threads.
fn engine_info(e: &tandem_shared::EngineSettings) -> serde_json::Value {
    json!({
        "default_backend": if e.onnxruntime.is_some() && e.backend != tandem_shared::BackendChoice::Tract { "onnxruntime" } else { "tract" },
        "onnxruntime": e.onnxruntime.as_ref().map(|o| json!({ "version": o.version, "library": o.path, "cuda": o.cuda })),
        "fallback_reason": e.fallback_reason,
        "device": match e.device { tandem_shared::Device::Cpu => "cpu", tandem_shared::Device::Cuda => "cuda" },
        "threads": e.threads,
    })
}

/// A JSON error response `{"error": "..."}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

/// The API, served identically on the HTTP and HTTPS listeners.
pub fn router(state: AppState) -> Router {
    let worker_id = HeaderValue::from(state.inner.worker_id);
    Router::new()
        .route("/", get(info))
        .route("/metrics", get(metrics))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/config", get(model_config))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/config", get(model_config))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .with_state(state)
        .layer(axum::middleware::map_response(move |mut res: Response| {
            let worker_id = worker_id.clone();
            async move {
                res.headers_mut().insert("x-tandem-worker", worker_id);
                res
            }
        }))
}

/// Path parameters: model name and optional version.
#[derive(Debug, serde::Deserialize)]
struct ModelPath {
    name: String,
    version: Option<String>,
}

fn find(state: &AppState, p: &ModelPath) -> Result<Arc<ModelVersion>, ApiError> {
    let not_found = |message| ApiError { status: StatusCode::NOT_FOUND, message };
    let model =
        state.inner.engine.models.get(&p.name).ok_or_else(|| not_found(format!("unknown model {:?}", p.name)))?;
    let unavailable = |reason: &str| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("model {:?} is unavailable: {reason}", p.name),
    };
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
async fn certificate(state: &AppState) -> serde_json::Value {
    let Some(path) = &state.inner.cert_status else { return serde_json::Value::Null };
    match tokio::fs::read(path)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<tandem_shared::tls::CertStatus>(&b).ok())
    {
        Some(status) => status.to_json(),
        None => json!({ "error": "certificate status not available yet" }),
    }
}

async fn info(State(state): State<AppState>, scheme: Option<Extension<Scheme>>) -> Json<serde_json::Value> {
    let scheme = scheme.map_or(Scheme::Http, |Extension(s)| s);
    let models: Vec<_> = state
        .inner
        .engine
        .models
        .iter()
        .map(|(n, m)| {
            let mut entry = json!({ "name": n, "versions": m.labels(), "ready": m.ready() });
            if let Some(reason) = m.reason() {
                entry["reason"] = json!(reason);
            }
            entry
        })
        .collect();
    Json(json!({
        "name": "tandem",
        "version": tandem_shared::VERSION,
        "scheme": scheme.as_str(),
        "worker_id": state.inner.worker_id,
        "workers": state.inner.num_workers,
        "models": models,
        "engine": state.inner.engine_info,
        "certificate": certificate(&state).await,
    }))
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "tandem",
        "version": tandem_shared::VERSION,
        "extensions": ["classification", "binary_tensor_data", "model_repository"],
    }))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

/// Ready once the repository is loaded and (strict readiness) every model serves.
/// A degraded certificate is reported here but does not make the server unready:
/// it still serves, with a stand-in certificate.
async fn ready(State(state): State<AppState>) -> Response {
    let engine = &state.inner.engine;
    let cert = certificate(&state).await;
    let ready = engine.ready();
    let mut body = json!({ "ready": ready, "models": engine.models.len() });
    let unavailable: Vec<_> =
        engine.models.iter().filter_map(|(n, m)| m.reason().map(|r| json!({ "name": n, "reason": r }))).collect();
    if !unavailable.is_empty() {
        body["unavailable"] = json!(unavailable);
    }
    if !cert.is_null() {
        body["certificate"] = json!({
            "degraded": cert["degraded"],
            "days_left": cert["days_left"],
            "fingerprint": cert["fingerprint"],
        });
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Triton's repository index: every model and version with its state and, when unavailable, the reason.
async fn repository_index(State(state): State<AppState>) -> Json<serde_json::Value> {
    let mut out = Vec::new();
    for (name, m) in &state.inner.engine.models {
        if let Some(reason) = &m.error {
            out.push(json!({ "name": name, "state": "UNAVAILABLE", "reason": reason }));
            continue;
        }
        for (v, s) in &m.versions {
            out.push(match s {
                VersionState::Ready(_) => json!({ "name": name, "version": v.to_string(), "state": "READY" }),
                VersionState::Unavailable(r) => {
                    json!({ "name": name, "version": v.to_string(), "state": "UNAVAILABLE", "reason": r })
                }
            });
        }
    }
    Json(json!(out))
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let v = find(&state, &p)?;
    let versions = state.inner.engine.models.get(&p.name).map(|m| m.labels()).unwrap_or_default();
    let mut body = json!({
        "name": v.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": v.inputs,
        "outputs": v.outputs,
    });
    if !v.unsupported_outputs.is_empty() {
        body["unsupported_outputs"] = v
            .unsupported_outputs
            .iter()
            .map(|(name, what)| json!({ "name": name, "type": what, "reason": "not a tensor; the protocol cannot carry it" }))
            .collect();
    }
    Ok(Json(body))
}

async fn model_ready(State(state): State<AppState>, Path(p): Path<ModelPath>) -> Response {
    match find(&state, &p) {
        Ok(v) => Json(json!({ "name": v.name, "version": v.version, "ready": true })).into_response(),
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
            (e.status, Json(json!({ "name": p.name, "ready": false, "error": e.message }))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Triton-style configuration (dims without the batch dimension).
async fn model_config(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let v = find(&state, &p)?;
    let dims = |t: &TensorMeta| -> serde_json::Value {
        let skip = usize::from(v.max_batch_size > 0);
        json!({ "name": t.name, "data_type": t.datatype.triton_name(), "dims": t.shape.iter().skip(skip).collect::<Vec<_>>() })
    };
    Ok(Json(json!({
        "name": v.name,
        "platform": PLATFORM,
        "backend": v.backend,
        "execution_provider": v.provider,
        "max_batch_size": v.max_batch_size,
        "input": v.inputs.iter().map(dims).collect::<Vec<_>>(),
        "output": v.outputs.iter().map(dims).collect::<Vec<_>>(),
    })))
}

async fn infer(State(state): State<AppState>, Path(p): Path<ModelPath>, headers: HeaderMap, body: Body) -> Response {
    let m = &state.inner.metrics;
    let started = Instant::now();
    let result = run_infer(&state, &p, &headers, body).await;
    m.infer_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    match result {
        Ok(r) => {
            m.infer_ok.fetch_add(1, Ordering::Relaxed);
            r
        }
        Err(e) => {
            let counter = if e.status.is_client_error() { &m.infer_client_error } else { &m.infer_server_error };
            counter.fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    }
}

async fn run_infer(state: &AppState, p: &ModelPath, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let model = find(state, p)?;
    let limit = state.inner.max_request_bytes;
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("request body exceeds MAX_REQUEST_BYTES ({limit} bytes)"),
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            source = s.source();
        }
        ApiError::bad(format!("cannot read the request body: {e}"))
    })?;
    let header_len = headers.get(HEADER_LENGTH).map(|v| v.to_str().unwrap_or("invalid"));
    let (req, binary) = decode_body(&bytes, header_len)?;
    let inputs = build_inputs(&model, &req, binary)?;
    let requested = requested_outputs(&model, &req)?;
    let wanted: Vec<usize> = requested.iter().map(|r| r.index).collect();

    let engine = &state.inner.engine;
    let _permit = engine.permits.acquire().await.map_err(|_| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the worker is shutting down".into(),
    })?;
    let runner = model.clone();
    let crashed = |detail: String| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("inference crashed{detail}"),
    };
    let outputs = if crate::shm_server::on_claimer_thread() {
        // A claimer thread is ours to block: no hop to the blocking pool. A
        // panic in the engine is caught here as spawn_blocking would catch it.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || runner.run(inputs, &wanted)))
            .map_err(|_| crashed(String::new()))?
    } else {
        tokio::task::spawn_blocking(move || runner.run(inputs, &wanted)).await.map_err(|e| crashed(format!(": {e}")))?
    }
    .map_err(|e| ApiError::bad(format!("inference failed: {e}")))?;
    state.inner.metrics.inferences.fetch_add(1, Ordering::Relaxed);
    let (body, json_len) = encode_response(&model, &req, &requested, outputs)?;
    let mut res = Response::new(Body::from(body));
    let h = res.headers_mut();
    match json_len {
        Some(n) => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            h.insert(HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    Ok(res)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.inner.metrics;
    let id = state.inner.worker_id;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let text = format!(
        "# HELP tandem_infer_requests_total Inference requests by outcome, per worker.\n\
         # TYPE tandem_infer_requests_total counter\n\
         tandem_infer_requests_total{{worker=\"{id}\",outcome=\"ok\"}} {}\n\
         tandem_infer_requests_total{{worker=\"{id}\",outcome=\"client_error\"}} {}\n\
         tandem_infer_requests_total{{worker=\"{id}\",outcome=\"server_error\"}} {}\n\
         # HELP tandem_infer_duration_seconds_sum Time spent answering inference requests.\n\
         # TYPE tandem_infer_duration_seconds_sum counter\n\
         tandem_infer_duration_seconds_sum{{worker=\"{id}\"}} {:.6}\n\
         # HELP tandem_worker_uptime_seconds Seconds since this worker started.\n\
         # TYPE tandem_worker_uptime_seconds gauge\n\
         tandem_worker_uptime_seconds{{worker=\"{id}\"}} {:.3}\n",
        get(&m.infer_ok),
        get(&m.infer_client_error),
        get(&m.infer_server_error),
        get(&m.infer_micros) as f64 / 1e6,
        state.inner.started.elapsed().as_secs_f64(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
