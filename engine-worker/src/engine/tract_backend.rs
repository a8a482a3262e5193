//! The tract backend: pure Rust, for machines without ONNX Runtime or models
//! that ask for it. Input facts come from the model and its configuration
//! (unnamed dimensions get names, configured dimensions are pinned), exporters'
//! intermediate shape annotations are ignored, and a concrete plan is cached
//! per batch size beside the symbolic one. A model whose shapes tract cannot
//! analyse symbolically (detectors with a variable height and width) is planned
//! per concrete input shape instead.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::tensor::{DataType, Tensor as Tn, TensorData};
use super::{LoadError, LoadOptions, Loaded, NotCarried, RunError, Runner, Side, TensorMeta};

/// Concrete plans kept per model; beyond this, the symbolic plan serves (or, for
/// shape-planned models, the least recently made plan is dropped).
const MAX_PLANS: usize = 8;

/// The size given to free dimensions when checking at load that a shape-planned model runs.
const PROBE_SIZE: usize = 64;

type Plan = Arc<TypedRunnableModel>;

enum Mode {
    /// One symbolic plan, plus concrete ones per batch size.
    Symbolic {
        /// The decluttered model with a symbolic batch, to concretise per batch size.
        typed: TypedModel,
        /// The optimised plan for any input size.
        symbolic: Plan,
        /// The batch symbol, when the model is batched.
        batch: Option<Symbol>,
        plans: Mutex<HashMap<usize, Plan>>,
    },
    /// A plan per set of input shapes, made on first use.
    PerShape { proto: Box<pb::ModelProto>, inputs: Vec<TensorMeta>, plans: Mutex<Vec<(Vec<Vec<usize>>, Plan)>> },
}

struct TractRunner {
    mode: Mode,
    opts: LoadOptions,
}

/// Loads `file` with tract.
pub fn load(file: &Path, opts: &LoadOptions) -> Result<Loaded, LoadError> {
    let onnx = onnx();
    let proto = onnx.proto_model_for_path(file).map_err(backend)?;
    let graph = proto.graph.as_ref().ok_or_else(|| LoadError::Backend(NO_GRAPH.into()))?;
    // tract is given the model's bytes, never its folder, so it reads no file a
    // model names; a model whose weights live in such files says so plainly.
    if let Some(w) = graph.initializer.iter().find(|t| {
        !t.external_data.is_empty() || t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
    }) {
        return Err(LoadError::Backend(format!(
            "initializer {:?} keeps its data in an external file, which the tract backend does not read; ONNX Runtime does (from the model's own folder only)",
            w.name
        )));
    }
    let graph_inputs = fed_inputs(graph);
    let mut inputs = Vec::new();
    for v in &graph_inputs {
        inputs.push(meta(v).map_err(|why| LoadError::Tensor { side: Side::Input, name: v.name.clone(), why })?);
    }
    let mut outputs = Vec::new();
    let mut unsupported = Vec::new();
    for v in &graph.output {
        match meta(v) {
            Ok(m) => outputs.push(m),
            Err(why) => unsupported.push((v.name.clone(), why.0)),
        }
    }
    if let Some(bad) = inputs.iter().chain(&outputs).find(|t| matches!(t.datatype, DataType::BYTES | DataType::BF16)) {
        return Err(LoadError::TractType { name: bad.name.clone(), datatype: bad.datatype });
    }
    if let Some((name, _)) = unsupported.first() {
        return Err(LoadError::TractOutput(name.clone()));
    }

    // The batch symbol needs to be known before analysis, so the auto-completed
    // batching is decided here from the same metadata the engine uses afterwards.
    let opts =
        &LoadOptions { batched: opts.batched || (opts.auto_batch && super::looks_batched(&inputs)), ..opts.clone() };
    let mode = match analyse(&onnx, &proto, &graph_inputs, &inputs, opts, None) {
        Ok((typed, batch)) => {
            let symbolic = typed.clone().into_optimized().and_then(|m| m.into_runnable()).map_err(backend)?;
            Mode::Symbolic { typed, symbolic, batch, plans: Mutex::new(HashMap::new()) }
        }
        Err(symbolic_error) => {
            // Check now that the model plans at all, with every free dimension at PROBE_SIZE.
            let probe: Vec<Vec<usize>> = inputs
                .iter()
                .map(|m| m.shape.iter().map(|&d| if d > 0 { d as usize } else { PROBE_SIZE }).collect())
                .collect();
            plan_for_shapes(&onnx, &proto, &graph_inputs, &inputs, opts, &probe).map_err(|e| {
                LoadError::Backend(format!("{symbolic_error} (and with concrete input shapes {probe:?}: {e})"))
            })?;
            tracing::info!(file = %file.display(), reason = %symbolic_error, "tract: symbolic shapes do not unify; planning per input shape");
            Mode::PerShape { proto: Box::new(proto.clone()), inputs: inputs.clone(), plans: Mutex::new(Vec::new()) }
        }
    };
    let runner = TractRunner { mode, opts: opts.clone() };
    Ok(Loaded { runner: Box::new(runner), inputs, outputs, unsupported_outputs: unsupported, provider: "tract".into() })
}

/// Gives the inputs their facts and analyses the model into a decluttered typed model.
fn analyse(
    onnx: &tract_onnx::Onnx,
    proto: &pb::ModelProto,
    graph_inputs: &[&pb::ValueInfoProto],
    inputs: &[TensorMeta],
    opts: &LoadOptions,
    concrete: Option<&[Vec<usize>]>,
) -> Result<(TypedModel, Option<Symbol>), LoadError> {
    let mut model = onnx.model_for_proto_model(proto).map_err(backend)?;
    let batch_sym = opts.batched.then(|| model.symbols.sym("N"));
    for (i, (v, m)) in graph_inputs.iter().zip(inputs).enumerate() {
        let dims: TVec<TDim> = m
            .shape
            .iter()
            .enumerate()
            .map(|(axis, &d)| {
                if let Some(shape) = concrete {
                    return TDim::Val(shape[i][axis] as i64);
                }
                if let Some(pinned) = opts.pinned.get(&m.name).and_then(|p| p.get(axis).copied()).filter(|&p| p > 0) {
                    return TDim::Val(pinned);
                }
                if d > 0 {
                    return TDim::Val(d);
                }
                match (&batch_sym, axis) {
                    (Some(n), 0) => n.clone().into(),
                    _ => model.symbols.sym(&dim_name(v, axis)).into(),
                }
            })
            .collect();
        let dt = tract_datum(m.datatype).ok_or(LoadError::TractType { name: m.name.clone(), datatype: m.datatype })?;
        model.set_input_fact(i, InferenceFact::dt_shape(dt, dims)).map_err(backend)?;
    }
    let typed = model.into_typed().and_then(|m| m.into_decluttered()).map_err(backend)?;
    Ok((typed, batch_sym))
}

/// The graph inputs a request feeds: those without an initializer (the others are weights).
pub fn fed_inputs(graph: &pb::GraphProto) -> Vec<&pb::ValueInfoProto> {
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph.input.iter().filter(|v| !initializers.contains(&v.name.as_str())).collect()
}

/// An optimised plan for exactly these input shapes.
fn plan_for_shapes(
    onnx: &tract_onnx::Onnx,
    proto: &pb::ModelProto,
    graph_inputs: &[&pb::ValueInfoProto],
    inputs: &[TensorMeta],
    opts: &LoadOptions,
    shapes: &[Vec<usize>],
) -> Result<Plan, LoadError> {
    let (typed, _) = analyse(onnx, proto, graph_inputs, inputs, opts, Some(shapes))?;
    typed.into_optimized().and_then(|m| m.into_runnable()).map_err(backend)
}

/// What tract says about a model it cannot read, analyse or plan.
fn backend(e: impl Into<anyhow::Error>) -> LoadError {
    LoadError::Backend(format!("{:#}", e.into()))
}

/// A model file without a graph.
const NO_GRAPH: &str = "the file has no graph";

fn onnx() -> tract_onnx::Onnx {
    tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true)
}

/// The symbol name of a dynamic dimension: the exporter's `dim_param`, else one made from the input and axis.
fn dim_name(v: &pb::ValueInfoProto, axis: usize) -> String {
    let param =
        tensor_type(v).and_then(|t| t.shape.as_ref()).and_then(|s| s.dim.get(axis)).and_then(|d| match &d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => Some(p.clone()),
            _ => None,
        });
    let raw = param.unwrap_or_else(|| format!("{}_{axis}", v.name));
    // tract symbols are identifiers.
    let clean: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("d_{clean}")
}

fn tensor_type(v: &pb::ValueInfoProto) -> Option<&pb::type_proto::Tensor> {
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => Some(t),
        _ => None,
    }
}

fn meta(v: &pb::ValueInfoProto) -> Result<TensorMeta, NotCarried> {
    let t = tensor_type(v).ok_or_else(|| NotCarried("not a tensor (a sequence, map or optional)".into()))?;
    let datatype = DataType::from_onnx(t.elem_type)
        .ok_or_else(|| NotCarried(format!("element type {} is not carried", t.elem_type)))?;
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
}

fn tract_datum(d: DataType) -> Option<DatumType> {
    Some(match d {
        DataType::BOOL => bool::datum_type(),
        DataType::UINT8 => u8::datum_type(),
        DataType::UINT16 => u16::datum_type(),
        DataType::UINT32 => u32::datum_type(),
        DataType::UINT64 => u64::datum_type(),
        DataType::INT8 => i8::datum_type(),
        DataType::INT16 => i16::datum_type(),
        DataType::INT32 => i32::datum_type(),
        DataType::INT64 => i64::datum_type(),
        DataType::FP16 => f16::datum_type(),
        DataType::FP32 => f32::datum_type(),
        DataType::FP64 => f64::datum_type(),
        DataType::BF16 | DataType::BYTES => return None,
    })
}

fn to_tract(t: Tn) -> Result<TValue, RunError> {
    macro_rules! tensor {
        ($v:expr) => {
            tract_onnx::prelude::Tensor::from_shape(&t.shape, &$v)
        };
    }
    let tensor = match t.data {
        TensorData::Bool(v) => tensor!(v),
        TensorData::U8(v) => tensor!(v),
        TensorData::U16(v) => tensor!(v),
        TensorData::U32(v) => tensor!(v),
        TensorData::U64(v) => tensor!(v),
        TensorData::I8(v) => tensor!(v),
        TensorData::I16(v) => tensor!(v),
        TensorData::I32(v) => tensor!(v),
        TensorData::I64(v) => tensor!(v),
        TensorData::F16(v) => tensor!(v),
        TensorData::F32(v) => tensor!(v),
        TensorData::F64(v) => tensor!(v),
        TensorData::BF16(_) | TensorData::Bytes(_) => {
            return Err(RunError::Backend("tract cannot run BF16 or BYTES tensors".into()))
        }
    };
    tensor.map(Into::into).map_err(|e| RunError::Backend(format!("{e:#}")))
}

fn from_tract(t: &tract_onnx::prelude::Tensor) -> Result<Tn, RunError> {
    macro_rules! copy {
        ($ty:ty, $variant:ident) => {
            TensorData::$variant(
                t.to_plain_array_view::<$ty>()
                    .map_err(|e| RunError::Backend(format!("{e:#}")))?
                    .iter()
                    .copied()
                    .collect(),
            )
        };
    }
    let dt = t.datum_type();
    let data = if dt == bool::datum_type() {
        copy!(bool, Bool)
    } else if dt == u8::datum_type() {
        copy!(u8, U8)
    } else if dt == u16::datum_type() {
        copy!(u16, U16)
    } else if dt == u32::datum_type() {
        copy!(u32, U32)
    } else if dt == u64::datum_type() {
        copy!(u64, U64)
    } else if dt == i8::datum_type() {
        copy!(i8, I8)
    } else if dt == i16::datum_type() {
        copy!(i16, I16)
    } else if dt == i32::datum_type() {
        copy!(i32, I32)
    } else if dt == i64::datum_type() {
        copy!(i64, I64)
    } else if dt == f16::datum_type() {
        copy!(f16, F16)
    } else if dt == f32::datum_type() {
        copy!(f32, F32)
    } else if dt == f64::datum_type() {
        copy!(f64, F64)
    } else {
        return Err(RunError::Backend(format!("tract produced a {dt:?} tensor, which the protocol does not carry")));
    };
    Ok(Tn::new(t.shape().to_vec(), data)?)
}

impl TractRunner {
    /// The plan for these inputs: cached concrete, else newly made (bounded), else symbolic.
    fn plan(&self, inputs: &[Tn]) -> Result<Plan, RunError> {
        match &self.mode {
            Mode::Symbolic { typed, symbolic, batch, plans } => {
                let (Some(sym), Some(n)) = (batch, inputs.first().and_then(|t| t.shape.first().copied())) else {
                    return Ok(symbolic.clone());
                };
                let mut plans = plans.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(p) = plans.get(&n) {
                    return Ok(p.clone());
                }
                if plans.len() >= MAX_PLANS {
                    return Ok(symbolic.clone());
                }
                let subs = HashMap::from([(sym.clone(), TDim::Val(n as i64))]);
                match typed.set_symbols(&subs).and_then(|m| m.into_optimized()).and_then(|m| m.into_runnable()) {
                    Ok(p) => {
                        plans.insert(n, p.clone());
                        Ok(p)
                    }
                    Err(e) => {
                        tracing::debug!(batch = n, error = %format!("{e:#}"), "no concrete plan; using the symbolic one");
                        Ok(symbolic.clone())
                    }
                }
            }
            Mode::PerShape { proto, inputs: metas, plans } => {
                let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape.clone()).collect();
                let mut plans = plans.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(i) = plans.iter().position(|(s, _)| *s == shapes) {
                    let hit = plans.remove(i);
                    let plan = hit.1.clone();
                    plans.push(hit);
                    return Ok(plan);
                }
                let graph = proto.graph.as_ref().ok_or_else(|| RunError::Backend(NO_GRAPH.into()))?;
                let plan = plan_for_shapes(&onnx(), proto, &fed_inputs(graph), metas, &self.opts, &shapes)
                    .map_err(|e| RunError::Backend(e.to_string()))?;
                if plans.len() >= MAX_PLANS {
                    plans.remove(0);
                }
                plans.push((shapes, plan.clone()));
                Ok(plan)
            }
        }
    }
}

impl Runner for TractRunner {
    fn run(&self, inputs: Vec<Tn>, wanted: &[usize]) -> Result<Vec<Tn>, RunError> {
        let plan = self.plan(&inputs)?;
        let values = inputs.into_iter().map(to_tract).collect::<Result<TVec<_>, _>>()?;
        let outputs = plan.run(values).map_err(|e| RunError::Backend(format!("{e:#}")))?;
        wanted
            .iter()
            .map(|&i| outputs.get(i).ok_or_else(|| RunError::NotProduced(i.to_string())).and_then(|t| from_tract(t)))
            .collect()
    }
}
