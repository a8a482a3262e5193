//! The engine: a Triton model repository served by ONNX Runtime (default) or
//! tract, one model never a reason for another to stop.
//!
//! Each model folder is read into a configuration (`config.pbtxt` or
//! `config.json`), its version policy picks version folders, and each chosen
//! version is loaded by its backend. Anything that fails is kept as
//! `UNAVAILABLE` with its reason and the rest serves.

pub mod batcher;
pub mod config;
pub mod error;
pub mod onnx_runtime;
pub mod repository;
pub mod tensor;
pub mod tract_backend;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;
use tandem_config::engine::{BackendChoice, Device};
use tandem_shared::{EngineSettings, ModelSet, Wanted};
use tokio::sync::Semaphore;

use self::config::pb;
pub use self::error::{ControlError, LabelError, LoadError, NotCarried, RepositoryError, RunError, Side};
use self::tensor::{DataType, Tensor};

/// Largest batch of a model whose configuration does not say (Triton's auto-complete).
pub const DEFAULT_MAX_BATCH_SIZE: usize = 1024;

/// The platform every model reports, as Triton names ONNX models.
pub const PLATFORM: &str = "onnxruntime_onnx";

/// Name, type and shape of one model input or output (`-1`: any size).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorMeta {
    /// Tensor name in the ONNX graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions; `-1` is dynamic.
    pub shape: Vec<i64>,
}

/// A loaded model, as a backend runs it.
pub trait Runner: Send + Sync {
    /// Runs `inputs` (in the order of [`Loaded::inputs`]) and returns the tensor outputs at `wanted`
    /// (indices into [`Loaded::outputs`]). Blocking: call from a thread that may block.
    fn run(&self, inputs: Vec<Tensor>, wanted: &[usize]) -> Result<Vec<Tensor>, RunError>;
}

/// What a backend made of a model file.
pub struct Loaded {
    /// The runnable model.
    pub runner: Box<dyn Runner>,
    /// Inputs, in the order `run` takes them.
    pub inputs: Vec<TensorMeta>,
    /// Tensor outputs, in graph order.
    pub outputs: Vec<TensorMeta>,
    /// Outputs the protocol cannot carry (sequences, maps): name and what they are.
    pub unsupported_outputs: Vec<(String, String)>,
    /// The execution provider the model runs on (`CPUExecutionProvider`, `tract`).
    pub provider: String,
}

/// How a backend should load one model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Intra-op threads.
    pub threads: usize,
    /// Inter-op threads (0: sequential execution).
    pub inter_threads: usize,
    /// Device to run on.
    pub device: Device,
    /// Sessions to keep (Triton's `instance_group` count).
    pub instances: usize,
    /// Whether the first dimension of every input is the batch.
    pub batched: bool,
    /// The configuration says nothing about batching: batch when the model looks batched ([`looks_batched`]).
    pub auto_batch: bool,
    /// Dimensions the configuration fixes, per input name (full rank, `-1` where free).
    pub pinned: BTreeMap<String, Vec<i64>>,
}

/// One loaded version of a model.
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version label (the folder name).
    pub version: String,
    /// Backend that runs it (`onnxruntime`, `tract`).
    pub backend: &'static str,
    /// Execution provider it runs on.
    pub provider: String,
    /// Largest batch accepted; 0 means the model has no batch dimension.
    pub max_batch_size: usize,
    /// Inputs as clients send them, in the order the runner takes them.
    pub inputs: Vec<TensorMeta>,
    /// Tensor outputs as clients receive them.
    pub outputs: Vec<TensorMeta>,
    /// Outputs the protocol cannot carry: name and what they are.
    pub unsupported_outputs: Vec<(String, String)>,
    /// Class labels per output (`label_filename`), for the classification extension.
    pub labels: Vec<Vec<String>>,
    /// Shapes the model takes instead of the client's (config `reshape`), without the batch dimension.
    input_reshape: Vec<Option<Vec<i64>>>,
    /// Shapes clients receive instead of the model's (config `dims` of a reshaped output).
    output_reshape: Vec<Option<Vec<i64>>>,
    /// The configuration it is served with, completed (`GET /v2/models/{m}/config`).
    pub config: pb::ModelConfig,
    /// Dynamic batching, when the configuration asks for it (and the model batches).
    pub dynamic_batching: Option<batcher::BatchPolicy>,
    /// The batcher, started on the first request.
    pub batcher: std::sync::OnceLock<batcher::Batcher>,
    /// This version's counters in the worker's statistics block, found on the
    /// first request (`None`: no entry left).
    pub stats: std::sync::OnceLock<Option<tandem_shared::stats::ModelStats>>,
    /// Recent mean time of a run per input element, in picoseconds (0: never
    /// run); see [`ModelVersion::runs_quickly`].
    recent_ps_per_element: AtomicU64,
    /// Inference requests running now, and how many may (`max_inflight`).
    inflight: std::sync::atomic::AtomicUsize,
    max_inflight: Option<usize>,
    runner: Box<dyn Runner>,
}

/// One inference request's place under a version's `max_inflight`, given back when dropped.
pub struct InflightSlot<'a>(Option<&'a std::sync::atomic::AtomicUsize>);

impl Drop for InflightSlot<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A request this version's recent runs say will take less than this is run
/// on the thread serving it: a hop to the blocking pool and back costs two
/// thread wake-ups, more than such a run itself, while a longer run would hold
/// up the other connections of that thread.
pub const INLINE_BELOW: std::time::Duration = std::time::Duration::from_micros(250);

impl std::fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelVersion")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Resolves a reshape target against the element count (one `-1` takes the rest).
fn resolve(prefix: &[usize], target: &[i64], count: usize) -> Result<Vec<usize>, RunError> {
    let fixed: usize =
        prefix.iter().product::<usize>() * target.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product::<usize>();
    let mut out = prefix.to_vec();
    for &d in target {
        if d >= 0 {
            out.push(d as usize);
        } else if fixed == 0 || !count.is_multiple_of(fixed) {
            return Err(RunError::Reshape { count, target: target.to_vec() });
        } else {
            out.push(count / fixed);
        }
    }
    if out.iter().product::<usize>() != count {
        return Err(RunError::Reshape { count, target: target.to_vec() });
    }
    Ok(out)
}

/// Whether `elements` input elements at `ps_per_element` (0: unknown) are expected to run within [`INLINE_BELOW`].
fn quick(ps_per_element: u64, elements: usize) -> bool {
    let expected_ns = u128::from(ps_per_element) * elements.max(1) as u128 / 1000;
    ps_per_element != 0 && expected_ns < INLINE_BELOW.as_nanos()
}

/// The mean per input element `old` (0: none yet) with a run of `took` on `elements` folded in.
fn fold(old: u64, took: std::time::Duration, elements: usize) -> u64 {
    let ps = took.as_nanos().saturating_mul(1000) / elements.max(1) as u128;
    let ps = u64::try_from(ps).unwrap_or(u64::MAX).max(1);
    let new = if old == 0 { ps } else { old - old / 8 + ps / 8 };
    new.max(1)
}

impl ModelVersion {
    /// A place for one more inference request, or `Err(max_inflight)` when
    /// that many are running already.
    pub fn admit(&self) -> Result<InflightSlot<'_>, usize> {
        let Some(max) = self.max_inflight else { return Ok(InflightSlot(None)) };
        let mut now = self.inflight.load(Ordering::Acquire);
        loop {
            if now >= max {
                return Err(max);
            }
            match self.inflight.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(InflightSlot(Some(&self.inflight))),
                Err(seen) => now = seen,
            }
        }
    }

    /// Whether a run on `elements` input elements is expected to be short
    /// enough to run on the serving thread ([`INLINE_BELOW`]), from the recent
    /// mean time per input element (which overestimates large inputs, whose
    /// fixed cost is spread thinner: the safe side); a version never run yet is not.
    pub fn runs_quickly(&self, elements: usize) -> bool {
        quick(self.recent_ps_per_element.load(Ordering::Relaxed), elements)
    }

    /// Folds one run's time per input element into the recent mean (an
    /// exponential average over about eight runs).
    fn note_run(&self, took: std::time::Duration, elements: usize) {
        // Racing updates may lose one sample: the mean is a hint, not a count.
        let old = self.recent_ps_per_element.load(Ordering::Relaxed);
        self.recent_ps_per_element.store(fold(old, took, elements), Ordering::Relaxed);
    }

    /// Runs the model on inputs in [`ModelVersion::inputs`] order; returns the outputs at `wanted`.
    /// Blocking: call from a thread that may block.
    pub fn run(&self, mut inputs: Vec<Tensor>, wanted: &[usize]) -> Result<Vec<Tensor>, RunError> {
        let batch_rank = usize::from(self.max_batch_size > 0);
        for (t, reshape) in inputs.iter_mut().zip(&self.input_reshape) {
            if let Some(r) = reshape {
                let prefix = &t.shape[..batch_rank.min(t.shape.len())];
                t.shape = resolve(prefix, r, t.data.len())?;
            }
        }
        let elements = inputs.iter().map(|t| t.data.len()).sum();
        let started = std::time::Instant::now();
        let ran = self.runner.run(inputs, wanted);
        self.note_run(started.elapsed(), elements);
        let mut out = ran?;
        for (t, &i) in out.iter_mut().zip(wanted) {
            if let Some(dims) = &self.output_reshape[i] {
                let prefix = &t.shape[..batch_rank.min(t.shape.len())];
                t.shape = resolve(prefix, dims, t.data.len())?;
            }
        }
        Ok(out)
    }
}

/// A version's state.
#[derive(Debug, Clone)]
pub enum VersionState {
    /// Loaded and serving.
    Ready(Arc<ModelVersion>),
    /// Not serving, with the reason.
    Unavailable(String),
}

/// All chosen versions of one model.
#[derive(Debug, Default, Clone)]
pub struct Model {
    /// Versions by number.
    pub versions: BTreeMap<u64, VersionState>,
    /// Why the whole model is unavailable (configuration, no version folder), if it is.
    pub error: Option<String>,
}

impl Model {
    /// The requested version, or the newest ready one.
    pub fn version(&self, v: Option<&str>) -> Option<&VersionState> {
        match v {
            Some(label) => self.versions.get(&label.parse::<u64>().ok()?),
            None => self
                .versions
                .values()
                .rev()
                .find(|s| matches!(s, VersionState::Ready(_)))
                .or_else(|| self.versions.values().next_back()),
        }
    }

    /// Version labels, oldest first.
    pub fn labels(&self) -> Vec<String> {
        self.versions.keys().map(u64::to_string).collect()
    }

    /// Whether some version serves.
    pub fn ready(&self) -> bool {
        self.versions.values().any(|s| matches!(s, VersionState::Ready(_)))
    }

    /// Why the model does not serve (its own error, else the newest version's).
    pub fn reason(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        if self.ready() {
            return None;
        }
        self.versions.values().rev().find_map(|s| match s {
            VersionState::Unavailable(r) => Some(r.clone()),
            VersionState::Ready(_) => None,
        })
    }
}

/// The loaded repository and the inference pool.
#[derive(Debug)]
pub struct Engine {
    /// Models by name; swapped whole when one is loaded or unloaded, so a
    /// request holds the models it found for as long as it runs.
    models: ArcSwap<BTreeMap<String, Model>>,
    /// Serialises loads and unloads (requests never wait on it).
    changing: std::sync::Mutex<()>,
    repository: std::path::PathBuf,
    settings: EngineSettings,
    /// Bounds concurrent inferences to the threads this worker should use.
    pub permits: Arc<Semaphore>,
    /// Whether readiness requires every model to be ready (Triton's strict readiness).
    pub strict_readiness: bool,
}

/// The reason an unloaded model gives.
pub const UNLOADED: &str = "unloaded";

fn log_unavailable(name: &str, model: &Model) {
    if let Some(reason) = &model.error {
        tracing::error!(model = %name, reason = %reason, "model unavailable");
    }
    for (v, state) in &model.versions {
        if let VersionState::Unavailable(reason) = state {
            tracing::error!(model = %name, version = v, reason = %reason, "model version unavailable");
        }
    }
}

impl Engine {
    /// Loads the models of the repository; `threads` bounds concurrent
    /// inferences. `wanted` says how each model is loaded: not at all
    /// (unloaded), from its files, or with a JSON configuration instead of its
    /// files' (as Triton's load request does).
    pub fn load(
        repository: &Path,
        settings: &EngineSettings,
        threads: usize,
        wanted: &ModelSet,
    ) -> Result<Engine, RepositoryError> {
        let dirs = repository::scan(repository)
            .map_err(|source| RepositoryError::Unreadable { path: repository.to_path_buf(), source })?;
        if dirs.is_empty() {
            tracing::warn!(repository = %repository.display(), "the model repository holds no model folder");
        }
        let mut models = BTreeMap::new();
        for dir in dirs {
            let model = match wanted.get(&dir.name) {
                Wanted::Unloaded => Model { error: Some(UNLOADED.into()), ..Model::default() },
                Wanted::Config(config) => match repository::find(repository, &dir.name, Some(&config)) {
                    Some(d) => load_model(&d, settings),
                    None => continue,
                },
                Wanted::Files => load_model(&dir, settings),
            };
            if settings.exit_on_model_error && model.reason().as_deref() != Some(UNLOADED) {
                if let Some(reason) = model.reason().or_else(|| {
                    model.versions.values().find_map(|s| match s {
                        VersionState::Unavailable(r) => Some(r.clone()),
                        VersionState::Ready(_) => None,
                    })
                }) {
                    return Err(RepositoryError::Model { model: dir.name, reason });
                }
            }
            models.insert(dir.name, model);
        }
        Ok(Engine {
            models: ArcSwap::from_pointee(models),
            changing: std::sync::Mutex::new(()),
            repository: repository.to_path_buf(),
            settings: settings.clone(),
            permits: Arc::new(Semaphore::new(threads.max(1))),
            strict_readiness: settings.strict_readiness,
        })
    }

    /// The models served now.
    pub fn models(&self) -> Arc<BTreeMap<String, Model>> {
        self.models.load_full()
    }

    /// The models served now, for a look that ends before any await (no
    /// reference count is touched: the request path's way in).
    pub fn models_now(&self) -> arc_swap::Guard<Arc<BTreeMap<String, Model>>> {
        self.models.load()
    }

    /// The repository index, as Triton lists it: every model folder there is
    /// now (those never loaded as unloaded) and every model still loaded
    /// whose folder has gone; an unloaded model whose folder has gone is not listed.
    pub fn index(&self) -> BTreeMap<String, Model> {
        let folders = repository::folder_names(&self.repository);
        let mut out: BTreeMap<String, Model> = self
            .models
            .load()
            .iter()
            .filter(|(name, m)| folders.contains(*name) || m.reason().as_deref() != Some(UNLOADED))
            .map(|(name, m)| (name.clone(), m.clone()))
            .collect();
        for name in folders {
            out.entry(name).or_insert_with(|| Model { error: Some(UNLOADED.into()), ..Model::default() });
        }
        out
    }

    /// Server readiness: every model ready (strict), or simply loaded.
    /// Unloaded models do not count against it.
    pub fn ready(&self) -> bool {
        !self.strict_readiness
            || self.models.load().values().all(|m| m.ready() || m.reason().as_deref() == Some(UNLOADED))
    }

    /// Loads (or reloads) model `name` from the repository, with `config` (JSON)
    /// in place of its configuration files when given. The other models serve
    /// throughout; requests already running on the previous load finish on it.
    /// When the new load has no ready version the previous one keeps serving
    /// and the error says why.
    pub fn load_model(&self, name: &str, config: Option<&str>) -> Result<(), ControlError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let Some(dir) = repository::find(&self.repository, name, config) else {
            tracing::warn!(model = %name.escape_debug(), repository = %self.repository.display(), "no such model folder");
            return Err(ControlError::NoFolder(name.to_string()));
        };
        let started = std::time::Instant::now();
        let model = load_model(&dir, &self.settings);
        let current = self.models.load_full();
        let serving = current.get(name).is_some_and(Model::ready);
        if !model.ready() {
            let reason = model.reason().unwrap_or_else(|| "no version is ready".into());
            if !serving {
                self.replace(name, Some(model));
            }
            let name = name.to_string();
            return Err(if serving {
                ControlError::KeptPrevious { name, reason }
            } else {
                ControlError::Failed { name, reason }
            });
        }
        self.replace(name, Some(model));
        tracing::info!(model = %name, ms = started.elapsed().as_millis() as u64, "model (re)loaded on request");
        Ok(())
    }

    /// Unloads model `name`: new requests are refused as unloaded; those running finish.
    pub fn unload_model(&self, name: &str) -> Result<(), ControlError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.models.load().contains_key(name) {
            return Err(ControlError::Unknown(name.to_string()));
        }
        self.replace(name, None);
        tracing::info!(model = %name, "model unloaded on request");
        Ok(())
    }

    fn replace(&self, name: &str, model: Option<Model>) {
        let mut next = (*self.models.load_full()).clone();
        next.insert(name.to_string(), model.unwrap_or(Model { error: Some(UNLOADED.into()), ..Model::default() }));
        self.models.store(Arc::new(next));
    }
}

/// Loads one model folder. Reasons with their full paths go to the log; the
/// model keeps them with the repository's location taken out, because they
/// are shown to clients (an answer never reveals where the server keeps files).
fn load_model(dir: &repository::ModelDir, settings: &EngineSettings) -> Model {
    let model = load_model_files(dir, settings);
    log_unavailable(&dir.name, &model);
    let roots = shown_roots(&dir.dir, &dir.name);
    let redact = |text: &String| roots.iter().fold(text.clone(), |t, (from, to)| t.replace(from.as_str(), to));
    Model {
        error: model.error.as_ref().map(redact),
        versions: model
            .versions
            .into_iter()
            .map(|(v, state)| match state {
                VersionState::Unavailable(r) => (v, VersionState::Unavailable(redact(&r))),
                ready => (v, ready),
            })
            .collect(),
    }
}

/// What a client sees instead of a model folder's absolute location: the model
/// folder (as given and resolved) becomes the model's name, the repository's
/// own path disappears.
fn shown_roots(model_dir: &Path, name: &str) -> Vec<(String, String)> {
    let mut roots = Vec::new();
    let mut add = |path: &Path, to: &str| {
        let text = path.to_string_lossy().trim_end_matches('/').to_string();
        if !text.is_empty() && text != "." && !roots.iter().any(|(f, _): &(String, String)| *f == text) {
            roots.push((text, to.to_string()));
        }
    };
    add(model_dir, name);
    if let Ok(c) = model_dir.canonicalize() {
        add(&c, name);
    }
    if let Some(repo) = model_dir.parent() {
        if let Ok(c) = repo.canonicalize() {
            add(&c, "<repository>");
        }
        add(repo, "<repository>");
    }
    // Longest first, so a model folder is replaced before the repository that holds it.
    roots.sort_by_key(|(f, _)| std::cmp::Reverse(f.len()));
    roots
}

fn load_model_files(dir: &repository::ModelDir, settings: &EngineSettings) -> Model {
    let loaded = match &dir.config {
        Ok(c) => c,
        Err(e) => return Model { error: Some(e.to_string()), ..Model::default() },
    };
    if !loaded.ignored.is_empty() && settings.log_config_notes {
        let fields = loaded.ignored.join(", ");
        tracing::info!(model = %dir.name, %fields, "configuration fields tandem does not act on (ignored)");
    }
    let config = &loaded.config;
    let chosen = match repository::versions(&dir.dir, config) {
        Ok(c) => c,
        Err(e) => return Model { error: Some(e.to_string()), ..Model::default() },
    };
    let versions = chosen
        .into_iter()
        .map(|(v, file)| {
            let state = file.map_err(|e| e.to_string()).and_then(|file| {
                let started = std::time::Instant::now();
                let mv = load_version(&dir.name, &dir.dir, v, &file, config, settings)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                tracing::info!(
                    model = %dir.name,
                    version = v,
                    backend = mv.backend,
                    provider = %mv.provider,
                    ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                );
                Ok(VersionState::Ready(Arc::new(mv)))
            });
            (v, state.unwrap_or_else(VersionState::Unavailable))
        })
        .collect();
    Model { versions, error: None }
}

/// Which backend a model runs on, or why it cannot run: `backend: "tract"` or
/// `"onnxruntime"` insist; otherwise (no backend, or `platform: "onnxruntime_onnx"`,
/// which only says the model is ONNX) the default applies.
fn backend_for(config: &pb::ModelConfig, settings: &EngineSettings) -> Result<&'static str, LoadError> {
    let ort = settings.onnxruntime.is_some();
    let missing = || LoadError::NoOnnxRuntime(settings.fallback_reason.as_deref().unwrap_or("no library").to_string());
    match (config.backend.as_str(), settings.backend) {
        ("tract", _) | ("", BackendChoice::Tract) => Ok("tract"),
        ("onnxruntime", _) | ("", BackendChoice::OnnxRuntime) => {
            if ort {
                Ok("onnxruntime")
            } else {
                Err(missing())
            }
        }
        _ => Ok(if ort { "onnxruntime" } else { "tract" }),
    }
}

fn load_version(
    name: &str,
    dir: &Path,
    version: u64,
    file: &Path,
    config: &pb::ModelConfig,
    settings: &EngineSettings,
) -> Result<ModelVersion, LoadError> {
    let backend = backend_for(config, settings)?;
    use pb::model_instance_group::Kind;
    let gpu = config.instance_group.iter().any(|g| g.kind == Kind::Gpu as i32);
    if gpu && settings.device != Device::Cuda {
        return Err(LoadError::GpuOnCpu);
    }
    if backend == "tract" && settings.device == Device::Cuda {
        return Err(LoadError::CudaOnTract);
    }
    let configured_batch = usize::try_from(config.max_batch_size).unwrap_or(0);
    let batch_rank = usize::from(configured_batch > 0);
    let mut pinned = BTreeMap::new();
    for input in config.input.iter().filter(|i| i.reshape.is_none() && !i.dims.is_empty()) {
        let mut dims = vec![-1; batch_rank];
        dims.extend(&input.dims);
        pinned.insert(input.name.clone(), dims);
    }
    let threads = match config.thread_parameter("intra_op_thread_count") {
        0 => settings.threads,
        n => n,
    };
    let auto_batch = configured_batch == 0 && config.input.is_empty();
    let opts = LoadOptions {
        threads,
        inter_threads: config.thread_parameter("inter_op_thread_count"),
        device: settings.device,
        instances: config.instance_group.iter().map(|g| g.count.max(1) as usize).sum::<usize>().max(1),
        batched: configured_batch > 0,
        auto_batch,
        pinned,
    };
    let loaded = if backend == "onnxruntime" {
        let info = settings.onnxruntime.as_ref().ok_or_else(|| LoadError::NoOnnxRuntime("no library".into()))?;
        onnx_runtime::load(info, file, &opts)?
    } else {
        tract_backend::load(file, &opts)?
    };
    let max_batch_size =
        if auto_batch && looks_batched(&loaded.inputs) { DEFAULT_MAX_BATCH_SIZE } else { configured_batch };
    let gpu = settings.device == Device::Cuda;
    apply_config(name, dir, version, (backend, gpu), config, loaded, max_batch_size)
}

/// Triton's auto-completed batching: every input has a dynamic first dimension
/// (and a rank of at least 2, so a 1-D signal is not taken for a batch).
pub fn looks_batched(inputs: &[TensorMeta]) -> bool {
    !inputs.is_empty() && inputs.iter().all(|i| i.shape.len() >= 2 && i.shape[0] == -1)
}

/// Checks the configuration against what the model declares and builds the served version.
fn apply_config(
    name: &str,
    dir: &Path,
    version: u64,
    (backend, gpu): (&'static str, bool),
    config: &pb::ModelConfig,
    loaded: Loaded,
    max_batch_size: usize,
) -> Result<ModelVersion, LoadError> {
    let Loaded { runner, mut inputs, mut outputs, unsupported_outputs, provider } = loaded;
    let batch_rank = usize::from(max_batch_size > 0);
    let mut input_reshape = vec![None; inputs.len()];
    for ci in &config.input {
        let i = position(&inputs, &ci.name, Side::Input)?;
        let meta = &mut inputs[i];
        check_type(&meta.name, Side::Input, meta.datatype, ci.data_type)?;
        if max_batch_size > 0 && ci.reshape.is_none() && meta.shape.first().is_some_and(|&d| d > 0) {
            return Err(LoadError::FixedBatch { max_batch_size, name: meta.name.clone(), first: meta.shape[0] });
        }
        if !ci.dims.is_empty() {
            let mut shape = vec![-1; batch_rank];
            shape.extend(&ci.dims);
            match &ci.reshape {
                Some(r) => input_reshape[i] = Some(r.shape.clone()),
                None => check_dims(&meta.name, Side::Input, &meta.shape, &shape)?,
            }
            meta.shape = shape;
        }
    }
    let mut output_reshape = vec![None; outputs.len()];
    let mut labels = vec![Vec::new(); outputs.len()];
    for co in &config.output {
        let i = position(&outputs, &co.name, Side::Output)?;
        let meta = &mut outputs[i];
        check_type(&meta.name, Side::Output, meta.datatype, co.data_type)?;
        if !co.dims.is_empty() {
            let mut shape = vec![-1; batch_rank];
            shape.extend(&co.dims);
            if co.reshape.is_some() {
                output_reshape[i] = Some(co.dims.clone());
            } else {
                check_dims(&meta.name, Side::Output, &meta.shape, &shape)?;
            }
            meta.shape = shape;
        }
        if !co.label_filename.is_empty() {
            labels[i] = read_labels(dir, &co.label_filename)
                .map_err(|why| LoadError::Labels { output: co.name.clone(), why })?;
        }
    }
    if batch_rank == 1 {
        for m in inputs.iter_mut().chain(outputs.iter_mut()) {
            if let Some(first) = m.shape.first_mut() {
                *first = -1;
            }
        }
    }
    let served = config::Served { name, backend, max_batch_size, inputs: &inputs, outputs: &outputs, gpu };
    let config_served = config::effective(config, &served);
    Ok(ModelVersion {
        config: config_served,
        name: name.to_string(),
        version: version.to_string(),
        backend,
        provider,
        max_batch_size,
        inputs,
        outputs,
        unsupported_outputs,
        labels,
        input_reshape,
        output_reshape,
        dynamic_batching: config.dynamic_batching().filter(|_| max_batch_size > 0).map(|d| batcher::BatchPolicy {
            preferred: d
                .preferred_batch_size
                .iter()
                .filter_map(|&n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .collect(),
            max_delay: std::time::Duration::from_micros(d.max_queue_delay_microseconds),
        }),
        batcher: std::sync::OnceLock::new(),
        stats: std::sync::OnceLock::new(),
        recent_ps_per_element: AtomicU64::new(0),
        inflight: std::sync::atomic::AtomicUsize::new(0),
        max_inflight: config.max_inflight(),
        runner,
    })
}

/// Largest label file read (`label_filename`), in bytes.
pub const LABEL_FILE_BYTES: u64 = 16 << 20;
/// Most labels one file may hold.
pub const MAX_LABELS: usize = 1 << 20;

/// The labels of `label_filename`, a file confined to the model's folder, one per line.
fn read_labels(dir: &Path, label_filename: &str) -> Result<Vec<String>, LabelError> {
    let path = repository::confined_file(dir, "label_filename", label_filename, "folder")?;
    let bytes = repository::read_bounded(&path, "label_filename", LABEL_FILE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| LabelError::NotText(label_filename.to_string()))?;
    let labels: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany { file: label_filename.to_string(), count: labels.len(), limit: MAX_LABELS });
    }
    Ok(labels)
}

/// Where the model has the tensor a configuration names, or an error listing what it has.
fn position(tensors: &[TensorMeta], name: &str, side: Side) -> Result<usize, LoadError> {
    tensors.iter().position(|m| m.name == name).ok_or_else(|| LoadError::NotInModel {
        side,
        name: name.to_string(),
        known: tensors.iter().map(|m| m.name.clone()).collect(),
    })
}

fn check_type(name: &str, side: Side, model: DataType, configured: i32) -> Result<(), LoadError> {
    if configured == pb::DataType::TypeInvalid as i32 {
        return Ok(());
    }
    let want = pb::DataType::try_from(configured).map(|d| d.as_str_name().to_string()).unwrap_or_default();
    if want != model.triton_name() {
        return Err(LoadError::TypeMismatch {
            side,
            name: name.to_string(),
            configured: want,
            model: model.triton_name(),
        });
    }
    Ok(())
}

fn check_dims(name: &str, side: Side, model: &[i64], configured: &[i64]) -> Result<(), LoadError> {
    let fits = model.is_empty()
        || (model.len() == configured.len()
            && model.iter().zip(configured).all(|(&m, &c)| m == -1 || c == -1 || m == c));
    if fits {
        Ok(())
    } else {
        Err(LoadError::ShapeMismatch {
            side,
            name: name.to_string(),
            configured: configured.to_vec(),
            model: model.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tensor::TensorData;
    use std::path::PathBuf;
    use std::time::Duration;

    #[test]
    fn a_version_runs_inline_only_once_its_runs_are_known_to_be_short_for_the_size_asked() {
        assert!(!quick(0, 64), "never run: not inline");
        // 20 µs for 64 elements: the same size is quick, 64 times the size is not.
        let mean = fold(0, Duration::from_micros(20), 64);
        assert!(quick(mean, 64));
        assert!(!quick(mean, 64 * 64));
        // One slow run moves the mean by an eighth; a run of slow ones takes it over.
        let mut m = mean;
        for _ in 0..40 {
            m = fold(m, Duration::from_millis(5), 64);
        }
        assert!(!quick(m, 64), "a version that became slow leaves the serving thread");
        assert_eq!(fold(0, Duration::from_secs(3600), 0), 3_600_000_000_000_000, "no input: counted as one element");
        assert!(!quick(u64::MAX, usize::MAX), "no overflow");
    }

    fn builtin() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    fn tract_only() -> EngineSettings {
        EngineSettings { backend: BackendChoice::Tract, threads: 1, ..EngineSettings::default() }
    }

    fn ready(engine: &Engine, name: &str) -> Arc<ModelVersion> {
        match engine.models()[name].version(None) {
            Some(VersionState::Ready(v)) => v.clone(),
            other => panic!("{name} not ready: {other:?}"),
        }
    }

    #[test]
    fn builtin_digits_loads_on_tract_with_a_dynamic_batch() {
        let engine = Engine::load(&builtin(), &tract_only(), 1, &ModelSet::default()).expect("load");
        let v = ready(&engine, "digits");
        assert_eq!(v.inputs, [TensorMeta { name: "pixels".into(), datatype: DataType::FP32, shape: vec![-1, 64] }]);
        assert_eq!(v.outputs[0].shape, [-1, 10]);
        assert_eq!(v.labels[0].len(), 10);
        for batch in [1usize, 3, 17, 3] {
            let x = Tensor::new(vec![batch, 64], TensorData::F32(vec![8.0; batch * 64])).expect("tensor");
            let out = v.run(vec![x], &[0]).expect("run");
            assert_eq!(out[0].shape, [batch, 10]);
            let TensorData::F32(p) = &out[0].data else { panic!("f32") };
            let sum: f32 = p.iter().take(10).sum();
            assert!((sum - 1.0).abs() < 1e-4, "softmax row sums to {sum}");
        }
    }

    #[test]
    fn a_broken_model_is_unavailable_and_the_others_load() {
        let dir = tempfile::tempdir().expect("tmp");
        let v = dir.path().join("broken/1");
        std::fs::create_dir_all(&v).expect("mkdir");
        std::fs::write(v.join("model.onnx"), b"not a protobuf").expect("write");
        let digits = dir.path().join("digits");
        std::fs::create_dir_all(digits.join("1")).expect("mkdir");
        std::fs::copy(builtin().join("digits/1/model.onnx"), digits.join("1/model.onnx")).expect("copy");
        std::fs::create_dir_all(dir.path().join("empty")).expect("mkdir");
        let engine = Engine::load(dir.path(), &tract_only(), 1, &ModelSet::default()).expect("load");
        assert!(engine.models()["digits"].ready());
        let reason = engine.models()["broken"].reason().expect("reason");
        assert!(reason.contains("broken/1/model.onnx"), "{reason}");
        assert!(engine.models()["empty"].reason().expect("reason").contains("no version folder"));
        assert!(!engine.ready(), "strict readiness");
        let settings = EngineSettings { exit_on_model_error: true, ..tract_only() };
        let err = Engine::load(dir.path(), &settings, 1, &ModelSet::default()).expect_err("exit on error");
        assert!(err.to_string().contains("broken"), "{err}");
    }

    #[test]
    fn missing_repository_is_a_clear_error() {
        let err = Engine::load(Path::new("/nonexistent/models"), &tract_only(), 1, &ModelSet::default())
            .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/models"), "{err}");
    }

    #[test]
    fn reshape_resolves_one_free_dimension() {
        assert_eq!(resolve(&[2], &[3, -1], 24).expect("ok"), [2, 3, 4]);
        assert_eq!(resolve(&[], &[6], 6).expect("ok"), [6]);
        assert!(resolve(&[2], &[5, -1], 24).is_err());
        assert!(resolve(&[2], &[3, 3], 24).is_err());
    }
}
