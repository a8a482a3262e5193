//! gRPC calls that stream, carried through the shared-memory ring as the
//! unary calls they are made of (every other gRPC call is unary and crosses
//! the ring whole, see [`crate::forward`]):
//!
//! - each message of a `ModelStreamInfer` stream is one `ModelInfer` call,
//!   spread over the engines like any request, up to [`STREAM_AHEAD`] at
//!   once, and answered on the stream in the order asked; a failed one is
//!   answered with its `error_message` and the stream goes on (Triton's
//!   behaviour for models that are not decoupled);
//! - a `grpc.health.v1.Health/Watch` is its `Check` asked again every
//!   [`WATCH_EVERY`], the answer sent when it changes (`SERVICE_UNKNOWN` for
//!   a model that does not exist, as the health protocol asks);
//! - each request of a server reflection stream (whose answers depend on
//!   nothing but the request) is a call of its own on the same path, carrying
//!   that one request.
//!
//! The call's `grpc-timeout` bounds the whole stream. Only framing is read
//! here: the engine decodes and encodes the messages themselves.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tandem_shared::edge::budget::Share;
use tandem_shared::edge::front;
use tandem_shared::edge::grpc::{self, code, Message, Messages};
use tandem_shared::edge::serve::{BoxError, RequestBody};
use tandem_shared::frame::ResponseFrame;
use tokio::sync::mpsc;

use crate::forward::{Forwarder, Reply};

/// The bidirectional inference stream.
const STREAM: &str = "/inference.GRPCInferenceService/ModelStreamInfer";
/// The unary call each of its messages becomes.
const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
/// The health service's server stream.
const WATCH: &str = "/grpc.health.v1.Health/Watch";
/// The unary call it repeats.
const CHECK: &str = "/grpc.health.v1.Health/Check";
/// Messages of one stream in the ring at once; also the answers that wait
/// for a client that does not read (then the stream stops reading requests).
const STREAM_AHEAD: usize = 16;
/// How often a health watch asks again.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVICE_UNKNOWN`.
const SERVICE_UNKNOWN: i32 = 3;

/// `inference.ModelStreamInferResponse` as the wire sees it: the
/// `ModelInferResponse` stays the bytes the engine encoded (a message field
/// and a bytes field are the same on the wire).
#[derive(Clone, PartialEq, prost::Message)]
struct StreamAnswer {
    #[prost(string, tag = "1")]
    error_message: String,
    #[prost(bytes = "vec", optional, tag = "2")]
    infer_response: Option<Vec<u8>>,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthAnswer {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// The streams served here, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `ModelStreamInfer`: each request a `ModelInfer` call, errors on the stream.
    Infer,
    /// Health `Watch`: its `Check` again and again.
    Watch,
    /// Reflection: each request a call of its own on the same path.
    Each,
}

/// The server reflection streams (v1, and v1alpha that older tools ask for).
const REFLECTION: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

fn kind(path: &str) -> Option<Kind> {
    match path {
        STREAM => Some(Kind::Infer),
        WATCH => Some(Kind::Watch),
        p if REFLECTION.contains(&p) => Some(Kind::Each),
        _ => None,
    }
}

/// Whether a gRPC call's path is one of the streams served here.
pub fn is_split(path: &str) -> bool {
    kind(path).is_some()
}

type Sender = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// Serves a stream: the answer's headers go at once, its messages as they are
/// answered, its status last (in trailers).
pub fn split<B: RequestBody>(fwd: Arc<Forwarder>, req: Request<B>) -> Reply {
    let (mut parts, body) = req.into_parts();
    // Without a deadline a stream lasts as long as its client keeps it (a health watch, for ever).
    let within = grpc::timeout(&parts.headers);
    let kind = kind(parts.uri.path()).unwrap_or(Kind::Each);
    // Each message becomes a unary call with the stream's headers, answered
    // uncompressed (its bytes are re-wrapped here), with no deadline of its
    // own: the stream's bounds them all.
    match kind {
        Kind::Infer => parts.uri = Uri::from_static(INFER),
        Kind::Watch => parts.uri = Uri::from_static(CHECK),
        Kind::Each => {}
    }
    parts.headers.remove("grpc-accept-encoding");
    parts.headers.remove("grpc-timeout");
    fwd.vouch(&mut parts);
    let (tx, rx) = mpsc::channel(STREAM_AHEAD);
    tokio::spawn(async move {
        let served = async {
            match kind {
                Kind::Watch => watch(&fwd, &parts, body, &tx).await,
                Kind::Infer | Kind::Each => stream(&fwd, &parts, body, &tx, kind).await,
            }
        };
        let (status, message) = match within {
            None => served.await,
            Some(within) => tokio::time::timeout(within, served).await.unwrap_or_else(|_| {
                (code::DEADLINE_EXCEEDED, format!("the call's deadline ({} ms) passed", within.as_millis()))
            }),
        };
        let _ = tx.send(Ok(Frame::trailers(grpc::status_headers(status, &message)))).await;
    });
    let mut res = Response::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed());
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    *res.status_mut() = StatusCode::OK;
    res
}

/// How a stream ended: its status and message.
type Ended = (u8, String);

/// A `ModelStreamInfer` or reflection stream: requests read, sent through
/// the ring and answered in order until the client's half ends (or, for
/// reflection, a call fails).
async fn stream(
    fwd: &Arc<Forwarder>,
    call: &http::request::Parts,
    mut body: impl RequestBody,
    tx: &Sender,
    kind: Kind,
) -> Ended {
    let mut cut = Messages::new(fwd.body_limit());
    let mut running = grpc::InOrder::new(STREAM_AHEAD);
    let mut reading = true;
    let mut broken: Option<Ended> = None;
    loop {
        if reading && running.has_room() {
            match cut.next_message() {
                Ok(Some(m)) => {
                    let (fwd, call) = (fwd.clone(), call.clone());
                    running.start(async move {
                        match kind {
                            Kind::Infer => Ok(infer(&fwd, &call, m).await),
                            _ => each(&fwd, &call, m).await,
                        }
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    // The answers already asked for still go out; then the stream ends with the status.
                    reading = false;
                    broken = Some((e.code(), e.to_string()));
                }
            }
        }
        if !reading && running.is_empty() {
            return broken.unwrap_or((code::OK, String::new()));
        }
        let room = reading && running.has_room();
        tokio::select! {
            frame = body.frame(), if room => match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        cut.push(&data);
                    }
                }
                None => {
                    reading = false;
                    if let Err(e) = cut.finish() {
                        broken = Some((e.code(), e.to_string()));
                    }
                }
                // The client reset its half: nobody is left to answer.
                Some(Err(e)) => {
                    running.abort();
                    return (code::INTERNAL, format!("cannot read the stream: {}", Into::<BoxError>::into(e)));
                }
            },
            answer = running.next() => {
                let wire = match answer {
                    Ok(Ok(wire)) => wire,
                    Ok(Err(ended)) => {
                        running.abort();
                        return ended;
                    }
                    Err(e) if kind == Kind::Infer => stream_answer(Err(format!("the request failed: {e}"))),
                    Err(e) => return (code::INTERNAL, format!("the request failed: {e}")),
                };
                if tx.send(Ok(Frame::data(wire))).await.is_err() {
                    // The client is gone; what is still in the ring is abandoned with it.
                    running.abort();
                    return (code::INTERNAL, "the client went away".into());
                }
            }
        }
    }
}

/// One request of a stream, through the ring, as its message on the stream.
async fn infer(fwd: &Forwarder, call: &http::request::Parts, m: Message) -> Bytes {
    // The message's bytes are held until its answer is made, like a request body's.
    let mut share = Share::default();
    if let Err(e) = fwd.budget.reserve(&mut share, m.wire.len() as u64, tandem_shared::edge::budget::WAIT).await {
        return stream_answer(Err(e.to_string()));
    }
    let answer = match fwd.exchange(call, std::slice::from_ref(&m.wire)).await {
        Ok(frame) => unary_answer(&frame),
        Err(refused) => Err(front::error_message(&refused)),
    };
    stream_answer(answer.map(|payload| payload.to_vec()))
}

/// One request of a reflection stream, through the ring: its answer as the
/// stream's message, or the status the stream ends with.
async fn each(fwd: &Forwarder, call: &http::request::Parts, m: Message) -> Result<Bytes, Ended> {
    match fwd.exchange(call, std::slice::from_ref(&m.wire)).await {
        Ok(frame) => match (grpc::status_of(&frame.headers, frame.trailers.as_ref()), unary_answer(&frame)) {
            (_, Ok(payload)) => Ok(grpc::message(&payload)),
            (status, Err(message)) => Err((status.map_or(code::INTERNAL, |s| s.0), message)),
        },
        Err(refused) => Err((grpc::code_for(refused.status()), front::error_message(&refused))),
    }
}

/// A unary call's answer from the engine: its one message's payload, or its
/// error's message.
fn unary_answer(frame: &ResponseFrame) -> Result<Bytes, String> {
    match grpc::status_of(&frame.headers, frame.trailers.as_ref()) {
        Some((code::OK, _)) => {
            let mut cut = Messages::new(usize::MAX);
            cut.push(&frame.body);
            match cut.next_message() {
                Ok(Some(m)) if !m.compressed => Ok(m.wire.slice(grpc::PREFIX_BYTES..)),
                _ => Err("the engine's answer was not one uncompressed message".into()),
            }
        }
        Some((_, message)) => Err(message),
        // Not a gRPC answer: one of the engine's JSON errors.
        None => Err(serde_json::from_slice::<serde_json::Value>(&frame.body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(String::from))
            .unwrap_or_else(|| frame.status.to_string())),
    }
}

/// A `ModelStreamInferResponse` on the wire: the answer, or its error.
fn stream_answer(answer: Result<Vec<u8>, String>) -> Bytes {
    let answer = match answer {
        Ok(response) => StreamAnswer { error_message: String::new(), infer_response: Some(response) },
        Err(error_message) => StreamAnswer { error_message, infer_response: None },
    };
    grpc::message(&prost::Message::encode_to_vec(&answer))
}

/// A health `Watch`: its one request read, then its `Check` asked again until
/// the client goes or the deadline passes.
async fn watch(fwd: &Forwarder, call: &http::request::Parts, mut body: impl RequestBody, tx: &Sender) -> Ended {
    let mut cut = Messages::new(fwd.body_limit());
    let request = loop {
        match cut.next_message() {
            Ok(Some(m)) => break m,
            Ok(None) => {}
            Err(e) => return (e.code(), e.to_string()),
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    cut.push(&data);
                }
            }
            None => return (code::INVALID_ARGUMENT, "a Watch call needs its request message".into()),
            Some(Err(e)) => return (code::INTERNAL, format!("cannot read the call: {}", Into::<BoxError>::into(e))),
        }
    };
    let mut last: Option<Bytes> = None;
    loop {
        let seen = match fwd.exchange(call, std::slice::from_ref(&request.wire)).await {
            Ok(frame) => match (grpc::status_of(&frame.headers, frame.trailers.as_ref()), unary_answer(&frame)) {
                (_, Ok(payload)) => payload,
                (Some((code::NOT_FOUND, _)), Err(_)) => {
                    Bytes::from(prost::Message::encode_to_vec(&HealthAnswer { status: SERVICE_UNKNOWN }))
                }
                (status, Err(message)) => return (status.map_or(code::INTERNAL, |s| s.0), message),
            },
            Err(refused) => return (grpc::code_for(refused.status()), front::error_message(&refused)),
        };
        if last.as_ref() != Some(&seen) {
            if tx.send(Ok(Frame::data(grpc::message(&seen)))).await.is_err() {
                return (code::INTERNAL, "the client went away".into());
            }
            last = Some(seen);
        }
        tokio::select! {
            () = tokio::time::sleep(WATCH_EVERY) => {}
            () = tx.closed() => return (code::INTERNAL, "the client went away".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_answer_carries_the_engine_s_bytes_or_the_error() {
        let ok = stream_answer(Ok(vec![0x0a, 1, b'm']));
        // Field 2, length 3, the engine's ModelInferResponse bytes untouched.
        assert_eq!(&ok[grpc::PREFIX_BYTES..], &[0x12, 3, 0x0a, 1, b'm']);
        let err = stream_answer(Err("bad".into()));
        assert_eq!(&err[grpc::PREFIX_BYTES..], &[0x0a, 3, b'b', b'a', b'd']);
        // An empty answer is still an answer (present, not absent).
        assert_eq!(&stream_answer(Ok(vec![]))[grpc::PREFIX_BYTES..], &[0x12, 0]);
    }

    #[test]
    fn a_unary_answer_is_its_message_or_its_error() {
        let mut trailers = grpc::status_headers(code::OK, "");
        let frame = |body: Bytes, trailers: &http::HeaderMap| ResponseFrame {
            status: StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: body.to_vec(),
            trailers: Some(trailers.clone()),
        };
        assert_eq!(unary_answer(&frame(grpc::message(b"abc"), &trailers)), Ok(Bytes::from_static(b"abc")));
        trailers = grpc::status_headers(code::INVALID_ARGUMENT, "bad tensor");
        assert_eq!(unary_answer(&frame(Bytes::new(), &trailers)), Err("bad tensor".into()));
        let json = ResponseFrame {
            status: StatusCode::SERVICE_UNAVAILABLE,
            headers: http::HeaderMap::new(),
            body: br#"{"error":"busy"}"#.to_vec(),
            trailers: None,
        };
        assert_eq!(unary_answer(&json), Err("busy".into()));
    }
}
