//! tandem's proxy worker (`WORKER_COMMAND`): serves the HTTP port and, with
//! `ENABLE_SSL`, the HTTPS port (TLS as the HTTPS worker terminates it), and
//! forwards every request to a ready copy of the operator's server. The
//! supervisor starts, probes and stops the copies and tells this worker which
//! are in rotation. See docs/PROXY.md.

#![forbid(unsafe_code)]

pub mod forward;
pub mod pool;

use std::net::TcpListener;
use std::sync::Arc;

use anyhow::Context;
use tandem_shared::edge::front::FrontDoor;
use tandem_shared::edge::serve::{Accepted, Server};
use tandem_shared::process::control::Command;
use tandem_shared::process::worker::{adopt_listener, run_worker, Kind, Running, Started};
use tandem_shared::WorkerSettings;

/// Most threads (each with its own runtime) the proxy worker runs.
const MAX_THREADS: usize = 16;

/// Serving threads for `cores` cores: half of them. The copies behind the
/// proxy (most often Python apps) need most of the machine, and a proxy
/// thread per core competed with them: on 2 cores with two uvicorn copies,
/// one thread instead of two served 1.01x nginx instead of 0.97x with
/// keep-alive (whole-tree CPU 525 vs 547 µs per request) and 1.18x instead
/// of 1.05x with a new TLS connection per request (886 vs 1110 µs). The cost
/// is a proxy-bound ceiling with very fast copies (tandem's own engine as the
/// copy: 28k instead of 32k req/s on 2 cores).
fn serving_threads(cores: usize) -> usize {
    (cores / 2).clamp(1, MAX_THREADS)
}

/// Runs the proxy worker until it is told to stop; returns when drained.
///
/// One single-threaded runtime per serving thread ([`serving_threads`]),
/// each accepting on both listeners and keeping its own connections to the
/// copies: a request never crosses threads, so no wake-up goes through the
/// kernel between accept, the copy's answer and the reply (a multi-threaded
/// runtime spent 86 µs of CPU per proxied request here, one runtime per
/// thread 55 µs).
pub fn run(settings: WorkerSettings) -> anyhow::Result<()> {
    let kind = Kind {
        name: "proxy worker",
        role: tandem_shared::stats::ProcessRole::Proxy,
        keep_large_allocations: false,
        on_park: None,
        on_unpark: None,
    };
    run_worker(settings, kind, serve)
}

fn single_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a tokio runtime")
}

/// What every serving thread shares.
struct Shared {
    settings: WorkerSettings,
    http: Option<TcpListener>,
    https: Option<(TcpListener, std::net::SocketAddr, tandem_tls::Handshaker)>,
    forwarder: Arc<forward::Proxy>,
    budget: usize,
}

async fn serve(started: Started) -> anyhow::Result<Running> {
    let Started { settings, control, stats, listener: http } = started;
    let threads = serving_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let proxy = settings.proxy()?.clone();
    let pool = pool::Pool::new(&proxy.backends, control.clone(), threads);
    if let Some(mut commands) = control.commands() {
        let pool = pool.clone();
        tokio::spawn(async move {
            while let Some(c) = commands.recv().await {
                if let Command::Backends { backends } = c {
                    tracing::debug!(copies = backends.len(), "the supervisor changed the copies");
                    pool.update(&backends);
                }
            }
        });
    }
    let tls = match proxy.https {
        Some((fd, addr)) => {
            let l = adopt_listener(fd).context("cannot take the inherited HTTPS listener")?;
            Some((l, addr, tandem_tls::Tls::start(settings.tls()?)?))
        }
        None => None,
    };
    let options = forward::Options {
        max_request_bytes: settings.edge.policy.max_request_bytes,
        timeout: proxy.request_timeout,
        access_log: settings.edge.policy.access_log.then_some(settings.worker_id),
        plain: FrontDoor::new(&settings, false, &stats)?.always_answering(&proxy.ready_path),
        secure: FrontDoor::new(&settings, true, &stats)?.always_answering(&proxy.ready_path),
        idle_timeout: settings.edge.policy.timeouts.idle,
        inflight_bytes: settings.edge.inflight_bytes,
    };
    let reloads = match &tls {
        Some((_, _, t)) => Some(t.spawn_reloads(settings.tls()?, control.clone(), stats.clone())?),
        None => None,
    };
    let fingerprint = tls.as_ref().map(|(_, _, t)| t.fingerprint.clone());
    let acceptors = tls.as_ref().map(|(_, _, t)| t.acceptors());
    let h3_stats = stats.clone();
    // Each listener gets its share of the descriptors, split over the threads.
    let listeners = (usize::from(tls.is_some()) + usize::from(http.is_some())).max(1);
    let shared = Arc::new(Shared {
        http,
        https: tls.map(|(l, a, t)| (l, a, t.handshaker(stats.clone(), a))),
        forwarder: Arc::new(forward::Proxy::new(pool.clone(), stats, options)),
        budget: (tandem_shared::edge::serve::connection_budget() / listeners / threads).max(8),
        settings: settings.clone(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let others: Vec<_> = (1..threads)
        .map(|i| {
            let (shared, stop) = (shared.clone(), stop_rx.clone());
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || -> anyhow::Result<bool> { Ok(single_thread()?.block_on(serve_thread(i, shared, stop))) })
        })
        .collect::<Result<_, _>>()
        .context("cannot start the proxy threads")?;
    let details = format!(
        "https={} copies={} threads={threads}",
        shared.https.as_ref().map_or("-".to_string(), |(_, a, _)| a.to_string()),
        pool.len()
    );
    // HTTP/3 (SSL_HTTP3): the UDP socket the supervisor bound, served from this thread's runtime.
    let http3 = match (settings.tls.as_ref().and_then(|t| t.h3), acceptors) {
        (Some((fd, addr)), Some(acceptors)) => {
            let socket = std::net::UdpSocket::from(
                tandem_shared::sys::adopt_fd(fd).context("cannot take the inherited HTTP/3 socket")?,
            );
            let options = tandem_tls::h3::Options {
                acceptors,
                stats: h3_stats,
                timeouts: settings.edge.policy.timeouts,
                max_connections: shared.budget,
                threads,
                on_park: None,
            };
            let fwd = shared.forwarder.clone();
            let port = addr.port();
            Some(tandem_tls::h3::Http3::start(socket, options, move |req| fwd.clone().handle(req, true, port))?)
        }
        _ => None,
    };
    let graceful = settings.graceful_timeout;
    let first = tokio::spawn(serve_thread(0, shared, stop_rx));
    let drain = async move {
        let _ = stop_tx.send(true);
        let h3 = async {
            match http3 {
                Some(h3) => h3.drain(graceful).await,
                None => true,
            }
        };
        let (first, h3) = tokio::join!(first, h3);
        let mut drained = first.unwrap_or(false) && h3;
        if let Some(r) = reloads {
            r.abort();
        }
        for t in others {
            drained &= matches!(t.join(), Ok(Ok(true)));
        }
        drained
    };
    Ok(Running { fingerprint, details, drain: Box::pin(drain) })
}

/// One thread's share: accepts on both listeners until stopped, then drains
/// its connections. Returns whether they all finished in time.
async fn serve_thread(index: usize, shared: Arc<Shared>, stop: tokio::sync::watch::Receiver<bool>) -> bool {
    pool::set_thread(index);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let register = |l: &TcpListener| l.try_clone().and_then(tokio::net::TcpListener::from_std);
    let settings = &shared.settings;
    let plain = Server::new(settings.edge.policy.timeouts, shared.budget);
    let secure = Server::new(settings.edge.policy.timeouts, shared.budget);
    let serve_http = async {
        // None with HTTP_MODE=off.
        let (Some(l), Some(addr)) = (&shared.http, settings.listen_addr) else { return };
        let http = match register(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(thread = index, error = %e, "cannot register the HTTP listener");
                return;
            }
        };
        let fwd = shared.forwarder.clone();
        let service = hyper::service::service_fn(move |req| fwd.clone().handle(req, false, addr.port()));
        let accept = |tcp, _| std::future::ready(Some(Accepted::plain(tcp)));
        plain.run(&http, stopped(stop.clone()), accept, service).await;
    };
    let serve_https = async {
        let Some((l, addr, handshaker)) = &shared.https else { return };
        let listener = match register(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(thread = index, error = %e, "cannot register the HTTPS listener");
                return;
            }
        };
        let fwd = shared.forwarder.clone();
        let port = addr.port();
        let service = hyper::service::service_fn(move |req| fwd.clone().handle(req, true, port));
        let handshaker = handshaker.clone();
        secure
            .run(&listener, stopped(stop.clone()), move |tcp, peer| handshaker.clone().accept(tcp, peer), service)
            .await;
    };
    tokio::join!(serve_http, serve_https);
    let (a, b) = tokio::join!(plain.drain(settings.graceful_timeout), secure.drain(settings.graceful_timeout));
    a && b
}

#[cfg(test)]
mod tests {
    use super::serving_threads;

    #[test]
    fn the_proxy_leaves_half_the_cores_to_the_copies() {
        assert_eq!(serving_threads(1), 1);
        assert_eq!(serving_threads(2), 1);
        assert_eq!(serving_threads(3), 1);
        assert_eq!(serving_threads(8), 4);
        assert_eq!(serving_threads(64), 16);
    }
}
