//! Hands decrypted requests to the engine workers through the shared-memory
//! ring and turns their answers back into HTTP responses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tandem_shared::edge::budget::{Budget, Share};
use tandem_shared::edge::front::{self, read_body, Answer, BodyError, FrontDoor, DRAIN_BYTES};
use tandem_shared::edge::grpc;
use tandem_shared::edge::serve::RequestBody;
use tandem_shared::frame::{decode_response, encode_request, FrameError, ResponseFrame};
use tandem_shared::stats::Stats;
use tandem_shared::sys::shm::{Region, DONE, FAILED, SUBMITTED};
use tokio::sync::oneshot;

/// Resubmissions of a request whose engine worker died.
const MAX_RETRIES: u32 = 2;
/// How long the completion thread sleeps before re-checking its stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// How long a serving thread with nothing else to do watches the ring for an
/// answer before it sleeps ([`Completions::watch_before_park`]): a health
/// check or a small model's round trip through an engine that was asleep
/// (its wake-up alone is 40-60 µs on a VM). An answer caught here saves two
/// more wake-ups (the completion thread, then this thread). Against a 30 µs
/// watch: digits over one keep-alive HTTPS connection 4.5k -> 6.1k req/s,
/// over two 9.2k -> 12.5k.
const WATCH_BEFORE_PARK: Duration = Duration::from_micros(150);
/// Above this many requests in the ring, a serving thread sleeps at once.
const WATCH_MAX_PENDING: usize = 2;
/// How long a request may wait for a free slot before 503 (bursts queue, overload is refused).
pub(crate) const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// What the HTTPS worker answers: a whole body, maybe followed by trailers
/// (a gRPC call's status), or a gRPC stream's messages as they are answered.
pub type Reply = Response<BoxBody<Bytes, Infallible>>;

/// Hop-by-hop headers: they describe one connection and never cross the ring.
pub(crate) const HOP_BY_HOP: [header::HeaderName; 5] =
    [header::CONNECTION, header::TRANSFER_ENCODING, header::TE, header::UPGRADE, header::CONTENT_LENGTH];

enum Waiter {
    Waiting(oneshot::Sender<u32>),
    /// The client gave up (deadline); free the slot when the engine answers.
    Abandoned,
}

/// Tracks submitted slots and wakes their tasks when the engine answers.
/// One thread sleeps on the ring's completion futex for all of them.
pub struct Completions {
    region: Arc<Region>,
    pending: Mutex<HashMap<u32, Waiter>>,
    stop: AtomicBool,
    /// Signalled whenever a slot is freed, for requests waiting for one.
    freed: tokio::sync::Notify,
}

impl std::fmt::Debug for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completions").finish_non_exhaustive()
    }
}

impl Completions {
    /// Starts the completion thread. Slots left by a previous HTTPS worker are
    /// freed now, or (if an engine still holds them) when they complete.
    pub fn start(region: Arc<Region>) -> std::io::Result<Arc<Completions>> {
        let freed = region.reset_orphans();
        region.reset_watchers();
        let mut pending = HashMap::new();
        for slot in 0..region.slots() {
            if region.state(slot) & tandem_shared::sys::shm::CLAIMED != 0 {
                pending.insert(slot, Waiter::Abandoned);
            }
        }
        if freed + pending.len() > 0 {
            tracing::info!(freed, held_by_engines = pending.len(), "recovered slots left by a previous https worker");
        }
        let c = Arc::new(Completions {
            region,
            pending: Mutex::new(pending),
            stop: AtomicBool::new(false),
            freed: tokio::sync::Notify::new(),
        });
        let runner = c.clone();
        std::thread::Builder::new().name("shm-completions".into()).spawn(move || runner.run())?;
        Ok(c)
    }

    /// Stops the completion thread (at exit).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Waiter>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            let seen = self.region.done_seq();
            if self.deliver() > 0 && self.watch(seen) {
                continue;
            }
            self.region.wait_for_done(seen, IDLE_WAIT);
        }
    }

    /// After delivering answers, with requests still in the ring: watches the
    /// completion counter for up to [`WATCH_BEFORE_PARK`] before sleeping,
    /// yielding the core, while engines skip the wake-up. True if a
    /// completion came meanwhile.
    fn watch(&self, seen: u32) -> bool {
        !self.lock().is_empty() && self.region.watch_for_done(seen, WATCH_BEFORE_PARK)
    }

    /// Hands every finished slot to its waiter (or frees it when nobody
    /// waits); returns how many.
    fn deliver(&self) -> usize {
        let mut pending = self.lock();
        let finished: Vec<(u32, u32)> =
            pending.keys().map(|&s| (s, self.region.state(s))).filter(|&(_, st)| st == DONE || st == FAILED).collect();
        let n = finished.len();
        for (slot, state) in finished {
            let delivered = match pending.remove(&slot) {
                Some(Waiter::Waiting(tx)) => tx.send(state).is_ok(),
                Some(Waiter::Abandoned) | None => false,
            };
            if !delivered {
                // Abandoned, or the task is gone (cancelled): nobody will read the answer.
                self.release(slot, state);
            }
        }
        n
    }

    /// For a serving thread about to sleep (tokio's `on_thread_park`): while a
    /// request is in the ring, watch it for up to [`WATCH_BEFORE_PARK`],
    /// yielding the core to anyone else runnable (an engine, often), and
    /// deliver what completes. A quick answer then resumes its task on this
    /// thread without a wake-up through the completion thread, which still
    /// delivers whatever takes longer.
    ///
    /// Only with at most [`WATCH_MAX_PENDING`] requests in the ring: under load
    /// the completion thread wakes once for many answers anyway, and a thread
    /// spinning then takes the core from the engines that compute them.
    pub fn watch_before_park(&self) {
        let pending = self.lock().len();
        if pending == 0 || pending > WATCH_MAX_PENDING {
            return;
        }
        // Engines skip waking the completion thread while this watch lasts;
        // whatever completed meanwhile (its wake-up skipped) is delivered here,
        // whether or not the watch saw the counter move: an engine bumps the
        // counter and then looks for watchers, so a completion whose bump came
        // just before this watch read the counter can still have skipped the
        // wake-up because of it. Delivered only here, it waited for the
        // completion thread's IDLE_WAIT (a 200 ms stall, about once in 50 000
        // requests at one request at a time).
        self.region.watch_for_done(self.region.done_seq(), WATCH_BEFORE_PARK);
        self.deliver();
    }

    /// Frees `slot` if it is in `state` and wakes requests waiting for a slot.
    fn release(&self, slot: u32, state: u32) -> bool {
        let freed = self.region.release(slot, state);
        if freed {
            self.freed.notify_waiters();
        }
        freed
    }

    /// Fails every pending request no engine has claimed (their waiters see FAILED).
    fn withdraw_unclaimed(&self) -> usize {
        let slots: Vec<u32> = self.lock().keys().copied().collect();
        slots.into_iter().filter(|&s| self.region.withdraw(s)).count()
    }

    /// Registers interest in `slot` before it is submitted.
    fn register(&self, slot: u32) -> oneshot::Receiver<u32> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(slot, Waiter::Waiting(tx));
        rx
    }

    /// Gives up on `slot`: frees it now if no engine took it yet, else when it completes.
    fn abandon(&self, slot: u32) {
        let mut pending = self.lock();
        if let Some(waiter) = pending.get_mut(&slot) {
            if self.release(slot, SUBMITTED) || self.release(slot, FAILED) {
                pending.remove(&slot);
            } else {
                *waiter = Waiter::Abandoned;
            }
        } else {
            // Already signalled to the (now dropped) receiver: free it ourselves.
            let _ = self.release(slot, DONE) || self.release(slot, FAILED);
        }
    }
}

/// A request's hold on the slot it submitted. Dropped while armed (the
/// request was cancelled: its client went away or its connection was closed
/// while it waited), it gives the slot back through [`Completions::abandon`],
/// now or when the engine finishes, whether or not the answer had already been
/// handed to the dropped task: without it such a slot stayed DONE for ever and
/// the ring ran out of slots.
struct InRing<'a> {
    completions: &'a Completions,
    slot: u32,
    armed: bool,
}

impl Drop for InRing<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.completions.abandon(self.slot);
        }
    }
}

/// Forwards HTTPS requests into the ring.
#[derive(Debug)]
pub struct Forwarder {
    region: Arc<Region>,
    completions: Arc<Completions>,
    max_request_bytes: usize,
    timeout: Duration,
    hint: AtomicU32,
    /// The HTTPS listener's edge policy.
    door: FrontDoor,
    /// The supervisor is gone: the engines are stopping, nothing new is started.
    orphaned: AtomicBool,
    /// The HTTPS worker's statistics block.
    stats: Stats,
    /// With `ACCESS_LOG`: this worker's id, for the lines of the answers it makes itself.
    access_log: Option<u64>,
    /// Request bytes this worker holds at once (`MAX_INFLIGHT_BYTES`).
    pub(crate) budget: Arc<Budget>,
}

/// The answer to a body the memory budget would not take: 503 with
/// `Retry-After` while others hold it, 413 when it alone is larger.
pub fn budget_refused(e: &tandem_shared::edge::budget::Refused) -> Answer {
    json_error(e.status(), &e.to_string())
}

/// The answer to a request that no engine will start because the supervisor died.
fn orphaned() -> Answer {
    let mut res = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "tandem is stopping (its supervisor is gone); the request was not started, retry on another instance",
    );
    res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// How the forwarder treats requests.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// MAX_REQUEST_BYTES.
    pub max_request_bytes: usize,
    /// REQUEST_TIMEOUT.
    pub timeout: Duration,
    /// With `ACCESS_LOG`: this worker's id.
    pub access_log: Option<u64>,
    /// The HTTPS listener's edge policy (HSTS, CORS).
    pub door: FrontDoor,
    /// `MAX_INFLIGHT_BYTES` for this worker.
    pub inflight_bytes: u64,
}

/// Marks a response the HTTPS worker made itself (the engine counts the ones it made).
#[derive(Debug, Clone, Copy)]
struct AnsweredHere;

pub(crate) fn json_error(status: StatusCode, message: &str) -> Answer {
    here(front::error(status, message))
}

/// `res`, marked as made by the HTTPS worker.
fn here(mut res: Answer) -> Answer {
    res.extensions_mut().insert(AnsweredHere);
    res
}

/// An answer as a [`Reply`].
pub(crate) fn boxed(res: Answer) -> Reply {
    res.map(BodyExt::boxed)
}

/// Ring events counted in the statistics (indexes into `stats::RING_EVENTS`).
mod event {
    pub const WAIT: usize = 0;
    pub const BUSY: usize = 1;
    pub const TIMEOUT: usize = 2;
    pub const RESUBMIT: usize = 3;
    pub const TOO_LARGE: usize = 4;
    pub const ENGINE_FAILED: usize = 5;
}

#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer this worker makes instead of the engine's, returned at once, once per request"
)]
impl Forwarder {
    /// A forwarder over `region`, counting into `stats`.
    pub fn new(region: Arc<Region>, completions: Arc<Completions>, stats: Stats, options: ForwardOptions) -> Self {
        Forwarder {
            stats,
            budget: Budget::new(options.inflight_bytes),
            access_log: options.access_log,
            region,
            completions,
            max_request_bytes: options.max_request_bytes,
            timeout: options.timeout,
            hint: AtomicU32::new(0),
            door: options.door,
            orphaned: AtomicBool::new(false),
        }
    }

    /// Serves one request; never fails (errors are JSON responses).
    pub async fn handle<B: RequestBody>(self: Arc<Self>, mut req: Request<B>) -> Result<Reply, Infallible> {
        let mut arrival = tandem_shared::edge::access::Arrival::new(&req, true, self.access_log.is_some());
        let web_origin = req.headers().get(header::ORIGIN).cloned();
        let is_grpc = grpc::is_call(req.headers());
        let answer = self.door.answer(&mut req);
        arrival.identified(&req);
        let forwarded = match answer {
            Some(answer) => Err(here(answer)),
            None if is_grpc && crate::grpc::is_split(req.uri().path()) => Ok(crate::grpc::split(self.clone(), req)),
            None => self.forward(req).await,
        };
        let mut res = match forwarded {
            Ok(res) => res,
            Err(mut res) => {
                // The engine counts (and logs) the answers it made; this worker the ones it made itself.
                if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    self.stats.ring(event::TOO_LARGE);
                }
                if is_grpc && !grpc::is_call(res.headers()) {
                    res = grpc::refusal(res);
                }
                let bytes_out = hyper::body::Body::size_hint(res.body()).exact();
                arrival.answered(
                    &self.stats,
                    tandem_shared::edge::access::counted_status(res.status(), res.headers()),
                    bytes_out,
                    self.access_log.unwrap_or(0),
                );
                boxed(res)
            }
        };
        self.door.finish(web_origin.as_ref(), res.headers_mut());
        Ok(res)
    }

    /// A request through the ring: the engine's answer, or (`Err`) one this worker made.
    async fn forward<B: RequestBody>(&self, req: Request<B>) -> Result<Reply, Answer> {
        let limit = self.body_limit();
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > (limit + DRAIN_BYTES) as u64) {
            // Too much to read through: answer and close, as RFC 9110 allows.
            let mut res = self.too_large();
            res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(res);
        }
        let (mut parts, body) = req.into_parts();
        // Held until the answer is back: the body's copy in the ring is in use until then.
        let mut share = Share::default();
        let read = read_body(body, limit, declared, 1, &self.budget, &mut share);
        let body = match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(b)) => b,
            Ok(Err(BodyError::TooLarge)) => return Err(self.too_large()),
            Ok(Err(BodyError::Budget(e))) => return Err(budget_refused(&e)),
            Ok(Err(BodyError::Read(e))) => {
                return Err(json_error(StatusCode::BAD_REQUEST, &format!("cannot read the request body: {e}")))
            }
            Err(_) => {
                return Err(json_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive within REQUEST_TIMEOUT",
                ))
            }
        };
        self.vouch(&mut parts);
        let grpc_call = grpc::is_call(&parts.headers);
        self.exchange(&parts, body.chunks()).await.map(|frame| reply(frame, grpc_call))
    }

    /// The request's headers as the engine should see them: no hop-by-hop
    /// ones, and what this worker vouches for (client address, certificate,
    /// API key name) set by it alone.
    pub(crate) fn vouch(&self, parts: &mut http::request::Parts) {
        for h in &HOP_BY_HOP {
            parts.headers.remove(h);
        }
        // With the access log on, the client's address travels with the request,
        // and so do a verified client certificate and the API key's name; a
        // client never sets any of them.
        tandem_shared::edge::access::remove_vouched(&mut parts.headers);
        if let Some(key) = parts.extensions.get::<tandem_shared::edge::gate::KeyName>() {
            if let Ok(v) = HeaderValue::from_str(&key.0) {
                parts.headers.insert(tandem_shared::edge::keys::KEY_NAME_HEADER, v);
            }
        }
        if let Some(id) = parts.extensions.get::<Arc<tandem_shared::edge::serve::ClientIdentity>>() {
            let values = tandem_shared::edge::access::client_header_values(id);
            for (name, value) in tandem_shared::edge::access::CLIENT_HEADERS.iter().zip(values) {
                if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
                    parts.headers.insert(*name, v);
                }
            }
        }
        if parts.version == http::Version::HTTP_3 {
            parts.headers.insert(tandem_shared::edge::access::PROTOCOL_HEADER, HeaderValue::from_static("h3"));
        }
        if let Some(peer) =
            parts.extensions.get::<tandem_shared::edge::serve::Peer>().filter(|_| self.access_log.is_some())
        {
            if let Ok(v) = HeaderValue::from_str(&peer.0.to_string()) {
                parts.headers.insert(tandem_shared::edge::access::PEER_HEADER, v);
            }
        }
    }

    /// The largest body (or gRPC message) forwarded: `MAX_REQUEST_BYTES`, or a slot if smaller.
    pub(crate) fn body_limit(&self) -> usize {
        self.max_request_bytes.min(self.region.slot_bytes())
    }

    /// The 413 for a body over MAX_REQUEST_BYTES or a slot, naming the smaller.
    pub(crate) fn too_large(&self) -> Answer {
        let slot_limit = self.region.slot_bytes();
        let which = if self.max_request_bytes <= slot_limit {
            front::max_request_bytes(self.max_request_bytes as u64)
        } else {
            format!("a shared-memory slot ({slot_limit} bytes); raise SHM_SLOT_BYTES")
        };
        here(front::too_large(&which))
    }

    /// Sends one request (headers as the engine should see them, body read
    /// whole) through the ring and waits for its answer: the engine's frame,
    /// or (`Err`) the answer this worker gives when there is none.
    pub(crate) async fn exchange(&self, parts: &http::request::Parts, body: &[Bytes]) -> Result<ResponseFrame, Answer> {
        let Some(mut writer) = self.reserve(body.iter().map(Bytes::len).sum()).await else {
            self.stats.ring(event::BUSY);
            return Err(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "all shared-memory slots are busy; retry shortly or raise SHM_SLOTS / NUM_WORKERS",
            ));
        };
        let len = match encode_request(writer.buf(), &parts.method, &parts.uri, &parts.headers, body) {
            Ok(n) => n,
            Err(FrameError::TooLarge { .. }) => return Err(self.too_large()),
            Err(e) => return Err(json_error(StatusCode::BAD_REQUEST, &format!("cannot forward the request: {e}"))),
        };
        if self.orphaned.load(Ordering::SeqCst) {
            return Err(orphaned());
        }
        let slot = writer.slot();
        let mut rx = self.completions.register(slot);
        writer.submit(len);
        // From here until an arm below takes the answer or frees the slot, a
        // cancelled request (its connection closed) gives the slot back.
        let mut owned = InRing { completions: &self.completions, slot, armed: true };

        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut retries = 0;
        loop {
            let completed = tokio::time::timeout_at(deadline, &mut rx).await;
            // Every arm but the resubmission answers now and frees the slot itself.
            owned.armed = matches!(completed, Ok(Ok(state)) if state != DONE
                && !self.orphaned.load(Ordering::SeqCst) && retries < MAX_RETRIES);
            match completed {
                Ok(Ok(DONE)) => return self.response(slot),
                Ok(Ok(_failed)) if self.orphaned.load(Ordering::SeqCst) => {
                    self.completions.release(slot, FAILED);
                    return Err(orphaned());
                }
                Ok(Ok(_failed)) if retries < MAX_RETRIES => {
                    retries += 1;
                    self.stats.ring(event::RESUBMIT);
                    tracing::warn!(slot, retries, "engine worker died holding a request; resubmitting");
                    rx = self.completions.register(slot);
                    if !self.region.resubmit(slot) {
                        owned.armed = false;
                        self.completions.abandon(slot);
                        return Err(json_error(StatusCode::SERVICE_UNAVAILABLE, "the request was lost while retrying"));
                    }
                }
                Ok(Ok(_failed)) => {
                    self.stats.ring(event::ENGINE_FAILED);
                    self.completions.release(slot, FAILED);
                    return Err(json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the engine workers handling this request died; it was retried twice",
                    ));
                }
                Ok(Err(_)) => {
                    self.completions.abandon(slot);
                    return Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, "the completion thread stopped"));
                }
                Err(_) => {
                    self.stats.ring(event::TIMEOUT);
                    self.completions.abandon(slot);
                    return Err(json_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("no engine worker answered within REQUEST_TIMEOUT ({} s)", self.timeout.as_secs()),
                    ));
                }
            }
        }
    }

    /// A free slot for a body of `len` bytes, waiting up to QUEUE_WAIT (or REQUEST_TIMEOUT if shorter) for one.
    async fn reserve(&self, len: usize) -> Option<tandem_shared::sys::shm::RequestWriter> {
        let deadline = tokio::time::Instant::now() + QUEUE_WAIT.min(self.timeout);
        let mut waited = false;
        loop {
            let hint = self.hint.fetch_add(1, Ordering::Relaxed);
            // Register for the wake-up before looking, so a slot freed in between is not missed.
            let freed = self.completions.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(w) = self.region.reserve(hint, len) {
                return Some(w);
            }
            if !waited {
                waited = true;
                self.stats.ring(event::WAIT);
            }
            tokio::time::timeout_at(deadline, freed).await.ok()?;
        }
    }

    /// The supervisor died: every request no engine has claimed is answered 503
    /// now, and nothing new is sent to the engines (they are stopping too).
    /// Requests an engine holds still get its answer. Returns how many were failed.
    pub fn orphan(&self) -> usize {
        self.orphaned.store(true, Ordering::SeqCst);
        self.completions.withdraw_unclaimed()
    }

    fn response(&self, slot: u32) -> Result<ResponseFrame, Answer> {
        let bytes = self.region.take_response(slot);
        self.completions.freed.notify_waiters();
        let Some(bytes) = bytes else {
            return Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, "the response vanished from its slot"));
        };
        decode_response(&bytes)
            .map_err(|e| json_error(StatusCode::BAD_GATEWAY, &format!("malformed response from the engine: {e}")))
    }
}

/// The engine's answer as this worker sends it: its body, then its trailers
/// when it has them. A gRPC call the engine answered in JSON (a request frame
/// it could not read, an answer too large for a slot) gets the status it means.
fn reply(frame: ResponseFrame, grpc_call: bool) -> Reply {
    if grpc_call && !grpc::is_call(&frame.headers) {
        let message = serde_json::from_slice::<serde_json::Value>(&frame.body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(String::from))
            .unwrap_or_else(|| frame.status.to_string());
        return boxed(grpc::refusal(front::error(frame.status, &message)));
    }
    let body = match frame.trailers {
        // No exact length: with one, hyper sends a content-length and the
        // stream ends with the data, before the trailers (a gRPC answer has none).
        Some(trailers) => {
            let frames = [Frame::data(Bytes::from(frame.body)), Frame::trailers(trailers)];
            StreamBody::new(tokio_stream::iter(frames.map(Ok))).boxed()
        }
        None => Full::new(Bytes::from(frame.body)).boxed(),
    };
    let mut res = Response::new(body);
    *res.status_mut() = frame.status;
    *res.headers_mut() = frame.headers;
    for h in &HOP_BY_HOP {
        res.headers_mut().remove(h);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tandem_shared::stats::ProcessRole;
    use tandem_shared::sys::shm::FREE;

    /// A forwarder over a ring of `slots` slots with no engine: the test answers.
    fn forwarder(slots: u32) -> (Arc<Region>, Forwarder) {
        let (region, _fd) = Region::create(slots, 4096, 0).expect("region");
        let completions = Completions::start(region.clone()).expect("completion thread");
        let (counters, _fd) =
            tandem_shared::sys::counters::Counters::create(tandem_shared::stats::region_words(2)).expect("stats");
        let stats = Stats::attach(counters, 1, ProcessRole::Https, 1);
        let options = ForwardOptions { max_request_bytes: 1024, timeout: Duration::from_secs(5), ..Default::default() };
        (region.clone(), Forwarder::new(region, completions, stats, options))
    }

    fn health() -> http::request::Parts {
        Request::builder().uri("/v2/health/live").body(()).expect("request").into_parts().0
    }

    /// Plays the engine: claims the one submitted request and answers 200.
    fn answer(region: &Arc<Region>) {
        answer_claim(region.claim(7, 0).expect("a request in the ring"));
    }

    fn answer_claim(mut claim: tandem_shared::sys::shm::Claim) {
        let n = tandem_shared::frame::encode_response(
            claim.response_buf(),
            StatusCode::OK,
            &http::HeaderMap::new(),
            b"{}",
            None,
        )
        .expect("encode");
        claim.finish(n);
    }

    async fn until_delivered(fwd: &Forwarder) {
        while !fwd.completions.lock().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_request_cancelled_after_its_answer_arrived_gives_its_slot_back() {
        let (region, fwd) = forwarder(1);
        let parts = health();
        let mut waiting = Box::pin(fwd.exchange(&parts, &[]));
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut waiting).await.is_err(), "no engine answered yet");
        answer(&region);
        // The answer reaches the waiting task, whose connection closes before it runs again.
        until_delivered(&fwd).await;
        drop(waiting);
        assert_eq!(region.state(0), FREE, "the cancelled request's slot is free again");
        // The ring's only slot serves the next request.
        let next = fwd.exchange(&parts, &[]);
        let engine = async {
            while region.state(0) != SUBMITTED {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            answer(&region);
        };
        let (res, ()) = tokio::join!(next, engine);
        assert_eq!(res.expect("the engine's answer").status, StatusCode::OK);
        assert_eq!(region.state(0), FREE);
    }

    #[tokio::test]
    async fn a_request_cancelled_while_the_engine_runs_it_frees_its_slot_when_the_engine_is_done() {
        let (region, fwd) = forwarder(1);
        let parts = health();
        let mut waiting = Box::pin(fwd.exchange(&parts, &[]));
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut waiting).await.is_err());
        let claim = region.claim(7, 0).expect("a request in the ring");
        drop(waiting);
        assert_ne!(region.state(0), FREE, "the engine still holds it");
        answer_claim(claim);
        let deadline = Instant::now() + Duration::from_secs(5);
        while region.state(0) != FREE {
            assert!(Instant::now() < deadline, "the slot was never freed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
