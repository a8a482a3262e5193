//! The copies the proxy worker forwards to: which are in rotation, how many
//! requests each holds (least outstanding wins), and one keep-alive
//! connection pool per copy, over TCP or a Unix socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tandem_shared::process::control::{Backend, BackendAddr, BackendState, ControlClient, WorkerEvent};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Errors of the bodies the proxy sends and receives.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request or response body of any origin.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// How long connecting to a copy may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle pooled connections close after this: below the keep-alive of common
/// servers (gunicorn 2 s, uvicorn 5 s), so a request is never written onto a
/// connection the copy is closing.
const POOL_IDLE: Duration = Duration::from_millis(1500);
/// A copy that refused a connection is skipped this long (unless no other is left).
const SUSPECT_FOR: Duration = Duration::from_secs(1);

/// A connection to a copy.
pub enum BackendStream {
    /// `{port}`.
    Tcp(TcpStream),
    /// `{socket}`.
    Unix(UnixStream),
}

impl AsyncRead for BackendStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Connection for BackendStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Connects to one copy, whatever the URI says.
#[derive(Clone)]
pub struct Connector {
    addr: Arc<BackendAddr>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<BackendStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.addr.clone();
        Box::pin(async move {
            let connect = async {
                match &*addr {
                    BackendAddr::Tcp(a) => {
                        let s = TcpStream::connect(a).await?;
                        let _ = s.set_nodelay(true);
                        Ok(BackendStream::Tcp(s))
                    }
                    BackendAddr::Unix(p) => Ok(BackendStream::Unix(UnixStream::connect(p).await?)),
                }
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(r) => r.map(TokioIo::new),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            }
        })
    }
}

const READY: u8 = 0;
const UNHEALTHY: u8 = 1;
const DRAINING: u8 = 2;

fn state_code(s: BackendState) -> u8 {
    match s {
        BackendState::Ready => READY,
        BackendState::Unhealthy => UNHEALTHY,
        BackendState::Draining => DRAINING,
    }
}

/// One copy and its connection pool.
pub struct Entry {
    /// The copy's worker id.
    pub id: u64,
    /// Its worker number (`{worker}`).
    pub worker: usize,
    state: AtomicU8,
    in_flight: AtomicUsize,
    /// Milliseconds since the pool's epoch until which the copy is skipped.
    suspect_until: AtomicU64,
    idle_reported: AtomicBool,
    /// Keep-alive connections to it, one pool per serving thread (a
    /// connection lives on the runtime of the thread that opened it).
    clients: Vec<Client<Connector, ProxyBody>>,
    /// The same over HTTP/2 with prior knowledge, for gRPC calls (a gRPC
    /// server speaks nothing else), one per serving thread too.
    grpc_clients: Vec<Client<Connector, ProxyBody>>,
}

thread_local! {
    static THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as serving thread `index` (it uses that thread's pools).
pub fn set_thread(index: usize) {
    THREAD.with(|t| t.set(index));
}

impl Entry {
    /// The connection pool of the calling thread.
    pub fn client(&self) -> &Client<Connector, ProxyBody> {
        let i = THREAD.with(std::cell::Cell::get);
        &self.clients[i.min(self.clients.len() - 1)]
    }

    /// The calling thread's HTTP/2 connection to the copy, for gRPC calls.
    pub fn grpc_client(&self) -> &Client<Connector, ProxyBody> {
        let i = THREAD.with(std::cell::Cell::get);
        &self.grpc_clients[i.min(self.grpc_clients.len() - 1)]
    }
}

fn client(addr: &BackendAddr, http2: bool) -> Client<Connector, ProxyBody> {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(1024)
        .http2_only(http2)
        // The client's Host header passes through as it came.
        .set_host(false)
        .build(Connector { addr: Arc::new(addr.clone()) })
}

/// Every copy in rotation.
pub struct Pool {
    entries: RwLock<Vec<Arc<Entry>>>,
    /// Bumped on every change of the set, for requests waiting for a copy.
    changed: tokio::sync::watch::Sender<u64>,
    next: AtomicUsize,
    epoch: Instant,
    control: Arc<ControlClient>,
    /// Serving threads (one connection pool each per copy).
    threads: usize,
}

/// A request's hold on a copy; the copy's count goes down when it drops
/// (when the response body has been sent, for streamed answers).
pub struct Lease {
    /// The copy.
    pub entry: Arc<Entry>,
    pool: Arc<Pool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let left = self.entry.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 {
            self.pool.report_if_idle(&self.entry);
        }
    }
}

impl Pool {
    /// A pool over `backends` for `threads` serving threads, reporting drained copies on `control`.
    pub fn new(backends: &[Backend], control: Arc<ControlClient>, threads: usize) -> Arc<Pool> {
        let (changed, _) = tokio::sync::watch::channel(0);
        let pool = Arc::new(Pool {
            entries: RwLock::new(Vec::new()),
            changed,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            control,
            threads: threads.max(1),
        });
        pool.update(backends);
        pool
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Replaces the set with `backends` (the supervisor's whole view); a copy
    /// that stays keeps its pool and its count.
    pub fn update(&self, backends: &[Backend]) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::take(&mut *entries);
        for b in backends {
            let entry = match old.iter().find(|e| e.id == b.id) {
                Some(e) => e.clone(),
                None => Arc::new(Entry {
                    id: b.id,
                    worker: b.worker,
                    state: AtomicU8::new(READY),
                    in_flight: AtomicUsize::new(0),
                    suspect_until: AtomicU64::new(0),
                    idle_reported: AtomicBool::new(false),
                    clients: (0..self.threads).map(|_| client(&b.addr, false)).collect(),
                    grpc_clients: (0..self.threads).map(|_| client(&b.addr, true)).collect(),
                }),
            };
            entry.state.store(state_code(b.state), Ordering::Release);
            entries.push(entry);
        }
        let draining: Vec<Arc<Entry>> =
            entries.iter().filter(|e| e.state.load(Ordering::Acquire) == DRAINING).cloned().collect();
        drop(entries);
        for e in draining {
            self.report_if_idle(&e);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Tells the supervisor a draining copy holds no request any more (once).
    fn report_if_idle(&self, e: &Entry) {
        if e.state.load(Ordering::Acquire) == DRAINING
            && e.in_flight.load(Ordering::Acquire) == 0
            && !e.idle_reported.swap(true, Ordering::AcqRel)
        {
            if let Err(err) = self.control.send(&WorkerEvent::BackendIdle { id: e.id }) {
                tracing::warn!(worker_id = e.id, error = %err, "cannot report a drained copy to the supervisor");
            }
        }
    }

    /// Skips copy `e` for a moment: it refused a connection. The supervisor
    /// is told (at most once per [`SUSPECT_FOR`]), so its prober looks at once.
    pub fn suspect(&self, e: &Entry) {
        let now = self.now_ms();
        let was = e.suspect_until.swap(now + SUSPECT_FOR.as_millis() as u64, Ordering::Relaxed);
        if was <= now {
            if let Err(err) = self.control.send(&WorkerEvent::BackendFailing { id: e.id }) {
                tracing::debug!(worker_id = e.id, error = %err, "cannot report a failing copy to the supervisor");
            }
        }
    }

    /// The copy with the fewest requests in flight among those in rotation and
    /// not in `tried`; when none is, a running one out of rotation (better an
    /// answer from a slow copy than none). Ties go round-robin.
    pub fn pick(self: &Arc<Self>, tried: &[u64]) -> Option<Lease> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let n = entries.len();
        if n == 0 {
            return None;
        }
        let now = self.now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(&Arc<Entry>, (u8, usize))> = None;
        for i in 0..n {
            let e = &entries[(start + i) % n];
            let state = e.state.load(Ordering::Acquire);
            if state == DRAINING || tried.contains(&e.id) {
                continue;
            }
            // Rank: in rotation first, then suspects, then unhealthy copies; fewest in flight within a rank.
            let rank = match (state, e.suspect_until.load(Ordering::Relaxed) > now) {
                (READY, false) => 0,
                (READY, true) => 1,
                _ => 2,
            };
            let key = (rank, e.in_flight.load(Ordering::Relaxed));
            if best.is_none_or(|(_, k)| key < k) {
                best = Some((e, key));
            }
        }
        let entry = best?.0.clone();
        entry.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Lease { entry, pool: self.clone() })
    }

    /// A watch on the set: take it before [`Pool::pick`], then [`Pool::changed`]
    /// misses no change made in between.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until the set changed since `rx` was taken, or `deadline` passes; false at the deadline.
    pub async fn changed(rx: &mut tokio::sync::watch::Receiver<u64>, deadline: tokio::time::Instant) -> bool {
        tokio::time::timeout_at(deadline, rx.changed()).await.is_ok_and(|r| r.is_ok())
    }

    /// How many copies are known (any state).
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// No copy is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
