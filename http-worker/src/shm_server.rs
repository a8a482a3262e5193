//! The engine side of the shared-memory ring: claim requests the HTTPS worker
//! submitted, run them through the same router as plain HTTP, write the answer back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use tandem_shared::frame::{decode_request, encode_response, FrameError};
use tandem_shared::sys::shm::{Claim, Region};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::router::Scheme;

/// How long the claimer sleeps on the futex before re-checking its stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(200);

/// Claims requests from the ring until stopped; see [`ShmServer::stop`].
#[derive(Debug)]
pub struct ShmServer {
    stop: Arc<AtomicBool>,
    capacity: Arc<Semaphore>,
    limit: u32,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ShmServer {
    /// Starts the claimer thread. At most `limit` requests are held at once, so
    /// a busy worker leaves the rest of the queue to idle ones.
    pub fn start(region: Arc<Region>, worker_id: u64, app: Router, limit: usize) -> std::io::Result<ShmServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS) as u32;
        let capacity = Arc::new(Semaphore::new(limit as usize));
        let handle = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new().name("shm-claimer".into()).spawn({
            let (stop, capacity) = (stop.clone(), capacity.clone());
            move || claim_loop(&region, worker_id, &app, &handle, &stop, &capacity)
        })?;
        Ok(ShmServer { stop, capacity, limit, thread: Some(thread) })
    }

    /// Stops claiming and waits (up to `timeout`) for the requests held to be answered.
    pub async fn stop(mut self, timeout: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if tokio::time::timeout(timeout, self.capacity.acquire_many(self.limit)).await.is_err() {
            tracing::warn!("shared-memory requests still running at the drain deadline");
        }
    }
}

fn claim_loop(
    region: &Arc<Region>,
    worker_id: u64,
    app: &Router,
    rt: &tokio::runtime::Handle,
    stop: &AtomicBool,
    capacity: &Arc<Semaphore>,
) {
    let mut hint = worker_id as u32;
    while !stop.load(Ordering::SeqCst) {
        let Ok(permit) = rt.block_on(capacity.clone().acquire_owned()) else { return };
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let seen = region.work_seq();
            if let Some(claim) = region.claim(worker_id, hint) {
                hint = claim.slot().wrapping_add(1);
                let app = app.clone();
                rt.spawn(async move {
                    answer(claim, app).await;
                    drop(permit);
                });
                break;
            }
            region.wait_for_work(seen, IDLE_WAIT);
        }
    }
}

/// Runs one claimed request through the router and publishes the response.
async fn answer(mut claim: Claim, app: Router) {
    let (status, headers, body) = match decode_request(claim.request()) {
        Ok(frame) => {
            let mut req = Request::new(Body::from(frame.body));
            *req.method_mut() = frame.method;
            *req.uri_mut() = frame.uri;
            *req.headers_mut() = frame.headers;
            req.extensions_mut().insert(Scheme::Https);
            let Ok(res) = app.oneshot(req).await;
            let (parts, body) = res.into_parts();
            match axum::body::to_bytes(body, usize::MAX).await {
                Ok(b) => (parts.status, parts.headers, b.to_vec()),
                Err(e) => {
                    error_parts(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot read the response body: {e}"))
                }
            }
        }
        Err(e) => error_parts(StatusCode::BAD_REQUEST, &format!("malformed shared-memory request frame: {e}")),
    };
    let n = match encode_response(claim.response_buf(), status, &headers, &body) {
        Ok(n) => n,
        Err(FrameError::TooLarge { capacity }) => {
            let (s, h, b) = error_parts(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "the response ({} bytes) is larger than a shared-memory slot ({capacity} bytes); raise SHM_SLOT_BYTES",
                    body.len()
                ),
            );
            encode_response(claim.response_buf(), s, &h, &b).unwrap_or(0)
        }
        Err(e) => {
            let (s, h, b) = error_parts(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot encode the response: {e}"));
            encode_response(claim.response_buf(), s, &h, &b).unwrap_or(0)
        }
    };
    claim.finish(n);
}

fn error_parts(status: StatusCode, message: &str) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut h = HeaderMap::new();
    h.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    (status, h, serde_json::json!({ "error": message }).to_string().into_bytes())
}
