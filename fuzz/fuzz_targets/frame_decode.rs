//! Fuzzes the shared-memory frame decoders: any bytes must decode or fail
//! cleanly, never panic; what decodes must re-encode to an equal frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_shared::frame::{decode_request, decode_response, encode_request, encode_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_request(data) {
        let mut buf = vec![0u8; data.len() + 64];
        let n = encode_request(&mut buf, &req.method, &req.uri, &req.headers, &[&req.body]).expect("re-encode");
        assert_eq!(decode_request(&buf[..n]).expect("decode again"), req);
    }
    if let Ok(res) = decode_response(data) {
        let mut buf = vec![0u8; data.len() + 64];
        let n = encode_response(&mut buf, res.status, &res.headers, &res.body, res.trailers.as_ref()).expect("re-encode");
        assert_eq!(decode_response(&buf[..n]).expect("decode again"), res);
    }
});
