//! Compressed bodies: inference requests sent with `Content-Encoding: gzip` or
//! `deflate` (tritonclient's request compression) are inflated with a bound
//! (a zip bomb is a 413, not an OOM), and answers are compressed when the
//! client's `Accept-Encoding` asks. Requests that use neither pay nothing.

use std::io::Read;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

use tandem_shared::edge::budget::{Budget, Share, WAIT};

use crate::infer::ApiError;

/// Answers smaller than this are sent as they are (compression would not pay).
const MIN_COMPRESS: usize = 1024;
/// Larger answers are compressed on the blocking pool, off the async threads.
const BLOCKING_ABOVE: usize = 1 << 20;

/// The one coding a request body was sent with, lower-case: `None` for
/// none (or only `identity`). Every `Content-Encoding` header counts, in any
/// spelling, and each may be a list (`gzip, deflate`), as HTTP defines them:
/// a body coded twice, or two headers that disagree, is refused rather than
/// read as the first header alone says.
pub fn coding(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("(not text)").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity");
    let first = codings.next();
    if let Some(second) = codings.next() {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!(
                "the body is sent with two Content-Encodings ({:?}, then {second:?}); tandem inflates one",
                first.unwrap_or_default()
            ),
        });
    }
    Ok(first)
}

/// Inflates `body` as its `Content-Encoding` says, to at most `limit` bytes,
/// taking the inflated bytes (twice: they and what is decoded from them)
/// from `budget` into `share` as they come, so a small compressed body cannot
/// grow past what the worker may hold. `None` when the body is not encoded
/// (or `identity`).
pub async fn inflate(
    headers: &HeaderMap,
    body: &[u8],
    limit: usize,
    budget: &Budget,
    share: &mut Share,
) -> Result<Option<Vec<u8>>, ApiError> {
    let Some(encoding) = coding(headers)? else { return Ok(None) };
    let mut reader: Box<dyn Read + Send + '_> = match encoding.as_str() {
        "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(body)),
        // HTTP's "deflate" is the zlib format; some clients send raw deflate.
        "deflate" if body.first().is_some_and(|b| b & 0x0f == 8) => Box::new(flate2::read::ZlibDecoder::new(body)),
        "deflate" => Box::new(flate2::read::DeflateDecoder::new(body)),
        other => {
            return Err(ApiError {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message: format!("unsupported Content-Encoding {other:?}; tandem accepts gzip, deflate and identity"),
            })
        }
    };
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("the inflated request body exceeds MAX_REQUEST_BYTES ({limit} bytes)"),
    };
    let mut out: Vec<u8> = Vec::new();
    loop {
        // A step at a time: each step's output is paid for before the next is made.
        let step = INFLATE_STEP.min(limit + 1 - out.len());
        budget.take(share, step as u64 * 2, WAIT).await.map_err(crate::state::refused)?;
        let before = out.len();
        (&mut reader)
            .take(step as u64)
            .read_to_end(&mut out)
            .map_err(|e| ApiError::bad(format!("the {encoding} request body does not inflate: {e}")))?;
        if out.len() > limit {
            return Err(too_large());
        }
        if out.len() - before < step {
            return Ok(Some(out));
        }
    }
}

/// Bytes inflated between two looks at the memory budget.
const INFLATE_STEP: usize = 1 << 20;

/// The encoding to answer in: gzip or deflate when `Accept-Encoding` accepts it (q > 0).
pub fn wanted(headers: &HeaderMap) -> Option<&'static str> {
    let accept = headers.get(header::ACCEPT_ENCODING)?.to_str().ok()?;
    let accepts = |name: &str| {
        accept.split(',').any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let q = parts.find_map(|p| p.strip_prefix("q=")).and_then(|q| q.parse::<f32>().ok()).unwrap_or(1.0);
            coding.eq_ignore_ascii_case(name) && q > 0.0
        })
    };
    ["gzip", "deflate"].into_iter().find(|e| accepts(e))
}

fn compress(encoding: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let level = flate2::Compression::fast();
    if encoding == "gzip" {
        let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 2), level);
        e.write_all(body)?;
        e.finish()
    } else {
        let mut e = flate2::write::ZlibEncoder::new(Vec::with_capacity(body.len() / 2), level);
        e.write_all(body)?;
        e.finish()
    }
}

/// Compresses `res` in `encoding` when it is worth it and not encoded already.
pub async fn compress_response(res: Response, encoding: &'static str) -> Response {
    if res.headers().contains_key(header::CONTENT_ENCODING) {
        return res;
    }
    let small = axum::body::HttpBody::size_hint(res.body()).upper().is_some_and(|n| (n as usize) < MIN_COMPRESS);
    if small {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return crate::state::error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the response body to compress it");
    };
    let compressed = if bytes.len() > BLOCKING_ABOVE {
        let b = bytes.clone();
        tokio::task::spawn_blocking(move || compress(encoding, &b)).await.ok().and_then(Result::ok)
    } else {
        compress(encoding, &bytes).ok()
    };
    parts.headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    match compressed {
        Some(c) if c.len() < bytes.len() => {
            parts.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(c))
        }
        _ => Response::from_parts(parts, Body::from(bytes)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn headers(k: header::HeaderName, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(k, HeaderValue::from_str(v).unwrap());
        h
    }

    #[tokio::test]
    async fn bodies_inflate_within_the_limit() {
        let b = Budget::new(64 << 20);
        let data = vec![b'x'; 10_000];
        for enc in ["gzip", "deflate"] {
            let packed = compress(enc, &data).unwrap();
            let h = headers(header::CONTENT_ENCODING, enc);
            assert_eq!(inflate(&h, &packed, 20_000, &b, &mut Share::default()).await.unwrap().unwrap(), data);
            assert_eq!(
                inflate(&h, &packed, 9_999, &b, &mut Share::default()).await.unwrap_err().status,
                StatusCode::PAYLOAD_TOO_LARGE
            );
        }
        let raw = {
            use std::io::Write;
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        };
        assert_eq!(
            inflate(&headers(header::CONTENT_ENCODING, "deflate"), &raw, 20_000, &b, &mut Share::default())
                .await
                .unwrap()
                .unwrap(),
            data
        );
        assert_eq!(
            inflate(&headers(header::CONTENT_ENCODING, "br"), b"x", 10, &b, &mut Share::default())
                .await
                .unwrap_err()
                .status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            inflate(&headers(header::CONTENT_ENCODING, "gzip"), b"nope", 10, &b, &mut Share::default())
                .await
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert!(inflate(&HeaderMap::new(), b"x", 10, &b, &mut Share::default()).await.unwrap().is_none());
        // The inflated bytes count against the budget: a small body that inflates past it is refused.
        let tight = Budget::new(4 << 20);
        let zeros = vec![0u8; 3 << 20];
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &zeros).unwrap();
        let packed = e.finish().unwrap();
        let refused =
            inflate(&headers(header::CONTENT_ENCODING, "gzip"), &packed, 8 << 20, &tight, &mut Share::default())
                .await
                .unwrap_err();
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", refused.message);
    }

    #[test]
    fn accept_encoding_is_read_with_its_weights() {
        assert_eq!(wanted(&headers(header::ACCEPT_ENCODING, "gzip, deflate")), Some("gzip"));
        assert_eq!(wanted(&headers(header::ACCEPT_ENCODING, "gzip;q=0, deflate")), Some("deflate"));
        assert_eq!(wanted(&headers(header::ACCEPT_ENCODING, "br")), None);
        assert_eq!(wanted(&HeaderMap::new()), None);
    }
}
