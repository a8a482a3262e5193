//! gRPC on the wire, as much as the request paths need without a gRPC stack:
//! recognising a call, answering one with a status (trailers-only), reading a
//! call's status and deadline, and cutting a body into its length-prefixed
//! messages. The engine's service itself is tonic (`engine-worker/src/grpc.rs`);
//! the front door and the HTTPS worker speak only this much.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use http_body_util::Full;

use super::front::{error_message, Answer};

/// The status codes tandem answers with (gRPC's `Code`).
pub mod code {
    /// Success.
    pub const OK: u8 = 0;
    /// The call failed for a reason without a better code.
    pub const UNKNOWN: u8 = 2;
    /// A bad request (a bad tensor, a bad parameter).
    pub const INVALID_ARGUMENT: u8 = 3;
    /// The call's deadline (or `REQUEST_TIMEOUT`) passed.
    pub const DEADLINE_EXCEEDED: u8 = 4;
    /// No such model.
    pub const NOT_FOUND: u8 = 5;
    /// The caller may not make this call.
    pub const PERMISSION_DENIED: u8 = 7;
    /// Over a limit: a message over `MAX_REQUEST_BYTES`, a rate limit.
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    /// No such method.
    pub const UNIMPLEMENTED: u8 = 12;
    /// Broken framing, or tandem failed.
    pub const INTERNAL: u8 = 13;
    /// Not now: busy, stopping, or a model not loaded.
    pub const UNAVAILABLE: u8 = 14;
    /// No (valid) credentials.
    pub const UNAUTHENTICATED: u8 = 16;
}

/// The calls whose request is a stream of messages for as long as the client
/// likes (so no body deadline applies to them; their own `grpc-timeout` does).
const CLIENT_STREAMS: [&str; 2] =
    ["/inference.GRPCInferenceService/ModelStreamInfer", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"];

/// Whether `path` is a call whose client streams its requests.
pub fn is_client_stream(path: &str) -> bool {
    CLIENT_STREAMS.contains(&path) || path == "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
}

/// Bytes before each message: a compressed flag and a big-endian length.
pub const PREFIX_BYTES: usize = 5;

/// Whether a request is a gRPC call (`content-type: application/grpc`, `+proto` and the like).
pub fn is_call(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Answers a call uncompressed unless the call itself came compressed: drops
/// `grpc-accept-encoding` when `grpc-encoding` is absent or `identity`. gRPC
/// clients (grpc-core, so tritonclient and perf_analyzer) advertise gzip on
/// every call; answering each in gzip costs the server most of its time on
/// large tensors, and Triton answers uncompressed unless asked. A client that
/// compresses its requests gets compressed answers back.
pub fn answer_as_asked(headers: &mut HeaderMap) {
    let compressed = headers.get("grpc-encoding").is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if !compressed {
        headers.remove("grpc-accept-encoding");
    }
}

/// `grpc-status` and `grpc-message` (percent-encoded, as the gRPC spec asks),
/// for the trailers of an answer or the headers of a trailers-only one.
pub fn status_headers(code: u8, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            h.insert("grpc-message", v);
        }
    }
    h
}

/// A gRPC "trailers-only" answer: HTTP 200 whose headers carry the status.
pub fn trailers_only(code: u8, message: &str) -> Answer {
    let mut res = Answer::new(Full::new(Bytes::new()));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.extend(status_headers(code, message));
    res
}

/// The gRPC code an HTTP status of tandem's own answers means.
pub fn code_for(status: StatusCode) -> u8 {
    match status {
        StatusCode::BAD_REQUEST => code::INVALID_ARGUMENT,
        StatusCode::UNAUTHORIZED => code::UNAUTHENTICATED,
        StatusCode::FORBIDDEN => code::PERMISSION_DENIED,
        // A path the door does not know: no such method.
        StatusCode::NOT_FOUND => code::UNIMPLEMENTED,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => code::DEADLINE_EXCEEDED,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE => code::RESOURCE_EXHAUSTED,
        StatusCode::SERVICE_UNAVAILABLE => code::UNAVAILABLE,
        StatusCode::INTERNAL_SERVER_ERROR | StatusCode::BAD_GATEWAY => code::INTERNAL,
        _ => code::UNKNOWN,
    }
}

/// One of tandem's own JSON answers as the gRPC status it means
/// (trailers-only), its message kept; `Retry-After`, `WWW-Authenticate` and
/// `Location` stay as they were.
pub fn refusal(answer: Answer) -> Answer {
    let mut res = trailers_only(code_for(answer.status()), &error_message(&answer));
    for name in [header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::LOCATION] {
        if let Some(v) = answer.headers().get(&name) {
            res.headers_mut().insert(name, v.clone());
        }
    }
    res
}

/// A call's status: from its trailers, else (trailers-only) its headers.
/// `None` when neither carries a valid `grpc-status`.
pub fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<(u8, String)> {
    let from = trailers.filter(|t| t.contains_key("grpc-status")).unwrap_or(headers);
    let code = from.get("grpc-status")?.to_str().ok()?.parse::<u8>().ok()?;
    let message = from.get("grpc-message").map(|m| percent_decode(m.as_bytes())).unwrap_or_default();
    Some((code, message))
}

/// A call's `grpc-timeout` (at most eight digits and a unit: `H`, `M`, `S`,
/// `m`, `u`, `n`), when it has a valid one.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn percent_encode(message: &str) -> String {
    message
        .bytes()
        .map(|b| if (0x20..0x7f).contains(&b) && b != b'%' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `payload` as one uncompressed message on the wire.
pub fn message(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_BYTES + payload.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

/// One message cut from a body: its bytes on the wire (prefix included), and
/// whether its flag says compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Prefix and payload, as the client sent them.
    pub wire: Bytes,
    /// The compressed flag (the payload is in the call's `grpc-encoding`).
    pub compressed: bool,
}

impl Message {
    /// The payload, without its prefix.
    pub fn payload(&self) -> &[u8] {
        &self.wire[PREFIX_BYTES..]
    }
}

/// Why a body could not be cut into messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A message's length is over the limit; nothing of it is read.
    #[error("a message of {len} bytes is over the limit of {limit} (MAX_REQUEST_BYTES)")]
    TooLarge {
        /// The length its prefix declares.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// A flag other than 0 or 1.
    #[error("a message's compressed flag is {0}, not 0 or 1")]
    Flag(u8),
    /// The body ended inside a message.
    #[error("the call's body ended inside a message")]
    Truncated,
}

impl FramingError {
    /// The status a call ends with for it.
    pub fn code(&self) -> u8 {
        match self {
            FramingError::TooLarge { .. } => code::RESOURCE_EXHAUSTED,
            FramingError::Flag(_) | FramingError::Truncated => code::INTERNAL,
        }
    }
}

/// A message's prefix: whether it is compressed, and its length (at most `limit`).
fn read_prefix(prefix: &[u8], limit: usize) -> Result<(bool, usize), FramingError> {
    let flag = prefix[0];
    if flag > 1 {
        return Err(FramingError::Flag(flag));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    match usize::try_from(len) {
        Ok(len) if len <= limit => Ok((flag == 1, len)),
        _ => Err(FramingError::TooLarge { len: u64::from(len), limit }),
    }
}

/// A request body whose messages are checked as they pass (a length over
/// `limit`, a bad flag, the body ending inside a message), so a call over
/// `MAX_REQUEST_BYTES` ends with `RESOURCE_EXHAUSTED` before any of the
/// message is held. Its error is what `error` makes of the [`FramingError`]
/// (the engine's gRPC stack reads a status from it).
pub struct Checked<B> {
    inner: B,
    limit: usize,
    /// Prefix bytes of the next message seen so far.
    prefix: [u8; PREFIX_BYTES],
    have: usize,
    /// Bytes of the current message still to pass.
    left: usize,
    error: fn(FramingError) -> BoxError,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Checked<B> {
    /// `inner`, its messages at most `limit` bytes, a violation ending it with `error(..)`.
    pub fn new(inner: B, limit: usize, error: fn(FramingError) -> BoxError) -> Self {
        Checked { inner, limit, prefix: [0; PREFIX_BYTES], have: 0, left: 0, error }
    }

    fn scan(&mut self, mut data: &[u8]) -> Result<(), FramingError> {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                continue;
            }
            let n = (PREFIX_BYTES - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == PREFIX_BYTES {
                self.left = read_prefix(&self.prefix, self.limit)?.1;
                self.have = 0;
            }
        }
        Ok(())
    }
}

impl<B> hyper::body::Body for Checked<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(e) = this.scan(data) {
                        return Poll::Ready(Some(Err((this.error)(e))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) if this.have + this.left > 0 => {
                (this.have, this.left) = (0, 0);
                Poll::Ready(Some(Err((this.error)(FramingError::Truncated))))
            }
            other => other.map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Cuts a body arriving in pieces into messages, never holding more than one
/// message of at most `limit` bytes beyond what arrived.
#[derive(Debug)]
pub struct Messages {
    buf: BytesMut,
    limit: usize,
}

impl Messages {
    /// A cutter for messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Messages { buf: BytesMut::new(), limit }
    }

    /// Adds what arrived.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, `None` until one has arrived; a prefix over the
    /// limit or with a bad flag is an error as soon as its five bytes are in.
    pub fn next_message(&mut self) -> Result<Option<Message>, FramingError> {
        let Some(prefix) = self.buf.get(..PREFIX_BYTES) else {
            return Ok(None);
        };
        let (compressed, len) = read_prefix(prefix, self.limit)?;
        let whole = PREFIX_BYTES + len;
        if self.buf.len() < whole {
            self.buf.reserve(whole - self.buf.len());
            return Ok(None);
        }
        let wire = self.buf.split_to(whole).freeze();
        Ok(Some(Message { wire, compressed }))
    }

    /// At the end of the body: an error if a message was left unfinished.
    pub fn finish(&self) -> Result<(), FramingError> {
        match self.buf.remaining() {
            0 => Ok(()),
            _ => Err(FramingError::Truncated),
        }
    }
}

/// The requests of one stream being answered: at most `limit` at once, each
/// its own task, their answers taken in the order they were asked.
#[derive(Debug)]
pub struct InOrder<T> {
    running: std::collections::VecDeque<tokio::task::JoinHandle<T>>,
    limit: usize,
}

impl<T: Send + 'static> InOrder<T> {
    /// Room for `limit` requests at once.
    pub fn new(limit: usize) -> Self {
        InOrder { running: std::collections::VecDeque::new(), limit }
    }

    /// Whether another request may start.
    pub fn has_room(&self) -> bool {
        self.running.len() < self.limit
    }

    /// Whether none is running.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Starts answering one more request.
    pub fn start(&mut self, answer: impl std::future::Future<Output = T> + Send + 'static) {
        self.running.push_back(tokio::spawn(answer));
    }

    /// The oldest request's answer, once it is ready (never, when none is
    /// running); `Err` if its task panicked. Cancel-safe: dropped before it
    /// is ready, the answer stays first in line.
    pub async fn next(&mut self) -> Result<T, tokio::task::JoinError> {
        let answer = match self.running.front_mut() {
            Some(first) => first.await,
            None => std::future::pending().await,
        };
        self.running.pop_front();
        answer
    }

    /// Stops every request still running (the client went away).
    pub fn abort(&mut self) {
        self.running.drain(..).for_each(|t| t.abort());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;
    use crate::edge::front::error;

    #[test]
    fn a_refusal_keeps_the_door_s_words_and_means_the_right_code() {
        let mut res = refusal(error(StatusCode::TOO_MANY_REQUESTS, "slow down; 50% over"));
        res.headers_mut().remove(header::DATE);
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["grpc-message"], "slow down; 50%25 over");
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(refusal(error(StatusCode::UNAUTHORIZED, "key")).headers()["grpc-status"], "16");
        assert_eq!(status_of(res.headers(), None), Some((code::RESOURCE_EXHAUSTED, "slow down; 50% over".to_string())));
    }

    #[test]
    fn a_status_is_read_from_the_trailers_first_and_messages_are_decoded() {
        let headers = status_headers(code::OK, "");
        let trailers = status_headers(code::NOT_FOUND, "no model \"x\" é");
        assert_eq!(status_of(&headers, Some(&trailers)), Some((5, "no model \"x\" é".to_string())));
        assert_eq!(status_of(&headers, None), Some((0, String::new())));
        assert_eq!(status_of(&HeaderMap::new(), Some(&HeaderMap::new())), None);
        assert_eq!(percent_decode(b"100%"), "100%");
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
    }

    #[test]
    fn deadlines_are_read_as_grpc_writes_them() {
        let d = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            timeout(&h)
        };
        assert_eq!(d("300m"), Some(Duration::from_millis(300)));
        assert_eq!(d("2S"), Some(Duration::from_secs(2)));
        assert_eq!(d("1H"), Some(Duration::from_secs(3600)));
        for bad in ["m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(d(bad), None, "{bad}");
        }
        assert_eq!(timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn messages_are_cut_whole_however_the_body_arrives() {
        let mut wire = message(b"hello").to_vec();
        wire.extend_from_slice(&message(b""));
        wire.extend_from_slice(&[1, 0, 0, 0, 2, 7, 7]);
        for piece in 1..wire.len() {
            let mut m = Messages::new(16);
            let mut got = Vec::new();
            for chunk in wire.chunks(piece) {
                m.push(chunk);
                while let Some(msg) = m.next_message().unwrap() {
                    got.push((msg.payload().to_vec(), msg.compressed));
                }
            }
            m.finish().unwrap();
            assert_eq!(got, vec![(b"hello".to_vec(), false), (vec![], false), (vec![7, 7], true)]);
        }
    }

    #[tokio::test]
    async fn a_checked_body_passes_good_messages_and_stops_at_the_first_bad_one() {
        use http_body_util::BodyExt;
        let error: fn(FramingError) -> BoxError = |e| Box::new(e);
        let chunks = |parts: Vec<Vec<u8>>| {
            let frames =
                parts.into_iter().map(|p| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(p))));
            http_body_util::StreamBody::new(tokio_stream::iter(frames))
        };
        let mut good = message(b"abc").to_vec();
        good.extend_from_slice(&message(&[9; 40]));
        let split: Vec<Vec<u8>> = good.chunks(3).map(<[u8]>::to_vec).collect();
        let body = Checked::new(chunks(split), 64, error).collect().await.unwrap();
        assert_eq!(body.to_bytes(), good);
        let over = Checked::new(chunks(vec![message(&[0; 65]).to_vec()]), 64, error).collect().await;
        let e = over.unwrap_err().downcast::<FramingError>().unwrap();
        assert_eq!(*e, FramingError::TooLarge { len: 65, limit: 64 });
        let short = Checked::new(chunks(vec![vec![0, 0, 0, 0, 9, 1, 2]]), 64, error).collect().await;
        assert_eq!(*short.unwrap_err().downcast::<FramingError>().unwrap(), FramingError::Truncated);
    }

    #[tokio::test]
    async fn answers_come_in_the_order_asked_whatever_order_they_finish_in() {
        let mut q = InOrder::new(3);
        for (i, ms) in [(0u32, 30u64), (1, 1), (2, 10)] {
            assert!(q.has_room());
            q.start(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                i
            });
        }
        assert!(!q.has_room());
        let mut got = Vec::new();
        while !q.is_empty() {
            got.push(q.next().await.unwrap());
        }
        assert_eq!(got, vec![0, 1, 2]);
        // With nothing running, next never ends.
        assert!(tokio::time::timeout(Duration::from_millis(20), q.next()).await.is_err());
    }

    #[test]
    fn a_hostile_prefix_is_refused_before_its_body_is_read() {
        let mut m = Messages::new(1024);
        m.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(m.next_message(), Err(FramingError::TooLarge { len: u64::from(u32::MAX), limit: 1024 }));
        let mut m = Messages::new(1024);
        m.push(&[9, 0, 0, 0, 0]);
        assert_eq!(m.next_message(), Err(FramingError::Flag(9)));
        let mut m = Messages::new(1024);
        m.push(&[0, 0, 0, 0, 9, 1]);
        assert_eq!(m.next_message(), Ok(None));
        assert_eq!(m.finish(), Err(FramingError::Truncated));
    }
}
