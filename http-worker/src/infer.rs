//! Open Inference Protocol request decoding and response encoding: JSON
//! tensors and the binary tensor data extension, with every check a client
//! can fail answered as a 400 that says what was wrong.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tract_onnx::prelude::{f16, Datum, TValue, TVec, Tensor};

use crate::engine::{DataType, ModelVersion, TensorMeta};

/// Runs `$body` with `$T` bound to the Rust type of a protocol datatype.
macro_rules! with_elem {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            DataType::BOOL => {
                type $T = bool;
                $body
            }
            DataType::UINT8 => {
                type $T = u8;
                $body
            }
            DataType::UINT16 => {
                type $T = u16;
                $body
            }
            DataType::UINT32 => {
                type $T = u32;
                $body
            }
            DataType::UINT64 => {
                type $T = u64;
                $body
            }
            DataType::INT8 => {
                type $T = i8;
                $body
            }
            DataType::INT16 => {
                type $T = i16;
                $body
            }
            DataType::INT32 => {
                type $T = i32;
                $body
            }
            DataType::INT64 => {
                type $T = i64;
                $body
            }
            DataType::FP16 => {
                type $T = f16;
                $body
            }
            DataType::FP32 => {
                type $T = f32;
                $body
            }
            DataType::FP64 => {
                type $T = f64;
                $body
            }
            DataType::BYTES => return Err(ApiError::bad("BYTES tensors are not supported by this engine")),
        }
    };
}

/// Header giving the length of the JSON part of a binary-extension body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An error answered as `{"error": "..."}` with a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

/// One input tensor of a request.
#[derive(Debug, Deserialize)]
pub struct RequestInput {
    /// Input name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Datatype name.
    pub datatype: String,
    /// `binary_data_size` and friends.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Row-major data (possibly nested); absent when sent as binary.
    #[serde(default)]
    pub data: Option<Value>,
}

/// One requested output.
#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    /// Output name.
    pub name: String,
    /// `binary_data`, `classification`.
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// An inference request.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    /// Request id, echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// `binary_data_output` and friends.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Input tensors.
    pub inputs: Vec<RequestInput>,
    /// Requested outputs; all outputs when absent.
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

/// Splits a body into the JSON request and the binary tail.
pub fn decode_body<'a>(body: &'a [u8], header_len: Option<&str>) -> Result<(InferRequest, &'a [u8]), ApiError> {
    let json_len = match header_len {
        None => body.len(),
        Some(v) => {
            let n: usize = v
                .trim()
                .parse()
                .map_err(|_| ApiError::bad(format!("Inference-Header-Content-Length {v:?} is not a byte count")))?;
            if n > body.len() {
                return Err(ApiError::bad(format!(
                    "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                    body.len()
                )));
            }
            n
        }
    };
    let (json, binary) = body.split_at(json_len);
    let req: InferRequest =
        serde_json::from_slice(json).map_err(|e| ApiError::bad(format!("malformed inference request JSON: {e}")))?;
    Ok((req, binary))
}

/// Elements a tensor of `shape` holds.
fn element_count(name: &str, shape: &[usize]) -> Result<usize, ApiError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ApiError::bad(format!("input {name}: shape {shape:?} is too large")))
}

/// Checks a request shape against the model's; returns it as sizes.
fn check_shape(meta: &TensorMeta, shape: &[i64], max_batch: usize) -> Result<Vec<usize>, ApiError> {
    let name = &meta.name;
    if shape.iter().any(|&d| d < 0) {
        return Err(ApiError::bad(format!("input {name}: shape {shape:?} has a negative dimension")));
    }
    if !meta.shape.is_empty() {
        let fits = shape.len() == meta.shape.len() && meta.shape.iter().zip(shape).all(|(&m, &s)| m == -1 || m == s);
        if !fits {
            return Err(ApiError::bad(format!(
                "input {name}: shape {shape:?} does not match the model's {:?} (-1 is any size)",
                meta.shape
            )));
        }
    }
    if max_batch > 0 {
        let batch = shape.first().copied().unwrap_or(0);
        if batch < 1 || batch as usize > max_batch {
            return Err(ApiError::bad(format!("input {name}: batch size {batch} is outside 1..={max_batch}")));
        }
    }
    Ok(shape.iter().map(|&d| d as usize).collect())
}

/// The model's inputs in graph order, built from the request.
pub fn build_inputs(model: &ModelVersion, req: &InferRequest, binary: &[u8]) -> Result<TVec<TValue>, ApiError> {
    for (i, input) in req.inputs.iter().enumerate() {
        if !model.inputs.iter().any(|m| m.name == input.name) {
            let known: Vec<&str> = model.inputs.iter().map(|m| m.name.as_str()).collect();
            return Err(ApiError::bad(format!("unknown input {:?}; the model takes {known:?}", input.name)));
        }
        if req.inputs[..i].iter().any(|o| o.name == input.name) {
            return Err(ApiError::bad(format!("input {:?} is given twice", input.name)));
        }
    }
    // Binary parts follow the order of the request's inputs.
    let mut cursor = 0usize;
    let mut tensors: Vec<(usize, Tensor)> = Vec::with_capacity(req.inputs.len());
    for input in &req.inputs {
        let index = model.inputs.iter().position(|m| m.name == input.name).unwrap_or_default();
        let meta = &model.inputs[index];
        let datatype = DataType::parse(&input.datatype)
            .ok_or_else(|| ApiError::bad(format!("input {}: unknown datatype {:?}", input.name, input.datatype)))?;
        if datatype != meta.datatype {
            return Err(ApiError::bad(format!(
                "input {}: datatype {datatype} does not match the model's {}",
                input.name, meta.datatype
            )));
        }
        let shape = check_shape(meta, &input.shape, model.max_batch_size)?;
        let count = element_count(&input.name, &shape)?;
        let tensor = match input.parameters.get("binary_data_size") {
            Some(size) => {
                let size = size.as_u64().ok_or_else(|| {
                    ApiError::bad(format!("input {}: binary_data_size must be a byte count", input.name))
                })? as usize;
                let want = count * datatype.size();
                if size != want {
                    return Err(ApiError::bad(format!(
                        "input {}: binary_data_size is {size} but shape {shape:?} of {datatype} needs {want} bytes",
                        input.name
                    )));
                }
                let end = cursor.checked_add(size).filter(|&e| e <= binary.len()).ok_or_else(|| {
                    ApiError::bad(format!(
                        "input {}: binary data ends after {} bytes, {size} more were promised",
                        input.name,
                        binary.len() - cursor
                    ))
                })?;
                let bytes = &binary[cursor..end];
                cursor = end;
                with_elem!(datatype, T => from_le::<T>(&shape, bytes))
            }
            None => {
                let data = input
                    .data
                    .as_ref()
                    .ok_or_else(|| ApiError::bad(format!("input {}: neither data nor binary_data_size", input.name)))?;
                with_elem!(datatype, T => from_json::<T>(&input.name, &shape, count, data)?)
            }
        }
        .map_err(|e| ApiError::bad(format!("input {}: {e}", input.name)))?;
        tensors.push((index, tensor));
    }
    if cursor != binary.len() {
        return Err(ApiError::bad(format!(
            "binary data has {} bytes that no input claims (binary_data_size values add up to {cursor})",
            binary.len() - cursor
        )));
    }
    if let Some(missing) = model.inputs.iter().enumerate().find(|(i, _)| !tensors.iter().any(|(j, _)| j == i)) {
        return Err(ApiError::bad(format!("missing input {:?}", missing.1.name)));
    }
    tensors.sort_by_key(|(i, _)| *i);
    Ok(tensors.into_iter().map(|(_, t)| t.into()).collect())
}

/// Encodes the response: JSON, plus a binary tail when any output asked for it.
/// Returns the body and, for binary responses, the JSON part's length.
pub fn encode_response(
    model: &ModelVersion,
    req: &InferRequest,
    outputs: &TVec<TValue>,
) -> Result<(Vec<u8>, Option<usize>), ApiError> {
    let all_binary = req.parameters.get("binary_data_output").and_then(Value::as_bool).unwrap_or(false);
    let requested: Vec<(usize, bool, Option<usize>)> = match &req.outputs {
        None => (0..model.outputs.len()).map(|i| (i, all_binary, None)).collect(),
        Some(list) => list
            .iter()
            .map(|o| {
                let i = model.outputs.iter().position(|m| m.name == o.name).ok_or_else(|| {
                    let known: Vec<&str> = model.outputs.iter().map(|m| m.name.as_str()).collect();
                    ApiError::bad(format!("unknown output {:?}; the model has {known:?}", o.name))
                })?;
                let binary = o.parameters.get("binary_data").and_then(Value::as_bool).unwrap_or(all_binary);
                let class = match o.parameters.get("classification") {
                    None => None,
                    Some(v) => Some(v.as_u64().filter(|&k| k > 0).ok_or_else(|| {
                        ApiError::bad(format!("output {}: classification must be a positive count", o.name))
                    })? as usize),
                };
                Ok((i, binary, class))
            })
            .collect::<Result<_, ApiError>>()?,
    };
    let mut tail = Vec::new();
    let mut json_outputs = Vec::with_capacity(requested.len());
    for (i, binary, class) in requested {
        let meta = &model.outputs[i];
        let tensor: &Tensor = &outputs[i];
        let (datatype, shape, data) = match class {
            Some(k) => {
                let (shape, labels) = classify(tensor, meta.datatype, k, &model.labels)?;
                (DataType::BYTES, shape, OutData::Bytes(labels))
            }
            None => (meta.datatype, tensor.shape().to_vec(), with_elem!(meta.datatype, T => to_out::<T>(tensor))?),
        };
        let mut out = ResponseOutput { name: meta.name.clone(), datatype, shape, data: None, parameters: None };
        if binary {
            let before = tail.len();
            data.write_le(&mut tail);
            out.parameters = Some(serde_json::json!({ "binary_data_size": tail.len() - before }));
        } else {
            out.data = Some(data);
        }
        json_outputs.push(out);
    }
    let response = InferResponse {
        model_name: &model.name,
        model_version: &model.version,
        id: req.id.as_deref(),
        outputs: json_outputs,
    };
    let mut body = serde_json::to_vec(&response).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("cannot encode the response: {e}"),
    })?;
    if tail.is_empty() {
        return Ok((body, None));
    }
    let json_len = body.len();
    body.extend_from_slice(&tail);
    Ok((body, Some(json_len)))
}

/// Top-`k` classes per batch row as Triton's `"score:index[:label]"` strings.
fn classify(t: &Tensor, dt: DataType, k: usize, labels: &[String]) -> Result<(Vec<usize>, Vec<String>), ApiError> {
    let scores: Vec<f64> = with_elem!(dt, T => to_out::<T>(t))?.as_f64();
    let (rows, classes) = match t.shape() {
        [] => (1, 1),
        [n] => (1, *n),
        [b, rest @ ..] => (*b, rest.iter().product()),
    };
    let k = k.min(classes.max(1));
    let mut out = Vec::with_capacity(rows * k);
    for row in scores.chunks(classes.max(1)) {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &i in idx.iter().take(k) {
            match labels.get(i) {
                Some(l) => out.push(format!("{}:{i}:{l}", row[i])),
                None => out.push(format!("{}:{i}", row[i])),
            }
        }
    }
    let shape = if t.rank() >= 2 { vec![rows, k] } else { vec![k] };
    Ok((shape, out))
}

#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<ResponseOutput>,
}

#[derive(Serialize)]
struct ResponseOutput {
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<OutData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

/// Output values, typed so JSON shows the shortest exact form of each number.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum OutData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f32>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<String>),
}

impl OutData {
    fn as_f64(&self) -> Vec<f64> {
        fn conv<T: Copy + Into<f64>>(v: &[T]) -> Vec<f64> {
            v.iter().map(|&x| x.into()).collect()
        }
        match self {
            OutData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
            OutData::U8(v) => conv(v),
            OutData::U16(v) => conv(v),
            OutData::U32(v) => conv(v),
            OutData::U64(v) => v.iter().map(|&x| x as f64).collect(),
            OutData::I8(v) => conv(v),
            OutData::I16(v) => conv(v),
            OutData::I32(v) => conv(v),
            OutData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            OutData::F16(v) | OutData::F32(v) => conv(v),
            OutData::F64(v) => v.clone(),
            OutData::Bytes(_) => Vec::new(),
        }
    }

    /// Appends the binary tensor encoding (little-endian; BYTES length-prefixed).
    fn write_le(&self, out: &mut Vec<u8>) {
        macro_rules! le {
            ($v:expr) => {
                for x in $v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            };
        }
        match self {
            OutData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
            OutData::U8(v) => out.extend_from_slice(v),
            OutData::U16(v) => le!(v),
            OutData::U32(v) => le!(v),
            OutData::U64(v) => le!(v),
            OutData::I8(v) => le!(v),
            OutData::I16(v) => le!(v),
            OutData::I32(v) => le!(v),
            OutData::I64(v) => le!(v),
            OutData::F16(v) => {
                for x in v {
                    out.extend_from_slice(&f16::from_f32(*x).to_le_bytes());
                }
            }
            OutData::F32(v) => le!(v),
            OutData::F64(v) => le!(v),
            OutData::Bytes(v) => {
                for s in v {
                    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
    }
}

/// A tensor element type the protocol can carry.
trait Elem: Datum + Copy {
    const SIZE: usize;
    fn from_json(v: &Value) -> Option<Self>;
    fn from_le(b: &[u8]) -> Self;
    fn out(v: Vec<Self>) -> OutData;
}

macro_rules! int_elem {
    ($($t:ty => $variant:ident),*) => {$(
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_json(v: &Value) -> Option<Self> {
                match v {
                    Value::Number(n) => n
                        .as_i64()
                        .and_then(|i| <$t>::try_from(i).ok())
                        .or_else(|| n.as_u64().and_then(|u| <$t>::try_from(u).ok())),
                    Value::Bool(b) => <$t>::try_from(u8::from(*b)).ok(),
                    _ => None,
                }
            }
            fn from_le(b: &[u8]) -> Self {
                <[u8; std::mem::size_of::<$t>()]>::try_from(b).map(<$t>::from_le_bytes).unwrap_or_default()
            }
            fn out(v: Vec<Self>) -> OutData {
                OutData::$variant(v)
            }
        }
    )*};
}
int_elem!(u8 => U8, u16 => U16, u32 => U32, u64 => U64, i8 => I8, i16 => I16, i32 => I32, i64 => I64);

impl Elem for bool {
    const SIZE: usize = 1;
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) => n.as_u64().filter(|&n| n <= 1).map(|n| n == 1),
            _ => None,
        }
    }
    fn from_le(b: &[u8]) -> Self {
        b.first().is_some_and(|&x| x != 0)
    }
    fn out(v: Vec<Self>) -> OutData {
        OutData::Bool(v)
    }
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn from_json(v: &Value) -> Option<Self> {
        v.as_f64().map(|f| f as f32)
    }
    fn from_le(b: &[u8]) -> Self {
        <[u8; 4]>::try_from(b).map(f32::from_le_bytes).unwrap_or_default()
    }
    fn out(v: Vec<Self>) -> OutData {
        OutData::F32(v)
    }
}

impl Elem for f64 {
    const SIZE: usize = 8;
    fn from_json(v: &Value) -> Option<Self> {
        v.as_f64()
    }
    fn from_le(b: &[u8]) -> Self {
        <[u8; 8]>::try_from(b).map(f64::from_le_bytes).unwrap_or_default()
    }
    fn out(v: Vec<Self>) -> OutData {
        OutData::F64(v)
    }
}

impl Elem for f16 {
    const SIZE: usize = 2;
    fn from_json(v: &Value) -> Option<Self> {
        v.as_f64().map(f16::from_f64)
    }
    fn from_le(b: &[u8]) -> Self {
        <[u8; 2]>::try_from(b).map(f16::from_le_bytes).unwrap_or(f16::ZERO)
    }
    fn out(v: Vec<Self>) -> OutData {
        OutData::F16(v.into_iter().map(f32::from).collect())
    }
}

fn from_le<T: Elem>(shape: &[usize], bytes: &[u8]) -> Result<Tensor, String> {
    let values: Vec<T> = bytes.chunks_exact(T::SIZE).map(T::from_le).collect();
    Tensor::from_shape(shape, &values).map_err(|e| e.to_string())
}

fn from_json<T: Elem>(
    name: &str,
    shape: &[usize],
    count: usize,
    data: &Value,
) -> Result<Result<Tensor, String>, ApiError> {
    let mut values: Vec<T> = Vec::with_capacity(count.min(1 << 24));
    let mut bad: Option<String> = None;
    flatten(data, &mut |v| {
        if bad.is_some() {
            return;
        }
        match T::from_json(v) {
            Some(x) => values.push(x),
            None => bad = Some(format!("input {name}: element {} ({v}) is not a valid {}", values.len(), T::name())),
        }
    });
    if let Some(msg) = bad {
        return Err(ApiError::bad(msg));
    }
    if values.len() != count {
        return Err(ApiError::bad(format!(
            "input {name}: shape {shape:?} needs {count} elements but data has {}",
            values.len()
        )));
    }
    Ok(Tensor::from_shape(shape, &values).map_err(|e| e.to_string()))
}

/// Visits the leaves of nested arrays in row-major order.
fn flatten(v: &Value, f: &mut impl FnMut(&Value)) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, f)),
        leaf => f(leaf),
    }
}

fn to_out<T: Elem>(t: &Tensor) -> Result<OutData, ApiError> {
    let view = t.to_plain_array_view::<T>().map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("output has an unexpected type: {e}"),
    })?;
    Ok(T::out(view.iter().copied().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use std::path::Path;
    use std::sync::Arc;

    fn digits() -> Arc<ModelVersion> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let engine = Engine::load(&repo, 1).expect("load");
        engine.models["digits"].version(None).expect("v").clone()
    }

    fn request(json: &str, binary: &[u8]) -> Result<TVec<TValue>, ApiError> {
        let m = digits();
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(binary);
        let len = json.len().to_string();
        let (req, bin) = decode_body(&body, if binary.is_empty() { None } else { Some(&len) })?;
        build_inputs(&m, &req, bin)
    }

    fn pixels(n: usize) -> String {
        format!("[{}]", vec!["1"; n].join(","))
    }

    #[test]
    fn json_tensor_decodes_flat_and_nested() {
        let flat =
            format!(r#"{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":{}}}]}}"#, pixels(64));
        assert_eq!(request(&flat, b"").expect("flat")[0].shape(), &[1, 64]);
        let nested = format!(
            r#"{{"inputs":[{{"name":"pixels","shape":[2,64],"datatype":"FP32","data":[{},{}]}}]}}"#,
            pixels(64),
            pixels(64)
        );
        assert_eq!(request(&nested, b"").expect("nested")[0].shape(), &[2, 64]);
    }

    #[test]
    fn every_client_mistake_is_a_400_naming_it() {
        let cases = [
            (r#"{"inputs": ["#.to_string(), "malformed"),
            (
                format!(r#"{{"inputs":[{{"name":"nope","shape":[1,64],"datatype":"FP32","data":{}}}]}}"#, pixels(64)),
                "unknown input",
            ),
            (
                format!(r#"{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP64","data":{}}}]}}"#, pixels(64)),
                "datatype FP64",
            ),
            (
                format!(r#"{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":{}}}]}}"#, pixels(63)),
                "needs 64 elements",
            ),
            (
                format!(r#"{{"inputs":[{{"name":"pixels","shape":[1,63],"datatype":"FP32","data":{}}}]}}"#, pixels(63)),
                "does not match",
            ),
            (
                format!(
                    r#"{{"inputs":[{{"name":"pixels","shape":[1000,64],"datatype":"FP32","data":{}}}]}}"#,
                    pixels(64)
                ),
                "batch size",
            ),
            (
                r#"{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","data":["a"]}]}"#.to_string(),
                "not a valid",
            ),
            (r#"{"inputs":[]}"#.to_string(), "missing input"),
            (r#"{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32"}]}"#.to_string(), "neither data"),
            (
                r#"{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"WAT","data":[]}]}"#.to_string(),
                "unknown datatype",
            ),
        ];
        for (json, want) in cases {
            let err = request(&json, b"").expect_err(&json);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.contains(want), "{want:?} not in {:?}", err.message);
        }
    }

    #[test]
    fn binary_framing_must_add_up() {
        let json =
            r#"{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","parameters":{"binary_data_size":256}}]}"#;
        let ok = vec![0u8; 256];
        assert_eq!(request(json, &ok).expect("binary")[0].shape(), &[1, 64]);
        let err = request(json, &ok[..100]).expect_err("short");
        assert!(err.message.contains("more were promised"), "{}", err.message);
        let mut long = ok.clone();
        long.extend_from_slice(&[0; 4]);
        assert!(request(json, &long).expect_err("long").message.contains("no input claims"));
        let wrong = json.replace("256", "255");
        assert!(request(&wrong, &ok[..255]).expect_err("size").message.contains("needs 256 bytes"));
        let body = b"{}";
        assert!(decode_body(body, Some("10")).is_err_and(|e| e.message.contains("only 2 bytes")));
        assert!(decode_body(body, Some("x")).is_err());
    }

    fn decode_json(dt: DataType, data: &Value) -> Result<Tensor, ApiError> {
        with_elem!(dt, T => from_json::<T>("x", &[2], 2, data)?).map_err(ApiError::bad)
    }

    fn decode_le(dt: DataType, bytes: &[u8]) -> Result<Tensor, ApiError> {
        with_elem!(dt, T => from_le::<T>(&[2], bytes)).map_err(ApiError::bad)
    }

    fn encode(dt: DataType, t: &Tensor) -> Result<OutData, ApiError> {
        with_elem!(dt, T => to_out::<T>(t))
    }

    #[test]
    fn every_datatype_round_trips_through_both_encodings() {
        for (dt, json) in [
            (DataType::BOOL, "[true,false]"),
            (DataType::UINT8, "[0,255]"),
            (DataType::UINT16, "[0,65535]"),
            (DataType::UINT32, "[0,4294967295]"),
            (DataType::UINT64, "[0,18446744073709551615]"),
            (DataType::INT8, "[-128,127]"),
            (DataType::INT16, "[-32768,32767]"),
            (DataType::INT32, "[-2147483648,2147483647]"),
            (DataType::INT64, "[-9223372036854775808,9223372036854775807]"),
            (DataType::FP16, "[0.5,-2.0]"),
            (DataType::FP32, "[0.25,-1.5]"),
            (DataType::FP64, "[0.1,-1e+300]"),
        ] {
            let data: Value = serde_json::from_str(json).expect("json");
            let t = decode_json(dt, &data).expect("decode");
            let out = encode(dt, &t).expect("encode");
            assert_eq!(serde_json::to_string(&out).expect("ser").replace(".0", ""), json.replace(".0", ""), "{dt}");
            let mut le = Vec::new();
            out.write_le(&mut le);
            assert_eq!(le.len(), 2 * dt.size(), "{dt}");
            assert_eq!(decode_le(dt, &le).expect("from_le"), t, "{dt}");
        }
        // Out of range for the type is refused, not wrapped.
        let data: Value = serde_json::from_str("[256]").expect("json");
        assert!(from_json::<u8>("x", &[1], 1, &data).is_err());
    }

    #[test]
    fn classification_returns_top_k_with_labels() {
        let m = digits();
        let probs: Vec<f32> = (0..10).map(|i| if i == 7 { 0.9 } else { 0.01 }).collect();
        let outputs: TVec<TValue> = std::iter::once(Tensor::from_shape(&[1, 10], &probs).expect("t").into()).collect();
        let req: InferRequest = serde_json::from_str(
            r#"{"id":"r1","inputs":[],"outputs":[{"name":"probabilities","parameters":{"classification":2}}]}"#,
        )
        .expect("req");
        let (body, len) = encode_response(&m, &req, &outputs).expect("encode");
        assert!(len.is_none());
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["id"], "r1");
        assert_eq!(v["outputs"][0]["datatype"], "BYTES");
        assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 2]));
        assert!(v["outputs"][0]["data"][0].as_str().expect("str").ends_with(":7:7"), "{v}");
    }
}
