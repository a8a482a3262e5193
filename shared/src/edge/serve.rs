//! Serving connections the same way on both ports: a bounded number of them,
//! each closed when it is silent, idle between requests or stalled, and all of
//! them drained on stop. The engine worker serves plain TCP with it, the HTTPS
//! worker TLS streams; the protocol (HTTP/1.1 or HTTP/2) is hyper's choice.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// `SSL_REDIRECT_HTTP`: where a plain HTTP request for `target` (path and
/// query) on `host` goes on HTTPS `port`; None when the host is missing or not a name.
pub fn https_location(host: Option<&str>, port: u16, target: &str) -> Option<http::HeaderValue> {
    let host = host.unwrap_or("localhost");
    // The host without its port ("[::1]:9001" -> "[::1]", "a.example:80" -> "a.example").
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b)) {
        return None;
    }
    let authority = if port == 443 { name.to_string() } else { format!("{name}:{port}") };
    http::HeaderValue::from_str(&format!("https://{authority}{target}")).ok()
}

pub use tandem_config::edge::Timeouts;

/// The error a [`BodyDeadline`] body ends with when its time is up.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within REQUEST_TIMEOUT ({0} s)")]
pub struct BodyTimedOut(pub u64);

/// A request body that must be read whole within a deadline ([`Timeouts::body`]).
/// The timer is armed only when the body makes the reader wait, so a body
/// that has already arrived costs nothing.
pub struct BodyDeadline<B> {
    inner: B,
    limit: Duration,
    deadline: Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> BodyDeadline<B> {
    /// `inner`, to be read within `limit` from now.
    pub fn new(inner: B, limit: Duration) -> Self {
        BodyDeadline { inner, limit, deadline: Instant::now() + limit, timer: None }
    }
}

impl<B> Body for BodyDeadline<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.limit.as_secs()))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// How often a connection's timers are looked at.
/// How long a kept-alive connection stays open once the server drains, for
/// a request a client may already have sent on it (answered with
/// `Connection: close`), before it is closed.
pub const DRAIN_LINGER: Duration = Duration::from_millis(500);

fn tick(t: &Timeouts) -> Duration {
    (t.header.min(t.keepalive).min(t.idle) / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Raises the open-file limit to its hard limit and returns how many
/// connections this process may hold: the limit minus a reserve for model
/// files, the ring, logs and the runtime's own descriptors.
pub fn connection_budget() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    };
    let soft = usize::try_from(soft).unwrap_or(usize::MAX).min(1 << 20);
    let reserve = (soft / 4).min(256);
    soft.saturating_sub(reserve).max(8)
}

/// What one connection has been doing, for its timers (here, and for an
/// HTTP/3 connection, whose idle timeout QUIC keeps itself).
pub struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte read or written.
    last_io: AtomicU64,
    /// Milliseconds since `start` of the last request's end (or of the accept).
    last_request: AtomicU64,
    in_flight: AtomicUsize,
    served: AtomicU64,
    /// The server drains: HTTP/1 answers say `Connection: close`.
    closing: std::sync::atomic::AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A connection that starts now.
    pub fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_io: AtomicU64::new(0),
            last_request: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// Why the connection should close now: a reason, and whether it must be dropped (not drained).
    fn expired(&self, t: &Timeouts) -> Option<(&'static str, bool)> {
        let quiet = Duration::from_millis(self.now().saturating_sub(self.last_io.load(Ordering::Relaxed)));
        if quiet > t.idle {
            return Some(("no byte moved within IDLE_TIMEOUT", true));
        }
        self.between_requests(t).map(|why| (why, false))
    }

    /// Why the connection, with no request in flight, should close now: no
    /// first request within HEADER_TIMEOUT, or idle past KEEPALIVE_TIMEOUT.
    pub fn between_requests(&self, t: &Timeouts) -> Option<&'static str> {
        if self.in_flight() > 0 {
            return None;
        }
        let quiet = Duration::from_millis(self.now().saturating_sub(self.last_request.load(Ordering::Relaxed)));
        if self.served.load(Ordering::Relaxed) == 0 {
            (quiet > t.header).then_some("no request within HEADER_TIMEOUT")
        } else {
            (quiet > t.keepalive).then_some("idle past KEEPALIVE_TIMEOUT")
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// The connection's stream, noting every byte that moves. It holds the
/// connection's place in the server's budget: a connection upgraded into a
/// tunnel (WebSocket) keeps its stream, and so keeps counting, until the
/// tunnel ends.
struct Touch<T, S> {
    inner: T,
    stamp: S,
}

/// What a [`Touch`] stream tells when a byte moves (and holds while it lives).
trait Stamp: Unpin {
    fn stamp(&self);
}

impl Stamp for Slot {
    fn stamp(&self) {
        self.activity.touch();
    }
}

impl Stamp for Arc<Activity> {
    fn stamp(&self) {
        self.touch();
    }
}

/// A connection's place in the server's budget, its pacing record, and what it has been doing.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _opened: Opened,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin, S: Stamp> AsyncRead for Touch<T, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.stamp.stamp();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin, S: Stamp> AsyncWrite for Touch<T, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.stamp.stamp();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.stamp.stamp();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The service, counting requests in flight for the keep-alive timer and
/// giving every request its connection's [`Peer`].
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
    conn: ConnInfo,
}

/// The client address of the connection a request came on (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// The verified client certificate of the connection a request came on (a
/// request extension, on the HTTPS port with `SSL_CLIENT_AUTH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Subject distinguished name.
    pub subject: String,
    /// Subject alternative names (`DNS:x`, `IP:y`, ...).
    pub sans: Vec<String>,
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub fingerprint: String,
}

/// A connection ready to serve, as the `connect` step of [`Server::run`] returns it.
pub struct Accepted<IO> {
    /// The stream (TCP, or TLS over it).
    pub io: IO,
    /// The client's verified certificate, if it presented one.
    pub client: Option<Arc<ClientIdentity>>,
}

impl<IO> Accepted<IO> {
    /// A connection with no client certificate.
    pub fn plain(io: IO) -> Self {
        Accepted { io, client: None }
    }
}

#[derive(Clone)]
struct ConnInfo {
    peer: Peer,
    client: Option<Arc<ClientIdentity>>,
}

/// Ends a request's count when its handler finishes (or is dropped).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_request.store(a.now(), Ordering::Relaxed);
        a.served.fetch_add(1, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B> Service<Request<Incoming>> for Counted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.conn.peer);
        if let Some(client) = &self.conn.client {
            req.extensions_mut().insert(client.clone());
        }
        let guard = self.activity.begin();
        let http1 = req.version() < http::Version::HTTP_2;
        let fut = self.inner.call(req);
        let activity = self.activity.clone();
        Box::pin(async move {
            let mut r = fut.await;
            // Draining: the client hears that this connection ends with this
            // answer, and sends its next request on a new one (never into a
            // connection being closed under it).
            if let Ok(res) = &mut r {
                if http1 && activity.closing.load(Ordering::Relaxed) {
                    res.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                }
            }
            drop(guard);
            r
        })
    }
}

/// Logs accept failures at most once a second, with how many there were.
#[derive(Default)]
struct AcceptErrors {
    last: Mutex<Option<(Instant, u64)>>,
}

impl AcceptErrors {
    fn note(&self, e: &io::Error) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *last {
            Some((at, count)) if at.elapsed() < Duration::from_secs(1) => *count += 1,
            _ => {
                let suppressed = last.map_or(0, |(_, c)| c);
                tracing::warn!(error = %e, suppressed, "accept failed; new connections wait in the backlog");
                *last = Some((Instant::now(), 0));
            }
        }
    }
}

/// The error a body or service may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body the front workers read: hyper's over TCP, or an HTTP/3
/// stream's ([`crate::edge`]'s callers give either).
pub trait RequestBody: Body<Data = bytes::Bytes, Error: Into<BoxError> + Send> + Send + Unpin + 'static {}

impl<B> RequestBody for B where B: Body<Data = bytes::Bytes, Error: Into<BoxError> + Send> + Send + Unpin + 'static {}

/// A request handler hyper can serve on many connections at once.
pub trait HttpService<B>:
    Service<Request<Incoming>, Response = Response<B>, Future: Send + 'static, Error: Into<BoxError>>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: Service<Request<Incoming>, Response = Response<B>, Future: Send + 'static, Error: Into<BoxError>>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A response body hyper can send from any thread.
pub trait ResponseBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> ResponseBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// Spreads connections over processes accepting from one socket: told of
/// every connection opened and closed, it says how long to hold back before
/// the next accept ([`crate::edge::balance::AcceptBalance`]).
pub trait Pacing: Send + Sync + 'static {
    /// The server starts or stops accepting.
    fn accepting(&self, on: bool);
    /// How long to wait before the next accept.
    fn wait(&self) -> Duration;
    /// A connection was accepted.
    fn opened(&self);
    /// A connection ended (`accepting`: the server still accepts).
    fn closed(&self, accepting: bool);
}

/// Tells the pacing the server stopped accepting (when `run` returns).
struct Stopped(Option<Arc<dyn Pacing>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            p.accepting(false);
        }
    }
}

/// Tells the pacing when its connection ends.
struct Opened(Option<(Arc<dyn Pacing>, watch::Receiver<bool>)>);

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some((p, drain)) = &self.0 {
            p.closed(!*drain.borrow());
        }
    }
}

/// Accepts and serves connections on one listener until stopped, then drains them.
pub struct Server {
    timeouts: Timeouts,
    builder: auto::Builder<TokioExecutor>,
    permits: Arc<Semaphore>,
    max: usize,
    drain: watch::Sender<bool>,
    errors: AcceptErrors,
    pacing: Option<Arc<dyn Pacing>>,
    on_park: Option<ParkHook>,
    on_unpark: Option<ParkHook>,
    silent: Option<Arc<Silent>>,
}

/// The connections of a server that have not sent a request yet, for
/// [`Server::evicting_silent`]: when every place is taken, the oldest of them
/// is closed to make room.
/// The silent connections by age: their activity and how to close them.
type Waiting = std::collections::BTreeMap<u64, (Arc<Activity>, Arc<tokio::sync::Notify>)>;

#[derive(Default)]
struct Silent {
    next: AtomicU64,
    waiting: Mutex<Waiting>,
}

impl Silent {
    /// Registers a new connection; the guard takes it out when the connection ends.
    fn register(self: &Arc<Self>, activity: Arc<Activity>, close: Arc<tokio::sync::Notify>) -> SilentEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (activity, close));
        SilentEntry { silent: self.clone(), id }
    }

    /// Closes the oldest connection that has sent nothing; false when there is none.
    fn evict_oldest(&self) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        // Connections that have sent a request leave the list as they are met.
        waiting.retain(|_, (a, _)| a.served.load(Ordering::Relaxed) == 0 && a.in_flight.load(Ordering::Relaxed) == 0);
        let Some((&id, _)) = waiting.iter().next() else { return false };
        if let Some((_, close)) = waiting.remove(&id) {
            close.notify_one();
        }
        true
    }
}

struct SilentEntry {
    silent: Arc<Silent>,
    id: u64,
}

impl Drop for SilentEntry {
    fn drop(&mut self) {
        self.silent.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// Run by a serving thread's runtime each time it is about to sleep (tokio's `on_thread_park`).
pub type ParkHook = Arc<dyn Fn() + Send + Sync>;

impl Server {
    /// A server holding at most `max_connections` connections with these timeouts.
    pub fn new(timeouts: Timeouts, max_connections: usize) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.header);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            // Pings find peers that vanished without closing.
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20));
        let max = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let (drain, _) = watch::channel(false);
        Server {
            timeouts,
            builder,
            permits: Arc::new(Semaphore::new(max)),
            max,
            drain,
            errors: AcceptErrors::default(),
            pacing: None,
            on_park: None,
            on_unpark: None,
            silent: None,
        }
    }

    /// Runs `hook` on the threads of [`Server::serve_all`] before they sleep.
    pub fn with_park_hook(mut self, hook: ParkHook) -> Self {
        self.on_park = Some(hook);
        self
    }

    /// Runs `hook` on the threads of [`Server::serve_all`] when they wake.
    pub fn with_unpark_hook(mut self, hook: ParkHook) -> Self {
        self.on_unpark = Some(hook);
        self
    }

    /// When every place is taken, closes the oldest connection that has not
    /// sent a request yet to make room for the new one: a port for a few
    /// short requests (the metrics port) that silent clients cannot block.
    pub fn evicting_silent(mut self) -> Self {
        self.silent = Some(Arc::default());
        self
    }

    /// Paces accepts with `pacing` (several processes on one socket).
    pub fn with_pacing(mut self, pacing: Arc<dyn Pacing>) -> Self {
        self.pacing = Some(pacing);
        self
    }

    /// Accepts until `stop` resolves. Each connection is first given to `connect`
    /// (the TLS handshake, or nothing) and then served by `service`. Beyond the
    /// connection limit, new connections wait in the kernel's backlog.
    pub async fn run<C, CF, IO, S, B>(
        &self,
        listener: &TcpListener,
        stop: impl Future<Output = ()>,
        connect: C,
        service: S,
    ) where
        C: Fn(TcpStream, SocketAddr) -> CF,
        CF: Future<Output = Option<Accepted<IO>>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: HttpService<B>,
        B: ResponseBody,
    {
        tokio::pin!(stop);
        if let Some(p) = &self.pacing {
            p.accepting(true);
        }
        let _stopped = Stopped(self.pacing.clone());
        loop {
            let free = self.permits.clone().try_acquire_owned().ok();
            if free.is_none() {
                if let Some(silent) = &self.silent {
                    silent.evict_oldest();
                }
            }
            let permit = match free {
                Some(p) => p,
                None => tokio::select! {
                    _ = &mut stop => return,
                    p = self.permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                },
            };
            if let Some(pause) = self.pacing.as_ref().map(|p| p.wait()).filter(|d| !d.is_zero()) {
                // Ahead of another process: let it take this connection if it can.
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            let accepted = tokio::select! {
                _ = &mut stop => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    self.errors.note(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let opened = Opened(self.pacing.clone().map(|p| {
                p.opened();
                (p, self.drain.subscribe())
            }));
            // The handshake's and the connection's futures are boxed: inline,
            // the task was 15 KB (TLS) that tokio copied into place on every
            // spawn, 4% of an HTTPS worker's time under new-connection load.
            let handshake = Box::pin(connect(tcp, peer));
            let builder = self.builder.clone();
            let service = service.clone();
            let timeouts = self.timeouts;
            let drain = self.drain.subscribe();
            let activity = Arc::new(Activity::new());
            // Listed as silent here, before the task first runs: on a
            // single-threaded runtime the loop may accept every place before
            // any task starts, and an eviction must find them all.
            let silent = self.silent.as_ref().map(|s| {
                let close = Arc::new(tokio::sync::Notify::new());
                (s.register(activity.clone(), close.clone()), close)
            });
            let accepted_at = Instant::now();
            tokio::spawn(async move {
                // A serving thread that blocks (a blocking call on it) shows here first.
                if accepted_at.elapsed() > Duration::from_millis(500) {
                    tracing::debug!(%peer, ms = accepted_at.elapsed().as_millis() as u64, pid = std::process::id(), thread = ?std::thread::current().name(), "a connection's task first ran long after its accept");
                }
                let slot = Slot { _permit: permit, _opened: opened, activity: activity.clone() };
                let serve = async move {
                    // The handshake counts against HEADER_TIMEOUT too.
                    let Ok(Some(accepted)) = tokio::time::timeout(timeouts.header, handshake).await else { return };
                    let conn = ConnInfo { peer: Peer(peer), client: accepted.client };
                    Box::pin(serve_connection(&builder, accepted.io, slot, service, timeouts, drain, conn)).await;
                };
                let Some((_listed, close)) = silent else { return serve.await };
                tokio::select! {
                    _ = serve => {}
                    _ = close.notified() => tracing::debug!(%peer, "closed a silent connection to make room"),
                }
            });
        }
    }

    /// Asks every connection to finish its requests and close, and waits up to `timeout` for them.
    /// (A paced server stopped accepting when [`Server::run`] returned.)
    /// Returns whether all of them closed in time.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.drain.send_replace(true);
        let all = self.permits.acquire_many(u32::try_from(self.max).unwrap_or(u32::MAX));
        tokio::time::timeout(timeout, all).await.is_ok()
    }
}

/// How a [`tunnel`] ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// One side closed (bytes copied each way).
    Closed(u64, u64),
    /// No byte moved either way within the idle timeout.
    Idle,
    /// A side failed.
    Failed(io::Error),
}

/// Copies bytes both ways between an upgraded client connection and its
/// backend until one side closes or no byte moves for `idle` (`IDLE_TIMEOUT`:
/// a tunnel obeys the same rule as every other connection).
pub async fn tunnel<A, B>(client: A, backend: B, idle: Duration) -> TunnelEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut a = Touch { inner: client, stamp: activity.clone() };
    let mut b = Touch { inner: backend, stamp: activity.clone() };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut timer = tokio::time::interval(tick);
    loop {
        tokio::select! {
            r = copy.as_mut() => return match r {
                Ok((up, down)) => TunnelEnd::Closed(up, down),
                Err(e) => TunnelEnd::Failed(e),
            },
            _ = timer.tick() => {
                let quiet = activity.now().saturating_sub(activity.last_io.load(Ordering::Relaxed));
                if Duration::from_millis(quiet) > idle {
                    return TunnelEnd::Idle;
                }
            }
        }
    }
}

/// Extra serving threads started by [`Server::serve_all`]; they keep
/// their runtimes (and so their connections) alive until [`Threads::finish`].
pub struct Threads {
    handles: Vec<std::thread::JoinHandle<()>>,
    finished: watch::Sender<bool>,
}

impl Threads {
    /// Lets the threads end (call after [`Server::drain`]) and waits for them.
    pub fn finish(self) {
        self.finished.send_replace(true);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Resolves once `rx` reads true.
async fn until(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

impl Server {
    /// Serves `listener` from a task on this thread's runtime and from `extra`
    /// more threads, each with a single-threaded runtime of its own, sharing
    /// this server's connection budget and drain, until
    /// [`Serving::stop_accepting`]. A connection lives on the thread that
    /// accepted it, so nothing it does wakes another thread (a multi-threaded
    /// runtime spent a third of a TLS worker's time parking and waking threads).
    pub fn serve_all<C, CF, IO, S, B>(
        self: &Arc<Self>,
        extra: usize,
        listener: std::net::TcpListener,
        connect: C,
        service: S,
    ) -> io::Result<Serving>
    where
        C: Fn(TcpStream, SocketAddr) -> CF + Clone + Send + 'static,
        CF: Future<Output = Option<Accepted<IO>>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: HttpService<B>,
        B: ResponseBody,
    {
        let (stop, stopped) = watch::channel(false);
        let (finished, done) = watch::channel(false);
        let mut handles = Vec::with_capacity(extra);
        for i in 1..=extra {
            let (server, listener) = (self.clone(), listener.try_clone()?);
            let (stop, done, connect, service) = (stopped.clone(), done.clone(), connect.clone(), service.clone());
            let mut builder = tokio::runtime::Builder::new_current_thread();
            if let Some(hook) = self.on_park.clone() {
                builder.on_thread_park(move || hook());
            }
            if let Some(hook) = self.on_unpark.clone() {
                builder.on_thread_unpark(move || hook());
            }
            let runtime = builder.enable_all().build()?;
            handles.push(std::thread::Builder::new().name(format!("serve-{i}")).spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => server.run(&l, until(stop), connect, service).await,
                        Err(e) => tracing::error!(thread = i, error = %e, "cannot register the listener"),
                    }
                    until(done).await;
                });
            })?);
        }
        let threads = Threads { handles, finished };
        let own = TcpListener::from_std(listener)?;
        let server = self.clone();
        let accepting = tokio::spawn(async move { server.run(&own, until(stopped), connect, service).await });
        Ok(Serving { stop, accepting, threads })
    }
}

/// A listener served on every thread by [`Server::serve_all`].
pub struct Serving {
    stop: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
    threads: Threads,
}

impl Serving {
    /// Stops accepting on every thread; the connections go on until drained ([`Server::drain`]).
    pub async fn stop_accepting(&mut self) {
        self.stop.send_replace(true);
        let _ = (&mut self.accepting).await;
    }

    /// Lets the threads end once their connections are drained (or out of time).
    pub fn finish(self) {
        self.threads.finish();
    }
}

/// Threads to serve with: one per core, at most 16.
pub fn serving_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16)
}

async fn serve_connection<IO, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    slot: Slot,
    service: S,
    timeouts: Timeouts,
    mut drain: watch::Receiver<bool>,
    conn: ConnInfo,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<B>,
    B: ResponseBody,
{
    let activity = slot.activity.clone();
    let io = TokioIo::new(Touch { inner: io, stamp: slot });
    let peer = conn.peer.0;
    let service = Counted { inner: service, activity: activity.clone(), conn };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(tick(&timeouts));
    // On a drain, a connection stays open for DRAIN_LINGER with every HTTP/1
    // answer saying `Connection: close` (a request already on its way is
    // answered, not cut off); then it is closed (HTTP/2: GOAWAY). The same for
    // one whose handshake ended after the drain began: its client has a
    // request to send.
    let mut closing = *drain.borrow();
    let mut lingering = closing;
    let linger = tokio::time::sleep(if closing { DRAIN_LINGER } else { Duration::from_secs(86400 * 365) });
    tokio::pin!(linger);
    if closing {
        activity.closing.store(true, Ordering::Relaxed);
    }
    // When a timer closed the connection: a peer that does not take part in the
    // close (an HTTP/2 client that never acknowledges the GOAWAY's ping) is dropped
    // after HEADER_TIMEOUT more.
    let mut timed_out: Option<Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            changed = drain.changed(), if !closing => {
                if changed.is_ok() {
                    closing = true;
                    lingering = true;
                    activity.closing.store(true, Ordering::Relaxed);
                    linger.as_mut().reset(tokio::time::Instant::now() + DRAIN_LINGER);
                }
            }
            () = &mut linger, if lingering => {
                lingering = false;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => match activity.expired(&timeouts) {
                Some((why, true)) => {
                    tracing::debug!(%peer, why, "closing connection");
                    return;
                }
                Some((why, false)) if !closing => {
                    tracing::debug!(%peer, why, "closing connection");
                    closing = true;
                    timed_out = Some(Instant::now());
                    conn.as_mut().graceful_shutdown();
                }
                _ if timed_out.is_some_and(|at| at.elapsed() > timeouts.header) => {
                    tracing::debug!(%peer, "the peer did not close; dropping the connection");
                    return;
                }
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            header: Duration::from_millis(100),
            keepalive: Duration::from_millis(200),
            idle: Duration::from_secs(1),
            body: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_silent_connection_expires_after_the_header_timeout() {
        let a = Activity::new();
        assert_eq!(a.expired(&timeouts()), None);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(a.expired(&timeouts()), Some(("no request within HEADER_TIMEOUT", false)));
    }

    #[test]
    fn requests_in_flight_hold_the_connection_until_nothing_moves() {
        let a = Arc::new(Activity::new());
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(a.clone());
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(a.expired(&timeouts()), None, "a request in flight is not idle");
        drop(guard);
        assert_eq!(a.expired(&timeouts()), None, "keep-alive counts from the request's end");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(a.expired(&timeouts()), Some(("idle past KEEPALIVE_TIMEOUT", false)));
        let t = Timeouts { idle: Duration::from_millis(100), ..timeouts() };
        assert_eq!(a.expired(&t).map(|(_, hard)| hard), Some(true), "no byte moved: dropped");
    }

    #[test]
    fn the_budget_stays_below_the_descriptor_limit() {
        let budget = connection_budget();
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("limit");
        assert!((budget as u64) < soft, "{budget} >= {soft}");
    }
}
