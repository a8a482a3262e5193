//! The engine: a Triton-style model repository loaded into tract plans, and
//! inference on a bounded pool of blocking threads.
//!
//! Layout: `<repo>/<model>/<version>/model.onnx`, optional `<repo>/<model>/config.json`
//! (`max_batch_size`, `labels`, `platform`). Names, datatypes and shapes come
//! from the ONNX file; every plan keeps its batch dimension symbolic.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// Why the repository could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The repository directory cannot be listed.
    #[error("cannot read model repository {path}")]
    Repository {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No model was found.
    #[error("model repository {0} holds no model (expected <model>/<version>/model.onnx)")]
    Empty(PathBuf),
    /// A `config.json` is malformed.
    #[error("cannot parse {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// tract refused the model.
    #[error("cannot load {path}: {reason}")]
    Model {
        /// The file.
        path: PathBuf,
        /// tract's message.
        reason: String,
    },
}

/// Tensor element types of the Open Inference Protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs, reason = "the names are the protocol's")]
pub enum DataType {
    BOOL,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    INT8,
    INT16,
    INT32,
    INT64,
    FP16,
    FP32,
    FP64,
    BYTES,
}

impl DataType {
    /// Parses a protocol name such as `FP32`.
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// Bytes per element in the binary encoding (BYTES is variable: 0).
    pub fn size(self) -> usize {
        use DataType::*;
        match self {
            BOOL | UINT8 | INT8 => 1,
            UINT16 | INT16 | FP16 => 2,
            UINT32 | INT32 | FP32 => 4,
            UINT64 | INT64 | FP64 => 8,
            BYTES => 0,
        }
    }

    fn from_onnx(elem_type: i32) -> Option<Self> {
        use DataType::*;
        Some(match elem_type {
            1 => FP32,
            2 => UINT8,
            3 => INT8,
            4 => UINT16,
            5 => INT16,
            6 => INT32,
            7 => INT64,
            8 => BYTES,
            9 => BOOL,
            10 => FP16,
            11 => FP64,
            12 => UINT32,
            13 => UINT64,
            _ => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

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

/// `config.json` beside a model's version folders.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct ModelConfig {
    platform: Option<String>,
    max_batch_size: Option<usize>,
    labels: Vec<String>,
}

/// One loaded version of a model.
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version label (the folder name).
    pub version: String,
    /// Platform reported in metadata.
    pub platform: String,
    /// Largest batch accepted; 0 means the model has no batch dimension.
    pub max_batch_size: usize,
    /// Class labels for the classification extension.
    pub labels: Vec<String>,
    /// Inputs, in graph order.
    pub inputs: Vec<TensorMeta>,
    /// Outputs, in graph order.
    pub outputs: Vec<TensorMeta>,
    plan: Arc<TypedRunnableModel>,
}

impl fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelVersion").field("name", &self.name).field("version", &self.version).finish_non_exhaustive()
    }
}

impl ModelVersion {
    /// Runs the plan on inputs given in graph order. Blocking: call from the pool.
    pub fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.plan.run(inputs)
    }
}

/// All versions of one model, newest last.
#[derive(Debug)]
pub struct Model {
    /// Versions by label.
    pub versions: BTreeMap<String, Arc<ModelVersion>>,
    latest: String,
}

impl Model {
    /// The requested version, or the newest.
    pub fn version(&self, v: Option<&str>) -> Option<&Arc<ModelVersion>> {
        self.versions.get(v.unwrap_or(&self.latest))
    }

    /// Version labels, oldest first.
    pub fn labels(&self) -> Vec<String> {
        let mut v: Vec<_> = self.versions.keys().cloned().collect();
        v.sort_by_key(|s| s.parse::<u64>().unwrap_or(u64::MAX));
        v
    }
}

/// The loaded repository and the inference pool.
#[derive(Debug)]
pub struct Engine {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
    /// Bounds concurrent inferences to the threads this worker should use.
    pub permits: Semaphore,
}

impl Engine {
    /// Loads every model of the repository; `threads` bounds concurrent inferences.
    pub fn load(repository: &Path, threads: usize) -> Result<Engine, LoadError> {
        let rerr = |source| LoadError::Repository { path: repository.to_path_buf(), source };
        let mut models = BTreeMap::new();
        let mut dirs: Vec<_> =
            std::fs::read_dir(repository).map_err(rerr)?.filter_map(Result::ok).map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs.into_iter().filter(|p| p.is_dir()) {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(String::from) else {
                continue;
            };
            let config_path = dir.join("config.json");
            let config: ModelConfig = match std::fs::read(&config_path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| LoadError::Config { path: config_path.clone(), reason: e.to_string() })?,
                Err(_) => ModelConfig::default(),
            };
            let mut versions = BTreeMap::new();
            let mut latest: Option<(u64, String)> = None;
            let entries = std::fs::read_dir(&dir).map_err(rerr)?.filter_map(Result::ok);
            for entry in entries {
                let vdir = entry.path();
                let file = vdir.join("model.onnx");
                let Some(label) = vdir.file_name().and_then(|n| n.to_str()).map(String::from) else {
                    continue;
                };
                let Ok(number) = label.parse::<u64>() else {
                    continue;
                };
                if !file.is_file() {
                    continue;
                }
                let loaded = load_version(&name, &label, &file, &config)?;
                tracing::info!(model = %name, version = %label, file = %file.display(), "model loaded");
                versions.insert(label.clone(), Arc::new(loaded));
                if latest.as_ref().is_none_or(|(n, _)| number > *n) {
                    latest = Some((number, label));
                }
            }
            if let Some((_, latest)) = latest {
                models.insert(name, Model { versions, latest });
            }
        }
        if models.is_empty() {
            return Err(LoadError::Empty(repository.to_path_buf()));
        }
        Ok(Engine { models, permits: Semaphore::new(threads.max(1)) })
    }
}

fn load_version(name: &str, version: &str, file: &Path, config: &ModelConfig) -> Result<ModelVersion, LoadError> {
    let merr = |e: &dyn fmt::Display| LoadError::Model { path: file.to_path_buf(), reason: e.to_string() };
    let onnx = tract_onnx::onnx();
    let proto = onnx.proto_model_for_path(file).map_err(|e| merr(&format!("{e:#}")))?;
    let graph = proto.graph.as_ref().ok_or_else(|| merr(&"the file has no graph"))?;
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let meta = |v: &pb::ValueInfoProto| -> Result<TensorMeta, LoadError> {
        let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            return Err(merr(&format!("{} is not a tensor", v.name)));
        };
        let datatype = DataType::from_onnx(t.elem_type)
            .ok_or_else(|| merr(&format!("{}: unsupported element type {}", v.name, t.elem_type)))?;
        let shape = t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => n,
                        _ => -1,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(TensorMeta { name: v.name.clone(), datatype, shape })
    };
    let inputs = graph
        .input
        .iter()
        .filter(|v| !initializers.contains(&v.name.as_str()))
        .map(meta)
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = graph.output.iter().map(meta).collect::<Result<Vec<_>, _>>()?;
    if let Some(bad) = inputs.iter().chain(&outputs).find(|t| t.datatype == DataType::BYTES) {
        return Err(merr(&format!("{}: string tensors are not supported", bad.name)));
    }
    let plan = onnx
        .model_for_path(file)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| merr(&format!("{e:#}")))?;
    let batched = inputs.iter().all(|i| i.shape.first() == Some(&-1));
    let max_batch_size = if batched { config.max_batch_size.unwrap_or(64) } else { 0 };
    Ok(ModelVersion {
        name: name.to_string(),
        version: version.to_string(),
        platform: config.platform.clone().unwrap_or_else(|| "onnx".to_string()),
        max_batch_size,
        labels: config.labels.clone(),
        inputs,
        outputs,
        plan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    #[test]
    fn builtin_digits_loads_with_a_dynamic_batch() {
        let engine = Engine::load(&builtin(), 1).expect("load");
        let v = engine.models["digits"].version(None).expect("latest");
        assert_eq!(v.inputs, [TensorMeta { name: "pixels".into(), datatype: DataType::FP32, shape: vec![-1, 64] }]);
        assert_eq!(v.outputs[0].shape, [-1, 10]);
        for batch in [1usize, 3, 17] {
            let x = Tensor::from_shape(&[batch, 64], &vec![8.0f32; batch * 64]).expect("tensor");
            let out = v.run(tvec!(x.into())).expect("run");
            assert_eq!(out[0].shape(), &[batch, 10]);
            let sum: f32 = out[0].to_plain_array_view::<f32>().expect("f32").iter().take(10).sum();
            assert!((sum - 1.0).abs() < 1e-4, "softmax row sums to {sum}");
        }
    }

    #[test]
    fn missing_repository_is_a_clear_error() {
        let err = Engine::load(Path::new("/nonexistent/models"), 1).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/models"), "{err}");
    }

    #[test]
    fn broken_model_names_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let v = dir.path().join("broken/1");
        std::fs::create_dir_all(&v).expect("mkdir");
        std::fs::write(v.join("model.onnx"), b"not a protobuf").expect("write");
        let err = Engine::load(dir.path(), 1).expect_err("broken");
        assert!(err.to_string().contains("broken/1/model.onnx"), "{err}");
    }
}
