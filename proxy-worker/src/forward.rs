//! One request through the proxy worker: headers rewritten as a reverse proxy
//! must (RFC 9110 §7.6: hop-by-hop headers dropped, `Forwarded` and
//! `X-Forwarded-*` set by tandem alone), sent to the copy with the fewest
//! requests in flight, retried on another copy when that is safe, streamed
//! back, and upgraded connections (WebSocket) tunnelled through.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tandem_shared::edge::front::{self, read_body, BodyError, FrontDoor};
use tandem_shared::edge::serve::{tunnel, ClientIdentity, Peer, TunnelEnd};
use tandem_shared::stats::Stats;

use crate::pool::{Lease, Pool, ProxyBody};
use tandem_shared::edge::serve::RequestBody;

/// Copies a request is tried on at most.
const MAX_ATTEMPTS: usize = 3;
/// Request bodies up to this are read before forwarding, so that the request
/// can go to another copy if the first one fails (larger ones stream through).
const REPLAYABLE_BYTES: u64 = 16 << 20;

/// Headers that describe one connection and never cross a proxy (RFC 9110
/// §7.6.1), with those the client may not set because tandem does.
const DROPPED: [&str; 17] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    tandem_shared::edge::access::PEER_HEADER,
    "via",
];

/// Answers up to this size (by `Content-Length`) are read whole before they are sent on.
const SMALL_ANSWER: u64 = 64 << 10;

/// The first entries of [`DROPPED`] are hop-by-hop (requests and responses alike).
const HOP_BY_HOP: usize = 7;

/// How the proxy treats requests.
#[derive(Debug, Clone)]
pub struct Options {
    /// `MAX_REQUEST_BYTES`.
    pub max_request_bytes: u64,
    /// `REQUEST_TIMEOUT`: until the copy's response headers (and the wait for a copy).
    pub timeout: Duration,
    /// With `ACCESS_LOG`: this worker's id.
    pub access_log: Option<u64>,
    /// The edge policy of the plain HTTP listener (`WORKER_READY_PATH` never redirected).
    pub plain: FrontDoor,
    /// The edge policy of the HTTPS listener.
    pub secure: FrontDoor,
    /// `IDLE_TIMEOUT`: an upgraded connection (WebSocket) with no byte moving is closed after it.
    pub idle_timeout: Duration,
    /// `MAX_INFLIGHT_BYTES`: bodies read before forwarding that this worker holds at once.
    pub inflight_bytes: u64,
}

/// The proxy: a pool of copies and how to treat requests.
pub struct Proxy {
    pool: Arc<Pool>,
    stats: Stats,
    opts: Options,
    budget: Arc<tandem_shared::edge::budget::Budget>,
}

/// What one request came with, for the headers tandem sets.
struct Origin<'a> {
    https: bool,
    /// The port of the listener it came on.
    port: u16,
    peer: Option<SocketAddr>,
    client: Option<&'a ClientIdentity>,
    /// The name of the API key the front door accepted.
    key: Option<&'a str>,
}

/// An answer the proxy makes itself, in the proxy's body type.
fn boxed(res: front::Answer) -> Response<ProxyBody> {
    res.map(|b| b.map_err(|n| match n {}).boxed_unsync())
}

fn local(status: StatusCode, message: &str) -> Response<ProxyBody> {
    boxed(front::error(status, message))
}

/// Methods a request of which may be sent twice (RFC 9110 §9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// The one protocol a client may switch to through the proxy. Any other
/// (`h2c` above all, which would turn the connection into a direct one to the
/// copy, past every header tandem sets) is dropped: the request goes on as a
/// plain one.
const TUNNELLED: &str = "websocket";

/// The `Upgrade` value of an HTTP/1.1 request asking to switch to a WebSocket.
fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    let mut upgrades = req.headers().get_all(header::UPGRADE).iter();
    let only = upgrades.next().filter(|_| upgrades.next().is_none())?;
    let websocket = only.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case(TUNNELLED));
    (asks && websocket).then(|| HeaderValue::from_static(TUNNELLED))
}

/// Headers `Connection` may never take away: the copy needs to know the host.
const KEPT_THOUGH_NAMED: [HeaderName; 1] = [header::HOST];

/// Drops the hop-by-hop headers (and those `Connection` names).
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !KEPT_THOUGH_NAMED.contains(n))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in &DROPPED[..HOP_BY_HOP] {
        headers.remove(*h);
    }
}

/// Whether a client's header is one tandem alone may set, in any spelling an
/// application might fold into it: CGI, WSGI and their kin read `X_Forwarded_For`
/// and `X-Forwarded-For` as the same variable. Any name with `_` is dropped
/// too (nginx's default), so no two headers can collide in such an application.
fn reserved(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.contains('_')
        || n.starts_with("x-tandem-")
        || DROPPED.iter().skip(HOP_BY_HOP).any(|d| *d == n)
        || tandem_shared::edge::access::CLIENT_HEADERS.contains(&n)
}

/// The request headers a copy sees: the client's, less what is hop-by-hop or
/// tandem's to say, plus who the client is as tandem saw it.
fn rewrite(headers: &mut HeaderMap, authority: Option<&str>, origin: &Origin<'_>, upgrade: Option<&HeaderValue>) {
    drop_hop_by_hop(headers);
    let reserved_names: Vec<HeaderName> = headers.keys().filter(|n| reserved(n)).cloned().collect();
    for n in reserved_names {
        headers.remove(n);
    }
    if !headers.contains_key(header::HOST) {
        // HTTP/2 carries the host in :authority; HTTP/1.1 to the copy needs Host
        // (an HTTP/1.0 client may send none: the copy is told tandem's own port).
        let v = authority
            .and_then(|a| HeaderValue::from_str(a).ok())
            .or_else(|| HeaderValue::from_str(&format!("localhost:{}", origin.port)).ok());
        if let Some(v) = v {
            headers.insert(header::HOST, v);
        }
    }
    let proto = if origin.https { "https" } else { "http" };
    let mut forwarded = String::new();
    if let Some(peer) = origin.peer {
        let ip = peer.ip().to_canonical();
        if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
            headers.insert("x-forwarded-for", v.clone());
            headers.insert("x-real-ip", v);
        }
        forwarded = if ip.is_ipv6() { format!("for=\"[{ip}]\";") } else { format!("for={ip};") };
    }
    forwarded.push_str("proto=");
    forwarded.push_str(proto);
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    headers.insert("x-forwarded-port", HeaderValue::from(origin.port));
    if let Some(host) = headers.get(header::HOST).cloned() {
        if let Ok(h) = host.to_str() {
            if h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b)) {
                forwarded.push_str(&format!(";host=\"{h}\""));
            }
        }
        headers.insert("x-forwarded-host", host);
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    if let Some(id) = origin.client {
        let values = tandem_shared::edge::access::client_header_values(id);
        for (name, value) in tandem_shared::edge::access::CLIENT_HEADERS.iter().zip(values) {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(*name, v);
            }
        }
    }
    if let Some(v) = origin.key.and_then(|k| HeaderValue::from_str(k).ok()) {
        headers.insert(tandem_shared::edge::keys::KEY_NAME_HEADER, v);
    }
    if let Some(u) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u.clone());
    }
}

/// A response body that holds the copy's lease until it has been sent.
struct Leased {
    inner: Incoming,
    _lease: Lease,
}

impl Body for Leased {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body as it will be sent: in memory (it can be sent again) or streamed once.
enum Outgoing {
    Replayable(Bytes),
    Stream(Option<ProxyBody>),
    /// A gRPC call's messages, each checked against the limit as it passes
    /// (a stream's whole body has none).
    Messages(Option<ProxyBody>),
}

impl Outgoing {
    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            Outgoing::Replayable(b) if b.is_empty() => Some(Empty::new().map_err(|n| match n {}).boxed_unsync()),
            Outgoing::Replayable(b) => Some(Full::new(b.clone()).map_err(|n| match n {}).boxed_unsync()),
            Outgoing::Stream(s) | Outgoing::Messages(s) => s.take(),
        }
    }
}

/// Why an attempt failed.
enum Failure {
    /// The copy could not be reached: the request was not sent (safe to send elsewhere).
    Connect(String),
    /// The request was (maybe partly) sent and the copy failed before answering.
    Sent(String),
    /// The client's body was over `MAX_REQUEST_BYTES`.
    TooLarge,
}

fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    use std::error::Error as _;
    if e.is_connect() {
        return Failure::Connect(cause(e));
    }
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return Failure::TooLarge;
        }
        source = s.source();
    }
    Failure::Sent(cause(e))
}

/// The innermost cause of an error, readable.
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

impl Proxy {
    /// A proxy over `pool`, counting into `stats`.
    pub fn new(pool: Arc<Pool>, stats: Stats, opts: Options) -> Self {
        let budget = tandem_shared::edge::budget::Budget::new(opts.inflight_bytes);
        Proxy { pool, stats, opts, budget }
    }

    /// Serves one request that came on the listener at `port`; never fails
    /// (errors are JSON responses).
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<impl RequestBody>,
        https: bool,
        port: u16,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let mut arrival = tandem_shared::edge::access::Arrival::new(&req, https, self.opts.access_log.is_some());
        let peer = req.extensions().get::<Peer>().map(|p| p.0);
        let client = req.extensions().get::<Arc<ClientIdentity>>().cloned();
        let door = if https { &self.opts.secure } else { &self.opts.plain };
        let web_origin = req.headers().get(header::ORIGIN).cloned();
        // Framing tandem refuses, then what the front door answers itself, then the copies.
        let refused = refuse_framing(&req).or_else(|| door.answer(&mut req).map(boxed));
        arrival.identified(&req);
        let key = req.extensions().get::<tandem_shared::edge::gate::KeyName>().cloned();
        let origin = Origin { https, port, peer, client: client.as_deref(), key: key.as_ref().map(|k| &*k.0) };
        let (mut res, worker) = match refused {
            Some(answer) => (answer, None),
            None => self.forward(req, &origin).await,
        };
        door.finish(web_origin.as_ref(), res.headers_mut());
        let own = self.opts.access_log.unwrap_or(0);
        let bytes_out = res.body().size_hint().exact();
        let status = tandem_shared::edge::access::counted_status(res.status(), res.headers());
        arrival.answered(&self.stats, status, bytes_out, worker.map_or(own, |w| w as u64));
        Ok(res)
    }

    /// The copy's answer, and the copy (worker number) that gave it.
    async fn forward(
        &self,
        mut req: Request<impl RequestBody>,
        origin: &Origin<'_>,
    ) -> (Response<ProxyBody>, Option<usize>) {
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        let upgrade = upgrade_of(&req);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().map(|a| a.to_string());
        // A gRPC call goes to the copy over HTTP/2, saying it reads trailers (gRPC servers ask).
        let grpc = tandem_shared::edge::grpc::is_call(&parts.headers);
        rewrite(&mut parts.headers, authority.as_deref(), origin, upgrade.as_ref());
        if grpc {
            parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let limit = self.opts.max_request_bytes;
        let too_large = || {
            let mut res = boxed(front::too_large(&front::max_request_bytes(limit)));
            res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            res
        };
        let declared = body.size_hint().exact();
        if declared.is_some_and(|n| n > limit) {
            return (too_large(), None);
        }
        // A body read before forwarding is held until the copy answered.
        let mut share = tandem_shared::edge::budget::Share::default();
        let mut outgoing = if body.is_end_stream() {
            Outgoing::Replayable(Bytes::new())
        } else if grpc && declared.is_none() {
            let cap = usize::try_from(limit).unwrap_or(usize::MAX);
            Outgoing::Messages(Some(tandem_shared::edge::grpc::Checked::new(body, cap, |e| Box::new(e)).boxed_unsync()))
        } else if declared.is_some_and(|n| n <= REPLAYABLE_BYTES) {
            let cap = usize::try_from(limit).unwrap_or(usize::MAX);
            match tokio::time::timeout_at(deadline, read_body(body, cap, declared, 1, &self.budget, &mut share)).await {
                Ok(Ok(b)) => Outgoing::Replayable(b.into_bytes()),
                Ok(Err(BodyError::TooLarge)) => return (too_large(), None),
                Ok(Err(BodyError::Budget(e))) if e.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    return (local(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()), None)
                }
                Ok(Err(BodyError::Budget(e))) => return (local(e.status(), &e.to_string()), None),
                Ok(Err(BodyError::Read(e))) => {
                    return (local(StatusCode::BAD_REQUEST, &format!("cannot read the request body: {e}")), None)
                }
                Err(_) => {
                    return (
                        local(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive within REQUEST_TIMEOUT"),
                        None,
                    )
                }
            }
        } else {
            Outgoing::Stream(Some(Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).boxed_unsync()))
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string();
        let retry_sent = idempotent(&parts.method) && matches!(outgoing, Outgoing::Replayable(_));
        let mut tried: Vec<u64> = Vec::new();
        let mut last_error = String::new();
        for _ in 0..MAX_ATTEMPTS {
            let lease = match self.lease(&tried, deadline).await {
                Some(l) => l,
                None if tried.is_empty() => {
                    return (
                        local(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no WORKER_COMMAND copy became ready within REQUEST_TIMEOUT",
                        ),
                        None,
                    )
                }
                None => break,
            };
            let (id, worker) = (lease.entry.id, lease.entry.worker);
            let Some(body) = outgoing.take() else { break };
            let Ok(uri) = Uri::try_from(format!("http://worker-{worker}{target}")) else {
                return (local(StatusCode::BAD_REQUEST, "the request target cannot be forwarded"), None);
            };
            let mut out = Request::new(body);
            *out.method_mut() = parts.method.clone();
            *out.uri_mut() = uri;
            *out.version_mut() = if grpc { Version::HTTP_2 } else { Version::HTTP_11 };
            *out.headers_mut() = parts.headers.clone();
            let client = if grpc { lease.entry.grpc_client() } else { lease.entry.client() };
            let sent = tokio::time::timeout_at(deadline, client.request(out)).await;
            let failure = match sent {
                Ok(Ok(res)) => return (self.answer(res, lease, client_upgrade, deadline).await, Some(worker)),
                Ok(Err(e)) => classify(&e),
                Err(_) => {
                    // A copy that does not answer in time may hang: its prober looks now.
                    self.pool.suspect(&lease.entry);
                    return (
                        local(
                            StatusCode::GATEWAY_TIMEOUT,
                            &format!(
                                "WORKER_COMMAND copy {worker} did not answer within REQUEST_TIMEOUT ({} s)",
                                self.opts.timeout.as_secs()
                            ),
                        ),
                        Some(worker),
                    );
                }
            };
            tried.push(id);
            match failure {
                Failure::TooLarge => return (too_large(), Some(worker)),
                Failure::Connect(why) => {
                    self.pool.suspect(&lease.entry);
                    tracing::warn!(worker, error = %why, "cannot connect to a WORKER_COMMAND copy; trying another");
                    last_error = format!("cannot connect to WORKER_COMMAND copy {worker}: {why}");
                }
                Failure::Sent(why) => {
                    self.pool.suspect(&lease.entry);
                    last_error = format!("WORKER_COMMAND copy {worker} failed before answering: {why}");
                    if !retry_sent {
                        tracing::warn!(worker, error = %why, "a copy failed with a request that cannot be sent twice");
                        return (local(StatusCode::BAD_GATEWAY, &last_error), Some(worker));
                    }
                    tracing::warn!(worker, error = %why, "a copy failed before answering; trying another");
                }
            }
        }
        (local(StatusCode::BAD_GATEWAY, &last_error), None)
    }

    /// A copy for the request, waiting for one to become ready (up to `deadline`)
    /// when none is; None when every copy was tried or none came.
    async fn lease(&self, tried: &[u64], deadline: tokio::time::Instant) -> Option<Lease> {
        loop {
            let mut watch = self.pool.watch();
            if let Some(l) = self.pool.pick(tried) {
                return Some(l);
            }
            if !tried.is_empty() || !Pool::changed(&mut watch, deadline).await {
                return None;
            }
        }
    }

    /// The copy's answer for the client: hop-by-hop headers dropped, the body
    /// streamed with the lease, or an upgraded connection tunnelled.
    async fn answer(
        &self,
        mut res: Response<Incoming>,
        lease: Lease,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        deadline: tokio::time::Instant,
    ) -> Response<ProxyBody> {
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client) = client_upgrade else {
                return local(StatusCode::BAD_GATEWAY, "the copy switched protocols unasked");
            };
            let upgrade = res.headers().get(header::UPGRADE).cloned();
            let backend = hyper::upgrade::on(&mut res);
            let idle = self.opts.idle_timeout;
            tokio::spawn(async move {
                // The lease lives as long as the tunnel: a copy busy with sockets gets fewer new ones.
                // The client's connection keeps its place in the connection limit (its
                // stream holds it) and the tunnel ends after IDLE_TIMEOUT without a byte.
                let _lease = lease;
                match tokio::try_join!(client, backend) {
                    Ok((c, b)) => match tunnel(TokioIo::new(c), TokioIo::new(b), idle).await {
                        TunnelEnd::Idle => tracing::debug!("upgraded connection closed: idle past IDLE_TIMEOUT"),
                        end => tracing::debug!(?end, "upgraded connection ended"),
                    },
                    Err(e) => tracing::debug!(error = %e, "the protocol switch did not complete"),
                }
            });
            let (mut parts, _) = res.into_parts();
            drop_hop_by_hop(&mut parts.headers);
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(u) = upgrade {
                parts.headers.insert(header::UPGRADE, u);
            }
            return Response::from_parts(parts, Empty::new().map_err(|n| match n {}).boxed_unsync());
        }
        let (mut parts, body) = res.into_parts();
        drop_hop_by_hop(&mut parts.headers);
        // (Never a gRPC answer: its status follows in trailers, which a whole read would drop.)
        let grpc = tandem_shared::edge::grpc::is_call(&parts.headers);
        if !grpc && body.size_hint().exact().is_some_and(|n| n <= SMALL_ANSWER) {
            // A small answer of known length is read whole, so its head and
            // body leave in one write (streamed, they took one write each).
            let read = tokio::time::timeout_at(deadline, body.collect()).await;
            drop(lease);
            return match read {
                Ok(Ok(b)) => {
                    Response::from_parts(parts, Full::new(b.to_bytes()).map_err(|n| match n {}).boxed_unsync())
                }
                Ok(Err(e)) => local(StatusCode::BAD_GATEWAY, &format!("the copy's answer broke off: {}", cause(&e))),
                Err(_) => local(StatusCode::GATEWAY_TIMEOUT, "the copy's answer did not arrive within REQUEST_TIMEOUT"),
            };
        }
        let body = Leased { inner: body, _lease: lease }.map_err(Into::into).boxed_unsync();
        Response::from_parts(parts, body)
    }
}

/// The head a copy would receive for a client's request on the listener at
/// `port` (`https` or not) from `peer`, with no client certificate: `None`
/// when tandem answers the request itself. The pure part of the proxy's
/// request path, for the fuzzer (`fuzz/fuzz_targets/proxy_head.rs`).
pub fn head_for_copy<B>(req: &Request<B>, https: bool, port: u16, peer: Option<SocketAddr>) -> Option<HeaderMap> {
    if refuse_framing(req).is_some() {
        return None;
    }
    let upgrade = upgrade_of(req);
    let mut headers = req.headers().clone();
    let authority = req.uri().authority().map(|a| a.to_string());
    rewrite(
        &mut headers,
        authority.as_deref(),
        &Origin { https, port, peer, client: None, key: None },
        upgrade.as_ref(),
    );
    Some(headers)
}

/// Methods the copies are sent (the answer to `OPTIONS *`).
const ALLOWED: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS";

/// What tandem answers itself instead of forwarding: `CONNECT` (tandem is not
/// a forward proxy), `OPTIONS *` (a question about tandem, not about a
/// resource), and a request whose `Host` is missing (HTTP/1.1 requires it) or
/// given twice (the copy and tandem could read different ones).
fn refuse_framing<B>(req: &Request<B>) -> Option<Response<ProxyBody>> {
    if req.method() == Method::CONNECT {
        let mut res = local(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not served: tandem is not a forward proxy");
        res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(ALLOWED));
        return Some(res);
    }
    if req.uri() == "*" {
        if req.method() != Method::OPTIONS {
            return Some(local(StatusCode::BAD_REQUEST, "the request target * is only for OPTIONS"));
        }
        let mut res = Response::new(Empty::new().map_err(|n| match n {}).boxed_unsync());
        *res.status_mut() = StatusCode::NO_CONTENT;
        res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(ALLOWED));
        return Some(res);
    }
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Some(local(StatusCode::BAD_REQUEST, "a request may carry one Host header, not several"));
    }
    if hosts == 0 && req.version() == Version::HTTP_11 {
        return Some(local(StatusCode::BAD_REQUEST, "an HTTP/1.1 request needs a Host header"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(https: bool, peer: &str) -> Origin<'static> {
        Origin { https, port: 8443, peer: Some(peer.parse().expect("addr")), client: None, key: None }
    }

    #[test]
    fn hop_by_hop_and_client_supplied_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api.example:8443"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        h.insert("x-tandem-client-subject", HeaderValue::from_static("CN=forged"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        rewrite(&mut h, None, &origin(true, "10.1.2.3:5555"), None);
        for gone in ["connection", "x-secret", "keep-alive", "x-tandem-client-subject"] {
            assert!(!h.contains_key(gone), "{gone} should be dropped");
        }
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example:8443");
        assert_eq!(h["x-forwarded-port"], "8443");
        assert_eq!(h[header::FORWARDED], "for=10.1.2.3;proto=https;host=\"api.example:8443\"");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn ipv6_peers_are_quoted_and_http2_authority_becomes_host() {
        let mut h = HeaderMap::new();
        rewrite(&mut h, Some("[::1]:9001"), &origin(false, "[::1]:4000"), None);
        assert_eq!(h[header::HOST], "[::1]:9001");
        assert_eq!(h[header::FORWARDED], "for=\"[::1]\";proto=http;host=\"[::1]:9001\"");
    }

    #[test]
    fn an_upgrade_keeps_its_connection_headers() {
        let req = Request::builder()
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("request");
        let u = upgrade_of(&req).expect("an upgrade");
        let mut h = req.headers().clone();
        rewrite(&mut h, None, &origin(false, "127.0.0.1:1"), Some(&u));
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        let plain = Request::builder().header(header::UPGRADE, "websocket").body(()).expect("request");
        assert!(upgrade_of(&plain).is_none(), "Upgrade without Connection: upgrade is not a request to switch");
    }

    #[test]
    fn only_a_websocket_upgrade_is_passed() {
        for (value, passed) in [
            ("websocket", true),
            ("WebSocket", true),
            ("h2c", false),
            ("TLS/1.2", false),
            ("websocket, h2c", false),
            ("foo", false),
        ] {
            let req = Request::builder()
                .header(header::CONNECTION, "Upgrade, HTTP2-Settings")
                .header(header::UPGRADE, value)
                .header("http2-settings", "AAMAAABkAAQAAP__")
                .body(())
                .expect("request");
            assert_eq!(upgrade_of(&req).is_some(), passed, "{value}");
            let mut h = req.headers().clone();
            rewrite(&mut h, None, &origin(false, "127.0.0.1:1"), upgrade_of(&req).as_ref());
            if !passed {
                for gone in ["upgrade", "connection", "http2-settings"] {
                    assert!(!h.contains_key(gone), "{value}: {gone} must not reach the copy");
                }
            }
        }
    }

    #[test]
    fn tandem_headers_are_dropped_in_every_spelling_and_host_survives_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api.example"));
        h.insert(header::CONNECTION, HeaderValue::from_static("host, x-forwarded-for"));
        for forged in [
            "x_forwarded_for",
            "X-Tandem-Client_Subject",
            "x-tandem-anything",
            "x_real_ip",
            "forwarded",
            "content_length",
        ] {
            h.append(
                HeaderName::from_bytes(forged.to_ascii_lowercase().as_bytes()).expect("name"),
                HeaderValue::from_static("forged"),
            );
        }
        rewrite(&mut h, None, &origin(false, "10.0.0.1:1"), None);
        assert!(h.iter().all(|(n, v)| !n.as_str().contains('_') && v != "forged"), "{h:?}");
        assert_eq!(h[header::HOST], "api.example");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
    }

    #[test]
    fn connect_options_star_and_bad_hosts_are_answered_by_tandem() {
        let req = |m: Method, uri: &str, hosts: &[&str], v: Version| {
            let mut r = Request::builder().method(m).uri(uri).version(v);
            for h in hosts {
                r = r.header(header::HOST, *h);
            }
            r.body(()).expect("request")
        };
        let status = |r: Request<()>| refuse_framing(&r).map(|res| res.status());
        assert_eq!(
            status(req(Method::CONNECT, "example.com:443", &["a"], Version::HTTP_11)),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(status(req(Method::OPTIONS, "*", &["a"], Version::HTTP_11)), Some(StatusCode::NO_CONTENT));
        assert_eq!(status(req(Method::GET, "/", &["a", "b"], Version::HTTP_11)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(req(Method::GET, "/", &[], Version::HTTP_11)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(req(Method::GET, "/", &[], Version::HTTP_10)), None);
        assert_eq!(status(req(Method::GET, "/", &[], Version::HTTP_2)), None);
        assert_eq!(status(req(Method::GET, "/", &["a"], Version::HTTP_11)), None);
    }

    #[test]
    fn only_idempotent_methods_are_sent_twice() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }
}
