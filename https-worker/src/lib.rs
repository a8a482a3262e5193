//! tandem's HTTPS worker: terminates TLS on the inherited listener
//! ([`tandem_tls`]) and hands every request to the engine workers through the
//! shared-memory ring, with a certificate that can be swapped without
//! dropping a request.

#![forbid(unsafe_code)]

pub mod forward;
pub mod grpc;

use std::sync::Arc;

use anyhow::Context;
use tandem_shared::process::worker::{run_worker, Kind, Running, Started};
use tandem_shared::WorkerSettings;
use tandem_tls::Tls;

/// How long the HTTPS worker waits for requests the engines hold once the supervisor is gone.
const ORPHAN_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the HTTPS worker until it is told to stop; returns when drained.
pub fn run(settings: WorkerSettings) -> anyhow::Result<()> {
    let kind = Kind {
        name: "https worker",
        role: tandem_shared::stats::ProcessRole::Https,
        keep_large_allocations: true,
        on_park: Some(watch_before_park),
        on_unpark: None,
    };
    // One single-threaded runtime per core (Server::serve_all): the skeleton's, and the others.
    run_worker(settings, kind, serve)
}

/// The ring this process forwards to, for [`watch_before_park`].
static WATCHED: std::sync::OnceLock<Arc<forward::Completions>> = std::sync::OnceLock::new();

/// Every serving thread's `on_thread_park`: see [`forward::Completions::watch_before_park`].
fn watch_before_park() {
    if let Some(c) = WATCHED.get() {
        c.watch_before_park();
    }
}

async fn serve(started: Started) -> anyhow::Result<Running> {
    let Started { settings, control, stats, listener } = started;
    let (Some(std_listener), Some(addr)) = (listener, settings.listen_addr) else {
        anyhow::bail!("the HTTPS worker was started without its listener");
    };
    let tls = Tls::start(settings.tls()?)?;
    let fingerprint = tls.fingerprint.clone();

    // No model here: every request goes to the engine workers through shared memory.
    let shm = settings.shm()?;
    let region = tandem_shared::process::worker::open_region(shm).context("cannot map the shared-memory region")?;
    let completions = forward::Completions::start(region.clone()).context("cannot start the completion thread")?;
    let _ = WATCHED.set(completions.clone());
    let max_request = usize::try_from(settings.edge.policy.max_request_bytes).unwrap_or(usize::MAX);
    let options = forward::ForwardOptions {
        max_request_bytes: max_request,
        timeout: shm.request_timeout,
        access_log: settings.edge.policy.access_log.then_some(settings.worker_id),
        door: tandem_shared::edge::front::FrontDoor::new(&settings, true, &stats)?,
        inflight_bytes: settings.edge.inflight_bytes,
    };
    let forwarder = Arc::new(forward::Forwarder::new(region, completions.clone(), stats.clone(), options));
    let budget = tandem_shared::edge::serve::connection_budget();
    let server = Arc::new(
        tandem_shared::edge::serve::Server::new(settings.edge.policy.timeouts, budget)
            .with_park_hook(Arc::new(watch_before_park)),
    );

    let reloads = tls.spawn_reloads(settings.tls()?, control.clone(), stats.clone())?;
    let handshaker = tls.handshaker(stats.clone(), addr);
    let handshake = move |tcp, peer| handshaker.clone().accept(tcp, peer);
    let fwd = forwarder.clone();
    let service = hyper::service::service_fn(move |req| fwd.clone().handle(req));
    // HTTP/3 (SSL_HTTP3): the UDP socket the supervisor bound, served from this thread's runtime.
    let http3 = match settings.tls()?.h3 {
        Some((fd, addr)) => {
            let socket = std::net::UdpSocket::from(
                tandem_shared::sys::adopt_fd(fd).context("cannot take the inherited HTTP/3 socket")?,
            );
            let fwd = forwarder.clone();
            let options = tandem_tls::h3::Options {
                acceptors: tls.acceptors(),
                stats: stats.clone(),
                timeouts: settings.edge.policy.timeouts,
                max_connections: budget,
                threads: tandem_shared::edge::serve::serving_threads(),
                on_park: Some(Arc::new(watch_before_park)),
            };
            let h3 = tandem_tls::h3::Http3::start(socket, options, move |req| fwd.clone().handle(req))?;
            tracing::debug!(%addr, "serving HTTP/3");
            Some(h3)
        }
        None => None,
    };
    let extra = tandem_shared::edge::serve::serving_threads() - 1;
    let mut serving =
        server.serve_all(extra, std_listener, handshake, service).context("cannot start the serving threads")?;
    let graceful = settings.graceful_timeout;
    let drain = async move {
        serving.stop_accepting().await;
        reloads.abort();
        // A stop because the supervisor was killed (its end of the control channel
        // closes) means the engines are stopping too: answer what they will never
        // start now, wait briefly for what they hold, and go.
        let orphaned = async {
            control.closed().await;
            let failed = forwarder.orphan();
            tracing::error!(failed, "the supervisor is gone; answering unstarted requests 503 and exiting");
            tokio::time::sleep(ORPHAN_DRAIN).await;
        };
        let both = async {
            let h3 = async {
                match http3 {
                    Some(h3) => h3.drain(graceful).await,
                    None => true,
                }
            };
            let (tcp, h3) = tokio::join!(server.drain(graceful), h3);
            tcp && h3
        };
        let drained = tokio::select! {
            d = both => d,
            () = orphaned => false,
        };
        serving.finish();
        drained
    };
    Ok(Running {
        fingerprint: Some(fingerprint),
        details: format!("max_connections={budget} threads={} http3={}", extra + 1, settings.tls()?.h3.is_some()),
        drain: Box::pin(drain),
    })
}
