//! The API router, a plain function so that every listener serves the very same API,
//! and the handlers of the Open Inference Protocol's routes.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use tandem_shared::stats::Timings;

use crate::engine::batcher::Place;
use crate::engine::{ModelVersion, VersionState, PLATFORM};
use crate::infer::{build_inputs, decode_body, encode_response, requested_outputs, ApiError, HEADER_LENGTH};
use crate::state::{certificate, error, find, read_body, AppState, ModelPath, Scheme};

/// The API, served identically on the HTTP and HTTPS listeners.
pub fn router(state: AppState) -> Router {
    let worker_id = HeaderValue::from(state.inner.worker_id);
    let id = state.inner.worker_id;
    let stats = state.inner.stats.clone();
    let access_log = state.inner.access_log;
    let door = state.inner.door.clone();
    let body_timeout = state.inner.body_timeout;
    let max_message = state.inner.max_request_bytes;
    let grpc = crate::grpc::service(state.clone());
    let health = crate::grpc::health(state.clone());
    let (reflection, reflection_alpha) = crate::grpc::reflection();
    let [reflection_path, reflection_alpha_path] = tandem_shared::edge::restricted::GRPC_REFLECTION;
    Router::new()
        .route("/", get(info))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/v2/models/stats", get(crate::metrics::all_model_stats))
        .route("/v2/models/{name}/stats", get(crate::metrics::model_stats))
        .route("/v2/models/{name}/versions/{version}/stats", get(crate::metrics::model_stats))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(crate::control_api::load))
        .route("/v2/repository/models/{name}/unload", post(crate::control_api::unload))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/config", get(model_config))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/config", get(model_config))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .route("/v2/systemsharedmemory/status", get(crate::system_shm::http_status_all))
        .route("/v2/systemsharedmemory/unregister", post(crate::system_shm::http_unregister_all))
        .route("/v2/systemsharedmemory/region/{name}/status", get(crate::system_shm::http_status))
        .route("/v2/systemsharedmemory/region/{name}/register", post(crate::system_shm::http_register))
        .route("/v2/systemsharedmemory/region/{name}/unregister", post(crate::system_shm::http_unregister))
        .route("/v2/cudasharedmemory/status", get(crate::system_shm::http_cuda_status))
        .route("/v2/cudasharedmemory/unregister", post(crate::system_shm::http_cuda_unregister))
        .route("/v2/cudasharedmemory/region/{name}/status", get(crate::system_shm::http_cuda_status))
        .route("/v2/cudasharedmemory/region/{name}/register", post(crate::system_shm::http_cuda_register))
        .route("/v2/cudasharedmemory/region/{name}/unregister", post(crate::system_shm::http_cuda_unregister))
        // The gRPC face, behind the same front door, counted the same way.
        .route_service(&format!("{}{{*method}}", crate::grpc::PREFIX), grpc)
        .route_service(&format!("{}{{*method}}", crate::grpc::HEALTH_PREFIX), health)
        .route_service(&format!("{reflection_path}{{*method}}"), reflection)
        .route_service(&format!("{reflection_alpha_path}{{*method}}"), reflection_alpha)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .with_state(state)
        .layer(axum::middleware::from_fn(move |mut req: axum::extract::Request, next: axum::middleware::Next| {
            let (worker_id, stats, door) = (worker_id.clone(), stats.clone(), door.clone());
            async move {
                let _in_flight = stats.in_flight();
                let https = req.extensions().get::<Scheme>() == Some(&Scheme::Https);
                let grpc = tandem_shared::edge::grpc::is_call(req.headers());
                if grpc {
                    tandem_shared::edge::grpc::answer_as_asked(req.headers_mut());
                    // Every message at most MAX_REQUEST_BYTES, refused from its prefix alone.
                    let body = std::mem::take(req.body_mut());
                    *req.body_mut() = axum::body::Body::new(tandem_shared::edge::grpc::Checked::new(
                        body,
                        max_message,
                        crate::grpc::framing_status,
                    ));
                }
                // A client stream lasts as long as its client likes (its grpc-timeout bounds it).
                let streams = grpc && tandem_shared::edge::grpc::is_client_stream(req.uri().path());
                if !https {
                    // Only the HTTPS worker vouches for a client's certificate or key.
                    tandem_shared::edge::access::remove_vouched(req.headers_mut());
                    if !streams && !axum::body::HttpBody::is_end_stream(req.body()) {
                        let body = std::mem::take(req.body_mut());
                        *req.body_mut() =
                            axum::body::Body::new(tandem_shared::edge::serve::BodyDeadline::new(body, body_timeout));
                    }
                }
                // A request over the ring met the HTTPS worker's front door, which vouches for its caller.
                let mut arrival = if https {
                    tandem_shared::edge::access::Arrival::from_ring(&req, access_log)
                } else {
                    tandem_shared::edge::access::Arrival::new(&req, false, access_log)
                };
                // Answers are compressed when the client's Accept-Encoding asks; never a
                // gRPC answer (its messages carry their own compression, and its status
                // comes in trailers that rewriting the body would lose).
                let encoding = crate::compression::wanted(req.headers()).filter(|_| !grpc);
                // Plain HTTP meets its front door here; HTTPS requests met the HTTPS worker's.
                let door = (!https).then_some(door);
                let web_origin = door.as_ref().and_then(|_| req.headers().get(header::ORIGIN).cloned());
                let answer = door.as_ref().and_then(|d| d.answer(&mut req));
                arrival.identified(&req);
                let grpc_port = req.extensions().get::<GrpcPort>().is_some();
                let mut res = match answer {
                    Some(answer) => answer.map(Body::new),
                    None if grpc_port && !grpc => error(
                        StatusCode::NOT_FOUND,
                        "this port (GRPC_PORT) serves gRPC calls only (content-type: application/grpc); the HTTP API is on PORT",
                    ),
                    None => next.run(req).await,
                };
                if let Some(e) = encoding {
                    res = crate::compression::compress_response(res, e).await;
                }
                if let Some(d) = &door {
                    d.finish(web_origin.as_ref(), res.headers_mut());
                }
                res.headers_mut().insert("x-tandem-worker", worker_id);
                let bytes_out = axum::body::HttpBody::size_hint(res.body()).exact();
                let status = tandem_shared::edge::access::counted_status(res.status(), res.headers());
                arrival.answered(&stats, status, bytes_out, id);
                res
            }
        }))
}

async fn info(State(state): State<AppState>, scheme: Option<Extension<Scheme>>) -> Json<serde_json::Value> {
    let scheme = scheme.map_or(Scheme::Http, |Extension(s)| s);
    let models: Vec<_> = state
        .inner
        .engine
        .models()
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

/// The protocol extensions served (model load and unload only in explicit mode).
pub(crate) fn extensions(state: &AppState) -> Vec<&'static str> {
    let mut extensions =
        vec!["classification", "binary_tensor_data", "statistics", "model_configuration", "system_shared_memory"];
    if state.inner.model_control.mode == tandem_config::engine::ModelControlMode::Explicit {
        extensions.push("model_repository");
    }
    extensions
}

/// Server metadata.
async fn server_metadata(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "name": "tandem", "version": tandem_shared::VERSION, "extensions": extensions(&state) }))
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
    let models = engine.models();
    let mut body = json!({ "ready": ready, "models": models.len() });
    let unavailable: Vec<_> =
        models.iter().filter_map(|(n, m)| m.reason().map(|r| json!({ "name": n, "reason": r }))).collect();
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
    if ready {
        Json(body).into_response()
    } else {
        unready(body)
    }
}

/// A readiness answer of "not now": 503 with `body` and, like every 503
/// tandem gives, `Retry-After` (load balancers and clients back off by it).
fn unready(body: serde_json::Value) -> Response {
    let mut res = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// Triton's repository index: every model and version with its state and, when unavailable, the reason.
/// One entry of the repository index: name, version (none for a model that
/// failed as a whole), `READY` or `UNAVAILABLE`, and why not.
pub(crate) struct IndexEntry {
    pub(crate) name: String,
    pub(crate) version: Option<String>,
    pub(crate) state: &'static str,
    pub(crate) reason: Option<String>,
}

/// The repository index both faces answer.
pub(crate) fn repository_entries(state: &AppState) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    for (name, m) in &state.inner.engine.index() {
        if let Some(reason) = &m.error {
            out.push(IndexEntry {
                name: name.clone(),
                version: None,
                state: "UNAVAILABLE",
                reason: Some(reason.clone()),
            });
            continue;
        }
        for (v, s) in &m.versions {
            let (state, reason) = match s {
                VersionState::Ready(_) => ("READY", None),
                VersionState::Unavailable(r) => ("UNAVAILABLE", Some(r.clone())),
            };
            out.push(IndexEntry { name: name.clone(), version: Some(v.to_string()), state, reason });
        }
    }
    out
}

async fn repository_index(State(state): State<AppState>) -> Json<serde_json::Value> {
    let out: Vec<serde_json::Value> = repository_entries(&state)
        .into_iter()
        .map(|e| {
            let mut v = json!({ "name": e.name, "state": e.state });
            if let Some(version) = e.version {
                v["version"] = json!(version);
            }
            if let Some(reason) = e.reason {
                v["reason"] = json!(reason);
            }
            v
        })
        .collect();
    Json(json!(out))
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let v = find(&state, &p)?;
    let versions = state.inner.engine.models().get(&p.name).map(|m| m.labels()).unwrap_or_default();
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
            unready(json!({ "name": p.name, "ready": false, "error": e.message }))
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
    let mut config = crate::engine::config::to_json(&v.config);
    // tandem's own: which execution provider runs it (not a ModelConfig field).
    config["execution_provider"] = json!(v.provider);
    Ok(Json(config))
}

async fn infer(State(state): State<AppState>, Path(p): Path<ModelPath>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let model = match find(&state, &p) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    counted(&state, &model, started, run_infer(&state, &model, &headers, body, started))
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Awaits one inference request of `model` (`run`: its answer, batch size,
/// the executions it stands for and where its time went) and counts it in
/// the version's statistics, a success or a failure, timed from `started`.
pub(crate) async fn counted<T>(
    state: &AppState,
    model: &Arc<ModelVersion>,
    started: Instant,
    run: impl std::future::Future<Output = Result<(T, u64, Option<u64>, Timings), ApiError>>,
) -> Result<T, ApiError> {
    let counters = state.model_stats(model);
    match run.await {
        Ok((answer, batch, execution, timings)) => {
            if let Some(c) = counters {
                c.success(batch, execution, timings, started.elapsed());
            }
            Ok(answer)
        }
        Err(e) => {
            if let Some(c) = counters {
                c.failure(started.elapsed());
            }
            Err(e)
        }
    }
}

/// Marks a request that arrived on `GRPC_PORT`.
#[derive(Debug, Clone, Copy)]
struct GrpcPort;

/// The router as `GRPC_PORT` serves it: gRPC calls pass; anything else is a
/// 404 that says where HTTP is served (the port is Triton's gRPC-only 8001),
/// answered by the router's middleware so that it is counted and logged.
pub fn grpc_only(app: Router) -> Router {
    app.layer(axum::Extension(GrpcPort))
}

/// Runs one inference request; returns the response, its batch size, the
/// executions it stands for and where its time went.
async fn run_infer(
    state: &AppState,
    model: &Arc<ModelVersion>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<(Response, u64, Option<u64>, Timings), ApiError> {
    let limit = state.inner.max_request_bytes;
    let (bytes, mut share) = read_body(headers, body, limit, &state.inner.budget).await?;
    // gzip / deflate bodies (tritonclient's request compression), inflated within
    // MAX_REQUEST_BYTES, the inflated bytes counted against the budget as they come.
    let bytes = match crate::compression::inflate(headers, &bytes, limit, &state.inner.budget, &mut share).await? {
        Some(inflated) => axum::body::Bytes::from(inflated),
        None => bytes,
    };
    let decoding = Instant::now();
    let (req, binary) = decode_body(&bytes, header_length(headers)?)?;
    shared_input_budget(state, &req, &mut share).await?;
    let inputs = build_inputs(model, &req, binary, state.shared_memory())?;
    let requested = requested_outputs(model, &req)?;
    let wanted: Vec<usize> = requested.iter().map(|r| r.index).collect();
    let (outputs, batch, execution, mut timings) = execute(state, model, inputs, wanted, started, decoding).await?;
    let encoding = Instant::now();
    let (body, json_len) = encode_response(model, &req, &requested, outputs, state.shared_memory())?;
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
    timings.output += encoding.elapsed();
    Ok((res, batch, execution, timings))
}

/// Inputs read from shared memory are held in memory like a body: at most
/// `MAX_REQUEST_BYTES` per request, counted against the worker's budget.
pub(crate) async fn shared_input_budget(
    state: &AppState,
    req: &crate::infer::InferRequest,
    share: &mut tandem_shared::edge::budget::Share,
) -> Result<(), ApiError> {
    let bytes = crate::infer::shared_input_bytes(req)?;
    if bytes == 0 {
        return Ok(());
    }
    if bytes > state.max_request_bytes() as u64 {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the inputs in shared memory add up to {bytes} bytes, over MAX_REQUEST_BYTES ({})",
                state.max_request_bytes()
            ),
        });
    }
    state.budget().take(share, bytes, tandem_shared::edge::budget::WAIT).await.map_err(crate::state::refused)
}

/// Runs decoded `inputs` on `model` (under its `max_inflight`, through its
/// batcher or on an inference thread) for the outputs at `wanted`: the path
/// every face of the protocol shares once its request is decoded. Returns the
/// outputs, the batch size, the executions it stands for and where the time went
/// (`started`: the request's arrival; `decoding`: when its decoding began).
pub(crate) async fn execute(
    state: &AppState,
    model: &Arc<ModelVersion>,
    inputs: Vec<crate::engine::tensor::Tensor>,
    wanted: Vec<usize>,
    started: Instant,
    decoding: Instant,
) -> Result<(Vec<crate::engine::tensor::Tensor>, u64, Option<u64>, Timings), ApiError> {
    // A version's max_inflight, counted from here (a body still arriving holds
    // no place): past it, "not now" rather than an ever longer queue.
    let _slot = model.admit().map_err(|max| {
        state.inner.stats.access(tandem_shared::stats::access_event::MODEL_BUSY);
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("model {} is running its max_inflight of {max} requests here; retry shortly", model.name),
        }
    })?;
    let batch =
        if model.max_batch_size > 0 { inputs.first().and_then(|t| t.shape.first()).copied().unwrap_or(1) } else { 1 };
    let mut timings = Timings { input: decoding.elapsed(), ..Timings::default() };

    let engine = &state.inner.engine;
    let crashed = |detail: String| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("inference crashed{detail}"),
    };
    // The execution this request stands for, by its batch size.
    let mut execution = Some(batch as u64);
    // A claimer thread is ours to block, and a serving thread may run a quick
    // version itself: no hop to the blocking pool (ModelVersion::runs_quickly).
    let place = if crate::shm_server::on_claimer_thread() {
        Place::Block
    } else if on_serving_thread() {
        Place::Quick
    } else {
        Place::Pool
    };
    let outputs = if let Some(policy) = &model.dynamic_batching {
        // Dynamic batching: the batcher waits for an inference thread and runs this request with others.
        let batcher = model
            .batcher
            .get_or_init(|| crate::engine::batcher::Batcher::start(model, policy.clone(), engine.permits.clone()));
        let done = batcher
            .infer(model, inputs, wanted, batch, place)
            .await
            .map_err(|e| ApiError::bad(format!("inference failed: {e}")))?;
        timings.queue = decoding.duration_since(started) + done.queue;
        timings.input += done.stacking;
        timings.infer = done.infer;
        timings.output = done.splitting;
        execution = done.counts_execution.then_some(done.batch_rows as u64);
        done.outputs
    } else {
        let queued = Instant::now();
        let _permit =
            engine.permits.acquire().await.map_err(|_| ApiError::unavailable("the worker is shutting down"))?;
        // Queue time: reading the body and waiting for an inference thread.
        timings.queue = decoding.duration_since(started) + queued.elapsed();
        let runner = model.clone();
        let running = Instant::now();
        // A panic in the engine is caught here as spawn_blocking would catch it.
        let elements = inputs.iter().map(|t| t.data.len()).sum();
        let outputs = if place.runs_here(model, elements) {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || runner.run(inputs, &wanted)))
                .map_err(|_| crashed(String::new()))?
        } else {
            tokio::task::spawn_blocking(move || runner.run(inputs, &wanted))
                .await
                .map_err(|e| crashed(format!(": {e}")))?
        }
        .map_err(|e| ApiError::bad(format!("inference failed: {e}")))?;
        timings.infer = running.elapsed();
        outputs
    };
    Ok((outputs, batch as u64, execution, timings))
}

/// Whether this task runs on a single-threaded runtime (one of the worker's
/// serving threads): blocking it briefly holds up only that thread's own
/// connections. On a multi-threaded runtime a blocked worker thread also
/// stalls the tasks queued behind it, so the blocking pool is used there.
fn on_serving_thread() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| matches!(h.runtime_flavor(), tokio::runtime::RuntimeFlavor::CurrentThread))
}

/// The binary extension's `Inference-Header-Content-Length`, once: the same
/// header sent again (in any spelling) with another value is refused, as
/// HTTP refuses two different `Content-Length`s, rather than one of them
/// being picked where something in front might have picked the other.
fn header_length(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(HEADER_LENGTH).iter().map(|v| v.to_str().unwrap_or("(not text)"));
    let first = values.next();
    if let Some(other) = values.find(|v| Some(*v) != first) {
        return Err(ApiError::bad(format!(
            "Inference-Header-Content-Length is given twice, as {:?} and {other:?}",
            first.unwrap_or_default()
        )));
    }
    Ok(first)
}
