//! `METRICS_PORT`: the supervisor serves `/metrics` itself, on a thread and
//! runtime of its own (its event loop never waits on a scrape), from the same
//! statistics region the workers count into, so scrapes work while workers
//! restart and never touch the inference ports.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use tandem_shared::edge::serve::{Server, Timeouts};
use tandem_shared::sys::counters::Counters;
use tandem_shared::sys::shm::Region;

/// Connections the metrics port holds at once (scrapers are few).
const MAX_CONNECTIONS: usize = 64;

/// The metrics port's own timers, shorter than the inference ports' (a scrape
/// asks at once and is answered in microseconds): a connection that says
/// nothing is closed after a few seconds, so silent clients cannot hold every
/// place for long.
fn own_timeouts(t: Timeouts) -> Timeouts {
    Timeouts {
        header: t.header.min(Duration::from_secs(5)),
        keepalive: t.keepalive.min(Duration::from_secs(30)),
        idle: t.idle.min(Duration::from_secs(60)),
        body: t.body.min(Duration::from_secs(5)),
    }
}

/// Serves `/metrics` and the `/status` page on `listener` until the process exits, and `GET /`:
/// tandem's version and how its engine runs, with the ONNX Runtime library's
/// path (`engine`), which the inference ports never show.
pub fn spawn(
    listener: TcpListener,
    counters: Arc<Counters>,
    ring: Option<Arc<Region>>,
    cert_status: Option<PathBuf>,
    timeouts: Timeouts,
    engine: serde_json::Value,
) -> anyhow::Result<()> {
    use anyhow::Context;
    listener.set_nonblocking(true).context("cannot make the metrics listener non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("metrics-port".into()).spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            let history = crate::status_page::spawn_sampler(counters.clone(), ring.clone());
            let app = axum::Router::new()
                // Both answers are made at once, from the counters region: no await.
                .route("/metrics", {
                    let (counters, ring, status) = (counters.clone(), ring.clone(), cert_status.clone());
                    axum::routing::get(move || {
                        std::future::ready(tandem_engine_worker::metrics::response(
                            &counters,
                            ring.as_deref(),
                            status.as_deref(),
                            None,
                        ))
                    })
                })
                .route(
                    "/status",
                    axum::routing::get(move || {
                        std::future::ready(crate::status_page::response(
                            &counters,
                            ring.as_deref(),
                            cert_status.as_deref(),
                            &history,
                        ))
                    }),
                )
                .route(
                    "/",
                    axum::routing::get(move || {
                        let about = serde_json::json!({
                            "name": "tandem",
                            "version": tandem_shared::VERSION,
                            "engine": engine.clone(),
                        });
                        async move { axum::Json(about) }
                    }),
                )
                .fallback(|| async {
                    tandem_engine_worker::state::error(
                        StatusCode::NOT_FOUND,
                        "only /, /metrics and /status are served on METRICS_PORT",
                    )
                    .into_response()
                });
            let service = hyper_util::service::TowerToHyperService::new(app);
            let server = Server::new(own_timeouts(timeouts), MAX_CONNECTIONS).evicting_silent();
            server
                .run(
                    &listener,
                    std::future::pending(),
                    |tcp, _| async move { Some(tandem_shared::edge::serve::Accepted::plain(tcp)) },
                    service,
                )
                .await;
        });
    })?;
    Ok(())
}
