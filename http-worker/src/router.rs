//! The API router, a plain function so that every listener serves the very same API.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::json;
use tandem_shared::WorkerSettings;

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
}

impl AppState {
    /// State for the worker described by `settings`.
    pub fn new(settings: &WorkerSettings) -> Self {
        AppState {
            inner: Arc::new(Inner {
                worker_id: settings.worker_id,
                num_workers: settings.num_workers,
            }),
        }
    }
}

/// A JSON error response `{"error": "..."}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The API, served identically on the HTTP and HTTPS listeners.
pub fn router(state: AppState) -> Router {
    let worker_id = state.inner.worker_id.to_string();
    Router::new()
        .route("/", get(info))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
        .layer(axum::middleware::map_response(move |mut res: Response| {
            let worker_id = worker_id.clone();
            async move {
                if let Ok(v) = worker_id.parse() {
                    res.headers_mut().insert("x-tandem-worker", v);
                }
                res
            }
        }))
}

async fn info(
    State(state): State<AppState>,
    scheme: Option<Extension<Scheme>>,
) -> Json<serde_json::Value> {
    let scheme = scheme.map_or(Scheme::Http, |Extension(s)| s);
    Json(json!({
        "name": "tandem",
        "version": tandem_shared::VERSION,
        "scheme": scheme.as_str(),
        "worker_id": state.inner.worker_id,
        "workers": state.inner.num_workers,
    }))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

async fn ready() -> Json<serde_json::Value> {
    Json(json!({ "ready": true }))
}
