//! The engine side of the shared-memory ring: claim requests the HTTPS worker
//! submitted, run them through the same router as plain HTTP, write the answer back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use tandem_shared::frame::{decode_request, encode_response, FrameError, RequestFrame};
use tandem_shared::sys::shm::{Claim, Region};
use tower::ServiceExt;

use crate::state::Scheme;

/// How long a claimer sleeps on the futex before re-checking its stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// How long a claimer that has just answered watches the ring for the next
/// request before it sleeps, yielding its core to anyone runnable meanwhile.
/// A request caught here costs no futex wake-up on either side (the HTTPS
/// worker skips the syscall while no claimer sleeps) and no switch back in,
/// which on a VM is most of a small request's trip through the ring. digits
/// over HTTPS, 2 workers (docs/BENCHMARKS.md): 1 connection 6.1k -> 12.9k
/// req/s, 16 connections 25.0k -> 28.5k with 63 -> 52 µs of CPU per request.
const WATCH_FOR_WORK: Duration = Duration::from_micros(150);
/// Requests for dynamically batched models a busy worker holds at once: they
/// wait in the batcher as tasks, so the claimers go on claiming (the batch
/// forms). Few, because every one held here is one an idle engine worker
/// could have claimed: on `cnn` over HTTPS with 2 workers, holding 256 ran
/// 0.83x unbatched, 16 0.79x, 4 0.89x (scripts/bench-view, docs/BENCHMARKS.md).
const MAX_BATCHED_HELD: usize = 4;

/// Whether a request path is an inference on a dynamically batched model.
pub type IsBatched = Arc<dyn Fn(&str) -> bool + Send + Sync>;

tokio::task_local! {
    /// Set while a claimer thread runs a request: inference may run inline on
    /// that thread (it is ours to block) instead of hopping to the blocking pool.
    static ON_CLAIMER: ();
}

/// Whether the current request runs on a claimer thread (see [`ON_CLAIMER`]).
pub fn on_claimer_thread() -> bool {
    ON_CLAIMER.try_with(|_| ()).is_ok()
}

/// Claims requests from the ring until stopped; see [`ShmServer::stop`].
#[derive(Debug)]
pub struct ShmServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ShmServer {
    /// Starts `claimers` threads. Each claims one request at a time and runs it
    /// to completion on its own thread, so a busy worker holds at most
    /// `claimers` requests and leaves the rest of the queue to idle workers,
    /// and a request costs one wake-up here instead of three thread hops.
    ///
    /// Requests for which `batched` says yes are the exception: they are
    /// handed to the runtime as tasks (up to [`MAX_BATCHED_HELD`] at once), so
    /// that enough of them wait together for the batcher to form batches.
    pub fn start(
        region: Arc<Region>,
        worker_id: u64,
        app: Router,
        claimers: usize,
        batched: IsBatched,
    ) -> std::io::Result<ShmServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Handle::current();
        let held = Arc::new(AtomicUsize::new(0));
        let watching = Arc::new(AtomicBool::new(false));
        let threads = (0..claimers.max(1))
            .map(|i| {
                let (region, app, rt, stop) = (region.clone(), app.clone(), rt.clone(), stop.clone());
                let (batched, held, watching) = (batched.clone(), held.clone(), watching.clone());
                std::thread::Builder::new().name(format!("shm-claimer-{i}")).spawn(move || {
                    let ctx = Claimer {
                        region: &region,
                        worker_id,
                        app: &app,
                        rt: &rt,
                        stop: &stop,
                        batched,
                        held,
                        watching,
                    };
                    claim_loop(&ctx, i as u32)
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(ShmServer { stop, threads })
    }

    /// Stops claiming and waits (up to `timeout`) for the requests held to be answered.
    pub async fn stop(self, timeout: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let joined = tokio::task::spawn_blocking(move || self.threads.into_iter().for_each(|t| drop(t.join())));
        if tokio::time::timeout(timeout, joined).await.is_err() {
            tracing::warn!("shared-memory requests still running at the drain deadline");
        }
    }
}

struct Claimer<'a> {
    region: &'a Arc<Region>,
    worker_id: u64,
    app: &'a Router,
    rt: &'a tokio::runtime::Handle,
    stop: &'a AtomicBool,
    batched: IsBatched,
    held: Arc<AtomicUsize>,
    /// A claimer of this worker watches the ring: the others sleep.
    watching: Arc<AtomicBool>,
}

fn claim_loop(c: &Claimer<'_>, first: u32) {
    let mut hint = first;
    // Whether this claimer just answered a request (it watches before sleeping).
    let mut busy = false;
    while !c.stop.load(Ordering::SeqCst) {
        let seen = c.region.work_seq();
        match c.region.claim(c.worker_id, hint) {
            Some(claim) => {
                busy = true;
                hint = claim.slot().wrapping_add(1);
                let frame = decode_request(claim.request());
                let to_batch = frame.as_ref().is_ok_and(|f| (c.batched)(f.uri.path()));
                if to_batch && c.held.fetch_add(1, Ordering::SeqCst) < MAX_BATCHED_HELD {
                    let (app, held) = (c.app.clone(), c.held.clone());
                    c.rt.spawn(async move {
                        answer(claim, frame, app).await;
                        held.fetch_sub(1, Ordering::SeqCst);
                    });
                } else {
                    if to_batch {
                        c.held.fetch_sub(1, Ordering::SeqCst);
                    }
                    c.rt.block_on(ON_CLAIMER.scope((), answer(claim, frame, c.app.clone())));
                }
            }
            // One claimer of this worker watches; the others sleep (a watch
            // each only took the cores from the requests being answered).
            None if busy && c.watching.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() => {
                busy = false;
                let came = c.region.watch_for_work(c.worker_id, seen, WATCH_FOR_WORK);
                c.watching.store(false, Ordering::SeqCst);
                if came {
                    c.region.wake_for_rest();
                }
            }
            None if busy => busy = false,
            None => c.region.wait_for_work(seen, IDLE_WAIT),
        }
    }
}

/// Runs one claimed request through the router and publishes the response.
async fn answer(mut claim: Claim, frame: Result<RequestFrame, FrameError>, app: Router) {
    let (status, headers, body, trailers) = match frame {
        Ok(frame) => {
            let mut req = Request::new(Body::from(frame.body));
            *req.method_mut() = frame.method;
            *req.uri_mut() = frame.uri;
            *req.headers_mut() = frame.headers;
            req.extensions_mut().insert(Scheme::Https);
            // The client's address, as the HTTPS worker wrote it (never the client).
            if let Some(peer) = req.headers_mut().remove(tandem_shared::edge::access::PEER_HEADER) {
                if let Some(addr) = peer.to_str().ok().and_then(|p| p.parse().ok()) {
                    req.extensions_mut().insert(tandem_shared::edge::serve::Peer(addr));
                }
            }
            let Ok(res) = app.oneshot(req).await;
            let (parts, body) = res.into_parts();
            // A gRPC answer ends with trailers (its status); they cross the ring too.
            match http_body_util::BodyExt::collect(body).await {
                Ok(collected) => {
                    let trailers = collected.trailers().cloned();
                    (parts.status, parts.headers, collected.to_bytes().to_vec(), trailers)
                }
                Err(e) => {
                    error_parts(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot read the response body: {e}"))
                }
            }
        }
        Err(e) => error_parts(StatusCode::BAD_REQUEST, &format!("malformed shared-memory request frame: {e}")),
    };
    let n = match encode_response(claim.response_buf(), status, &headers, &body, trailers.as_ref()) {
        Ok(n) => n,
        Err(FrameError::TooLarge { capacity }) => {
            let (s, h, b, _) = error_parts(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "the response ({} bytes) is larger than a shared-memory slot ({capacity} bytes); raise SHM_SLOT_BYTES",
                    body.len()
                ),
            );
            encode_response(claim.response_buf(), s, &h, &b, None).unwrap_or(0)
        }
        Err(e) => {
            let (s, h, b, _) =
                error_parts(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot encode the response: {e}"));
            encode_response(claim.response_buf(), s, &h, &b, None).unwrap_or(0)
        }
    };
    claim.finish(n);
}

fn error_parts(status: StatusCode, message: &str) -> (StatusCode, HeaderMap, Vec<u8>, Option<HeaderMap>) {
    let (headers, body) = tandem_shared::edge::front::error_parts(status, message);
    (status, headers, body.to_vec(), None)
}
