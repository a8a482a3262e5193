//! The Open Inference Protocol's gRPC face (Triton's
//! `inference.GRPCInferenceService`), served by the same router as the HTTP
//! face (so the same front door, access log and counters), on the same
//! engine: a gRPC request is turned into the HTTP face's decoded request
//! (its tensors as the binary extension carries them) and runs through
//! [`crate::router::execute`]. Calls not served yet answer `UNIMPLEMENTED`.

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use crate::engine::config::pb;
use crate::engine::tensor::DataType;
use crate::engine::PLATFORM;
use crate::infer::{build_inputs, raw_output, requested_outputs, ApiError, InferRequest, RequestInput, RequestOutput};
use crate::state::{find, AppState, ModelPath};

/// The standard health service's prefix.
pub use tandem_shared::edge::restricted::GRPC_HEALTH as HEALTH_PREFIX;
/// The routes' prefix: every call is `/inference.GRPCInferenceService/{Method}`
/// (the restricted categories read the same names).
pub use tandem_shared::edge::restricted::GRPC_SERVICE as PREFIX;

/// Types generated from `proto/health.proto` (`grpc.health.v1`).
#[allow(missing_docs, clippy::all, reason = "generated code")]
pub mod health_pb {
    include!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs"));
}

/// The service, over one worker's state.
pub struct Grpc {
    state: AppState,
}

/// How often a health `Watch` looks again.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers a stream holds for a client that has not read them yet.
const STREAM_AHEAD: usize = 16;

/// The tower service the router mounts at [`PREFIX`]: messages up to
/// `MAX_REQUEST_BYTES` each way, gzip accepted, and sent back to a call that
/// came gzipped (the router drops a plain call's `grpc-accept-encoding`).
pub fn service(state: AppState) -> pb::grpc_inference_service_server::GrpcInferenceServiceServer<Grpc> {
    let limit = state.inner.max_request_bytes;
    crate::grpc_codec::hold_at_most(limit);
    pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(Grpc { state })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
}

/// Server reflection (v1 and v1alpha) over every service served here, so
/// grpcurl-style tools can list the calls and their messages.
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::engine::config::DESCRIPTORS)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder().build_v1().expect("the descriptor set built with the binary is valid");
    let v1alpha = builder().build_v1alpha().expect("the descriptor set built with the binary is valid");
    (v1, v1alpha)
}

/// `grpc.health.v1.Health`: `Check` for the server (`""`, SERVING once
/// ready) or a model by name (SERVING when a version serves, NOT_SERVING
/// when it is unavailable, `NOT_FOUND` when there is no such model, as the
/// health protocol asks); `Watch` asks the same every [`WATCH_EVERY`] and
/// sends each change (`SERVICE_UNKNOWN` while there is no such model). The
/// HTTPS worker serves `Watch` the same way over the ring.
pub struct Health {
    state: AppState,
}

/// The health service the router mounts at [`HEALTH_PREFIX`].
pub fn health(state: AppState) -> health_pb::health_server::HealthServer<Health> {
    health_pb::health_server::HealthServer::new(Health { state })
}

#[tonic::async_trait]
impl health_pb::health_server::Health for Health {
    async fn check(
        &self,
        r: Request<health_pb::HealthCheckRequest>,
    ) -> Result<Response<health_pb::HealthCheckResponse>, Status> {
        let service = r.into_inner().service;
        match serving_status(&self.state, &service) {
            Some(status) => Ok(Response::new(health_pb::HealthCheckResponse { status: status as i32 })),
            None => Err(Status::not_found(format!("no model {service:?}"))),
        }
    }

    async fn watch(
        &self,
        r: Request<health_pb::HealthCheckRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<health_pb::HealthCheckResponse>>, Status> {
        use health_pb::health_check_response::ServingStatus;
        let service = r.into_inner().service;
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = serving_status(&state, &service).unwrap_or(ServingStatus::ServiceUnknown);
                if last != Some(now) {
                    last = Some(now);
                    if tx.send(Ok(health_pb::HealthCheckResponse { status: now as i32 })).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(WATCH_EVERY) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// The server's (`""`) or a model's serving status; `None` when there is no such model.
fn serving_status(state: &AppState, service: &str) -> Option<health_pb::health_check_response::ServingStatus> {
    use health_pb::health_check_response::ServingStatus;
    let serving = if service.is_empty() {
        state.inner.engine.ready()
    } else {
        match find(state, &model_path(service, "")) {
            Ok(_) => true,
            Err(e) if e.status == StatusCode::NOT_FOUND => return None,
            Err(_) => false,
        }
    };
    Some(if serving { ServingStatus::Serving } else { ServingStatus::NotServing })
}

/// A call's broken framing as the status it ends with (`RESOURCE_EXHAUSTED`
/// for a message over `MAX_REQUEST_BYTES`), for [`tandem_shared::edge::grpc::Checked`].
pub fn framing_status(e: tandem_shared::edge::grpc::FramingError) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(Status::new(tonic::Code::from(i32::from(e.code())), e.to_string()))
}

/// A JSON-face error as the gRPC status Triton gives for it.
fn status(e: ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
        StatusCode::NOT_FOUND => tonic::Code::NotFound,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => tonic::Code::Unavailable,
        StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::ResourceExhausted,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Internal,
    };
    Status::new(code, e.message)
}

fn model_path(name: &str, version: &str) -> ModelPath {
    ModelPath { name: name.to_string(), version: (!version.is_empty()).then(|| version.to_string()) }
}

/// A gRPC parameter as the JSON face's parameter value.
fn json_param(p: &pb::InferParameter) -> Value {
    use pb::infer_parameter::ParameterChoice as C;
    match &p.parameter_choice {
        Some(C::BoolParam(b)) => Value::from(*b),
        Some(C::Int64Param(n)) => Value::from(*n),
        Some(C::StringParam(s)) => Value::from(s.as_str()),
        Some(C::DoubleParam(x)) => Value::from(*x),
        Some(C::Uint64Param(n)) => Value::from(*n),
        None => Value::Null,
    }
}

/// Typed `contents` as the binary extension's little-endian bytes, by `datatype`.
fn contents_bytes(name: &str, datatype: &str, c: &pb::InferTensorContents) -> Result<Vec<u8>, ApiError> {
    let narrow = |v: &[i32], bits: u32| -> Result<Vec<u8>, ApiError> {
        let (lo, hi) = (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1);
        let mut out = Vec::with_capacity(v.len() * bits as usize / 8);
        for &x in v {
            if !(lo..=hi).contains(&i64::from(x)) {
                return Err(ApiError::bad(format!("input {name}: {x} does not fit {datatype}")));
            }
            out.extend_from_slice(&x.to_le_bytes()[..bits as usize / 8]);
        }
        Ok(out)
    };
    let unarrow = |v: &[u32], bits: u32| -> Result<Vec<u8>, ApiError> {
        let mut out = Vec::with_capacity(v.len() * bits as usize / 8);
        for &x in v {
            if bits < 32 && x >> bits != 0 {
                return Err(ApiError::bad(format!("input {name}: {x} does not fit {datatype}")));
            }
            out.extend_from_slice(&x.to_le_bytes()[..bits as usize / 8]);
        }
        Ok(out)
    };
    Ok(match datatype {
        "BOOL" => c.bool_contents.iter().map(|&b| u8::from(b)).collect(),
        "INT8" => narrow(&c.int_contents, 8)?,
        "INT16" => narrow(&c.int_contents, 16)?,
        "INT32" => narrow(&c.int_contents, 32)?,
        "INT64" => c.int64_contents.iter().flat_map(|x| x.to_le_bytes()).collect(),
        "UINT8" => unarrow(&c.uint_contents, 8)?,
        "UINT16" => unarrow(&c.uint_contents, 16)?,
        "UINT32" => unarrow(&c.uint_contents, 32)?,
        "UINT64" => c.uint64_contents.iter().flat_map(|x| x.to_le_bytes()).collect(),
        "FP32" => c.fp32_contents.iter().flat_map(|x| x.to_le_bytes()).collect(),
        "FP64" => c.fp64_contents.iter().flat_map(|x| x.to_le_bytes()).collect(),
        "BYTES" => {
            let mut out = Vec::new();
            for b in &c.bytes_contents {
                let len = u32::try_from(b.len())
                    .map_err(|_| ApiError::bad(format!("input {name}: an element over 4 GiB")))?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(b);
            }
            out
        }
        other => {
            return Err(ApiError::bad(format!(
                "input {name}: {other} has no typed contents field; send it in raw_input_contents"
            )))
        }
    })
}

/// Whether an input's data is as long as its shape says, told in gRPC's own
/// terms (its typed `contents` or its `raw_input_contents` entry) rather than
/// the binary extension's the rest of the path speaks. A shape that is not a
/// plain one (a negative dimension, an overflowing product) and BYTES pass
/// through: the common path names what is wrong with them.
fn sized_for_shape(input: &pb::model_infer_request::InferInputTensor, len: usize, raw: bool) -> Result<(), ApiError> {
    let Some(size) = DataType::parse(&input.datatype).map(DataType::size).filter(|&s| s > 0) else {
        return Ok(());
    };
    let count = input.shape.iter().try_fold(1usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)));
    let Some(count) = count.filter(|c| c.checked_mul(size).is_some()) else {
        return Ok(());
    };
    if len == count * size {
        return Ok(());
    }
    let (name, shape, datatype) = (&input.name, &input.shape, &input.datatype);
    Err(ApiError::bad(if raw {
        format!(
            "input {name}: its raw_input_contents entry is {len} bytes but shape {shape:?} of {datatype} needs {}",
            count * size
        )
    } else {
        format!("input {name}: contents hold {} {datatype} values but shape {shape:?} holds {count}", len / size)
    }))
}

/// The gRPC request as the JSON face's decoded request and its binary tail.
/// An input in a shared-memory region carries no data here, and as Triton's
/// `raw_input_contents` holds one entry per input that is not in one, in order.
fn as_http(r: &pb::ModelInferRequest) -> Result<(InferRequest, bytes::Bytes), ApiError> {
    let in_shm = |i: &pb::model_infer_request::InferInputTensor| i.parameters.contains_key("shared_memory_region");
    // A set, not a scan of the inputs before each: a message may list a great many.
    let mut names = std::collections::HashSet::with_capacity(r.inputs.len());
    if let Some(twice) = r.inputs.iter().find(|i| !names.insert(i.name.as_str())) {
        return Err(crate::infer::given_twice(&twice.name));
    }
    let raw = !r.raw_input_contents.is_empty();
    let carried = r.inputs.iter().filter(|i| !in_shm(i)).count();
    if raw && r.raw_input_contents.len() != carried {
        return Err(ApiError::bad(format!(
            "raw_input_contents has {} entries for {carried} inputs not in shared memory",
            r.raw_input_contents.len(),
        )));
    }
    // Each input's bytes, as the binary extension's tail carries them: a raw
    // tensor is a slice of the received message, not a copy.
    let mut parts: Vec<bytes::Bytes> = Vec::with_capacity(r.inputs.len());
    let mut inputs = Vec::with_capacity(r.inputs.len());
    let mut raw_contents = r.raw_input_contents.iter();
    for input in &r.inputs {
        let mut parameters: Map<String, Value> =
            input.parameters.iter().map(|(k, v)| (k.clone(), json_param(v))).collect();
        if in_shm(input) {
            if input.contents.is_some() {
                return Err(ApiError::bad(format!(
                    "input {}: its data is in shared memory; it cannot also come in contents",
                    input.name
                )));
            }
            inputs.push(RequestInput {
                name: input.name.clone(),
                shape: input.shape.clone(),
                datatype: input.datatype.clone(),
                parameters,
                data: None,
            });
            continue;
        }
        let bytes = match (&input.contents, raw) {
            (Some(_), true) => {
                return Err(ApiError::bad(format!(
                    "input {}: contents and raw_input_contents are both given",
                    input.name
                )))
            }
            (Some(c), false) => contents_bytes(&input.name, &input.datatype, c)?.into(),
            (None, true) => raw_contents.next().cloned().unwrap_or_default(),
            (None, false) => return Err(ApiError::bad(format!("input {} has no data", input.name))),
        };
        sized_for_shape(input, bytes.len(), raw)?;
        parameters.insert("binary_data_size".into(), Value::from(bytes.len()));
        parts.push(bytes);
        inputs.push(RequestInput {
            name: input.name.clone(),
            shape: input.shape.clone(),
            datatype: input.datatype.clone(),
            parameters,
            data: None,
        });
    }
    let outputs = (!r.outputs.is_empty()).then(|| {
        r.outputs
            .iter()
            .map(|o| {
                let mut parameters: Map<String, Value> =
                    o.parameters.iter().map(|(k, v)| (k.clone(), json_param(v))).collect();
                parameters.insert("binary_data".into(), Value::Bool(true));
                RequestOutput { name: o.name.clone(), parameters }
            })
            .collect()
    });
    let mut parameters: Map<String, Value> = r.parameters.iter().map(|(k, v)| (k.clone(), json_param(v))).collect();
    parameters.insert("binary_data_output".into(), Value::Bool(true));
    let id = (!r.id.is_empty()).then(|| r.id.clone());
    let binary = match <[_; 1]>::try_from(parts) {
        Ok([one]) => one,
        Err(parts) => parts.concat().into(),
    };
    Ok((InferRequest { id, parameters, inputs, outputs, non_finite: false }, binary))
}

/// The JSON parameters that say where an output was written, as gRPC parameters.
fn region_parameters(json: Value, into: &mut std::collections::HashMap<String, pb::InferParameter>) {
    use pb::infer_parameter::ParameterChoice as C;
    let Value::Object(map) = json else { return };
    for (k, v) in map {
        let choice = match v {
            Value::String(s) => C::StringParam(s),
            Value::Number(n) => C::Int64Param(n.as_i64().unwrap_or(i64::MAX)),
            _ => continue,
        };
        into.insert(k, pb::InferParameter { parameter_choice: Some(choice) });
    }
}

impl Grpc {
    /// One request of a stream, answered as the stream carries it.
    async fn stream_answer(&self, req: pb::ModelInferRequest) -> pb::ModelStreamInferResponse {
        match self.infer(req).await {
            Ok(answer) => pb::ModelStreamInferResponse { error_message: String::new(), infer_response: Some(answer) },
            Err(e) => pb::ModelStreamInferResponse { error_message: e.message, infer_response: None },
        }
    }

    async fn infer(&self, r: pb::ModelInferRequest) -> Result<pb::ModelInferResponse, ApiError> {
        let started = Instant::now();
        let state = &self.state;
        let model = find(state, &model_path(&r.model_name, &r.model_version))?;
        let run = async {
            let decoding = Instant::now();
            let (req, binary) = as_http(&r)?;
            let mut share = tandem_shared::edge::budget::Share::default();
            crate::router::shared_input_budget(state, &req, &mut share).await?;
            let inputs = build_inputs(&model, &req, &binary, state.shared_memory())?;
            let requested = requested_outputs(&model, &req)?;
            let wanted = requested.iter().map(|q| q.index).collect();
            let (outputs, batch, execution, mut timings) =
                crate::router::execute(state, &model, inputs, wanted, started, decoding).await?;
            let encoding = Instant::now();
            let mut response = pb::ModelInferResponse {
                model_name: model.name.clone(),
                model_version: model.version.clone(),
                id: r.id.clone(),
                ..Default::default()
            };
            for (q, tensor) in requested.iter().zip(outputs) {
                let name = &model.outputs[q.index].name;
                let (datatype, shape, bytes) = raw_output(&model, q, tensor)?;
                let mut parameters = std::collections::HashMap::new();
                let bytes = match &q.place {
                    // In the region; an empty entry keeps raw_output_contents in step with outputs, as Triton's.
                    Some(place) => {
                        region_parameters(
                            crate::infer::to_region_bytes(state.shared_memory(), name, place, &bytes)?,
                            &mut parameters,
                        );
                        Vec::new()
                    }
                    None => bytes,
                };
                response.outputs.push(pb::model_infer_response::InferOutputTensor {
                    name: name.clone(),
                    datatype: datatype.name().to_string(),
                    shape: shape.iter().map(|&d| d as i64).collect(),
                    parameters,
                    ..Default::default()
                });
                response.raw_output_contents.push(bytes);
            }
            timings.output += encoding.elapsed();
            Ok::<_, ApiError>((response, batch, execution, timings))
        };
        crate::router::counted(state, &model, started, run).await
    }
}

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for Grpc {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse { ready: self.state.inner.engine.ready() }))
    }

    async fn model_ready(&self, r: Request<pb::ModelReadyRequest>) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = r.into_inner();
        match find(&self.state, &model_path(&r.name, &r.version)) {
            Ok(_) => Ok(Response::new(pb::ModelReadyResponse { ready: true })),
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                Ok(Response::new(pb::ModelReadyResponse { ready: false }))
            }
            Err(e) => Err(status(e)),
        }
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "tandem".into(),
            version: tandem_shared::VERSION.into(),
            extensions: crate::router::extensions(&self.state).into_iter().map(String::from).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = r.into_inner();
        let v = find(&self.state, &model_path(&r.name, &r.version)).map_err(status)?;
        let versions = self.state.inner.engine.models().get(&r.name).map(|m| m.labels()).unwrap_or_default();
        let meta = |t: &crate::engine::TensorMeta| pb::model_metadata_response::TensorMetadata {
            name: t.name.clone(),
            datatype: t.datatype.name().to_string(),
            shape: t.shape.clone(),
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: v.name.clone(),
            versions,
            platform: PLATFORM.to_string(),
            inputs: v.inputs.iter().map(meta).collect(),
            outputs: v.outputs.iter().map(meta).collect(),
        }))
    }

    async fn model_infer(&self, r: Request<pb::ModelInferRequest>) -> Result<Response<pb::ModelInferResponse>, Status> {
        // The client's deadline (grpc-timeout), never past REQUEST_TIMEOUT.
        let limit = self.state.inner.body_timeout;
        let within = tandem_shared::edge::grpc::timeout(r.metadata().as_ref()).map_or(limit, |d| d.min(limit));
        match tokio::time::timeout(within, self.infer(r.into_inner())).await {
            Ok(answer) => answer.map(Response::new).map_err(status),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {} ms (the call's deadline, or REQUEST_TIMEOUT)",
                within.as_millis()
            ))),
        }
    }

    /// Each request on the stream answered on it, in the order asked, up to
    /// [`STREAM_AHEAD`] running at once (so a stream keeps the batcher fed);
    /// a request that fails is answered with its `error_message` and the
    /// stream goes on (as Triton does for models that are not decoupled).
    /// At most [`STREAM_AHEAD`] answers wait for a client that does not read;
    /// then the stream stops reading requests until it does. A broken stream
    /// (bad framing, a message over the limit) ends with its status after the
    /// answers already asked for.
    async fn model_stream_infer(
        &self,
        r: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::ModelStreamInferResponse>>, Status> {
        let mut inbound = r.into_inner();
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_AHEAD);
        tokio::spawn(async move {
            let mut running = tandem_shared::edge::grpc::InOrder::new(STREAM_AHEAD);
            let mut reading = true;
            let mut broken = None;
            loop {
                if !reading && running.is_empty() {
                    if let Some(status) = broken {
                        let _ = tx.send(Err(status)).await;
                    }
                    return;
                }
                let room = reading && running.has_room();
                tokio::select! {
                    message = inbound.message(), if room => match message {
                        Ok(Some(req)) => {
                            let grpc = Grpc { state: state.clone() };
                            running.start(async move { grpc.stream_answer(req).await });
                        }
                        Ok(None) => reading = false,
                        Err(status) => {
                            reading = false;
                            broken = Some(status);
                        }
                    },
                    answer = running.next() => {
                        let answer = answer.unwrap_or_else(|e| pb::ModelStreamInferResponse {
                            error_message: format!("the request failed: {e}"),
                            infer_response: None,
                        });
                        if tx.send(Ok(answer)).await.is_err() {
                            running.abort();
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn model_statistics(
        &self,
        r: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        use tandem_shared::stats::ModelCounter::*;
        let r = r.into_inner();
        let only = (!r.name.is_empty()).then(|| model_path(&r.name, &r.version));
        if let Some(p) = &only {
            find(&self.state, p).map_err(status)?;
        }
        let entries = crate::metrics::stats_entries(&self.state, only.as_ref()).map_err(status)?;
        let d = |count, ns| Some(pb::StatisticDuration { count, ns });
        let model_stats = entries
            .into_iter()
            .map(|(name, version, t)| pb::ModelStatistics {
                name,
                version,
                last_inference: t.get(LastInferenceMs),
                inference_count: t.get(InferenceCount),
                execution_count: t.get(ExecutionCount),
                inference_stats: Some(pb::InferStatistics {
                    success: d(t.get(SuccessCount), t.get(SuccessNs)),
                    fail: d(t.get(FailCount), t.get(FailNs)),
                    queue: d(t.get(QueueCount), t.get(QueueNs)),
                    compute_input: d(t.get(InputCount), t.get(InputNs)),
                    compute_infer: d(t.get(InferCount), t.get(InferNs)),
                    compute_output: d(t.get(OutputCount), t.get(OutputNs)),
                    cache_hit: d(0, 0),
                    cache_miss: d(0, 0),
                }),
                batch_stats: t
                    .batches
                    .iter()
                    .map(|(&batch_size, &[count, input, infer, output])| pb::InferBatchStatistics {
                        batch_size,
                        compute_input: d(count, input),
                        compute_infer: d(count, infer),
                        compute_output: d(count, output),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        _: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let models = crate::router::repository_entries(&self.state)
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version.unwrap_or_default(),
                state: e.state.to_string(),
                reason: e.reason.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        r: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        use pb::model_repository_parameter::ParameterChoice as C;
        let r = r.into_inner();
        let params: Map<String, Value> = r
            .parameters
            .iter()
            .map(|(k, v)| {
                let v = match &v.parameter_choice {
                    Some(C::StringParam(s)) => Value::from(s.as_str()),
                    Some(C::BoolParam(b)) => Value::from(*b),
                    Some(C::Int64Param(n)) => Value::from(*n),
                    Some(C::BytesParam(_)) | None => Value::Null,
                };
                (k.clone(), v)
            })
            .collect();
        let config = crate::control_api::config_param(&params).map_err(status)?;
        let change = tandem_shared::process::control::ModelChange::Load { model: r.model_name, config };
        crate::control_api::change(&self.state, change).await.map_err(status)?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        r: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let change = tandem_shared::process::control::ModelChange::Unload { model: r.into_inner().model_name };
        crate::control_api::change(&self.state, change).await.map_err(status)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        r: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        use pb::system_shared_memory_status_response::RegionStatus;
        let name = r.into_inner().name;
        let regions =
            crate::system_shm::status(&self.state, (!name.is_empty()).then_some(name.as_str())).map_err(status)?;
        let regions = regions
            .into_iter()
            .map(|r| {
                let s = RegionStatus { name: r.name.clone(), key: r.key, offset: r.offset, byte_size: r.byte_size };
                (r.name, s)
            })
            .collect();
        Ok(Response::new(pb::SystemSharedMemoryStatusResponse { regions }))
    }

    async fn system_shared_memory_register(
        &self,
        r: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        let r = r.into_inner();
        let region =
            tandem_shared::system_shm::Region { name: r.name, key: r.key, offset: r.offset, byte_size: r.byte_size };
        crate::system_shm::register(&self.state, region).await.map_err(status)?;
        Ok(Response::new(pb::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        r: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        let name = r.into_inner().name;
        crate::system_shm::unregister(&self.state, (!name.is_empty()).then_some(name)).await.map_err(status)?;
        Ok(Response::new(pb::SystemSharedMemoryUnregisterResponse {}))
    }

    async fn cuda_shared_memory_status(
        &self,
        r: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        match r.into_inner().name {
            n if n.is_empty() => Ok(Response::new(pb::CudaSharedMemoryStatusResponse::default())),
            n => Err(Status::invalid_argument(format!("no CUDA shared-memory region {n:?} is registered"))),
        }
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        Err(Status::unimplemented(crate::system_shm::NO_CUDA_SHARED_MEMORY))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        Ok(Response::new(pb::CudaSharedMemoryUnregisterResponse {}))
    }

    async fn model_config(
        &self,
        r: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = r.into_inner();
        let v: Arc<crate::engine::ModelVersion> =
            find(&self.state, &model_path(&r.name, &r.version)).map_err(status)?;
        Ok(Response::new(pb::ModelConfigResponse { config: Some(v.config.clone()) }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn typed_contents_become_the_binary_extension_s_bytes() {
        let c = pb::InferTensorContents { int_contents: vec![1, -2], ..Default::default() };
        assert_eq!(contents_bytes("x", "INT16", &c).unwrap(), vec![1, 0, 0xfe, 0xff]);
        let big = pb::InferTensorContents { int_contents: vec![300], ..Default::default() };
        assert!(contents_bytes("x", "INT8", &big).is_err());
        let u = pb::InferTensorContents { uint_contents: vec![256], ..Default::default() };
        assert!(contents_bytes("x", "UINT8", &u).is_err());
        let b = pb::InferTensorContents { bytes_contents: vec![b"ab".to_vec()], ..Default::default() };
        assert_eq!(contents_bytes("x", "BYTES", &b).unwrap(), vec![2, 0, 0, 0, b'a', b'b']);
        assert!(contents_bytes("x", "FP16", &pb::InferTensorContents::default()).is_err());
    }

    #[test]
    fn reflection_is_built_from_the_descriptors_compiled_in() {
        // (reflection() expects this; the descriptors are the binary's own, never a client's.)
        let _ = reflection();
    }

    #[test]
    fn raw_and_typed_data_cannot_be_mixed_or_missing() {
        let input = |contents| pb::model_infer_request::InferInputTensor {
            name: "a".into(),
            datatype: "FP32".into(),
            shape: vec![1],
            contents,
            ..Default::default()
        };
        let typed = Some(pb::InferTensorContents { fp32_contents: vec![1.0], ..Default::default() });
        let both = pb::ModelInferRequest {
            inputs: vec![input(typed.clone())],
            raw_input_contents: vec![vec![0; 4].into()],
            ..Default::default()
        };
        assert!(as_http(&both).is_err());
        let none = pb::ModelInferRequest { inputs: vec![input(None)], ..Default::default() };
        assert!(as_http(&none).is_err());
        let miscounted = pb::ModelInferRequest {
            inputs: vec![input(None), input(None)],
            raw_input_contents: vec![vec![0; 4].into()],
            ..Default::default()
        };
        assert!(as_http(&miscounted).is_err());
        let (req, binary) =
            as_http(&pb::ModelInferRequest { inputs: vec![input(typed)], ..Default::default() }).unwrap();
        assert_eq!(binary[..], 1.0f32.to_le_bytes());
        assert_eq!(req.inputs[0].parameters["binary_data_size"], 4);
    }
}
