//! The ONNX Runtime backend (the default): the shared library from the
//! `onnxruntime` Python package, loaded once per process through `ort`'s
//! `load-dynamic`, one session per model instance.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use ort::ep::ExecutionProvider;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynMap, DynMapValueType, DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use tandem_shared::OrtLibrary;

use super::tensor::{DataType, Tensor, TensorData};
use super::{Device, LoadError, LoadOptions, Loaded, NotCarried, RunError, Runner, Side, TensorMeta};

struct Runtime {
    env: ort::environment::Environment,
}

static RUNTIME: OnceLock<Result<Runtime, LoadError>> = OnceLock::new();

/// Loads the library at `path` into this process (once) and creates the environment.
fn runtime(path: &Path) -> Result<&'static Runtime, LoadError> {
    RUNTIME
        .get_or_init(|| {
            let builder = ort::init_from(path).map_err(|e| LoadError::Runtime(e.to_string()))?;
            // No telemetry: an inference server does not report to a third party.
            let env = builder
                .with_name("tandem")
                .with_telemetry(false)
                .build()
                .map_err(|e| LoadError::Runtime(format!("cannot create the environment: {e}")))?;
            Ok(Runtime { env })
        })
        .as_ref()
        .map_err(|e| LoadError::Runtime(e.to_string()))
}

/// Loads the library and reports its version and providers: the supervisor
/// runs this in a child process (`tandem engine-probe PATH`) so that a broken
/// library can never take the supervisor down.
pub fn probe(path: &Path) -> Result<OrtLibrary, LoadError> {
    runtime(path)?;
    let cuda = ort::ep::CUDA::is_available().unwrap_or(false);
    Ok(OrtLibrary { path: path.to_path_buf(), version: version(path), cuda, found_by: String::new() })
}

/// The version the library reports of itself; else from the build string
/// (`git-branch=rel-1.31.1`), else the file name (`libonnxruntime.so.1.31.1`).
fn version(path: &Path) -> String {
    if let Some(v) = tandem_shared::sys::ort_version(path) {
        return v;
    }
    let info = ort::info();
    if let Some(v) = info.split(&[',', ' '][..]).find_map(|p| p.strip_prefix("git-branch=rel-")) {
        return v.to_string();
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    match name.split_once(".so.") {
        Some((_, v)) => v.to_string(),
        None => "unknown".to_string(),
    }
}

/// One loaded model: its sessions (one per instance), used round-robin by whoever is free.
struct OrtRunner {
    sessions: Vec<Mutex<Session>>,
    input_names: Vec<String>,
    /// Session output names of the tensor outputs, in graph order.
    output_names: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
}

/// Loads `file` as a session (or several, one per instance) with `info`'s library.
pub fn load(info: &OrtLibrary, file: &Path, opts: &LoadOptions) -> Result<Loaded, LoadError> {
    let rt = runtime(&info.path)?;
    let instances = opts.instances.max(1);
    let mut sessions = Vec::with_capacity(instances);
    for _ in 0..instances {
        sessions.push(session(rt, file, opts)?);
    }
    let first = &sessions[0];
    let mut inputs = Vec::new();
    for outlet in first.inputs() {
        let name = outlet.name();
        inputs.push(meta(name, outlet.dtype()).map_err(|why| LoadError::Tensor {
            side: Side::Input,
            name: name.to_string(),
            why,
        })?);
    }
    let mut outputs = Vec::new();
    let mut unsupported = Vec::new();
    for outlet in first.outputs() {
        match meta(outlet.name(), outlet.dtype()) {
            Ok(m) => outputs.push(m),
            Err(why) => unsupported.push((outlet.name().to_string(), why.0)),
        }
    }
    let runner = OrtRunner {
        input_names: inputs.iter().map(|m| m.name.clone()).collect(),
        output_names: outputs.iter().map(|m| m.name.clone()).collect(),
        sessions: sessions.into_iter().map(Mutex::new).collect(),
        next: Default::default(),
    };
    let provider = if opts.device == Device::Cuda { "CUDAExecutionProvider" } else { "CPUExecutionProvider" };
    Ok(Loaded {
        runner: Box::new(runner),
        inputs,
        outputs,
        unsupported_outputs: unsupported,
        provider: provider.into(),
    })
}

fn session(rt: &Runtime, file: &Path, opts: &LoadOptions) -> Result<Session, LoadError> {
    let e = |e: ort::Error<_>| LoadError::Backend(e.to_string());
    let mut builder = Session::builder(&rt.env)
        .map_err(|e| LoadError::Backend(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(e)?
        .with_intra_threads(opts.threads.max(1))
        .map_err(e)?
        // Spinning threads would steal the cores the HTTP side needs between requests.
        .with_intra_op_spinning(false)
        .map_err(e)?;
    if opts.inter_threads > 0 {
        builder =
            builder.with_inter_threads(opts.inter_threads).map_err(e)?.with_parallel_execution(true).map_err(e)?;
    }
    if opts.device == Device::Cuda {
        builder = builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| LoadError::Cuda(e.to_string()))?;
    }
    builder.commit_from_file(file).map_err(|e| LoadError::Backend(with_locale_hint(e.to_string())))
}

/// onnxruntime's StringNormalizer (in every scikit-learn text pipeline
/// skl2onnx converts) opens the locale its model names, `en_US.UTF-8`
/// unless it says otherwise, and a machine without that locale compiled
/// fails the load with a C++ message: say what the operator can do.
fn with_locale_hint(message: String) -> String {
    if !message.contains("Failed to construct locale") {
        return message;
    }
    format!(
        "{message} (the model's StringNormalizer needs that locale on this machine: on Debian or Ubuntu, `apt-get install locales && localedef -i en_US -f UTF-8 en_US.UTF-8`, or for another locale the one the error names; tandem's container image has en_US.UTF-8)"
    )
}

/// Metadata of a session input or output; what it is instead, for anything
/// that is not a tensor the protocol carries (kept as a model's unsupported output).
fn meta(name: &str, ty: &ValueType) -> Result<TensorMeta, NotCarried> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            let datatype = datatype(*ty)
                .ok_or_else(|| NotCarried(format!("element type {ty:?} is not carried by the protocol")))?;
            Ok(TensorMeta { name: name.to_string(), datatype, shape: shape.iter().map(|&d| d.max(-1)).collect() })
        }
        ValueType::Sequence(inner) if class_scores(inner).is_some() => {
            Ok(TensorMeta { name: name.to_string(), datatype: DataType::FP32, shape: vec![-1, -1] })
        }
        ValueType::Sequence(inner) => Err(NotCarried(format!("a sequence of {}", describe(inner)))),
        ValueType::Map { key, value } => Err(NotCarried(format!("a map from {key:?} to {value:?}"))),
        ValueType::Optional(inner) => Err(NotCarried(format!("an optional {}", describe(inner)))),
    }
}

/// The key type of a sequence's element that is a map from a class (an
/// INT64 or string label) to a FP32 score: scikit-learn's ZipMap, which
/// skl2onnx puts on every classifier's probabilities unless told not to.
/// Such an output is carried as a FP32 `[rows, classes]` tensor.
fn class_scores(element: &ValueType) -> Option<TensorElementType> {
    match element {
        ValueType::Map {
            key: key @ (TensorElementType::Int64 | TensorElementType::String),
            value: TensorElementType::Float32,
        } => Some(*key),
        _ => None,
    }
}

/// A sequence of class-to-score maps as a FP32 `[rows, classes]` tensor, a
/// row per map, its columns in the maps' key order (onnxruntime keeps a
/// map's keys sorted, the order of scikit-learn's `classes_`). Every map
/// must have the same keys.
fn rows_of_maps(name: &str, v: &DynValue, key: TensorElementType) -> Result<Tensor, RunError> {
    let err = |why: String| RunError::Tensor { side: Side::Output, name: name.to_string(), why };
    let maps = v.try_extract_sequence::<DynMapValueType>().map_err(|e| err(e.to_string()))?;
    let (columns, scores) = if key == TensorElementType::Int64 {
        stack(&maps, DynMap::try_extract_key_values::<i64, f32>)
    } else {
        stack(&maps, DynMap::try_extract_key_values::<String, f32>)
    }
    .map_err(err)?;
    Tensor::new(vec![maps.len(), columns], TensorData::F32(scores)).map_err(|e| err(e.to_string()))
}

/// The maps' scores, row after row, and how many classes a row has: every
/// map's keys (compared as they are, not as text) must be the first one's.
fn stack<K: PartialEq>(
    maps: &[DynMap],
    pairs: impl Fn(&DynMap) -> ort::Result<Vec<(K, f32)>>,
) -> Result<(usize, Vec<f32>), String> {
    let mut scores = Vec::new();
    let mut classes: Option<Vec<K>> = None;
    for map in maps {
        let (keys, values): (Vec<K>, Vec<f32>) = pairs(map).map_err(|e| e.to_string())?.into_iter().unzip();
        match &classes {
            Some(first) if *first != keys => return Err("its maps do not all have the same classes".into()),
            Some(_) => {}
            None => classes = Some(keys),
        }
        scores.extend(values);
    }
    Ok((classes.map_or(0, |c| c.len()), scores))
}

fn describe(ty: &ValueType) -> String {
    match ty {
        ValueType::Tensor { ty, .. } => format!("{ty:?} tensors"),
        ValueType::Sequence(inner) => format!("sequences of {}", describe(inner)),
        ValueType::Map { key, value } => format!("maps from {key:?} to {value:?}"),
        ValueType::Optional(inner) => format!("optional {}", describe(inner)),
    }
}

fn datatype(t: TensorElementType) -> Option<DataType> {
    use TensorElementType as T;
    Some(match t {
        T::Bool => DataType::BOOL,
        T::Uint8 => DataType::UINT8,
        T::Uint16 => DataType::UINT16,
        T::Uint32 => DataType::UINT32,
        T::Uint64 => DataType::UINT64,
        T::Int8 => DataType::INT8,
        T::Int16 => DataType::INT16,
        T::Int32 => DataType::INT32,
        T::Int64 => DataType::INT64,
        T::Float16 => DataType::FP16,
        T::Bfloat16 => DataType::BF16,
        T::Float32 => DataType::FP32,
        T::Float64 => DataType::FP64,
        T::String => DataType::BYTES,
        _ => return None,
    })
}

fn to_value(name: &str, t: Tensor) -> Result<DynValue, RunError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    macro_rules! owned {
        ($v:expr) => {
            OrtTensor::from_array((shape, $v)).map(|t| t.into_dyn())
        };
    }
    let value = match t.data {
        TensorData::Bool(v) => owned!(v),
        TensorData::U8(v) => owned!(v),
        TensorData::U16(v) => owned!(v),
        TensorData::U32(v) => owned!(v),
        TensorData::U64(v) => owned!(v),
        TensorData::I8(v) => owned!(v),
        TensorData::I16(v) => owned!(v),
        TensorData::I32(v) => owned!(v),
        TensorData::I64(v) => owned!(v),
        TensorData::F16(v) => owned!(v),
        TensorData::BF16(v) => owned!(v),
        TensorData::F32(v) => owned!(v),
        TensorData::F64(v) => owned!(v),
        TensorData::Bytes(v) => {
            let strings = v
                .into_iter()
                .enumerate()
                .map(|(i, b)| String::from_utf8(b).map_err(|_| RunError::NotUtf8 { name: name.to_string(), index: i }))
                .collect::<Result<Vec<String>, RunError>>()?;
            OrtTensor::from_string_array((shape, strings.as_slice())).map(|t| t.into_dyn())
        }
    };
    value.map_err(|e| RunError::Tensor { side: Side::Input, name: name.to_string(), why: e.to_string() })
}

fn from_value(name: &str, v: &DynValue) -> Result<Tensor, RunError> {
    if let ValueType::Sequence(element) = v.dtype() {
        if let Some(key) = class_scores(element) {
            return rows_of_maps(name, v, key);
        }
    }
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(RunError::Tensor { side: Side::Output, name: name.to_string(), why: "not a tensor".into() });
    };
    let err = |e: ort::Error| RunError::Tensor { side: Side::Output, name: name.to_string(), why: e.to_string() };
    macro_rules! copy {
        ($t:ty, $variant:ident) => {{
            let (shape, data) = v.try_extract_tensor::<$t>().map_err(err)?;
            (shape.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>(), TensorData::$variant(data.to_vec()))
        }};
    }
    use TensorElementType as T;
    let (shape, data) = match ty {
        T::Bool => copy!(bool, Bool),
        T::Uint8 => copy!(u8, U8),
        T::Uint16 => copy!(u16, U16),
        T::Uint32 => copy!(u32, U32),
        T::Uint64 => copy!(u64, U64),
        T::Int8 => copy!(i8, I8),
        T::Int16 => copy!(i16, I16),
        T::Int32 => copy!(i32, I32),
        T::Int64 => copy!(i64, I64),
        T::Float16 => copy!(half::f16, F16),
        T::Bfloat16 => copy!(half::bf16, BF16),
        T::Float32 => copy!(f32, F32),
        T::Float64 => copy!(f64, F64),
        T::String => {
            let (shape, strings) = v.try_extract_strings().map_err(err)?;
            let shape = shape.iter().map(|&d| d.max(0) as usize).collect();
            (shape, TensorData::Bytes(strings.into_iter().map(String::into_bytes).collect()))
        }
        other => return Err(RunError::Unsupported { name: name.to_string(), datatype: format!("{other:?}") }),
    };
    Tensor::new(shape, data).map_err(|e| RunError::Tensor {
        side: Side::Output,
        name: name.to_string(),
        why: e.to_string(),
    })
}

impl Runner for OrtRunner {
    fn run(&self, inputs: Vec<Tensor>, wanted: &[usize]) -> Result<Vec<Tensor>, RunError> {
        let values = inputs
            .into_iter()
            .zip(&self.input_names)
            .map(|(t, name)| Ok((name.as_str(), to_value(name, t)?)))
            .collect::<Result<Vec<_>, RunError>>()?;
        // Any free session; else wait on the next one in turn.
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = self.sessions.len();
        let mut guard = (0..n)
            .find_map(|i| self.sessions[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| self.sessions[start % n].lock().unwrap_or_else(|p| p.into_inner()));
        let outputs = guard.run(values).map_err(|e| RunError::Backend(e.to_string()))?;
        wanted
            .iter()
            .map(|&i| {
                let name = &self.output_names[i];
                let value = outputs.get(name.as_str()).ok_or_else(|| RunError::NotProduced(name.clone()))?;
                from_value(name, value)
            })
            .collect()
    }
}
