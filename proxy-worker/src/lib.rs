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
use tandem_shared::control::{Command, ControlClient, WorkerEvent};
use tandem_shared::serve::{Accepted, Server};
use tandem_shared::worker::{attach, stop_signal};
use tandem_shared::WorkerSettings;

/// Runs the proxy worker until it is told to stop; returns when drained.
pub fn run(settings: WorkerSettings) -> anyhow::Result<()> {
    let control = attach(&settings)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the tokio runtime")?;
    runtime.block_on(serve(settings, control))
}

fn listener(fd: i32, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let fd = tandem_shared::sys::adopt_fd(fd).with_context(|| format!("cannot take the inherited {what} listener"))?;
    let l = TcpListener::from(fd);
    l.set_nonblocking(true).context("cannot make the listener non-blocking")?;
    tokio::net::TcpListener::from_std(l).context("cannot register the listener")
}

async fn serve(settings: WorkerSettings, control: Arc<ControlClient>) -> anyhow::Result<()> {
    let proxy = settings.proxy.clone().context("the proxy worker was started without its settings")?;
    let stats = tandem_shared::worker::open_stats(
        &settings.stats,
        tandem_shared::stats::ProcessRole::Proxy,
        settings.worker_id,
    )
    .context("cannot map the statistics region")?;
    let pool = pool::Pool::new(&proxy.backends, control.clone());
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
    let http = listener(tandem_shared::sys::LISTEN_FDS_START, "HTTP")?;
    let tls = match proxy.https {
        Some((fd, addr)) => Some((listener(fd, "HTTPS")?, addr, tandem_https_worker::Tls::start(&settings)?)),
        None => None,
    };
    let hsts = settings
        .hsts
        .as_deref()
        .map(http::HeaderValue::from_str)
        .transpose()
        .context("SSL_HSTS is not a valid header value")?;
    let options = forward::Options {
        max_request_bytes: settings.max_request_bytes,
        timeout: proxy.request_timeout,
        access_log: settings.access_log.then_some(settings.worker_id),
        hsts,
        redirect_to_https: settings.redirect_to_https,
        ready_path: proxy.ready_path.clone(),
        acme_http01: settings.acme_http01.clone(),
    };
    let forwarder = Arc::new(forward::Proxy::new(pool.clone(), stats.clone(), options));
    // Each listener gets half the descriptors when there are two.
    let budget = tandem_shared::serve::connection_budget() / if tls.is_some() { 2 } else { 1 };
    let plain = Server::new(settings.timeouts, budget);
    let secure = Server::new(settings.timeouts, budget);
    let reloads = match &tls {
        Some((_, _, t)) => Some(t.spawn_reloads(&settings, control.clone(), stats.clone())?),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let fingerprint = tls.as_ref().map(|(_, _, t)| t.fingerprint.clone());
    control
        .send(&WorkerEvent::Ready { addr: settings.listen_addr.to_string(), fingerprint: fingerprint.clone() })
        .context("cannot report ready to the supervisor")?;
    tracing::info!(
        worker_id = settings.worker_id,
        pid = std::process::id(),
        http = %settings.listen_addr,
        https = tls.as_ref().map(|(_, a, _)| a.to_string()),
        copies = pool.len(),
        "proxy worker ready"
    );

    let http_port = settings.listen_addr.port();
    let fwd = forwarder.clone();
    let http_service = hyper::service::service_fn(move |req| fwd.clone().handle(req, false, http_port));
    let serve_http = plain.run(
        &http,
        stopped(stop_rx.clone()),
        |tcp, _| std::future::ready(Some(Accepted::plain(tcp))),
        http_service,
    );
    let serve_https = async {
        if let Some((listener, addr, tls)) = &tls {
            let handshaker = tls.handshaker(stats.clone(), *addr);
            let fwd = forwarder.clone();
            let port = addr.port();
            let service = hyper::service::service_fn(move |req| fwd.clone().handle(req, true, port));
            secure
                .run(listener, stopped(stop_rx.clone()), move |tcp, peer| handshaker.clone().accept(tcp, peer), service)
                .await;
        }
    };
    tokio::join!(serve_http, serve_https);
    drop(http);
    drop(tls);
    if let Some(r) = reloads {
        r.abort();
    }
    tracing::info!(worker_id = settings.worker_id, "draining in-flight requests");
    let _ = control.send(&WorkerEvent::Draining);
    let (a, b) = tokio::join!(plain.drain(settings.graceful_timeout), secure.drain(settings.graceful_timeout));
    if a && b {
        tracing::info!("drained");
    } else {
        tracing::warn!(
            timeout_s = settings.graceful_timeout.as_secs(),
            "drain timed out; exiting with requests in flight"
        );
    }
    Ok(())
}
