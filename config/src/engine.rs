//! tandem's own engine: the model repository, the backend and its device and
//! threads, readiness, model control and Triton's system shared memory.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scope::engine;
use crate::{values, Reader};

crate::declare! {
    MODEL_REPOSITORY {
        default: "built-in models/",
        doc: "Triton-style model repository (one folder per model)",
        accepted: "an existing directory",
        scope: engine,
    }
    ORT_DYLIB_PATH {
        default: "discovered",
        doc: "ONNX Runtime shared library (default: the onnxruntime Python package's)",
        accepted: "the path of a readable ONNX Runtime library",
        scope: |c| engine(c).or_else(|| (c.engine.backend == BackendChoice::Tract).then_some("ENGINE_BACKEND=tract never loads ONNX Runtime")),
    }
    ENGINE_BACKEND {
        default: "auto",
        doc: "default backend: auto (onnxruntime when found, else tract), onnxruntime or tract",
        accepted: "auto, onnxruntime or tract",
        scope: engine,
    }
    ENGINE_DEVICE {
        default: "cpu",
        doc: "cpu or cuda (CUDA execution provider; exit 2 if missing)",
        accepted: "cpu or cuda",
        scope: engine,
    }
    ENGINE_THREADS {
        default: "cores ÷ NUM_WORKERS",
        doc: "intra-op threads per model (1-1024)",
        accepted: "auto or an integer 1-1024",
        scope: engine,
    }
    STRICT_READINESS {
        default: "true",
        doc: "/v2/health/ready is false while any model is unavailable",
        accepted: values::BOOL,
        scope: engine,
    }
    EXIT_ON_MODEL_ERROR {
        default: "false",
        doc: "a model that fails to load stops start-up (exit 1)",
        accepted: values::BOOL,
        scope: engine,
    }
    MODEL_CONTROL_MODE {
        default: "none",
        doc: "none (models fixed at start), explicit (repository load/unload API) or poll (rescan the repository)",
        accepted: "none, explicit or poll",
        scope: engine,
    }
    MODEL_LOAD {
        default: "(none)",
        doc: "with MODEL_CONTROL_MODE=explicit, the models loaded at start: names comma-separated, or * for every model (Triton's --load-model)",
        accepted: "* or model names (the repository's folder names) comma-separated",
        scope: |c| engine(c).or_else(|| (c.engine.model_control_mode != ModelControlMode::Explicit).then_some("MODEL_CONTROL_MODE is not explicit, so every model is loaded at start")),
    }
    REPOSITORY_POLL_SECS {
        default: "15",
        doc: "seconds between rescans of the repository with MODEL_CONTROL_MODE=poll (1-86400)",
        accepted: "seconds 1-86400, as a number (30) or with a unit s, m, h or d (30s, 2m, 1h)",
        scope: |c| engine(c).or_else(|| (c.engine.model_control_mode != ModelControlMode::Poll).then_some("MODEL_CONTROL_MODE is not poll")),
    }
    SYSTEM_SHARED_MEMORY {
        default: "false",
        doc: "Triton's system shared-memory extension: local clients register POSIX regions under /dev/shm by name and pass tensors in them (off by default: a client that may register a region reads and writes whatever /dev/shm file tandem may open)",
        accepted: values::BOOL,
        scope: engine,
    }
}

/// Device models run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU through ONNX Runtime's CUDA execution provider.
    Cuda,
}

/// The default backend for models that do not name one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// ONNX Runtime when its library is found, else tract.
    #[default]
    Auto,
    /// ONNX Runtime; start-up fails without it.
    OnnxRuntime,
    /// tract, pure Rust.
    Tract,
}

/// How the served models may change while tandem runs (Triton's `--model-control-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelControlMode {
    /// The repository is read once at start.
    #[default]
    None,
    /// `POST /v2/repository/models/{m}/load` and `/unload` change them.
    Explicit,
    /// The repository is rescanned every `REPOSITORY_POLL_SECS`.
    Poll,
}

/// The models `MODEL_CONTROL_MODE=explicit` loads at start (`MODEL_LOAD`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelLoad {
    /// Every model in the repository (`*`; in the other modes, always).
    #[serde(rename = "*")]
    All,
    /// These, by folder name (none by default).
    Only(Vec<String>),
}

/// Whether `name` can be a model folder's name (one path component, printable).
pub fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.contains(['/', '\\', ','])
        && !name.chars().any(char::is_control)
}

/// The engine section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Engine {
    /// Model repository, when set explicitly.
    pub model_repository: Option<PathBuf>,
    /// ONNX Runtime library, when set explicitly.
    pub ort_dylib_path: Option<PathBuf>,
    /// Default backend.
    pub backend: BackendChoice,
    /// Device models run on.
    pub device: Device,
    /// Intra-op threads per model, when set (else [`threads_per_model`] decides).
    pub threads: Option<usize>,
    /// Readiness needs every model ready.
    pub strict_readiness: bool,
    /// A model that fails to load stops start-up.
    pub exit_on_model_error: bool,
    /// How models may change while running.
    pub model_control_mode: ModelControlMode,
    /// What explicit model control loads at start.
    pub model_load: ModelLoad,
    /// Between repository rescans (poll mode).
    pub repository_poll: Duration,
    /// Triton's system shared-memory extension is served.
    pub system_shared_memory: bool,
}

/// A worker's share of `cores` when `workers` share them (at least 1).
pub fn share_of_cores(cores: usize, workers: usize) -> usize {
    (cores / workers.max(1)).max(1)
}

/// Intra-op threads per model: `ENGINE_THREADS`, else the cores shared out
/// over the engine workers, so the machine is never oversubscribed.
pub fn threads_per_model(explicit: Option<usize>, cores: usize, engine_workers: usize) -> usize {
    explicit.unwrap_or_else(|| share_of_cores(cores, engine_workers))
}

/// Reads the engine section.
pub fn parse(r: &mut Reader) -> Engine {
    let model_repository = r.get(&MODEL_REPOSITORY, None, |v| {
        let p = PathBuf::from(v);
        p.is_dir().then_some(Some(p))
    });
    let ort_dylib_path = r.get(&ORT_DYLIB_PATH, None, |v| values::readable_file(v).map(Some));
    let backend = r.get(&ENGINE_BACKEND, BackendChoice::Auto, |v| {
        values::one_of(
            v,
            &[
                ("auto", BackendChoice::Auto),
                ("onnxruntime", BackendChoice::OnnxRuntime),
                ("ort", BackendChoice::OnnxRuntime),
                ("onnxruntime_onnx", BackendChoice::OnnxRuntime),
                ("tract", BackendChoice::Tract),
            ],
        )
    });
    let device = r.get(&ENGINE_DEVICE, Device::Cpu, |v| {
        values::one_of(v, &[("cpu", Device::Cpu), ("cuda", Device::Cuda), ("gpu", Device::Cuda)])
    });
    let threads = r.get(&ENGINE_THREADS, None, |v| match v {
        "auto" => Some(None),
        n => values::range(n, 1usize, 1024).map(Some),
    });
    if backend == BackendChoice::Tract && device == Device::Cuda {
        r.bad(&ENGINE_DEVICE, "cuda", "cpu, because ENGINE_BACKEND=tract has no CUDA support");
    }
    let strict_readiness = r.get(&STRICT_READINESS, true, values::parse_bool);
    let exit_on_model_error = r.get(&EXIT_ON_MODEL_ERROR, false, values::parse_bool);
    let model_control_mode = r.get(&MODEL_CONTROL_MODE, ModelControlMode::None, |v| {
        values::one_of(
            v,
            &[
                ("none", ModelControlMode::None),
                ("explicit", ModelControlMode::Explicit),
                ("poll", ModelControlMode::Poll),
            ],
        )
    });
    let explicit = model_control_mode == ModelControlMode::Explicit;
    let model_load = r.get(&MODEL_LOAD, if explicit { ModelLoad::Only(Vec::new()) } else { ModelLoad::All }, |v| {
        if !explicit {
            return Some(ModelLoad::All);
        }
        if v == "*" {
            return Some(ModelLoad::All);
        }
        let names = values::list(v);
        names.iter().all(|n| is_model_name(n)).then_some(ModelLoad::Only(names))
    });
    let repository_poll = r.get(&REPOSITORY_POLL_SECS, Duration::from_secs(15), |v| values::seconds(v, 1, 86400));
    let system_shared_memory = r.get(&SYSTEM_SHARED_MEMORY, false, values::parse_bool);
    Engine {
        model_repository,
        ort_dylib_path,
        backend,
        device,
        threads,
        strict_readiness,
        exit_on_model_error,
        model_control_mode,
        model_load,
        repository_poll,
        system_shared_memory,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<ModelLoad, crate::ConfigError> {
        crate::Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).map(|c| c.engine.model_load)
    }

    #[test]
    fn explicit_control_loads_only_what_model_load_names() {
        assert_eq!(load(&[]).unwrap(), ModelLoad::All);
        assert_eq!(load(&[("MODEL_LOAD", "a")]).unwrap(), ModelLoad::All, "ignored unless explicit");
        let explicit = ("MODEL_CONTROL_MODE", "explicit");
        assert_eq!(load(&[explicit]).unwrap(), ModelLoad::Only(vec![]));
        assert_eq!(load(&[explicit, ("MODEL_LOAD", "*")]).unwrap(), ModelLoad::All);
        assert_eq!(
            load(&[explicit, ("MODEL_LOAD", "digits, yolo-v8")]).unwrap(),
            ModelLoad::Only(vec!["digits".into(), "yolo-v8".into()])
        );
        for bad in ["../etc", "a/b", "..", "a\tb"] {
            assert_eq!(load(&[explicit, ("MODEL_LOAD", bad)]).expect_err(bad).problems[0].var, "MODEL_LOAD");
        }
    }

    #[test]
    fn threads_are_the_setting_else_a_share_of_the_cores() {
        assert_eq!(threads_per_model(Some(3), 8, 2), 3);
        assert_eq!(threads_per_model(None, 8, 2), 4);
        assert_eq!(threads_per_model(None, 2, 4), 1);
        assert_eq!(threads_per_model(None, 2, 0), 2);
    }
}
