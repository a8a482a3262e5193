//! What the supervisor hands each worker at start, by section: every worker
//! gets the common part and the edge policy; an engine worker its engine
//! section, a TLS-terminating worker its TLS section, the proxy worker its
//! proxy section — no role receives another's settings. The supervisor builds
//! them with one pure function (`tandem_supervisor::worker_settings`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_config::engine::{BackendChoice, Device, ModelControlMode};
use tandem_config::process::LogFormat;

use crate::process::control;

/// Which kind of worker a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Plain HTTP with the inference engine.
    Engine,
    /// TLS termination.
    HttpsWorker,
    /// With `WORKER_COMMAND`: serves both ports and forwards every request to a copy.
    ProxyWorker,
    /// With `WORKER_COMMAND`: one copy of the operator's server (not a tandem process).
    App,
}

impl Role {
    /// Whether this process serves the ports in front of the engines or copies
    /// (it drains first on stop, and gets SIGHUP for certificates).
    pub fn is_front(self) -> bool {
        matches!(self, Role::HttpsWorker | Role::ProxyWorker)
    }

    /// The hidden subcommand that starts this role.
    pub fn subcommand(self) -> &'static str {
        match self {
            Role::Engine => "engine-worker",
            Role::HttpsWorker => "https-worker",
            Role::ProxyWorker => "proxy-worker",
            // Never run as a tandem subcommand; the name is for logs.
            Role::App => "worker-command",
        }
    }
}

/// Everything a worker needs, given to it explicitly by the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSettings {
    /// Which worker this is.
    pub role: Role,
    /// Its number among all workers the supervisor started (restarts get new ones).
    pub worker_id: u64,
    /// The supervisor's pid: a worker whose parent is not this exits at once.
    pub supervisor_pid: i32,
    /// The address of the listener at descriptor `LISTEN_FDS_START`; `None`
    /// when it has none (the engine workers with `HTTP_MODE=off` serve only the ring).
    pub listen_addr: Option<SocketAddr>,
    /// The control socket's descriptor.
    pub control_fd: i32,
    /// The statistics region and this worker's block in it.
    pub stats: StatsSettings,
    /// Tracing filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Drain time on stop.
    pub graceful_timeout: Duration,
    /// The policy every request path applies.
    pub edge: EdgeSettings,
    /// The shared-memory ring (engine and HTTPS workers, when HTTPS reaches the engine).
    pub shm: Option<ShmSettings>,
    /// Engine workers only.
    pub engine: Option<EngineWorker>,
    /// Workers that terminate TLS only.
    pub tls: Option<TlsSettings>,
    /// The proxy worker only (`WORKER_COMMAND`).
    pub proxy: Option<ProxySettings>,
}

/// Why a worker cannot run with the settings it was given.
#[derive(Debug, thiserror::Error)]
#[error("the {role} was started without its {section} settings")]
pub struct MissingSection {
    /// The worker's subcommand.
    pub role: &'static str,
    /// The section it lacks.
    pub section: &'static str,
}

impl WorkerSettings {
    fn section<'a, T>(&self, s: &'a Option<T>, section: &'static str) -> Result<&'a T, MissingSection> {
        s.as_ref().ok_or(MissingSection { role: self.role.subcommand(), section })
    }

    /// The engine section.
    pub fn engine(&self) -> Result<&EngineWorker, MissingSection> {
        self.section(&self.engine, "engine")
    }

    /// The TLS section.
    pub fn tls(&self) -> Result<&TlsSettings, MissingSection> {
        self.section(&self.tls, "TLS")
    }

    /// The ring section.
    pub fn shm(&self) -> Result<&ShmSettings, MissingSection> {
        self.section(&self.shm, "shared-memory ring")
    }

    /// The proxy section.
    pub fn proxy(&self) -> Result<&ProxySettings, MissingSection> {
        self.section(&self.proxy, "proxy")
    }
}

/// The front door's policy, the same on every request path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeSettings {
    /// The edge section as configured (limits, timeouts, access log).
    pub policy: tandem_config::edge::Edge,
    /// This worker's memory budget for request bytes in flight (`MAX_INFLIGHT_BYTES`, or its share of the memory).
    pub inflight_bytes: u64,
    /// The HTTPS port, when there is one: where the plain port redirects or
    /// points to (`HTTP_MODE`).
    pub https_port: Option<u16>,
    /// ACME: where HTTP-01 key authorizations wait, one file per token (answered on plain HTTP).
    pub acme_http01: Option<PathBuf>,
}

/// What an engine worker needs: the models and how to run them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineWorker {
    /// Engine workers running now (each takes its share of the cores).
    pub num_workers: usize,
    /// The model repository.
    pub model_repository: PathBuf,
    /// Backend, device and threads.
    pub runtime: EngineSettings,
    /// How models may change while running.
    pub model_control: ModelControlMode,
    /// What to load at start: `MODEL_LOAD`, then every explicit load and unload since.
    pub models_wanted: ModelSet,
    /// The certificate status file `/metrics` reports from, when there is an HTTPS port.
    pub cert_status: Option<PathBuf>,
    /// Triton's system shared memory (`SYSTEM_SHARED_MEMORY`): the regions
    /// registered now; `None` when the extension is off.
    pub system_shared_memory: Option<crate::system_shm::RegionSet>,
    /// The gRPC-only listener (`GRPC_PORT`): its descriptor and address.
    pub grpc_listen: Option<(i32, SocketAddr)>,
}

/// How one model is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wanted {
    /// Not loaded (listed in the repository index as unavailable, "unloaded").
    Unloaded,
    /// From its folder's files.
    Files,
    /// From its folder, with this JSON configuration in place of its files' (Triton's load request).
    Config(String),
}

/// The models an engine worker loads: those named, and every other model in
/// the repository loaded from its files or not at all (`MODEL_CONTROL_MODE=explicit`
/// loads only what `MODEL_LOAD` names, as Triton's `--load-model`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSet {
    /// Models loaded otherwise than the rest.
    pub named: BTreeMap<String, Wanted>,
    /// Whether the models not named are loaded from their files.
    pub others_loaded: bool,
}

impl Default for ModelSet {
    /// Every model, from its files.
    fn default() -> Self {
        ModelSet { named: BTreeMap::new(), others_loaded: true }
    }
}

impl ModelSet {
    /// How `model` is loaded.
    pub fn get(&self, model: &str) -> Wanted {
        match self.named.get(model) {
            Some(w) => w.clone(),
            None if self.others_loaded => Wanted::Files,
            None => Wanted::Unloaded,
        }
    }

    /// Makes `model` load as `wanted`.
    pub fn set(&mut self, model: &str, wanted: Wanted) {
        let default = if self.others_loaded { Wanted::Files } else { Wanted::Unloaded };
        if wanted == default {
            self.named.remove(model);
        } else {
            self.named.insert(model.to_string(), wanted);
        }
    }
}

/// What a worker that terminates TLS needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsSettings {
    /// The TLS section as configured (client certificates, TLS floor, HSTS).
    pub policy: tandem_config::tls::Tls,
    /// The published certificate and key.
    pub live_cert: PathBuf,
    /// ACME: where TLS-ALPN-01 certificates wait, one per name (answered for `acme-tls/1`).
    pub acme_alpn01: Option<PathBuf>,
    /// HTTP/3 (`SSL_HTTP3`): the UDP socket's descriptor and address, in the worker serving HTTPS.
    #[serde(default)]
    pub h3: Option<(i32, SocketAddr)>,
}

/// What the proxy worker needs beyond the common settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxySettings {
    /// Descriptor and address of the HTTPS listener, when `ENABLE_SSL` (the
    /// HTTP listener is the first, as for every worker).
    pub https: Option<(i32, SocketAddr)>,
    /// `REQUEST_TIMEOUT`: how long a copy may take to start answering.
    pub request_timeout: Duration,
    /// The copies running when the proxy worker was spawned.
    pub backends: Vec<control::Backend>,
    /// `WORKER_READY_PATH` (a health check: never redirected to HTTPS).
    pub ready_path: String,
}

/// The ONNX Runtime library the supervisor found and probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrtLibrary {
    /// The shared library.
    pub path: PathBuf,
    /// ONNX Runtime's version, as the library reports it.
    pub version: String,
    /// Whether the CUDA execution provider is compiled into this library.
    pub cuda: bool,
    /// Which discovery rule found it (`ORT_DYLIB_PATH`, `VIRTUAL_ENV`, …), as
    /// `GET /` and the start-up log say.
    #[serde(default)]
    pub found_by: String,
}

/// How the engine runs models, decided once by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSettings {
    /// ONNX Runtime, when found and loadable.
    pub onnxruntime: Option<OrtLibrary>,
    /// Why ONNX Runtime is not the default, when it is not.
    pub fallback_reason: Option<String>,
    /// The default backend (`ENGINE_BACKEND`).
    pub backend: BackendChoice,
    /// Device models run on.
    pub device: Device,
    /// Intra-op threads per model.
    pub threads: usize,
    /// Readiness needs every model ready.
    pub strict_readiness: bool,
    /// A model that fails to load stops start-up.
    pub exit_on_model_error: bool,
    /// This worker logs what the configurations ask that tandem ignores (the
    /// first engine worker does, so each note appears once per supervisor life).
    pub log_config_notes: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            onnxruntime: None,
            fallback_reason: None,
            backend: BackendChoice::Auto,
            device: Device::Cpu,
            threads: 1,
            strict_readiness: true,
            exit_on_model_error: false,
            log_config_notes: true,
        }
    }
}

/// Where and how big the shared-memory ring is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShmSettings {
    /// Descriptor number of the memfd in the worker.
    pub fd: i32,
    /// Number of slots.
    pub slots: u32,
    /// Bytes per request or response.
    pub slot_bytes: usize,
    /// How long a request may wait for the engine.
    pub request_timeout: Duration,
}

/// Where the statistics region is and which block of it a worker writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsSettings {
    /// Descriptor number of the memfd in the worker.
    pub fd: i32,
    /// Size of the region in 64-bit words.
    pub words: usize,
    /// The worker's block.
    pub block: usize,
}
