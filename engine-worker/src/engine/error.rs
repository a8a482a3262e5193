//! Why a model version cannot load, why a run fails and why a model-control
//! request is refused, as types: callers match on them, and they become text
//! only where they are reported (a model's reason, an answer's JSON error, a
//! control reply, a log line).

use super::repository::FileError;
use super::tensor::{DataType, ShapeError};

/// Which side of a model a tensor is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A tensor the request feeds.
    Input,
    /// A tensor the model produces.
    Output,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Input => "input",
            Side::Output => "output",
        })
    }
}

/// What a graph value is, when it is not a tensor the protocol carries (a
/// sequence, a map, an element type without a protocol name): kept as a
/// model's unsupported output, or the reason an input cannot be fed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotCarried(pub String);

/// Why the repository could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// The repository directory cannot be listed.
    #[error("cannot read model repository {path}")]
    Unreadable {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A model failed and `EXIT_ON_MODEL_ERROR` asks to stop.
    #[error("model {model} is unavailable (EXIT_ON_MODEL_ERROR=true): {reason}")]
    Model {
        /// The model (and version).
        model: String,
        /// Why.
        reason: String,
    },
}

/// Why one version of a model cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration (or the default) asks for ONNX Runtime and there is none.
    #[error("the model needs ONNX Runtime, which is not available: {0}")]
    NoOnnxRuntime(String),
    /// `KIND_GPU` on a CPU engine.
    #[error("instance_group asks for KIND_GPU but ENGINE_DEVICE is cpu")]
    GpuOnCpu,
    /// `ENGINE_DEVICE=cuda` for a model tract runs.
    #[error("ENGINE_DEVICE=cuda but the model runs on tract, which has no CUDA support")]
    CudaOnTract,
    /// The ONNX Runtime library cannot be loaded or set up in this process.
    #[error("{0}")]
    Runtime(String),
    /// The CUDA execution provider cannot be enabled.
    #[error("cannot enable the CUDA execution provider: {0}")]
    Cuda(String),
    /// The backend cannot read, analyse or open the model file (its own words).
    #[error("{0}")]
    Backend(String),
    /// An input the protocol cannot carry or the backend cannot run.
    #[error("{side} {name}: {why}")]
    Tensor {
        /// Input or output.
        side: Side,
        /// The tensor.
        name: String,
        /// What it is instead.
        why: NotCarried,
    },
    /// tract has no kernels for this element type.
    #[error("{name}: tract cannot run {datatype} tensors; use the onnxruntime backend")]
    TractType {
        /// The tensor.
        name: String,
        /// Its element type.
        datatype: DataType,
    },
    /// tract cannot run a model with a non-tensor output.
    #[error("output {0} is not a tensor; tract cannot run it, use the onnxruntime backend")]
    TractOutput(String),
    /// The configuration names a tensor the model does not have.
    #[error("configuration {side} {name:?} is not an {side} of the model; it has {known:?}")]
    NotInModel {
        /// Input or output.
        side: Side,
        /// The configured name.
        name: String,
        /// The model's tensors on that side.
        known: Vec<String>,
    },
    /// The configuration's element type is not the model's.
    #[error("{side} {name}: the configuration says {configured} but the model has {model}")]
    TypeMismatch {
        /// Input or output.
        side: Side,
        /// The tensor.
        name: String,
        /// The configured type, as Triton names it.
        configured: String,
        /// The model's type, as Triton names it.
        model: String,
    },
    /// The configuration's shape does not fit the model's.
    #[error("{side} {name}: the configuration's shape {configured:?} does not fit the model's {model:?}")]
    ShapeMismatch {
        /// Input or output.
        side: Side,
        /// The tensor.
        name: String,
        /// The configured shape (with the batch dimension).
        configured: Vec<i64>,
        /// The model's shape.
        model: Vec<i64>,
    },
    /// Batching configured for an input whose first dimension is fixed.
    #[error("max_batch_size is {max_batch_size} but input {name} has a fixed first dimension {first}")]
    FixedBatch {
        /// The configured largest batch.
        max_batch_size: usize,
        /// The input.
        name: String,
        /// Its first dimension.
        first: i64,
    },
    /// An output's `label_filename` cannot be used.
    #[error("output {output}: {why}")]
    Labels {
        /// The output.
        output: String,
        /// Why.
        why: LabelError,
    },
}

/// Why a `label_filename` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// Outside the folder, missing, unreadable or too large.
    #[error(transparent)]
    File(#[from] FileError),
    /// Not UTF-8 text.
    #[error("label_filename {0:?} is not UTF-8 text")]
    NotText(String),
    /// More labels than [`super::MAX_LABELS`].
    #[error("label_filename {file:?} holds {count} labels; at most {limit}")]
    TooMany {
        /// The configured file name.
        file: String,
        /// Labels it holds.
        count: usize,
        /// Most allowed.
        limit: usize,
    },
}

/// Why a run (or a request's part of a batch) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    /// A configured `reshape` does not fit the elements given or produced.
    #[error("{count} elements cannot be reshaped to {target:?}")]
    Reshape {
        /// Elements of the tensor.
        count: usize,
        /// The shape asked for.
        target: Vec<i64>,
    },
    /// A BYTES element ONNX Runtime cannot take (its string tensors hold UTF-8).
    #[error("input {name}: element {index} is not UTF-8 (ONNX Runtime string tensors hold UTF-8 text)")]
    NotUtf8 {
        /// The input.
        name: String,
        /// The element.
        index: usize,
    },
    /// A tensor the backend cannot take or give back (its own words).
    #[error("{side} {name}: {why}")]
    Tensor {
        /// Input or output.
        side: Side,
        /// The tensor.
        name: String,
        /// What went wrong.
        why: String,
    },
    /// An output of an element type the protocol does not carry.
    #[error("output {name}: element type {datatype} is not carried by the protocol")]
    Unsupported {
        /// The output.
        name: String,
        /// The backend's name for its type.
        datatype: String,
    },
    /// An output the model did not produce.
    #[error("output {0} was not produced")]
    NotProduced(String),
    /// The backend failed (its own words).
    #[error("{0}")]
    Backend(String),
    /// A tensor made from the backend's answer does not hold together.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// The requests of a batch cannot be stacked.
    #[error("cannot batch the requests: {0}")]
    Batch(ShapeError),
    /// A batched output cannot be split back into its requests.
    #[error("output {name:?} cannot be split back into the batch's requests: {why}")]
    Split {
        /// The output.
        name: String,
        /// Why.
        why: ShapeError,
    },
    /// The version was unloaded while the request waited for its batch.
    #[error("the model was unloaded")]
    Unloaded,
    /// The worker stopped before the batch ran.
    #[error("the batch was dropped (the worker is stopping)")]
    Dropped,
}

/// Why a model-control request (load, unload) did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such folder in the repository (or not a plain folder name).
    #[error("no model folder {0:?} in the model repository")]
    NoFolder(String),
    /// The new load has no ready version; nothing served before.
    #[error("model {name:?} failed to load: {reason}")]
    Failed {
        /// The model.
        name: String,
        /// Why (already shown without the repository's location).
        reason: String,
    },
    /// The new load has no ready version; the previous one keeps serving.
    #[error("model {name:?} failed to load ({reason}); the previous load keeps serving")]
    KeptPrevious {
        /// The model.
        name: String,
        /// Why.
        reason: String,
    },
    /// Unloading a model the engine does not know.
    #[error("unknown model {0:?}")]
    Unknown(String),
}
