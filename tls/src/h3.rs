//! HTTP/3 on the HTTPS port's number over UDP (`SSL_HTTP3`): QUIC (quinn)
//! with the certificate, client verification and statistics of the TCP
//! listener, TLS 1.3 only and no 0-RTT, each request handed to the same
//! service as a request over TCP. Bounded: connections, handshakes under way
//! (past a threshold a client must prove its address with a Retry first),
//! streams per connection and the bytes each may buffer; closed when silent
//! or idle as TCP connections are, and drained on stop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::{Body, Frame};
use tandem_shared::edge::serve::{Activity, BoxError, ClientIdentity, Peer, Timeouts, DRAIN_LINGER};
use tandem_shared::stats::{Stats, TLS_ALPN};
use tokio::sync::{watch, Semaphore};

use crate::client_auth::Acceptors;

/// Requests one connection may have open at once (as HTTP/2's `max_concurrent_streams`).
pub const MAX_STREAMS: u32 = 256;
/// Unidirectional streams a client may open: HTTP/3's control and QPACK
/// streams, with room for the grease streams some clients send.
const MAX_UNI_STREAMS: u32 = 16;
/// Bytes one request stream may have in flight towards us before we read them.
const STREAM_WINDOW: u32 = 2 << 20;
/// Bytes one connection may have in flight towards us over all its streams.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Handshakes under way past which a client that has not proven its address
/// (answered a Retry) is sent one first: a flood of Initial packets from
/// spoofed addresses then costs a stateless packet each, not a connection.
pub const RETRY_ABOVE: usize = 64;
/// Connection attempts quinn holds before they are accepted or refused.
const MAX_INCOMING: usize = 4096;
/// Largest header section a request may send (QPACK-decoded).
const MAX_FIELD_SECTION: u64 = 64 << 10;
/// The UDP socket's receive and send buffers asked of the kernel. Its
/// default (208 KiB) holds about a hundred full packets: one client's upload
/// at loopback speed overflows it while the runtime is busy, and every
/// dropped datagram is a retransmission and a halved congestion window
/// (a 4 MiB upload lost 0.45% of its packets here with the default).
const SOCKET_BUFFER: usize = 4 << 20;

/// The largest UDP payload this endpoint accepts, advertises (QUIC's
/// `max_udp_payload_size`) and probes its path for. quinn's default, 1472
/// bytes, fits a 1500-byte Ethernet frame; path MTU discovery still finds
/// that size on such paths, and larger packets are used only where the path
/// carries them (loopback, jumbo frames). Fewer packets are most of QUIC's
/// cost: a 4 MiB upload over loopback with 6500-byte packets took 4.9 ms of
/// server CPU instead of 7.4 and ran 1.55x as many requests a second
/// (docs/BENCHMARKS.md). Not higher: quinn sends up to 10 packets in one
/// segmented datagram, which must stay within UDP's 65,507 bytes; past
/// 6,550 the kernel refuses the whole batch and quinn's black-hole detection
/// falls back to 1200-byte packets (measured at 9000).
pub const MAX_UDP_PAYLOAD: u16 = 6500;

/// The endpoint's own configuration: [`MAX_UDP_PAYLOAD`].
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("MAX_UDP_PAYLOAD is within QUIC's bounds");
    config
}

/// Path MTU discovery up to [`MAX_UDP_PAYLOAD`].
pub fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut config = quinn::MtuDiscoveryConfig::default();
    config.upper_bound(MAX_UDP_PAYLOAD);
    config
}

/// Asks for [`SOCKET_BUFFER`] each way on `socket`; the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`, which is said once, with the fix.
pub fn size_buffers(socket: &std::net::UdpSocket) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "cannot inspect the HTTP/3 socket"),
    };
    let _ = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER);
    // Linux grants twice what it was asked (its own bookkeeping included),
    // and reports that: less than twice the ask means the cap took some.
    let granted = state.recv_buffer_size(socket.into()).unwrap_or(0);
    if granted < 2 * SOCKET_BUFFER {
        tracing::warn!(
            granted,
            wanted = SOCKET_BUFFER,
            "the kernel caps the HTTP/3 socket's receive buffer; large uploads over HTTP/3 may lose packets\nhint: sysctl -w net.core.rmem_max={SOCKET_BUFFER} net.core.wmem_max={SOCKET_BUFFER}"
        );
    }
}

/// The QUIC server configuration: TLS 1.3, ALPN `h3`, 0-RTT off (inference
/// requests are not idempotent), the acceptors' certificate resolver and
/// client verifier, and the bounds above.
pub fn server_config(acceptors: &Acceptors, timeouts: &Timeouts) -> anyhow::Result<quinn::ServerConfig> {
    let verifier = acceptors.current().verifier.clone();
    let mut tls = crate::server_config(acceptors.resolver().clone(), tandem_config::tls::TlsVersion::Tls13, verifier)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.max_early_data_size = 0;
    let quic =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("the TLS configuration cannot serve QUIC")?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .mtu_discovery_config(Some(mtu_discovery()))
        .max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        // IDLE_TIMEOUT: no packet either way for that long ends the connection.
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(timeouts.idle.min(Duration::from_secs(3600)))
                .context("IDLE_TIMEOUT does not fit QUIC")?,
        ));
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config
        .transport_config(Arc::new(transport))
        .max_incoming(MAX_INCOMING)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(16 << 20);
    Ok(config)
}

type RecvHalf = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

/// A request's body as it arrives on its HTTP/3 stream: data, then trailers.
pub struct H3Body {
    recv: RecvHalf,
    data_done: bool,
    done: bool,
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match this.recv.poll_recv_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Ok(Some(mut buf))) => {
                    let bytes = buf.copy_to_bytes(buf.remaining());
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Poll::Ready(Ok(None)) => this.data_done = true,
            }
        }
        let trailers = this.recv.poll_recv_trailers(cx);
        match trailers {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                this.done = true;
                match r {
                    Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                    Ok(None) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Connection-specific headers HTTP/3 forbids in an answer (RFC 9114 §4.2).
const CONNECTION_SPECIFIC: [http::header::HeaderName; 5] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::HeaderName::from_static("keep-alive"),
    http::header::HeaderName::from_static("proxy-connection"),
];

/// Serves HTTP/3 on one UDP socket until drained.
pub struct Http3 {
    /// QUIC's own runtime, when it has one.
    runtime: Option<tokio::runtime::Runtime>,
    endpoint: quinn::Endpoint,
    drain: watch::Sender<bool>,
    /// Set halfway through a drain: handshakes and request headers still
    /// awaited are given up.
    give_up: watch::Sender<bool>,
    /// Connections open (each holds one permit of `max`).
    permits: Arc<Semaphore>,
    max: usize,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for Http3 {
    /// Its runtime goes without waiting for its tasks (dropped from async code
    /// a runtime must not block).
    fn drop(&mut self) {
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

/// Handshakes under way, for the Retry threshold.
#[derive(Default)]
struct Handshaking(AtomicUsize);

struct HandshakeSlot(Arc<Handshaking>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request handler: what the TCP listener's service does with a request, for an HTTP/3 one.
pub trait H3Service<RB>: Fn(Request<H3Body>) -> Self::Fut + Clone + Send + Sync + 'static {
    /// The answer's future.
    type Fut: Future<Output = Result<Response<RB>, Infallible>> + Send + 'static;
}

impl<S, F, RB> H3Service<RB> for S
where
    S: Fn(Request<H3Body>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<RB>, Infallible>> + Send + 'static,
{
    type Fut = F;
}

/// An answer's body HTTP/3 can send: bytes, and an error it can name.
pub trait AnswerBody: Body<Data = Bytes, Error: std::fmt::Display + Send> + Send + 'static {}

impl<B> AnswerBody for B where B: Body<Data = Bytes, Error: std::fmt::Display + Send> + Send + 'static {}

/// What [`Http3::start`] needs besides the socket and the service.
pub struct Options {
    /// The acceptors of the TCP listener (certificate, client verification).
    pub acceptors: Arc<Acceptors>,
    /// Counts handshakes.
    pub stats: Stats,
    /// HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, IDLE_TIMEOUT.
    pub timeouts: Timeouts,
    /// Connections held at most.
    pub max_connections: usize,
    /// Threads of QUIC's own runtime (its connections run on any of them); 0
    /// serves from the calling thread's runtime.
    pub threads: usize,
    /// Run by those threads before they sleep (the ring's watch).
    pub on_park: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Http3 {
    /// Serves `socket` with `service`, from a runtime of its own with
    /// `options.threads` threads (or this thread's runtime with none).
    pub fn start<S, RB>(socket: std::net::UdpSocket, options: Options, service: S) -> anyhow::Result<Http3>
    where
        S: H3Service<RB>,
        RB: AnswerBody,
    {
        let Options { acceptors, stats, timeouts, max_connections, threads, on_park } = options;
        let runtime = match threads {
            0 => None,
            n => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n).thread_name("h3").enable_all();
                if let Some(hook) = on_park {
                    b.on_thread_park(move || hook());
                }
                Some(b.build().context("cannot start HTTP/3's runtime")?)
            }
        };
        let _entered = runtime.as_ref().map(|r| r.enter());
        socket.set_nonblocking(true).context("cannot make the HTTP/3 socket non-blocking")?;
        size_buffers(&socket);
        let config = server_config(&acceptors, &timeouts)?;
        let io = Arc::new(quinn::TokioRuntime);
        let endpoint = quinn::Endpoint::new(endpoint_config(), Some(config), socket, io)
            .context("cannot serve QUIC on the HTTP/3 socket")?;
        let max = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let permits = Arc::new(Semaphore::new(max));
        let (drain, _) = watch::channel(false);
        let (give_up, _) = watch::channel(false);
        let handshaking = Arc::new(Handshaking::default());
        let serve = Serve {
            stats,
            timeouts,
            drain: drain.clone(),
            give_up: give_up.clone(),
            permits: permits.clone(),
            handshaking,
        };
        // A client CA bundle reloaded: new handshakes verify against it.
        let mut swaps = acceptors.swaps();
        let (ep, acc) = (endpoint.clone(), acceptors.clone());
        let accepting = tokio::spawn(async move {
            loop {
                tokio::select! {
                    incoming = ep.accept() => match incoming {
                        Some(i) => serve.incoming(i, service.clone()),
                        None => return,
                    },
                    Ok(()) = swaps.changed() => match server_config(&acc, &serve.timeouts) {
                        Ok(c) => ep.set_server_config(Some(c)),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot rebuild the HTTP/3 configuration; the previous one serves"),
                    },
                }
            }
        });
        drop(_entered);
        Ok(Http3 { runtime, endpoint, drain, give_up, permits, max, accepting })
    }

    /// Stops taking connections, asks each to finish its requests (GOAWAY),
    /// and waits up to `timeout` for them; returns whether all closed in time.
    pub async fn drain(mut self, timeout: Duration) -> bool {
        // New connection attempts are ignored from here on, not refused: on an
        // upgrade the next HTTPS worker reads the same socket, and the client's
        // next Initial (sent again after its loss timer) may reach it instead.
        // (`send_replace`, not `send`: with no connection set up yet nothing
        // subscribes, and `send` would then not store the flag at all.)
        self.drain.send_replace(true);
        let all = self.permits.acquire_many(u32::try_from(self.max).unwrap_or(u32::MAX));
        tokio::pin!(all);
        // Halfway, what is still only being set up is given up: a handshake
        // whose packets reach the next worker (on an upgrade both read the
        // socket) would otherwise be held to HEADER_TIMEOUT, past GRACEFUL_TIMEOUT.
        let drained = match tokio::time::timeout(timeout / 2, &mut all).await {
            Ok(_) => true,
            Err(_) => {
                self.give_up.send_replace(true);
                tokio::time::timeout(timeout - timeout / 2, all).await.is_ok()
            }
        };
        // The endpoint is not closed when every connection went: closing it
        // (or no longer accepting) would answer a new client's Initial with
        // CONNECTION_REFUSED while this process still reads the socket the
        // next worker serves. It goes with the process, new attempts ignored
        // to the end. Connections still open past the time are closed.
        if !drained {
            self.accepting.abort();
            self.endpoint.close(h3::error::Code::H3_NO_ERROR.value().try_into().unwrap_or_default(), b"stopping");
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
        drained
    }
}

/// What every connection's task shares.
#[derive(Clone)]
struct Serve {
    stats: Stats,
    timeouts: Timeouts,
    drain: watch::Sender<bool>,
    give_up: watch::Sender<bool>,
    permits: Arc<Semaphore>,
    handshaking: Arc<Handshaking>,
}

impl Serve {
    /// A connection attempt: refused past the connection limit, sent a Retry
    /// while too many handshakes are under way, else served.
    fn incoming<S, RB>(&self, incoming: quinn::Incoming, service: S)
    where
        S: H3Service<RB>,
        RB: AnswerBody,
    {
        if *self.drain.borrow() {
            incoming.ignore();
            return;
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::debug!(peer = %incoming.remote_address(), "HTTP/3 connection refused: every place is taken");
            incoming.refuse();
            return;
        };
        let under_way = self.handshaking.0.load(Ordering::Relaxed);
        if under_way >= RETRY_ABOVE && !incoming.remote_address_validated() && incoming.may_retry() {
            // Stateless: nothing is held until the client answers from its address.
            let peer = incoming.remote_address();
            if let Err(e) = incoming.retry() {
                tracing::debug!(%peer, error = %e, "cannot send a QUIC Retry");
            }
            return;
        }
        self.handshaking.0.fetch_add(1, Ordering::Relaxed);
        let slot = HandshakeSlot(self.handshaking.clone());
        let peer = incoming.remote_address();
        let serve = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut pending = crate::handshake::Pending::new(&serve.stats);
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    pending.failed_quic(&e);
                    return;
                }
            };
            // A handshake still under way halfway through a drain is given up
            // (held to HEADER_TIMEOUT it would outlast GRACEFUL_TIMEOUT).
            let handshake = tokio::time::timeout(serve.timeouts.header, connecting);
            let given_up = set(serve.give_up.subscribe());
            let finished = tokio::select! {
                r = handshake => r,
                () = given_up => {
                    tracing::debug!(%peer, "a QUIC handshake still under way was given up on the drain");
                    return;
                }
            };
            let conn = match finished {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    pending.failed_quic(&e);
                    if let Some(why) = crate::handshake::quic_rejected(&e) {
                        if crate::client_auth::first_in_a_while(peer.ip()) {
                            tracing::info!(%peer, reason = %why, "client certificate rejected (HTTP/3)");
                        }
                    }
                    tracing::debug!(%peer, error = %e, "QUIC handshake failed");
                    return;
                }
                // Dropped: the attempt is closed; `pending` counts a timeout.
                Err(_) => return,
            };
            pending.done_quic();
            drop(slot);
            let client = conn
                .peer_identity()
                .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
                .and_then(|chain| crate::client_auth::identity_of(&chain));
            serve.connection(conn, peer, client, service).await;
        });
    }

    /// Serves one connection's requests until it closes, times out or is drained.
    async fn connection<S, RB>(
        &self,
        conn: quinn::Connection,
        peer: SocketAddr,
        client: Option<Arc<ClientIdentity>>,
        service: S,
    ) where
        S: H3Service<RB>,
        RB: AnswerBody,
    {
        let mut builder = h3::server::builder();
        builder.max_field_section_size(MAX_FIELD_SECTION);
        let mut h3c = match builder.build::<_, Bytes>(h3_quinn::Connection::new(conn.clone())).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "HTTP/3 connection set-up failed");
                return;
            }
        };
        let activity = Arc::new(Activity::new());
        // On a drain the connection takes requests for DRAIN_LINGER more (one
        // already on its way is answered, not refused), then sends GOAWAY and
        // closes once its requests are answered; the same for one whose
        // handshake ended after the drain began.
        let mut drain = self.drain.subscribe();
        let mut draining = *drain.borrow();
        let mut goaway_at = draining.then(|| Instant::now() + DRAIN_LINGER);
        let mut closing = false;
        let tick_every = (self.timeouts.header.min(self.timeouts.keepalive) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_every);
        let mut closed_at: Option<Instant> = None;
        loop {
            tokio::select! {
                accepted = h3c.accept() => match accepted {
                    Ok(Some(resolver)) => {
                        let guard = activity.begin();
                        let (service, client, header) = (service.clone(), client.clone(), self.timeouts.header);
                        let given_up = set(self.give_up.subscribe());
                        tokio::spawn(async move {
                            let _guard = guard;
                            // Headers that have not come halfway through a drain are not waited for.
                            let resolved = tokio::select! {
                                r = tokio::time::timeout(header, resolver.resolve_request()) => r,
                                () = given_up => return tracing::debug!(%peer, "HTTP/3 request headers had not come halfway through the drain"),
                            };
                            let (req, stream) = match resolved {
                                Ok(Ok(r)) => r,
                                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "bad HTTP/3 request"),
                                Err(_) => return tracing::debug!(%peer, "HTTP/3 request headers did not arrive within HEADER_TIMEOUT"),
                            };
                            respond(req, stream, peer, client, service).await;
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if !e.is_h3_no_error() {
                            tracing::debug!(%peer, error = %e, "HTTP/3 connection ended with an error");
                        }
                        break;
                    }
                },
                changed = drain.changed(), if !draining => {
                    if changed.is_ok() {
                        draining = true;
                        goaway_at = Some(Instant::now() + DRAIN_LINGER);
                    }
                }
                _ = tick.tick() => {
                    if !closing && goaway_at.is_some_and(|at| Instant::now() >= at) {
                        closing = true;
                        let _ = h3c.shutdown(0).await;
                    }
                    if closing && activity.in_flight() == 0 {
                        break;
                    }
                    if let Some(why) = activity.between_requests(&self.timeouts).filter(|_| !closing && !draining) {
                        tracing::debug!(%peer, why, "closing HTTP/3 connection");
                        closing = true;
                        closed_at = Some(Instant::now());
                        let _ = h3c.shutdown(0).await;
                    }
                    if closed_at.is_some_and(|at| at.elapsed() > self.timeouts.header) {
                        break;
                    }
                }
            }
        }
        // Requests still answering keep the connection until they finish (or the drain times out).
        while activity.in_flight() > 0 && conn.close_reason().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        conn.close(h3::error::Code::H3_NO_ERROR.value().try_into().unwrap_or_default(), b"");
    }
}

/// Resolves once `rx` reads true (never if its sender goes first).
async fn set(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Hands one request to the service and sends its answer: head, data, trailers.
async fn respond<S, RB>(
    req: Request<()>,
    stream: h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
    peer: SocketAddr,
    client: Option<Arc<ClientIdentity>>,
    service: S,
) where
    S: H3Service<RB>,
    RB: AnswerBody,
{
    let (mut send, recv) = stream.split();
    let (mut parts, ()) = req.into_parts();
    parts.version = http::Version::HTTP_3;
    parts.extensions.insert(Peer(peer));
    if let Some(c) = client {
        parts.extensions.insert(c);
    }
    let req = Request::from_parts(parts, H3Body { recv, data_done: false, done: false });
    let Ok(res) = service(req).await;
    let (mut head, body) = res.into_parts();
    for h in &CONNECTION_SPECIFIC {
        head.headers.remove(h);
    }
    if let Err(e) = send.send_response(Response::from_parts(head, ())).await {
        return tracing::debug!(%peer, error = %e, "cannot send an HTTP/3 answer");
    }
    let mut body = std::pin::pin!(body);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let sent = match frame {
            Ok(f) => match f.into_data() {
                Ok(data) if data.is_empty() => Ok(()),
                Ok(data) => send.send_data(data).await,
                Err(f) => match f.into_trailers() {
                    Ok(t) => send.send_trailers(t).await,
                    Err(_) => Ok(()),
                },
            },
            Err(e) => {
                tracing::debug!(%peer, error = %e, "an HTTP/3 answer's body failed");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return;
            }
        };
        if let Err(e) = sent {
            return tracing::debug!(%peer, error = %e, "cannot send an HTTP/3 answer");
        }
    }
    if let Err(e) = send.finish().await {
        tracing::debug!(%peer, error = %e, "cannot finish an HTTP/3 answer");
    }
}

/// The ALPN index HTTP/3 handshakes are counted under.
pub fn alpn_index() -> usize {
    TLS_ALPN.iter().position(|a| *a == "h3").unwrap_or(TLS_ALPN.len() - 1)
}
