//! tandem's engine worker: the router that serves the API on both
//! ports, and the process that accepts plain HTTP on the inherited listener.

#![forbid(unsafe_code)]

pub mod compression;
pub mod control_api;
pub mod engine;
pub mod grpc;
pub mod grpc_codec;
pub mod infer;
pub mod metrics;
pub mod model_control;
pub mod nonfinite;
pub mod router;
pub mod shm_server;
pub mod state;
pub mod system_shm;

use std::sync::Arc;

use anyhow::Context;
use tandem_shared::process::worker::{run_worker, Kind, Running, Started};
use tandem_shared::WorkerSettings;

pub use router::router;
pub use state::{AppState, Scheme};

/// Runs the engine worker until it is told to stop; returns when drained.
pub fn run(settings: WorkerSettings) -> anyhow::Result<()> {
    let kind = Kind {
        name: "engine worker",
        role: tandem_shared::stats::ProcessRole::Engine,
        keep_large_allocations: true,
        // Whether this worker would take a new connection at once
        // (shared::edge::balance): every serving thread says when it sleeps.
        on_park: Some(tandem_shared::edge::balance::thread_parked),
        on_unpark: Some(tandem_shared::edge::balance::thread_unparked),
    };
    // One single-threaded runtime per inference thread (Server::serve_all):
    // the skeleton's, which also answers the control channel, and the others.
    run_worker(settings, kind, serve)
}

async fn serve(started: Started) -> anyhow::Result<Running> {
    let Started { settings, control, stats, listener: std_listener } = started;
    let engine = load_engine(&settings)?;
    metrics::spawn_state_publisher(engine.clone(), stats.clone());
    let inference_threads = engine.permits.available_permits();
    let region = settings.shm.as_ref().map(tandem_shared::process::worker::open_region).transpose()?;
    // Connections spread over the engine workers (they share one socket): see shared::edge::balance.
    let balance = Arc::new(tandem_shared::edge::balance::AcceptBalance::new(
        stats.clone(),
        tandem_shared::stats::ProcessRole::Engine,
    ));
    let app = router(AppState::new(
        &settings,
        settings.engine()?,
        tandem_shared::edge::front::FrontDoor::new(&settings, false, &stats)?,
        engine.clone(),
        stats,
        region.clone(),
        control.clone(),
    ));
    let shm = match region {
        Some(region) => {
            // One claimer per inference thread, and at least two so that a cheap
            // request (metadata, health) never waits behind an inference.
            let claimers = inference_threads.max(2);
            let server =
                shm_server::ShmServer::start(region, settings.worker_id, app.clone(), claimers, is_batched(&engine))
                    .context("cannot start the shared-memory claimer")?;
            Some(server)
        }
        None => None,
    };

    let budget = tandem_shared::edge::serve::connection_budget();
    let server = Arc::new(
        tandem_shared::edge::serve::Server::new(settings.edge.policy.timeouts, budget)
            .with_pacing(balance)
            .with_park_hook(Arc::new(tandem_shared::edge::balance::thread_parked))
            .with_unpark_hook(Arc::new(tandem_shared::edge::balance::thread_unparked)),
    );
    let service = hyper_util::service::TowerToHyperService::new(app.clone());
    let plain = |tcp, _| async move { Some(tandem_shared::edge::serve::Accepted::plain(tcp)) };
    // A connection lives on the thread that accepted it, and a quick inference
    // runs there too: a plain-HTTP request wakes no other thread. Without a
    // plain listener (HTTP_MODE=off) the ring is the only way in.
    let mut serving = std_listener
        .map(|l| server.serve_all(inference_threads.saturating_sub(1), l, plain, service))
        .transpose()
        .context("cannot start the serving threads")?;
    // GRPC_PORT: the same router behind a gate that lets only gRPC calls through,
    // served from this thread (the plain port's threads stay the plain port's).
    let mut grpc_serving = match settings.engine()?.grpc_listen {
        Some((fd, _)) => {
            let l = tandem_shared::process::worker::adopt_listener(fd).context("cannot take the gRPC listener")?;
            let only = hyper_util::service::TowerToHyperService::new(router::grpc_only(app.clone()));
            Some(server.serve_all(0, l, plain, only).context("cannot serve the gRPC port")?)
        }
        None => None,
    };
    let graceful = settings.graceful_timeout;
    // The door: the TCP listeners and their connections. A whole stop begins
    // with the front (its requests still reach us through the ring), and the
    // supervisor sends SIGUSR1 meanwhile: we take no new connection and close
    // the kept-alive ones (their clients move on now, not when the front is
    // done or killed) while the ring is answered until SIGTERM. A SIGTERM
    // alone closes the door and stops the ring at once.
    let mut told = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot listen for SIGUSR1")?;
    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let id = settings.worker_id;
    let door = tokio::spawn(async move {
        tokio::select! {
            _ = told.recv() => tracing::info!(worker_id = id, "the stop has begun: no new connections, kept-alive ones closed; the ring is answered until the front is gone"),
            _ = stopping.wait_for(|s| *s) => {}
        }
        if let Some(s) = serving.as_mut() {
            s.stop_accepting().await;
        }
        if let Some(s) = grpc_serving.as_mut() {
            s.stop_accepting().await;
        }
        let drained = server.drain(graceful).await;
        (drained, serving, grpc_serving)
    });
    let drain = async move {
        stop.send_replace(true);
        if let Some(shm) = shm {
            shm.stop(graceful).await;
        }
        let Ok((drained, serving, grpc_serving)) = door.await else { return false };
        if let Some(s) = serving {
            s.finish();
        }
        if let Some(s) = grpc_serving {
            s.finish();
        }
        drained
    };
    Ok(Running {
        fingerprint: None,
        details: format!("max_connections={budget} threads={inference_threads}"),
        drain: Box::pin(drain),
    })
}

/// Whether a ring request should wait among others rather than on its
/// claimer thread: an inference on a model version served with dynamic
/// batching now (models can change while running, so it looks each time),
/// where batching pays on it ([`engine::batcher::Gain`]), while every
/// inference thread is busy. With a thread free it runs at once
/// on the claimer (leading its batch of whatever is queued), as an
/// unbatched request would.
fn is_batched(engine: &Arc<engine::Engine>) -> shm_server::IsBatched {
    let engine = engine.clone();
    Arc::new(move |path: &str| {
        let Some(rest) = path.strip_prefix("/v2/models/") else { return false };
        let mut segs = rest.split('/');
        let (Some(name), Some(next)) = (segs.next(), segs.next()) else { return false };
        let version = match (next, segs.next(), segs.next()) {
            ("infer", None, _) => None,
            ("versions", Some(v), Some("infer")) => Some(v),
            _ => return false,
        };
        engine.models_now().get(name).and_then(|m| m.version(version)).is_some_and(|v| match v {
            // A batcher not started yet has learnt nothing: batch, to learn.
            engine::VersionState::Ready(mv) if mv.dynamic_batching.is_some() => {
                mv.batcher.get().is_none_or(|b| b.pays())
            }
            _ => false,
        }) && engine.permits.available_permits() == 0
    })
}

/// Loads the model repository named in the settings, sized for this worker's share of the cores.
pub fn load_engine(settings: &WorkerSettings) -> anyhow::Result<Arc<engine::Engine>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Concurrent inferences: this worker's share of the cores.
    let section = settings.engine()?;
    let permits = tandem_config::engine::share_of_cores(cores, section.num_workers);
    let started = std::time::Instant::now();
    let engine = engine::Engine::load(&section.model_repository, &section.runtime, permits, &section.models_wanted)?;
    let models = engine.models();
    let ready = models.values().filter(|m| m.ready()).count();
    tracing::info!(
        worker_id = settings.worker_id,
        models = models.len(),
        ready,
        threads = section.runtime.threads,
        ms = started.elapsed().as_millis() as u64,
        "engine loaded"
    );
    Ok(Arc::new(engine))
}
