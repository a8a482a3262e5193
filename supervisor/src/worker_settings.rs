//! What each worker kind receives: one pure function from the whole
//! configuration and what the supervisor knows at spawn time to the settings
//! of one worker. An engine worker never sees TLS policy, a TLS-terminating
//! worker never sees engine settings, only the proxy worker sees the proxy's.

use std::net::SocketAddr;
use std::path::Path;

use tandem_config::acme::AcmeChallenge;
use tandem_config::certs::CertSource;
use tandem_config::Config;
use tandem_shared::certs::cache::Layout;
use tandem_shared::process::control::Backend;
use tandem_shared::{
    EdgeSettings, EngineSettings, EngineWorker, ModelSet, ProxySettings, Role, ShmSettings, StatsSettings, TlsSettings,
    WorkerSettings,
};

use tandem_shared::sys::LISTEN_FDS_START;

/// Descriptor number of the control socket in a worker (right after its one listener).
pub const CONTROL_FD: i32 = LISTEN_FDS_START + 1;
/// Descriptor number of the shared-memory memfd in a worker.
pub const SHM_FD: i32 = LISTEN_FDS_START + 2;
/// Descriptor number of the statistics memfd in a worker.
pub const STATS_FD: i32 = LISTEN_FDS_START + 3;
/// Descriptor number of the worker's settings (a memfd holding their JSON:
/// settings can outgrow what one environment variable may hold).
pub const SETTINGS_FD: i32 = LISTEN_FDS_START + 4;
/// Descriptor number of the HTTPS listener in the proxy worker (which has no ring).
pub const PROXY_HTTPS_FD: i32 = LISTEN_FDS_START + 2;
/// Descriptor number of the gRPC-only listener (`GRPC_PORT`) in an engine worker.
pub const GRPC_FD: i32 = LISTEN_FDS_START + 5;
/// Descriptor number of the HTTP/3 UDP socket (`SSL_HTTP3`) in the HTTPS or proxy worker.
pub const H3_FD: i32 = LISTEN_FDS_START + 5;

/// What the supervisor knows when it spawns a worker, beyond the configuration.
pub struct Spawn<'a> {
    /// The worker's kind.
    pub role: Role,
    /// Its number.
    pub worker_id: u64,
    /// The address of the listener it gets first (none for the engines with `HTTP_MODE=off`).
    pub listen_addr: Option<SocketAddr>,
    /// The statistics region and its block.
    pub stats: StatsSettings,
    /// Engine workers (or copies) running, this one included.
    pub engine_workers: usize,
    /// The HTTPS port's address, when there is one.
    pub https_addr: Option<SocketAddr>,
    /// The gRPC-only port's address (`GRPC_PORT`), when there is one.
    pub grpc_addr: Option<SocketAddr>,
    /// The HTTP/3 socket's address (`SSL_HTTP3`), when the worker gets it.
    pub h3_addr: Option<SocketAddr>,
    /// Whether the shared-memory ring exists (HTTPS to the engine).
    pub ring: bool,
    /// The model repository.
    pub model_repository: &'a Path,
    /// The engine's settings as resolved at start (its threads are decided here).
    pub engine: &'a EngineSettings,
    /// Model changes every engine worker replays.
    pub models_wanted: &'a ModelSet,
    /// The system shared-memory regions registered now, when the extension is on.
    pub system_shm: Option<&'a tandem_shared::system_shm::RegionSet>,
    /// The copies running (proxy worker).
    pub backends: Vec<Backend>,
    /// The machine's cores.
    pub cores: usize,
    /// The memory tandem may use (for the default `MAX_INFLIGHT_BYTES`).
    pub memory: u64,
}

/// The settings of the worker `spawn` describes.
pub fn for_worker(config: &Config, spawn: Spawn<'_>) -> WorkerSettings {
    let role = spawn.role;
    let cert_dir = config.process.cert_dir();
    let certs = Layout::of(&cert_dir);
    let acme = (spawn.https_addr.is_some() && config.certs.source == CertSource::Acme).then_some(&certs);
    let front = usize::from(spawn.https_addr.is_some());
    let edge = EdgeSettings {
        policy: config.edge.clone(),
        // Every serving process (the engines, the TLS or proxy worker) gets an equal part.
        inflight_bytes: config.edge.max_inflight_bytes.unwrap_or_else(|| {
            tandem_shared::edge::budget::share(
                spawn.memory,
                spawn.engine_workers + front,
                config.edge.max_request_bytes.saturating_mul(3),
            )
        }),
        https_port: spawn.https_addr.map(|a| a.port()),
        acme_http01: acme.map(Layout::acme_http01),
    };
    let tls = || TlsSettings {
        policy: config.tls.clone(),
        live_cert: certs.live(),
        acme_alpn01: acme.filter(|_| config.acme.challenge == AcmeChallenge::TlsAlpn01).map(Layout::acme_alpn01),
        h3: spawn.h3_addr.filter(|_| role.is_front()).map(|a| (H3_FD, a)),
    };
    let shm = || ShmSettings {
        fd: SHM_FD,
        slots: config.ring.slots,
        slot_bytes: config.ring.slot_bytes,
        request_timeout: config.edge.request_timeout,
    };
    let engine = || EngineWorker {
        num_workers: spawn.engine_workers,
        model_repository: spawn.model_repository.to_path_buf(),
        runtime: EngineSettings {
            threads: tandem_config::engine::threads_per_model(config.engine.threads, spawn.cores, spawn.engine_workers),
            log_config_notes: spawn.worker_id == 1,
            ..spawn.engine.clone()
        },
        model_control: config.engine.model_control_mode,
        models_wanted: spawn.models_wanted.clone(),
        cert_status: spawn.https_addr.map(|_| certs.status()),
        system_shared_memory: spawn.system_shm.cloned(),
        grpc_listen: spawn.grpc_addr.map(|a| (GRPC_FD, a)),
    };
    let (engine, tls, shm, proxy) = match role {
        Role::Engine => (Some(engine()), None, spawn.ring.then(shm), None),
        Role::HttpsWorker => (None, Some(tls()), spawn.ring.then(shm), None),
        Role::ProxyWorker => (
            None,
            spawn.https_addr.map(|_| tls()),
            None,
            Some(ProxySettings {
                https: spawn.https_addr.map(|a| (PROXY_HTTPS_FD, a)),
                request_timeout: config.edge.request_timeout,
                backends: spawn.backends,
                ready_path: config.proxy.ready_path.clone(),
            }),
        ),
        Role::App => (None, None, None, None),
    };
    WorkerSettings {
        role,
        worker_id: spawn.worker_id,
        supervisor_pid: std::process::id() as i32,
        listen_addr: spawn.listen_addr,
        control_fd: CONTROL_FD,
        stats: spawn.stats,
        log_level: config.process.log_level.clone(),
        log_format: config.process.log_format,
        graceful_timeout: config.process.graceful_timeout,
        edge,
        shm,
        engine,
        tls,
        proxy,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Config {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).expect("valid")
    }

    fn spawn<'a>(role: Role, https: bool, engine: &'a EngineSettings, wanted: &'a ModelSet) -> Spawn<'a> {
        Spawn {
            role,
            worker_id: 1,
            listen_addr: Some("127.0.0.1:9001".parse().unwrap()),
            stats: StatsSettings { fd: STATS_FD, words: 1, block: 1 },
            engine_workers: 2,
            https_addr: https.then(|| "127.0.0.1:9002".parse().unwrap()),
            grpc_addr: None,
            h3_addr: None,
            ring: https,
            model_repository: Path::new("/models"),
            engine,
            models_wanted: wanted,
            system_shm: None,
            backends: Vec::new(),
            cores: 8,
            memory: 16 << 30,
        }
    }

    #[test]
    fn each_worker_kind_receives_only_its_sections() {
        let c = config(&[("ENABLE_SSL", "true"), ("SSL_HSTS", "max-age=60"), ("SSL_REDIRECT_HTTP", "true")]);
        let (engine, wanted) = (EngineSettings::default(), ModelSet::default());
        let e = for_worker(&c, spawn(Role::Engine, true, &engine, &wanted));
        assert!(e.engine.is_some() && e.shm.is_some() && e.tls.is_none() && e.proxy.is_none());
        assert_eq!((e.edge.https_port, e.edge.policy.http_mode), (Some(9002), tandem_config::edge::HttpMode::Redirect));
        let engine_section = e.engine.unwrap();
        assert_eq!(engine_section.runtime.threads, 4, "8 cores over 2 engine workers");
        assert!(engine_section.cert_status.is_some());
        let h = for_worker(&c, spawn(Role::HttpsWorker, true, &engine, &wanted));
        assert!(h.engine.is_none() && h.shm.is_some() && h.proxy.is_none());
        assert_eq!(h.tls.expect("TLS").policy.hsts.as_deref(), Some("max-age=60"));
        let p = for_worker(&c, spawn(Role::ProxyWorker, true, &engine, &wanted));
        assert!(p.engine.is_none() && p.shm.is_none() && p.tls.is_some());
        assert_eq!(p.proxy.expect("proxy").https.map(|(fd, _)| fd), Some(PROXY_HTTPS_FD));
        // Without HTTPS: no ring, no TLS, nothing to redirect to.
        let c = config(&[]);
        let e = for_worker(&c, spawn(Role::Engine, false, &engine, &wanted));
        assert!(e.shm.is_none() && e.edge.https_port.is_none() && e.engine.unwrap().cert_status.is_none());
        let p = for_worker(&c, spawn(Role::ProxyWorker, false, &engine, &wanted));
        assert!(p.tls.is_none());
    }

    #[test]
    fn the_memory_budget_is_shared_by_every_serving_process_unless_set() {
        let (engine, wanted) = (EngineSettings::default(), ModelSet::default());
        // 16 GiB / 4 over 2 engines + 1 HTTPS worker.
        let c = config(&[("ENABLE_SSL", "true")]);
        assert_eq!(for_worker(&c, spawn(Role::Engine, true, &engine, &wanted)).edge.inflight_bytes, (4 << 30) / 3);
        let c = config(&[("MAX_INFLIGHT_BYTES", "1073741824")]);
        assert_eq!(for_worker(&c, spawn(Role::Engine, false, &engine, &wanted)).edge.inflight_bytes, 1 << 30);
        let c = config(&[("ENGINE_THREADS", "3")]);
        let e = for_worker(&c, spawn(Role::Engine, false, &engine, &wanted));
        assert_eq!(e.engine.unwrap().runtime.threads, 3, "ENGINE_THREADS wins");
    }
}
