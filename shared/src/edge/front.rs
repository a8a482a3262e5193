//! The front door: the edge policy every request path applies the same way
//! (the engine worker's plain HTTP, the HTTPS worker, the proxy worker), and
//! every answer tandem makes itself, built here (the JSON error shape lives in
//! one place). Before a request reaches its path, [`FrontDoor::answer`] may
//! answer it: an ACME HTTP-01 challenge, the redirect to HTTPS or the refusal
//! of the plain port (`HTTP_MODE`), a CORS preflight. On the way out, [`FrontDoor::finish`] adds what every answer
//! carries: HSTS over HTTPS, the CORS headers.

use std::path::PathBuf;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tandem_config::edge::{Cors, HttpMode};

use crate::WorkerSettings;

/// An answer tandem makes itself.
pub type Answer = Response<Full<Bytes>>;

/// `{"error": message}` with `status`. Every 503 and 429 says when to come
/// back (`Retry-After: 1`, unless the caller knows better): it is always a "not now".
pub fn error(status: StatusCode, message: &str) -> Answer {
    let (headers, body) = error_parts(status, message);
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    // Kept beside the JSON for a face that carries it otherwise (gRPC's grpc-message).
    res.extensions_mut().insert(ErrorMessage(message.into()));
    res
}

/// What an [`error`] answer says, as a response extension.
#[derive(Debug, Clone)]
struct ErrorMessage(std::sync::Arc<str>);

/// What one of tandem's own answers says: its [`error`] message, else its status.
pub fn error_message(answer: &Answer) -> String {
    match answer.extensions().get::<ErrorMessage>() {
        Some(m) => m.0.to_string(),
        None => answer.status().to_string(),
    }
}

/// [`error`]'s headers and body, for a path that frames answers itself (the ring).
pub fn error_parts(status: StatusCode, message: &str) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    (headers, Bytes::from(serde_json::json!({ "error": message }).to_string()))
}

/// 413 for a body over `which` ([`max_request_bytes`], or a smaller limit of the path).
pub fn too_large(which: &str) -> Answer {
    error(StatusCode::PAYLOAD_TOO_LARGE, &too_large_message(which))
}

/// What a 413 says.
pub fn too_large_message(which: &str) -> String {
    format!("request body exceeds {which}")
}

/// `MAX_REQUEST_BYTES` as a 413 names it.
pub fn max_request_bytes(limit: u64) -> String {
    format!("MAX_REQUEST_BYTES ({limit} bytes)")
}

/// How much of a too-large body is still read (and dropped) so that a client
/// that is still sending reads the 413 instead of a broken connection.
pub const DRAIN_BYTES: usize = 64 << 20;

/// Why a request body was not read.
pub enum BodyError {
    /// Over the limit (the rest was drained, up to [`DRAIN_BYTES`]).
    TooLarge,
    /// The connection failed.
    Read(crate::edge::serve::BoxError),
    /// The memory budget for bodies in flight would not take it.
    Budget(crate::edge::budget::Refused),
}

/// A body read whole, its large chunks kept as the connection read them
/// (slices of its read buffer, not copied): the HTTPS worker copies them
/// once, straight into a ring slot. Gathering a 4 MiB body into one buffer
/// first was a second full copy, the largest single cost of a large HTTPS
/// request. Chunks under [`KEPT_CHUNK`] (every HTTP/2 and HTTP/3 DATA frame,
/// a slow HTTP/1 sender's reads) are copied together as before: a slice
/// holds its whole read buffer, so keeping a client's one-byte frames would
/// hold many times the bytes the memory budget counted.
#[derive(Debug, Default)]
pub struct Collected {
    chunks: Vec<Bytes>,
    /// Small chunks gathered since the last kept one.
    tail: bytes::BytesMut,
    len: usize,
    declared: usize,
}

/// The smallest chunk [`Collected`] keeps without copying: an HTTP/1 read
/// buffer is at most about 400 KiB, so a kept chunk holds at most 1.6 times
/// its own bytes.
pub const KEPT_CHUNK: usize = 256 << 10;

/// The least and the most [`Collected`] sets aside at once for a body whose
/// length it was not told.
const TAIL_FIRST: usize = 16 << 10;
const TAIL_STEP: usize = 1 << 20;

impl Collected {
    fn new(declared: usize) -> Self {
        Collected { declared, ..Collected::default() }
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body in one piece: as it is when it is one chunk, else copied together once.
    pub fn into_bytes(mut self) -> Bytes {
        match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.swap_remove(0),
            _ => {
                let mut whole = bytes::BytesMut::with_capacity(self.len);
                for c in &self.chunks {
                    whole.extend_from_slice(c);
                }
                whole.freeze()
            }
        }
    }

    fn push(&mut self, chunk: Bytes) {
        if chunk.len() >= KEPT_CHUNK {
            self.seal();
            self.len += chunk.len();
            self.chunks.push(chunk);
        } else if !chunk.is_empty() {
            if self.tail.capacity() - self.tail.len() < chunk.len() {
                // Full, or not begun: the gathered bytes become a chunk and the
                // next ones go to a new buffer, never a grown one (growing
                // copies everything gathered so far, again at each doubling).
                // Sized for the rest of a declared body; without a length (an
                // HTTP/3 or chunked upload), as large as all so far, up to
                // TAIL_STEP: a few chunks for a large body, and never a
                // buffer far larger than the bytes the budget counted.
                self.seal();
                let rest = match self.declared.checked_sub(self.len) {
                    Some(rest) if rest > 0 => rest,
                    _ => self.len.clamp(TAIL_FIRST, TAIL_STEP),
                };
                self.tail = bytes::BytesMut::with_capacity(rest.max(chunk.len()));
            }
            self.len += chunk.len();
            self.tail.extend_from_slice(&chunk);
        }
    }

    /// Ends the gathered small chunks as one chunk.
    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push(std::mem::take(&mut self.tail).freeze());
        }
    }

    fn clear(&mut self) {
        *self = Collected::default();
    }
}

/// Reads a body of at most `limit` bytes. Past the limit, or refused by the
/// memory budget, it reads on and drops up to [`DRAIN_BYTES`] more, so the
/// 413 or 503 reaches a client still sending (an HTTP/2 stream answered
/// before its body would be reset under the client).
/// The body is counted against `budget` into `share` as it arrives (its
/// declared length at once), `factor` times its bytes (the engine counts a
/// plain body twice: the body and the tensors decoded from it): the process
/// never holds more bodies than its memory budget allows.
pub async fn read_body(
    mut body: impl crate::edge::serve::RequestBody,
    limit: usize,
    expected: Option<u64>,
    factor: u64,
    budget: &crate::edge::budget::Budget,
    share: &mut crate::edge::budget::Share,
) -> Result<Collected, BodyError> {
    let declared = expected.map_or(0, |n| n.min(limit as u64) as usize);
    // Why the body is not taken: past the limit, or the budget would not take
    // it. Either way the rest is read and dropped (up to DRAIN_BYTES), held by
    // nobody, so the answer reaches a client still sending: an HTTP/1
    // connection closed on unread bytes is reset, and the answer with it.
    let mut refused =
        budget.reserve(share, declared as u64 * factor, crate::edge::budget::WAIT).await.err().map(BodyError::Budget);
    let mut buf = Collected::new(declared);
    let mut drained = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.into()))?;
        let Ok(data) = frame.into_data() else { continue };
        if refused.is_some() {
            drained += data.len();
            if drained > DRAIN_BYTES {
                break;
            }
            continue;
        }
        let after = buf.len() + data.len();
        if after > limit {
            refused = Some(BodyError::TooLarge);
        } else if let Err(e) = budget.reserve(share, after as u64 * factor, crate::edge::budget::WAIT).await {
            refused = Some(BodyError::Budget(e));
        } else {
            buf.push(data);
            continue;
        }
        buf.clear();
        *share = crate::edge::budget::Share::default();
    }
    match refused {
        Some(why) => Err(why),
        None => {
            buf.seal();
            Ok(buf)
        }
    }
}

/// The paths the plain port answers whatever `HTTP_MODE` says (but `off`):
/// health checks and model readiness (load balancers and orchestrators probe
/// plain HTTP; Triton's `health` category) and ACME HTTP-01 challenges (the
/// CA asks over plain HTTP).
fn always_answered(path: &str) -> bool {
    // A path another server might read differently (dot segments, empty
    // segments, backslashes) is never let past, and here neither is an escape
    // or a trailing `/`: a copy behind the proxy could resolve
    // /v2/health/../infer to what the port must not serve.
    if path.contains('%') || path.ends_with('/') || super::restricted::ambiguous(path) {
        return false;
    }
    // Model readiness (/v2/models/{name}[/versions/{version}]/ready) as the
    // restricted categories read it.
    path.starts_with("/v2/health/")
        || path.starts_with(ACME_PREFIX)
        || (path.starts_with("/v2/models/") && super::restricted::category(path) == Some("health"))
}

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

/// Headers a browser page may read from an answer (beyond the CORS-safelisted
/// ones): the binary tensor extension's header length, which worker answered,
/// when to retry.
const EXPOSED: &str = "inference-header-content-length, x-tandem-worker, retry-after, content-encoding";
/// Methods the API answers.
const METHODS: &str = "GET, POST, OPTIONS";
/// How long a browser may keep a preflight's answer (seconds).
const PREFLIGHT_MAX_AGE: &str = "600";

/// What a plain listener does with a request that is not a health check
/// (`HTTP_MODE`); HTTPS listeners serve everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Plain {
    /// Serves it.
    #[default]
    Serves,
    /// 403, pointing at the HTTPS port.
    Refuses(u16),
    /// 308 to the same URL on the HTTPS port.
    Redirects(u16),
}

/// The edge policy of one listener (the default applies none).
#[derive(Debug, Clone)]
pub struct FrontDoor {
    hsts: Option<HeaderValue>,
    /// `Alt-Svc` advertising HTTP/3 on the HTTPS port (`SSL_HTTP3`).
    alt_svc: Option<HeaderValue>,
    plain: Plain,
    acme_http01: Option<PathBuf>,
    cors: Cors,
    also_answered: Option<String>,
    /// `RESTRICTED_API`.
    restricted: std::sync::Arc<super::restricted::Restricted>,
    /// `/metrics` is served here (`METRICS_PUBLIC`).
    metrics_public: bool,
    /// API keys and rate limits, when configured.
    gate: Option<std::sync::Arc<super::gate::Gate>>,
}

impl Default for FrontDoor {
    /// Everything served, nothing added.
    fn default() -> Self {
        FrontDoor {
            hsts: None,
            alt_svc: None,
            plain: Plain::Serves,
            acme_http01: None,
            cors: Cors::Off,
            also_answered: None,
            restricted: Default::default(),
            metrics_public: true,
            gate: None,
        }
    }
}

/// A configured header value that cannot be sent.
#[derive(Debug, thiserror::Error)]
#[error("SSL_HSTS is not a valid header value")]
pub struct BadHsts;

impl FrontDoor {
    /// The policy of a listener of this worker: plain HTTP, or HTTPS when
    /// `https`; its refusals count into `stats`, whose region holds the rate
    /// limiter's buckets.
    pub fn new(settings: &WorkerSettings, https: bool, stats: &crate::stats::Stats) -> Result<Self, BadHsts> {
        let hsts = match settings.tls.as_ref().and_then(|t| t.policy.hsts.as_deref()).filter(|_| https) {
            // Validated at start-up (values::valid_hsts); sent over HTTPS only, as RFC 6797 requires.
            Some(v) => Some(HeaderValue::from_str(v).map_err(|_| BadHsts)?),
            None => None,
        };
        // A day, as Caddy and Cloudflare advertise it: HTTP/3 clients try UDP next time.
        let alt_svc = match settings.tls.as_ref().and_then(|t| t.h3).filter(|_| https) {
            Some((_, addr)) => HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", addr.port())).ok(),
            None => None,
        };
        let plain = match (https, settings.edge.https_port, settings.edge.policy.http_mode) {
            (false, Some(port), HttpMode::Redirect) => Plain::Redirects(port),
            (false, Some(port), HttpMode::Health) => Plain::Refuses(port),
            _ => Plain::Serves,
        };
        Ok(FrontDoor {
            hsts,
            alt_svc,
            plain,
            acme_http01: settings.edge.acme_http01.clone().filter(|_| !https),
            cors: settings.edge.policy.cors.clone(),
            also_answered: None,
            restricted: std::sync::Arc::new(super::restricted::Restricted::new(&settings.edge.policy.restricted)),
            metrics_public: settings.edge.policy.metrics_public,
            gate: super::gate::Gate::new(&settings.edge.policy.access, stats).map(std::sync::Arc::new),
        })
    }

    /// Also answers `path` whatever `HTTP_MODE` says, and without an API key
    /// (`WORKER_READY_PATH`, the copies' health check).
    pub fn always_answering(mut self, path: &str) -> Self {
        self.also_answered = Some(path.to_string());
        self
    }

    /// The answer the front door gives itself, before the request path sees
    /// the request; `None` lets the request through (with the
    /// [`super::gate::KeyName`] of its API key in its extensions, when it has one).
    pub fn answer<B>(&self, req: &mut Request<B>) -> Option<Answer> {
        let answer = self.answer_http(req)?;
        // A gRPC client reads its status from grpc-status, not the HTTP one.
        Some(if super::grpc::is_call(req.headers()) { super::grpc::refusal(answer) } else { answer })
    }

    fn answer_http<B>(&self, req: &mut Request<B>) -> Option<Answer> {
        let path = req.uri().path();
        if let Some(dir) = &self.acme_http01 {
            if let Some(token) = path.strip_prefix(ACME_PREFIX) {
                return Some(acme_http01(dir, token));
            }
        }
        if let Some(res) = self.preflight(req) {
            return Some(res);
        }
        if let Some(res) = self.plain_port(req) {
            return Some(res);
        }
        if !self.metrics_public && path == "/metrics" {
            return Some(error(
                StatusCode::NOT_FOUND,
                "/metrics is served on METRICS_PORT only (METRICS_PUBLIC=false)",
            ));
        }
        if self.gate.is_none() && self.restricted.is_empty() {
            return None;
        }
        let (category, health) = match super::restricted::classify(req.uri().path()) {
            // The copies' ready path is their health check too.
            Ok((path, category)) => (
                category,
                super::gate::is_health_check(&path, category) || self.also_answered.as_deref() == Some(&*path),
            ),
            Err(refused) => return Some(*refused),
        };
        // Who the caller is (401) before what it may do (403).
        if let Some(gate) = &self.gate {
            if let Some(refused) = gate.admit(req, health) {
                return Some(refused);
            }
        }
        self.restricted.check_category(req, category)
    }

    /// What the plain port does with a request that is not a health check (`HTTP_MODE`).
    fn plain_port<B>(&self, req: &Request<B>) -> Option<Answer> {
        let path = req.uri().path();
        if self.plain == Plain::Serves || always_answered(path) || self.also_answered.as_deref() == Some(path) {
            return None;
        }
        let port = match self.plain {
            Plain::Redirects(port) => port,
            Plain::Refuses(port) => {
                return Some(error(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "the plain HTTP port answers health checks only (HTTP_MODE=health); use HTTPS on port {port}"
                    ),
                ))
            }
            Plain::Serves => return None,
        };
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
        let host = host.or(req.uri().authority().map(|a| a.as_str()));
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        Some(match crate::edge::serve::https_location(host, port, target) {
            Some(location) => {
                let mut res = error(StatusCode::PERMANENT_REDIRECT, "this server answers over HTTPS");
                res.headers_mut().insert(header::LOCATION, location);
                res
            }
            None => error(StatusCode::BAD_REQUEST, "a Host header is needed to redirect to HTTPS"),
        })
    }

    /// A CORS preflight (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`), answered here when CORS is on: 204
    /// with what the page may send, or 403 for an origin not allowed.
    fn preflight<B>(&self, req: &Request<B>) -> Option<Answer> {
        if self.cors == Cors::Off || req.method() != Method::OPTIONS {
            return None;
        }
        let origin = req.headers().get(header::ORIGIN)?;
        req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
        let Some(allowed) = self.allow_origin(origin) else {
            return Some(error(StatusCode::FORBIDDEN, "this origin may not call the API (CORS_ALLOW_ORIGINS)"));
        };
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(METHODS));
        // The headers the page asked to send, when they are header names.
        if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let names = asked.to_str().ok().filter(|v| v.split(',').all(|n| HeaderName::try_from(n.trim()).is_ok()));
            if names.is_some() {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
            }
        }
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(PREFLIGHT_MAX_AGE));
        h.insert(
            header::VARY,
            HeaderValue::from_static("Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        );
        Some(res)
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, when it is allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        let text = origin.to_str().ok()?;
        if !self.cors.allows(text) {
            return None;
        }
        Some(if self.cors == Cors::Any { HeaderValue::from_static("*") } else { origin.clone() })
    }

    /// Adds what every answer carries on its way out; `origin` is the
    /// request's `Origin` header.
    pub fn finish(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if let Some(h) = &self.hsts {
            headers.insert(header::STRICT_TRANSPORT_SECURITY, h.clone());
        }
        if let Some(h) = &self.alt_svc {
            headers.insert(header::ALT_SVC, h.clone());
        }
        if self.cors == Cors::Off {
            return;
        }
        if self.cors != Cors::Any {
            // The answer differs by origin: caches must keep them apart.
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        if let Some(allowed) = origin.and_then(|o| self.allow_origin(o)) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED));
        }
    }
}

/// ACME HTTP-01: the key authorization for `token`, as the supervisor wrote
/// it for the order in progress; 404 for anything else (RFC 8555 §8.3).
fn acme_http01(dir: &std::path::Path, token: &str) -> Answer {
    match crate::certs::cache::http01_answer(dir, token) {
        Some(body) => {
            let mut res = Response::new(Full::new(Bytes::from(body)));
            res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            res
        }
        None => error(StatusCode::NOT_FOUND, "no ACME challenge with this token"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn a_collected_body_keeps_large_chunks_and_gathers_small_ones() {
        let large = |b: u8| Bytes::from(vec![b; KEPT_CHUNK]);
        let mut c = Collected::new(0);
        for piece in [Bytes::from_static(b"a"), Bytes::from_static(b"bc"), large(1), Bytes::from_static(b"d"), large(2)]
        {
            c.push(piece);
        }
        c.seal();
        // "abc", the first large chunk as it came, "d", the second.
        let sizes: Vec<usize> = c.chunks().iter().map(Bytes::len).collect();
        assert_eq!(sizes, [3, KEPT_CHUNK, 1, KEPT_CHUNK]);
        let kept = large(1);
        let mut k = Collected::new(0);
        k.push(kept.clone());
        k.seal();
        assert_eq!(k.chunks()[0].as_ptr(), kept.as_ptr(), "a large chunk is not copied");
        let whole = c.into_bytes();
        assert_eq!(whole.len(), 4 + 2 * KEPT_CHUNK);
        assert_eq!((&whole[..3], whole[3], whole[3 + KEPT_CHUNK]), (&b"abc"[..], 1, b'd'));
        // A million one-byte frames are one chunk, not a million slices.
        let mut tiny = Collected::new(1 << 20);
        for _ in 0..1 << 20 {
            tiny.push(Bytes::from_static(b"x"));
        }
        tiny.seal();
        assert_eq!((tiny.chunks().len(), tiny.len()), (1, 1 << 20));
        // Without a length, 4 MiB of 1400-byte frames (HTTP/3's) is a few
        // chunks, each filled before the next begins: nothing gathered is copied again.
        let mut unknown = Collected::new(0);
        let frame = Bytes::from(vec![7u8; 1400]);
        while unknown.len() < 4 << 20 {
            unknown.push(frame.clone());
        }
        unknown.seal();
        let sizes: Vec<usize> = unknown.chunks().iter().map(Bytes::len).collect();
        assert!(sizes.len() <= 12, "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= TAIL_STEP + 1400), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), unknown.len());
    }

    fn door(cors: Cors, https: bool, redirect: Option<u16>) -> FrontDoor {
        FrontDoor {
            hsts: https.then(|| HeaderValue::from_static("max-age=60")),
            plain: redirect.map_or(Plain::Serves, Plain::Redirects),
            acme_http01: None,
            cors,
            also_answered: Some("/ready".into()),
            ..FrontDoor::default()
        }
    }

    fn req(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn every_503_says_when_to_come_back() {
        let res = error(StatusCode::SERVICE_UNAVAILABLE, "busy");
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
        assert!(error(StatusCode::NOT_FOUND, "x").headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_is_answered_and_others_refused() {
        let d = door(Cors::Origins(vec!["https://app.example".into()]), false, None);
        let pre = |origin: &str| {
            d.answer(&mut req(
                Method::OPTIONS,
                "/v2/models/m/infer",
                &[
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                    ("access-control-request-headers", "content-type, inference-header-content-length"),
                ],
            ))
        };
        let ok = pre("https://app.example").expect("answered");
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert_eq!(ok.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example");
        assert_eq!(ok.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS], "content-type, inference-header-content-length");
        assert_eq!(pre("https://evil.example").expect("refused").status(), StatusCode::FORBIDDEN);
        // Lookalikes and other spellings of an allowed origin are other origins.
        for other in ["https://app.example.evil", "https://app.example:443.evil", "http://app.example", "null"] {
            assert_eq!(pre(other).expect("refused").status(), StatusCode::FORBIDDEN, "{other}");
        }
        // Requested headers that are not header names are never echoed back.
        let odd = d
            .answer(&mut req(
                Method::OPTIONS,
                "/",
                &[
                    ("origin", "https://app.example"),
                    ("access-control-request-method", "POST"),
                    ("access-control-request-headers", "content-type, bad name!, x"),
                ],
            ))
            .expect("answered");
        assert_eq!(odd.status(), StatusCode::NO_CONTENT);
        assert!(odd.headers().get(header::ACCESS_CONTROL_ALLOW_HEADERS).is_none());
        // A plain OPTIONS (no preflight headers) and CORS off pass through.
        assert!(d.answer(&mut req(Method::OPTIONS, "/", &[("origin", "https://app.example")])).is_none());
        let off = door(Cors::Off, false, None);
        let mut r =
            req(Method::OPTIONS, "/", &[("origin", "https://app.example"), ("access-control-request-method", "POST")]);
        assert!(off.answer(&mut r).is_none());
    }

    #[test]
    fn answers_carry_cors_and_hsts_as_configured() {
        let d = door(Cors::Origins(vec!["https://app.example".into()]), true, None);
        let mut h = HeaderMap::new();
        d.finish(Some(&HeaderValue::from_static("https://app.example")), &mut h);
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example");
        assert_eq!(h[header::STRICT_TRANSPORT_SECURITY], "max-age=60");
        assert!(h[header::ACCESS_CONTROL_EXPOSE_HEADERS].to_str().unwrap().contains("inference-header-content-length"));
        let mut h = HeaderMap::new();
        d.finish(Some(&HeaderValue::from_static("https://evil.example")), &mut h);
        assert!(h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        assert_eq!(h[header::VARY], "Origin");
        let mut h = HeaderMap::new();
        door(Cors::Any, false, None).finish(Some(&HeaderValue::from_static("null")), &mut h);
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(h.get(header::STRICT_TRANSPORT_SECURITY).is_none() && h.get(header::VARY).is_none());
    }

    #[test]
    fn plain_http_is_redirected_except_health_acme_and_the_ready_path() {
        let d = door(Cors::Off, false, Some(8443));
        let r = d.answer(&mut req(Method::GET, "/v2/models?x=1", &[("host", "a.example:8080")])).expect("redirected");
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()[header::LOCATION], "https://a.example:8443/v2/models?x=1");
        for path in ["/v2/health/ready", "/ready"] {
            assert!(d.answer(&mut req(Method::GET, path, &[("host", "a.example")])).is_none(), "{path}");
        }
        let bad = d.answer(&mut req(Method::GET, "/", &[("host", "a b")])).expect("answered");
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_health_only_plain_port_answers_probes_and_refuses_the_rest() {
        let d = FrontDoor { plain: Plain::Refuses(8443), ..door(Cors::Off, false, None) };
        for path in [
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/digits/ready",
            "/v2/models/digits/versions/2/ready",
            "/ready",
            "/.well-known/acme-challenge/t",
        ] {
            assert!(d.answer(&mut req(Method::GET, path, &[])).is_none(), "{path}");
        }
        for path in [
            "/",
            "/v2",
            "/v2/models/digits/infer",
            "/v2/models//ready",
            "/v2/repository/index",
            "/metrics",
            "/v2/models/ready/infer",
            "/v2/health/../models/d/infer",
            "/v2/health/%2e%2e/x",
            "/v2/health//x",
        ] {
            let r = d.answer(&mut req(Method::POST, path, &[])).expect(path);
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        }
        assert!(door(Cors::Off, false, None).answer(&mut req(Method::POST, "/v2/models/digits/infer", &[])).is_none());
    }
}
