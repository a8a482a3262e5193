//! Open Inference Protocol request decoding and response encoding: JSON
//! tensors and the binary tensor data extension for every datatype (BYTES as
//! length-prefixed strings), with every check a client can fail answered as a
//! 400 that says what was wrong; and tensors read from or written to a
//! system shared-memory region instead of the body ([`SharedMemory`]).

use axum::http::StatusCode;
use half::{bf16, f16};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::engine::tensor::{DataType, Tensor, TensorData};
use crate::engine::{ModelVersion, TensorMeta};
use crate::nonfinite::Element;

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

    /// A 500 with `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into() }
    }

    /// A 503 with `message` (the answer gets `Retry-After`).
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into() }
    }
}

/// Where tensors that name a system shared-memory region are read and
/// written: the worker's registry (`crate::system_shm::SystemShm`), or
/// [`NoSharedMemory`] where the extension is off. Errors say what was wrong.
pub trait SharedMemory {
    /// `len` bytes from `offset` of region `region`.
    fn read(&self, region: &str, offset: u64, len: u64) -> Result<Vec<u8>, String>;
    /// `bytes` at `offset` of region `region`.
    fn write(&self, region: &str, offset: u64, bytes: &[u8]) -> Result<(), String>;
}

/// No system shared memory (`SYSTEM_SHARED_MEMORY=false`): every use is refused, saying how to allow it.
pub struct NoSharedMemory;

/// Why a region cannot be used while the extension is off.
pub const SHARED_MEMORY_OFF: &str =
    "system shared memory is off on this server (SYSTEM_SHARED_MEMORY=true lets local clients register regions)";

impl SharedMemory for NoSharedMemory {
    fn read(&self, _: &str, _: u64, _: u64) -> Result<Vec<u8>, String> {
        Err(SHARED_MEMORY_OFF.into())
    }
    fn write(&self, _: &str, _: u64, _: &[u8]) -> Result<(), String> {
        Err(SHARED_MEMORY_OFF.into())
    }
}

/// A tensor's place in a shared-memory region: the parameters
/// `shared_memory_region`, `shared_memory_byte_size` and `shared_memory_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InRegion {
    /// The region's registered name.
    pub region: String,
    /// Where in the region.
    pub offset: u64,
    /// How many bytes (an input's exact size; an output's room).
    pub byte_size: u64,
}

impl InRegion {
    /// The place `params` give for the `kind` ("input" or "output") called
    /// `name`, if any (the two words are joined only for an error message:
    /// this runs for every tensor of every request).
    fn of(kind: &str, name: &str, params: &Map<String, Value>) -> Result<Option<InRegion>, ApiError> {
        let what = format_args!("{kind} {name}");
        let count = |key: &str| -> Result<Option<u64>, ApiError> {
            params
                .get(key)
                .map(|v| {
                    v.as_u64().ok_or_else(|| ApiError::bad(format!("{what}: {key} must be a byte count, not {v}")))
                })
                .transpose()
        };
        let (byte_size, offset) = (count("shared_memory_byte_size")?, count("shared_memory_offset")?);
        let Some(region) = params.get("shared_memory_region") else {
            if byte_size.is_some() || offset.is_some() {
                return Err(ApiError::bad(format!(
                    "{what}: shared_memory_byte_size and shared_memory_offset need shared_memory_region"
                )));
            }
            return Ok(None);
        };
        let region =
            region.as_str().ok_or_else(|| ApiError::bad(format!("{what}: shared_memory_region must be a name")))?;
        let byte_size = byte_size.ok_or_else(|| {
            ApiError::bad(format!("{what}: shared_memory_region {region:?} needs shared_memory_byte_size"))
        })?;
        Ok(Some(InRegion { region: region.to_string(), offset: offset.unwrap_or(0), byte_size }))
    }
}

/// Bytes a request's inputs read from shared memory (what decoding them will
/// hold in memory, counted against the worker's budget before it starts);
/// a malformed place is refused here already, as decoding would.
pub fn shared_input_bytes(req: &InferRequest) -> Result<u64, ApiError> {
    let mut total = 0u64;
    for i in &req.inputs {
        if let Some(place) = InRegion::of("input", &i.name, &i.parameters)? {
            total = total.saturating_add(place.byte_size);
        }
    }
    Ok(total)
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
    /// Row-major data (possibly nested), as its JSON text: decoded only once
    /// the datatype and shape are known, straight into the tensor's buffer
    /// (never a tree of JSON values, whose memory is many times the tensor's);
    /// absent when sent as binary or in shared memory.
    #[serde(default)]
    pub data: Option<Box<serde_json::value::RawValue>>,
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
    /// Whether the JSON wrote non-finite numbers bare (`NaN`, `Infinity`),
    /// now marked strings that only float data accepts ([`crate::nonfinite`]).
    #[serde(skip)]
    pub non_finite: bool,
}

/// The error for an input named twice in one request (either face).
pub(crate) fn given_twice(name: &str) -> ApiError {
    ApiError::bad(format!("input {name:?} is given twice"))
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
    let quoted = crate::nonfinite::quote_tokens(json);
    let mut req: InferRequest = serde_json::from_slice(quoted.as_deref().unwrap_or(json)).map_err(|e| {
        let e = crate::nonfinite::unquoted(e.to_string());
        ApiError::bad(format!("malformed inference request JSON: {e}"))
    })?;
    req.non_finite = quoted.is_some();
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
    let fits = shape.len() == meta.shape.len() && meta.shape.iter().zip(shape).all(|(&m, &s)| m == -1 || m == s);
    if !fits {
        return Err(ApiError::bad(format!(
            "input {name}: shape {shape:?} does not match the model's {:?} (-1 is any size)",
            meta.shape
        )));
    }
    if max_batch > 0 {
        let batch = shape.first().copied().unwrap_or(0);
        if batch < 1 || batch as usize > max_batch {
            return Err(ApiError::bad(format!("input {name}: batch size {batch} is outside 1..={max_batch}")));
        }
    }
    Ok(shape.iter().map(|&d| d as usize).collect())
}

/// The model's inputs in its order, built from the request.
pub fn build_inputs(
    model: &ModelVersion,
    req: &InferRequest,
    binary: &[u8],
    shm: &dyn SharedMemory,
) -> Result<Vec<Tensor>, ApiError> {
    decode_inputs(&model.inputs, model.max_batch_size, req, binary, shm)
}

/// The inputs `metas` describes (in their order), built from the request; the
/// part of [`build_inputs`] that needs no loaded model (fuzzed on its own).
pub fn decode_inputs(
    metas: &[TensorMeta],
    max_batch_size: usize,
    req: &InferRequest,
    binary: &[u8],
    shm: &dyn SharedMemory,
) -> Result<Vec<Tensor>, ApiError> {
    for (i, input) in req.inputs.iter().enumerate() {
        if !metas.iter().any(|m| m.name == input.name) {
            let known: Vec<&str> = metas.iter().map(|m| m.name.as_str()).collect();
            return Err(ApiError::bad(format!("unknown input {:?}; the model takes {known:?}", input.name)));
        }
        if req.inputs[..i].iter().any(|o| o.name == input.name) {
            return Err(given_twice(&input.name));
        }
    }
    if let Some(missing) = metas.iter().find(|m| !req.inputs.iter().any(|i| i.name == m.name)) {
        return Err(ApiError::bad(format!("missing input {:?}", missing.name)));
    }
    // Binary parts follow the order of the request's inputs.
    let mut cursor = 0usize;
    let mut tensors: Vec<(usize, Tensor)> = Vec::with_capacity(req.inputs.len());
    let mut batch: Option<(usize, &str)> = None;
    for input in &req.inputs {
        let index = metas.iter().position(|m| m.name == input.name).unwrap_or_default();
        let meta = &metas[index];
        let name = &input.name;
        let datatype = DataType::parse(&input.datatype)
            .ok_or_else(|| ApiError::bad(format!("input {name}: unknown datatype {:?}", input.datatype)))?;
        if datatype != meta.datatype {
            return Err(ApiError::bad(format!(
                "input {name}: datatype {datatype} does not match the model's {}",
                meta.datatype
            )));
        }
        let shape = check_shape(meta, &input.shape, max_batch_size)?;
        if max_batch_size > 0 {
            match batch {
                None => batch = Some((shape[0], name)),
                Some((b, first)) if b != shape[0] => {
                    return Err(ApiError::bad(format!(
                        "input {name}: batch size {} differs from input {first}'s {b}",
                        shape[0]
                    )))
                }
                Some(_) => {}
            }
        }
        let count = element_count(name, &shape)?;
        let data = match (InRegion::of("input", name, &input.parameters)?, input.parameters.get("binary_data_size")) {
            (Some(place), size) => {
                if size.is_some() || input.data.is_some() {
                    return Err(ApiError::bad(format!(
                        "input {name}: its data is in shared-memory region {:?}; it cannot also come in the body",
                        place.region
                    )));
                }
                if datatype != DataType::BYTES {
                    let want = count.saturating_mul(datatype.size()) as u64;
                    if place.byte_size != want {
                        return Err(ApiError::bad(format!(
                            "input {name}: shared_memory_byte_size is {} but shape {shape:?} of {datatype} needs {want} bytes",
                            place.byte_size
                        )));
                    }
                }
                let bytes = shm
                    .read(&place.region, place.offset, place.byte_size)
                    .map_err(|e| ApiError::bad(format!("input {name}: {e}")))?;
                from_binary(name, datatype, count, &bytes)?
            }
            (None, Some(size)) => {
                let size = size
                    .as_u64()
                    .ok_or_else(|| ApiError::bad(format!("input {name}: binary_data_size must be a byte count")))?
                    as usize;
                if datatype != DataType::BYTES {
                    let want = count.saturating_mul(datatype.size());
                    if size != want {
                        return Err(ApiError::bad(format!(
                            "input {name}: binary_data_size is {size} but shape {shape:?} of {datatype} needs {want} bytes"
                        )));
                    }
                }
                let end = cursor.checked_add(size).filter(|&e| e <= binary.len()).ok_or_else(|| {
                    ApiError::bad(format!(
                        "input {name}: binary data ends after {} bytes, {size} more were promised",
                        binary.len() - cursor
                    ))
                })?;
                let bytes = &binary[cursor..end];
                cursor = end;
                from_binary(name, datatype, count, bytes)?
            }
            (None, None) => {
                let data = input
                    .data
                    .as_ref()
                    .ok_or_else(|| ApiError::bad(format!("input {name}: neither data nor binary_data_size")))?;
                from_json(name, datatype, count, data, req.non_finite)?
            }
        };
        let tensor = Tensor::new(shape, data).map_err(|e| ApiError::bad(format!("input {name}: {e}")))?;
        tensors.push((index, tensor));
    }
    if cursor != binary.len() {
        return Err(ApiError::bad(format!(
            "binary data has {} bytes that no input claims (binary_data_size values add up to {cursor})",
            binary.len() - cursor
        )));
    }
    tensors.sort_by_key(|(i, _)| *i);
    Ok(tensors.into_iter().map(|(_, t)| t).collect())
}

/// One output to return: its index in the model's outputs, binary or JSON,
/// top-k classification, or written to a shared-memory region.
#[derive(Debug, Clone)]
pub struct Requested {
    /// Index into [`ModelVersion::outputs`].
    pub index: usize,
    /// Binary tensor data instead of JSON.
    pub binary: bool,
    /// Top-k classification instead of the tensor.
    pub classes: Option<usize>,
    /// Written to this region instead of the answer.
    pub place: Option<InRegion>,
}

/// The outputs a request asks for (all tensor outputs when it names none), checked before running.
pub fn requested_outputs(model: &ModelVersion, req: &InferRequest) -> Result<Vec<Requested>, ApiError> {
    let all_binary = flag(&req.parameters, "binary_data_output")?.unwrap_or(false);
    let Some(list) = &req.outputs else {
        return Ok((0..model.outputs.len())
            .map(|index| Requested { index, binary: all_binary, classes: None, place: None })
            .collect());
    };
    let mut out: Vec<Requested> = Vec::with_capacity(list.len());
    for o in list {
        let Some(index) = model.outputs.iter().position(|m| m.name == o.name) else {
            if let Some((_, what)) = model.unsupported_outputs.iter().find(|(n, _)| *n == o.name) {
                return Err(ApiError::bad(format!(
                    "output {} is {what}, which the protocol cannot carry; ask for the model's tensor outputs instead",
                    o.name
                )));
            }
            let known: Vec<&str> = model.outputs.iter().map(|m| m.name.as_str()).collect();
            return Err(ApiError::bad(format!("unknown output {:?}; the model has {known:?}", o.name)));
        };
        if out.iter().any(|r| r.index == index) {
            return Err(ApiError::bad(format!("output {:?} is asked for twice", o.name)));
        }
        let binary = flag(&o.parameters, "binary_data")?.unwrap_or(all_binary);
        let classes =
            match o.parameters.get("classification") {
                None => None,
                Some(v) => Some(v.as_u64().filter(|&k| k > 0).ok_or_else(|| {
                    ApiError::bad(format!("output {}: classification must be a positive count", o.name))
                })? as usize),
            };
        if classes.is_some() && model.outputs[index].datatype == DataType::BYTES {
            return Err(ApiError::bad(format!("output {}: BYTES outputs cannot be classified", o.name)));
        }
        let place = InRegion::of("output", &o.name, &o.parameters)?;
        out.push(Requested { index, binary, classes, place });
    }
    Ok(out)
}

fn flag(params: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match params.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::bad(format!("parameter {key} must be true or false, not {other}"))),
    }
}

/// Encodes the response: JSON, plus a binary tail when any output asked for it.
/// `outputs` are the tensors of `requested`, in its order. Returns the body and,
/// for binary responses, the JSON part's length.
pub fn encode_response(
    model: &ModelVersion,
    req: &InferRequest,
    requested: &[Requested],
    outputs: Vec<Tensor>,
    shm: &dyn SharedMemory,
) -> Result<(Vec<u8>, Option<usize>), ApiError> {
    let mut binary: Vec<TensorData> = Vec::new();
    let mut json_outputs = Vec::with_capacity(requested.len());
    for (r, tensor) in requested.iter().zip(outputs) {
        let meta = &model.outputs[r.index];
        let tensor = answered(model, r, tensor)?;
        let mut out = ResponseOutput {
            name: &meta.name,
            datatype: tensor.datatype(),
            shape: tensor.shape,
            data: None,
            parameters: None,
        };
        if let Some(place) = &r.place {
            // As Triton's HTTP face: no data and no parameters (clients such as
            // perf_analyzer read any output parameters as binary_data_size).
            to_region(shm, &meta.name, place, &tensor.data)?;
        } else if r.binary {
            out.parameters = Some(serde_json::json!({ "binary_data_size": binary_size(&tensor.data) }));
            binary.push(tensor.data);
        } else {
            out.data = Some(JsonData(tensor.data));
        }
        json_outputs.push(out);
    }
    let response = InferResponse {
        model_name: &model.name,
        model_version: &model.version,
        id: req.id.as_deref(),
        outputs: json_outputs,
    };
    let mut body =
        serde_json::to_vec(&response).map_err(|e| ApiError::internal(format!("cannot encode the response: {e}")))?;
    if binary.is_empty() {
        return Ok((body, None));
    }
    // The binary parts go straight after the JSON: one copy of each output.
    let json_len = body.len();
    body.reserve(binary.iter().map(binary_size).sum());
    for data in &binary {
        write_binary(data, &mut body);
    }
    Ok((body, Some(json_len)))
}

/// Writes output `name`'s bytes (as the binary extension lays them out) to
/// `place`; returns the parameters that say so in the answer.
pub fn to_region(shm: &dyn SharedMemory, name: &str, place: &InRegion, data: &TensorData) -> Result<Value, ApiError> {
    let mut bytes = Vec::with_capacity(binary_size(data));
    write_binary(data, &mut bytes);
    to_region_bytes(shm, name, place, &bytes)
}

/// [`to_region`] of an output already laid out as bytes.
pub fn to_region_bytes(shm: &dyn SharedMemory, name: &str, place: &InRegion, bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.len() as u64 > place.byte_size {
        return Err(ApiError::bad(format!(
            "output {name} needs {} bytes but shared_memory_byte_size gives it {}",
            bytes.len(),
            place.byte_size
        )));
    }
    shm.write(&place.region, place.offset, bytes).map_err(|e| ApiError::bad(format!("output {name}: {e}")))?;
    let mut p = serde_json::json!({ "shared_memory_region": place.region, "shared_memory_byte_size": bytes.len() });
    if place.offset != 0 {
        p["shared_memory_offset"] = Value::from(place.offset);
    }
    Ok(p)
}

/// The output `r` asks for: the tensor itself, or its top-k classes.
fn answered(model: &ModelVersion, r: &Requested, tensor: Tensor) -> Result<Tensor, ApiError> {
    match r.classes {
        Some(k) => classify(&tensor, k, &model.labels[r.index]),
        None => Ok(tensor),
    }
}

/// One output as a face that carries raw bytes sends it (gRPC's
/// `raw_output_contents`): classified when asked, then its datatype, shape and
/// little-endian bytes (BYTES length-prefixed), as the binary extension writes them.
pub fn raw_output(
    model: &ModelVersion,
    r: &Requested,
    tensor: Tensor,
) -> Result<(DataType, Vec<usize>, Vec<u8>), ApiError> {
    let tensor = answered(model, r, tensor)?;
    let mut bytes = Vec::with_capacity(binary_size(&tensor.data));
    write_binary(&tensor.data, &mut bytes);
    Ok((tensor.datatype(), tensor.shape, bytes))
}

/// Top-`k` classes per batch row as Triton's `"score:index[:label]"` strings.
fn classify(t: &Tensor, k: usize, labels: &[String]) -> Result<Tensor, ApiError> {
    let scores = as_f64(&t.data).ok_or_else(|| ApiError::bad("only numeric outputs can be classified"))?;
    let (rows, classes) = match t.shape.as_slice() {
        [] => (1, 1),
        [n] => (1, *n),
        [b, rest @ ..] => (*b, rest.iter().product()),
    };
    let k = k.min(classes.max(1));
    // Scores print in their own precision (an FP32 0.99998 is not 0.9999840259552002).
    let single = matches!(t.data, TensorData::F32(_) | TensorData::F16(_) | TensorData::BF16(_));
    let score = |x: f64| if single { (x as f32).to_string() } else { x.to_string() };
    let mut out = Vec::with_capacity(rows * k);
    for row in scores.chunks(classes.max(1)) {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &i in idx.iter().take(k) {
            let text = match labels.get(i) {
                Some(l) => format!("{}:{i}:{l}", score(row[i])),
                None => format!("{}:{i}", score(row[i])),
            };
            out.push(text.into_bytes());
        }
    }
    let shape = if t.shape.len() >= 2 { vec![rows, k] } else { vec![k] };
    Tensor::new(shape, TensorData::Bytes(out)).map_err(|e| ApiError::internal(e.to_string()))
}

#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<ResponseOutput<'a>>,
}

#[derive(Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: DataType,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

/// Tensor elements as JSON: numbers in their shortest exact form (FP16/BF16
/// widened; non-finite ones as Triton writes them, `NaN`, `Infinity`,
/// `-Infinity`), BYTES as strings.
struct JsonData(TensorData);

impl Serialize for JsonData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fn seq<S: Serializer, T: Serialize>(s: S, it: impl ExactSizeIterator<Item = T>) -> Result<S::Ok, S::Error> {
            let mut q = s.serialize_seq(Some(it.len()))?;
            for x in it {
                q.serialize_element(&x)?;
            }
            q.end()
        }
        match &self.0 {
            TensorData::F16(v) => seq(s, v.iter().map(|x| Element(x.to_f32()))),
            TensorData::BF16(v) => seq(s, v.iter().map(|x| Element(x.to_f32()))),
            TensorData::Bytes(v) => seq(s, v.iter().map(|b| String::from_utf8_lossy(b))),
            TensorData::Bool(v) => seq(s, v.iter()),
            TensorData::U8(v) => seq(s, v.iter()),
            TensorData::U16(v) => seq(s, v.iter()),
            TensorData::U32(v) => seq(s, v.iter()),
            TensorData::U64(v) => seq(s, v.iter()),
            TensorData::I8(v) => seq(s, v.iter()),
            TensorData::I16(v) => seq(s, v.iter()),
            TensorData::I32(v) => seq(s, v.iter()),
            TensorData::I64(v) => seq(s, v.iter()),
            TensorData::F32(v) => seq(s, v.iter().copied().map(Element)),
            TensorData::F64(v) => seq(s, v.iter().copied().map(Element)),
        }
    }
}

fn as_f64(d: &TensorData) -> Option<Vec<f64>> {
    use TensorData as D;
    Some(match d {
        D::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
        D::U8(v) => v.iter().map(|&x| x.into()).collect(),
        D::U16(v) => v.iter().map(|&x| x.into()).collect(),
        D::U32(v) => v.iter().map(|&x| x.into()).collect(),
        D::U64(v) => v.iter().map(|&x| x as f64).collect(),
        D::I8(v) => v.iter().map(|&x| x.into()).collect(),
        D::I16(v) => v.iter().map(|&x| x.into()).collect(),
        D::I32(v) => v.iter().map(|&x| x.into()).collect(),
        D::I64(v) => v.iter().map(|&x| x as f64).collect(),
        D::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
        D::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
        D::F32(v) => v.iter().map(|&x| x.into()).collect(),
        D::F64(v) => v.clone(),
        D::Bytes(_) => return None,
    })
}

/// A fixed-size element type of the protocol.
trait Elem: Copy + Sized {
    const SIZE: usize;
    fn from_leaf(v: Leaf<'_>) -> Option<Self>;
    fn read_le(b: &[u8]) -> Self;
    fn write_le(self, out: &mut Vec<u8>);

    /// Decodes a whole little-endian buffer (compiles to a plain copy loop; no zeroing first).
    fn read_all(bytes: &[u8]) -> Vec<Self> {
        bytes.chunks_exact(Self::SIZE).map(Self::read_le).collect()
    }

    /// Appends a whole slice little-endian.
    fn write_all(v: &[Self], out: &mut Vec<u8>) {
        out.reserve(v.len() * Self::SIZE);
        v.iter().for_each(|&x| x.write_le(out));
    }
}

/// Numbers whose memory is their little-endian encoding on this host: one copy out.
macro_rules! pod_bulk {
    () => {
        fn write_all(v: &[Self], out: &mut Vec<u8>) {
            if cfg!(target_endian = "little") {
                out.extend_from_slice(bytemuck::cast_slice(v));
            } else {
                out.reserve(v.len() * Self::SIZE);
                v.iter().for_each(|&x| x.write_le(out));
            }
        }
    };
}

/// `read_le`, `write_le` and the bulk copies of a number type (its `to_le_bytes` encoding).
macro_rules! le_codec {
    ($t:ty) => {
        fn read_le(b: &[u8]) -> Self {
            <[u8; std::mem::size_of::<$t>()]>::try_from(b).map(<$t>::from_le_bytes).unwrap_or_default()
        }
        fn write_le(self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.to_le_bytes());
        }
        pod_bulk!();
    };
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_leaf(v: Leaf<'_>) -> Option<Self> {
                match v {
                    Leaf::I(i) => <$t>::try_from(i).ok(),
                    Leaf::U(u) => <$t>::try_from(u).ok(),
                    Leaf::B(b) => <$t>::try_from(u8::from(b)).ok(),
                    _ => None,
                }
            }
            le_codec!($t);
        }
    )*};
}
int_elem!(u8, u16, u32, u64, i8, i16, i32, i64);

macro_rules! float_elem {
    ($($t:ty => $from:expr),*) => {$(
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_leaf(v: Leaf<'_>) -> Option<Self> {
                let finite = |f: f64| Some($from(f)).filter(|x: &$t| x.is_finite());
                match v {
                    Leaf::F(f) => finite(f),
                    Leaf::NonFinite(f) => Some($from(f)),
                    Leaf::I(i) => finite(i as f64),
                    Leaf::U(u) => finite(u as f64),
                    _ => None,
                }
            }
            le_codec!($t);
        }
    )*};
}
// A JSON number is finite; one that only fits as infinity is out of the type's range, refused (not rounded to
// inf). Only a bare NaN or Infinity token is a non-finite element.
float_elem!(
    f32 => |f| f as f32,
    f64 => |f| f,
    f16 => f16::from_f64,
    bf16 => bf16::from_f64
);

impl Elem for bool {
    const SIZE: usize = 1;
    fn from_leaf(v: Leaf<'_>) -> Option<Self> {
        match v {
            Leaf::B(b) => Some(b),
            Leaf::U(n) if n <= 1 => Some(n == 1),
            _ => None,
        }
    }
    fn read_le(b: &[u8]) -> Self {
        b.first().is_some_and(|&x| x != 0)
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
}

/// Runs `$body` with `$T` bound to the Rust type of a fixed-size datatype and `$V` its [`TensorData`] variant.
macro_rules! with_fixed {
    ($dt:expr, $T:ident, $V:ident => $body:expr, bytes => $bytes:expr) => {
        match $dt {
            DataType::BOOL => {
                type $T = bool;
                use TensorData::Bool as $V;
                $body
            }
            DataType::UINT8 => {
                type $T = u8;
                use TensorData::U8 as $V;
                $body
            }
            DataType::UINT16 => {
                type $T = u16;
                use TensorData::U16 as $V;
                $body
            }
            DataType::UINT32 => {
                type $T = u32;
                use TensorData::U32 as $V;
                $body
            }
            DataType::UINT64 => {
                type $T = u64;
                use TensorData::U64 as $V;
                $body
            }
            DataType::INT8 => {
                type $T = i8;
                use TensorData::I8 as $V;
                $body
            }
            DataType::INT16 => {
                type $T = i16;
                use TensorData::I16 as $V;
                $body
            }
            DataType::INT32 => {
                type $T = i32;
                use TensorData::I32 as $V;
                $body
            }
            DataType::INT64 => {
                type $T = i64;
                use TensorData::I64 as $V;
                $body
            }
            DataType::FP16 => {
                type $T = f16;
                use TensorData::F16 as $V;
                $body
            }
            DataType::BF16 => {
                type $T = bf16;
                use TensorData::BF16 as $V;
                $body
            }
            DataType::FP32 => {
                type $T = f32;
                use TensorData::F32 as $V;
                $body
            }
            DataType::FP64 => {
                type $T = f64;
                use TensorData::F64 as $V;
                $body
            }
            DataType::BYTES => $bytes,
        }
    };
}

fn from_binary(name: &str, dt: DataType, count: usize, bytes: &[u8]) -> Result<TensorData, ApiError> {
    with_fixed!(dt, T, V => Ok(V(T::read_all(bytes))), bytes => {
        // Each element: a 4-byte little-endian length, then that many bytes.
        let mut items = Vec::with_capacity(count.min(1 << 20));
        let mut rest = bytes;
        while !rest.is_empty() {
            let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(|| {
                ApiError::bad(format!("input {name}: BYTES element {} has a truncated length prefix", items.len()))
            })?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > tail.len() {
                return Err(ApiError::bad(format!(
                    "input {name}: BYTES element {} claims {len} bytes but {} remain",
                    items.len(),
                    tail.len()
                )));
            }
            items.push(tail[..len].to_vec());
            rest = &tail[len..];
        }
        if items.len() != count {
            return Err(ApiError::bad(format!("input {name}: shape needs {count} BYTES elements but the binary data has {}", items.len())));
        }
        Ok(TensorData::Bytes(items))
    })
}

/// One leaf of a JSON tensor, as the parser met it.
#[derive(Debug, Clone, Copy)]
enum Leaf<'a> {
    U(u64),
    I(i64),
    F(f64),
    B(bool),
    S(&'a str),
    /// `NaN`, `Infinity` or `-Infinity`, written bare ([`crate::nonfinite`]).
    NonFinite(f64),
    Null,
    Object,
}

impl std::fmt::Display for Leaf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leaf::U(v) => write!(f, "{v}"),
            Leaf::I(v) => write!(f, "{v}"),
            Leaf::F(v) => write!(f, "{v}"),
            Leaf::B(v) => write!(f, "{v}"),
            Leaf::S(v) => write!(f, "{v:?}"),
            Leaf::NonFinite(v) => f.write_str(crate::nonfinite::canonical(*v)),
            Leaf::Null => f.write_str("null"),
            Leaf::Object => f.write_str("an object"),
        }
    }
}

/// Why a leaf of a JSON tensor is refused.
#[derive(Debug, thiserror::Error)]
enum LeafError {
    /// One leaf more than the shape holds.
    #[error("shape needs {0} elements but data has more")]
    TooMany(usize),
    /// A leaf that is not a value of the tensor's type.
    #[error("element {index} ({leaf}) is not a valid {datatype}")]
    NotA {
        /// Its position.
        index: usize,
        /// The leaf as written.
        leaf: String,
        /// The tensor's type.
        datatype: DataType,
    },
}

/// Walks nested JSON arrays in row-major order and hands each leaf to `push`
/// as the parser meets it, so nothing but the destination buffer grows.
struct Leaves<'p, F>(&'p mut F);

impl<'de, F: FnMut(Leaf<'_>) -> Result<(), LeafError>> serde::de::DeserializeSeed<'de> for Leaves<'_, F> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: FnMut(Leaf<'_>) -> Result<(), LeafError>> serde::de::Visitor<'de> for Leaves<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tensor elements, possibly in nested arrays")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Leaves(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        (self.0)(Leaf::U(v)).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        (self.0)(Leaf::I(v)).map_err(E::custom)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        (self.0)(Leaf::F(v)).map_err(E::custom)
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        (self.0)(Leaf::B(v)).map_err(E::custom)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        (self.0)(Leaf::S(v)).map_err(E::custom)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        (self.0)(Leaf::Null).map_err(E::custom)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        (self.0)(Leaf::Object).map_err(serde::de::Error::custom)
    }
}

/// Decodes JSON tensor data of `count` elements of `dt` straight into its
/// buffer: each leaf converted as the parser meets it, more leaves than the
/// shape holds refused at the first extra one. With `non_finite`, the
/// strings [`crate::nonfinite::quote_tokens`] made are the numbers they stand for.
fn from_json(
    name: &str,
    dt: DataType,
    count: usize,
    data: &serde_json::value::RawValue,
    non_finite: bool,
) -> Result<TensorData, ApiError> {
    with_fixed!(dt, T, V => Ok(V(walk(name, dt, count, data, non_finite, T::from_leaf)?)), bytes => {
        let items = walk(name, dt, count, data, non_finite, |leaf| match leaf {
            Leaf::S(s) => Some(s.as_bytes().to_vec()),
            _ => None,
        })?;
        Ok(TensorData::Bytes(items))
    })
}

/// [`from_json`] for elements of one type, `convert`ed leaf by leaf.
fn walk<T>(
    name: &str,
    dt: DataType,
    count: usize,
    data: &serde_json::value::RawValue,
    non_finite: bool,
    convert: impl Fn(Leaf<'_>) -> Option<T>,
) -> Result<Vec<T>, ApiError> {
    // Every element takes at least two bytes of text ("0,"): the text bounds
    // the buffer, whatever shape the request claims.
    let mut out: Vec<T> = Vec::with_capacity(count.min(data.get().len() / 2 + 1));
    let mut push = |leaf: Leaf<'_>| {
        let leaf = match leaf {
            Leaf::S(s) if non_finite => crate::nonfinite::marked(s).map_or(leaf, Leaf::NonFinite),
            other => other,
        };
        if out.len() == count {
            return Err(LeafError::TooMany(count));
        }
        let value =
            convert(leaf).ok_or_else(|| LeafError::NotA { index: out.len(), leaf: leaf.to_string(), datatype: dt })?;
        out.push(value);
        Ok(())
    };
    let mut de = serde_json::Deserializer::from_str(data.get());
    serde::de::DeserializeSeed::deserialize(Leaves(&mut push), &mut de).map_err(|e| {
        // A message of ours comes back with the parser's position after it.
        let text = e.to_string();
        let text = text.split(" at line ").next().unwrap_or(&text).to_string();
        ApiError::bad(format!("input {name}: {text}"))
    })?;
    if out.len() != count {
        return Err(ApiError::bad(format!("input {name}: shape needs {count} elements but data has {}", out.len())));
    }
    Ok(out)
}

/// Bytes of the binary tensor encoding of `data`.
fn binary_size(data: &TensorData) -> usize {
    match data {
        TensorData::Bytes(v) => v.iter().map(|b| 4 + b.len()).sum(),
        other => other.len() * other.datatype().size(),
    }
}

/// Appends the binary tensor encoding (little-endian; BYTES length-prefixed).
fn write_binary(data: &TensorData, out: &mut Vec<u8>) {
    match data {
        TensorData::Bytes(v) => {
            for b in v {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
        TensorData::Bool(v) => Elem::write_all(v, out),
        TensorData::U8(v) => Elem::write_all(v, out),
        TensorData::U16(v) => Elem::write_all(v, out),
        TensorData::U32(v) => Elem::write_all(v, out),
        TensorData::U64(v) => Elem::write_all(v, out),
        TensorData::I8(v) => Elem::write_all(v, out),
        TensorData::I16(v) => Elem::write_all(v, out),
        TensorData::I32(v) => Elem::write_all(v, out),
        TensorData::I64(v) => Elem::write_all(v, out),
        TensorData::F16(v) => Elem::write_all(v, out),
        TensorData::BF16(v) => Elem::write_all(v, out),
        TensorData::F32(v) => Elem::write_all(v, out),
        TensorData::F64(v) => Elem::write_all(v, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, VersionState};
    use std::path::Path;
    use std::sync::Arc;

    fn digits() -> Arc<ModelVersion> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let settings = tandem_shared::EngineSettings {
            backend: tandem_config::engine::BackendChoice::Tract,
            ..Default::default()
        };
        let engine = Engine::load(&repo, &settings, 1, &tandem_shared::ModelSet::default()).expect("load");
        match engine.models()["digits"].version(None) {
            Some(VersionState::Ready(v)) => v.clone(),
            other => panic!("digits: {other:?}"),
        }
    }

    fn request(json: &str, binary: &[u8]) -> Result<Vec<Tensor>, ApiError> {
        let m = digits();
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(binary);
        let len = json.len().to_string();
        let (req, bin) = decode_body(&body, if binary.is_empty() { None } else { Some(&len) })?;
        build_inputs(&m, &req, bin, &NoSharedMemory)
    }

    fn pixels(n: usize) -> String {
        format!("[{}]", vec!["1"; n].join(","))
    }

    #[test]
    fn json_tensor_decodes_flat_and_nested() {
        let flat =
            format!(r#"{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":{}}}]}}"#, pixels(64));
        assert_eq!(request(&flat, b"").expect("flat")[0].shape, [1, 64]);
        let nested = format!(
            r#"{{"inputs":[{{"name":"pixels","shape":[2,64],"datatype":"FP32","data":[{},{}]}}]}}"#,
            pixels(64),
            pixels(64)
        );
        assert_eq!(request(&nested, b"").expect("nested")[0].shape, [2, 64]);
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
                format!(
                    r#"{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":["a"{}]}}]}}"#,
                    ",1".repeat(63)
                ),
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
        assert_eq!(request(json, &ok).expect("binary")[0].shape, [1, 64]);
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
            (DataType::BF16, "[0.5,-2.0]"),
            (DataType::FP32, "[0.25,-1.5]"),
            (DataType::FP64, "[0.1,-1e+300]"),
            (DataType::BYTES, r#"["héllo",""]"#),
        ] {
            let data = serde_json::value::RawValue::from_string(json.to_string()).expect("json");
            let t = from_json("x", dt, 2, &data, false).expect("decode");
            assert_eq!(t.datatype(), dt);
            let out = serde_json::to_string(&JsonData(t.clone())).expect("ser");
            assert_eq!(out.replace(".0", ""), json.replace(".0", ""), "{dt}");
            let mut le = Vec::new();
            write_binary(&t, &mut le);
            if dt != DataType::BYTES {
                assert_eq!(le.len(), 2 * dt.size(), "{dt}");
            }
            assert_eq!(from_binary("x", dt, 2, &le).expect("from_le"), t, "{dt}");
        }
        // Out of range for the type is refused, not wrapped or rounded to infinity.
        for (dt, json) in [
            (DataType::UINT8, "[256]"),
            (DataType::INT8, "[-129]"),
            (DataType::FP32, "[1e39]"),
            (DataType::FP16, "[70000]"),
            (DataType::BF16, "[-1e39]"),
        ] {
            let data = serde_json::value::RawValue::from_string(json.to_string()).expect("json");
            let err = from_json("x", dt, 1, &data, false).expect_err(json);
            assert!(err.message.contains("input x: element 0") && err.message.contains(dt.name()), "{}", err.message);
        }
        let raw = |t: &str| serde_json::value::RawValue::from_string(t.into()).expect("json");
        let t = from_json("x", DataType::INT32, 4, &raw("[[1,2],[3,[4]]]"), false).expect("nested");
        assert_eq!(t, TensorData::I32(vec![1, 2, 3, 4]));
        let more = from_json("x", DataType::FP32, 2, &raw("[1,2,3,4]"), false).expect_err("more");
        assert_eq!(more.message, "input x: shape needs 2 elements but data has more");
        let fewer = from_json("x", DataType::FP32, 4, &raw("[1,2,3]"), false).expect_err("fewer");
        assert_eq!(fewer.message, "input x: shape needs 4 elements but data has 3");
        let object = from_json("x", DataType::FP32, 1, &raw(r#"[{"a":1}]"#), false).expect_err("object");
        assert!(object.message.contains("element 0 (an object) is not a valid FP32"), "{}", object.message);
        // A shape far larger than the text reserves nothing for it.
        let huge = from_json("x", DataType::FP64, 1 << 40, &raw("[1]"), false).expect_err("short");
        assert!(huge.message.contains("but data has 1"), "{}", huge.message);
        let big = serde_json::value::RawValue::from_string("[3.4e38, 65504]".into()).expect("json");
        assert!(from_json("x", DataType::FP32, 2, &big, false).is_ok());
        // A BYTES length prefix that overruns the data is refused.
        assert!(from_binary("x", DataType::BYTES, 1, &[9, 0, 0, 0, b'a']).is_err());
        assert!(from_binary("x", DataType::BYTES, 1, &[1, 0]).is_err());
    }

    #[test]
    fn bare_non_finite_tokens_are_float_elements_and_nothing_else() {
        let decode = |dt: &str, data: &str| {
            let json = format!(r#"{{"inputs":[{{"name":"x","shape":[3],"datatype":"{dt}","data":{data}}}]}}"#);
            let (req, _) = decode_body(json.as_bytes(), None)?;
            let data = req.inputs[0].data.as_ref().expect("data");
            from_json("x", DataType::parse(dt).expect("datatype"), 3, data, req.non_finite)
        };
        match decode("FP32", "[NaN, Infinity, -Inf]").expect("fp32") {
            TensorData::F32(v) => assert!(v[0].is_nan() && v[1] == f32::INFINITY && v[2] == f32::NEG_INFINITY),
            other => panic!("{other:?}"),
        }
        match decode("BF16", "[[-Infinity], [-NaN], [2]]").expect("bf16") {
            TensorData::BF16(v) => assert!(v[0] == bf16::NEG_INFINITY && v[1].is_nan() && v[2] == bf16::from_f32(2.0)),
            other => panic!("{other:?}"),
        }
        let int = decode("INT32", "[1, NaN, 3]").expect_err("int");
        assert!(int.message.contains("element 1 (NaN) is not a valid INT32"), "{int:?}");
        let bytes = decode("BYTES", r#"["a", Infinity, "c"]"#).expect_err("bytes");
        assert!(bytes.message.contains("element 1 (Infinity) is not a valid BYTES"), "{bytes:?}");
        // A client's own string is a string, in a body with or without tokens.
        assert!(decode("FP32", r#"["NaN", 1, 2]"#).is_err());
        assert!(decode("FP32", r#"["NaN", NaN, 2]"#).is_err());
        // Outside a tensor's data the marked string is no number.
        let shape = decode_body(br#"{"inputs":[{"name":"x","shape":[NaN],"datatype":"FP32","data":[1]}]}"#, None);
        let shape = shape.expect_err("shape").message;
        assert!(shape.contains("malformed inference request JSON: invalid type: NaN, expected i64"), "{shape}");
    }

    #[test]
    fn classification_returns_top_k_with_labels() {
        let m = digits();
        let probs: Vec<f32> = (0..10).map(|i| if i == 7 { 0.9 } else { 0.01 }).collect();
        let outputs = vec![Tensor::new(vec![1, 10], TensorData::F32(probs)).expect("t")];
        let req: InferRequest = serde_json::from_str(
            r#"{"id":"r1","inputs":[],"outputs":[{"name":"probabilities","parameters":{"classification":2}}]}"#,
        )
        .expect("req");
        let requested = requested_outputs(&m, &req).expect("requested");
        let (body, len) = encode_response(&m, &req, &requested, outputs, &NoSharedMemory).expect("encode");
        assert!(len.is_none());
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["id"], "r1");
        assert_eq!(v["outputs"][0]["datatype"], "BYTES");
        assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 2]));
        assert_eq!(v["outputs"][0]["data"][0], "0.9:7:7", "FP32 scores print as FP32: {v}");
    }
}
