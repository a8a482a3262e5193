//! The frame format of requests and responses in shared-memory slots.
//!
//! Request:  `b"TQ"`, version, method, path and query, headers, body.
//! Response: `b"TR"`, version, status, headers, body, then a flag byte and,
//! when it is 1, the trailers (gRPC's `grpc-status` and `grpc-message` end
//! every gRPC answer there).
//! Integers are little-endian; every length is checked against the buffer,
//! so a malformed frame is an error, never a panic (the decoder is fuzzed).

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

/// Frame format version; bump on any layout change.
pub const FRAME_VERSION: u8 = 2;
const REQUEST_MAGIC: &[u8; 2] = b"TQ";
const RESPONSE_MAGIC: &[u8; 2] = b"TR";

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame does not fit in the slot.
    #[error("frame needs more than the {capacity} bytes of a slot")]
    TooLarge {
        /// Slot capacity in bytes.
        capacity: usize,
    },
    /// The buffer ends before the frame does.
    #[error("frame truncated at byte {0}")]
    Truncated(usize),
    /// Wrong magic or version.
    #[error("not a version-{FRAME_VERSION} {0} frame")]
    Header(&'static str),
    /// A field is not valid HTTP.
    #[error("invalid {0} in frame")]
    Invalid(&'static str),
}

/// A request as carried through shared memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    /// HTTP method.
    pub method: Method,
    /// Path and query.
    pub uri: Uri,
    /// Headers (end-to-end ones only).
    pub headers: HeaderMap,
    /// Body.
    pub body: Vec<u8>,
}

/// A response as carried through shared memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseFrame {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Vec<u8>,
    /// Trailers, when the answer ends with some (every gRPC answer does).
    pub trailers: Option<HeaderMap>,
}

/// Writes into a fixed buffer (a slot), failing cleanly when it is full.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        let end = self.pos.checked_add(bytes.len()).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(FrameError::TooLarge { capacity: self.buf.len() })?;
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    fn headers(&mut self, headers: &HeaderMap) -> Result<(), FrameError> {
        let count = u16::try_from(headers.len()).map_err(|_| FrameError::Invalid("header count"))?;
        self.put(&count.to_le_bytes())?;
        for (name, value) in headers {
            let n = u16::try_from(name.as_str().len()).map_err(|_| FrameError::Invalid("header name"))?;
            let v = u32::try_from(value.len()).map_err(|_| FrameError::Invalid("header value"))?;
            self.put(&n.to_le_bytes())?;
            self.put(name.as_str().as_bytes())?;
            self.put(&v.to_le_bytes())?;
            self.put(value.as_bytes())?;
        }
        Ok(())
    }
}

/// Reads a frame, checking every length.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(FrameError::Truncated(self.pos))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn magic(&mut self, magic: &[u8; 2], what: &'static str) -> Result<(), FrameError> {
        if self.take(2)? != magic || self.u8()? != FRAME_VERSION {
            return Err(FrameError::Header(what));
        }
        Ok(())
    }

    fn headers(&mut self) -> Result<HeaderMap, FrameError> {
        let count = self.u16()?;
        // Each header takes at least 6 bytes; a count the buffer cannot hold is corrupt.
        if usize::from(count) * 6 > self.buf.len() - self.pos {
            return Err(FrameError::Truncated(self.pos));
        }
        let mut headers = HeaderMap::new();
        for _ in 0..count {
            let n = usize::from(self.u16()?);
            let name = HeaderName::from_bytes(self.take(n)?).map_err(|_| FrameError::Invalid("header name"))?;
            let v = self.u32()? as usize;
            let value = HeaderValue::from_bytes(self.take(v)?).map_err(|_| FrameError::Invalid("header value"))?;
            headers.try_append(name, value).map_err(|_| FrameError::Invalid("header count"))?;
        }
        Ok(headers)
    }

    fn body(&mut self) -> Result<Vec<u8>, FrameError> {
        let len = usize::try_from(self.u64()?).map_err(|_| FrameError::Truncated(self.pos))?;
        Ok(self.take(len)?.to_vec())
    }

    fn end(&self) -> Result<(), FrameError> {
        if self.pos != self.buf.len() {
            return Err(FrameError::Invalid("trailing bytes"));
        }
        Ok(())
    }
}

/// Encodes a request into `buf`, its body given as the chunks it was read in
/// (written one after the other); returns the frame length.
pub fn encode_request(
    buf: &mut [u8],
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[impl AsRef<[u8]>],
) -> Result<usize, FrameError> {
    let mut w = Writer { buf, pos: 0 };
    w.put(REQUEST_MAGIC)?;
    w.put(&[FRAME_VERSION])?;
    let m = method.as_str().as_bytes();
    w.put(&[u8::try_from(m.len()).map_err(|_| FrameError::Invalid("method"))?])?;
    w.put(m)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes();
    w.put(&u32::try_from(path.len()).map_err(|_| FrameError::Invalid("uri"))?.to_le_bytes())?;
    w.put(path)?;
    w.headers(headers)?;
    let len: usize = body.iter().map(|c| c.as_ref().len()).sum();
    w.put(&(len as u64).to_le_bytes())?;
    for chunk in body {
        w.put(chunk.as_ref())?;
    }
    Ok(w.pos)
}

/// Decodes a request frame.
pub fn decode_request(buf: &[u8]) -> Result<RequestFrame, FrameError> {
    let mut r = Reader { buf, pos: 0 };
    r.magic(REQUEST_MAGIC, "request")?;
    let m = usize::from(r.u8()?);
    let method = Method::from_bytes(r.take(m)?).map_err(|_| FrameError::Invalid("method"))?;
    let u = r.u32()? as usize;
    // Only origin form ("/path?query") is ever encoded.
    let uri = r.take(u)?;
    if uri.first() != Some(&b'/') {
        return Err(FrameError::Invalid("uri"));
    }
    let uri = Uri::try_from(uri).map_err(|_| FrameError::Invalid("uri"))?;
    let headers = r.headers()?;
    let body = r.body()?;
    r.end()?;
    Ok(RequestFrame { method, uri, headers, body })
}

/// Encodes a response (and its trailers, if any) into `buf`; returns the frame length.
pub fn encode_response(
    buf: &mut [u8],
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    trailers: Option<&HeaderMap>,
) -> Result<usize, FrameError> {
    let mut w = Writer { buf, pos: 0 };
    w.put(RESPONSE_MAGIC)?;
    w.put(&[FRAME_VERSION])?;
    w.put(&status.as_u16().to_le_bytes())?;
    w.headers(headers)?;
    w.put(&(body.len() as u64).to_le_bytes())?;
    w.put(body)?;
    match trailers {
        Some(t) => {
            w.put(&[1])?;
            w.headers(t)?;
        }
        None => w.put(&[0])?,
    }
    Ok(w.pos)
}

/// Decodes a response frame.
pub fn decode_response(buf: &[u8]) -> Result<ResponseFrame, FrameError> {
    let mut r = Reader { buf, pos: 0 };
    r.magic(RESPONSE_MAGIC, "response")?;
    let status = StatusCode::from_u16(r.u16()?).map_err(|_| FrameError::Invalid("status"))?;
    let headers = r.headers()?;
    let body = r.body()?;
    let trailers = match r.u8()? {
        0 => None,
        1 => Some(r.headers()?),
        _ => return Err(FrameError::Invalid("trailers flag")),
    };
    r.end()?;
    Ok(ResponseFrame { status, headers, body, trailers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h
    }

    #[test]
    fn request_round_trips() {
        let mut buf = vec![0u8; 4096];
        let uri: Uri = "/v2/models/digits/infer?x=1".parse().expect("uri");
        let n = encode_request(&mut buf, &Method::POST, &uri, &sample_headers(), &[b"{\"a\":1}"]).expect("encode");
        let f = decode_request(&buf[..n]).expect("decode");
        assert_eq!(f.method, Method::POST);
        assert_eq!(f.uri, uri);
        assert_eq!(f.headers.get_all("x-multi").iter().count(), 2);
        assert_eq!(f.body, b"{\"a\":1}");
        // A body given in chunks is the same frame as the body in one piece.
        let mut chunked = vec![0u8; 4096];
        let m = encode_request(&mut chunked, &Method::POST, &uri, &sample_headers(), &[&b"{\"a\""[..], b"", b":1}"])
            .expect("encode");
        assert_eq!(&chunked[..m], &buf[..n]);
        let small = &mut [0u8; 64][..];
        assert!(matches!(
            encode_request(small, &Method::POST, &uri, &HeaderMap::new(), &[[0u8; 40], [0u8; 40]]),
            Err(FrameError::TooLarge { capacity: 64 })
        ));
    }

    #[test]
    fn response_round_trips_and_too_large_is_an_error() {
        let mut buf = vec![0u8; 256];
        let n = encode_response(&mut buf, StatusCode::IM_A_TEAPOT, &sample_headers(), b"hi", None).expect("encode");
        let f = decode_response(&buf[..n]).expect("decode");
        assert_eq!((f.status, f.body.as_slice(), f.trailers), (StatusCode::IM_A_TEAPOT, &b"hi"[..], None));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let n = encode_response(&mut buf, StatusCode::OK, &HeaderMap::new(), b"m", Some(&trailers)).expect("encode");
        let f = decode_response(&buf[..n]).expect("decode");
        assert_eq!(f.trailers.as_ref().map(|t| &t["grpc-status"]), Some(&HeaderValue::from_static("0")));
        for cut in 0..n {
            assert!(decode_response(&buf[..cut]).is_err(), "truncated at {cut} decoded");
        }
        let err = encode_response(&mut buf, StatusCode::OK, &HeaderMap::new(), &[0; 300], None).expect_err("too large");
        assert_eq!(err, FrameError::TooLarge { capacity: 256 });
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let mut buf = vec![0u8; 4096];
        let uri: Uri = "/x".parse().expect("uri");
        let n = encode_request(&mut buf, &Method::GET, &uri, &sample_headers(), &[b"body"]).expect("encode");
        let frame = buf[..n].to_vec();
        for cut in 0..n {
            assert!(decode_request(&frame[..cut]).is_err(), "truncated at {cut} decoded");
        }
        // Deterministic pseudo-random corruption (xorshift), many rounds.
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut f = frame.clone();
            for _ in 0..3 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let i = (s as usize) % f.len();
                f[i] = (s >> 32) as u8;
            }
            let _ = decode_request(&f);
            let _ = decode_response(&f);
        }
    }
}
