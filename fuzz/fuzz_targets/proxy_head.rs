//! Fuzzes the proxy's request-head rewriting (WORKER_COMMAND): whatever head a
//! client sends, the copy never sees a header spelled with `_`, an
//! `X-Tandem-*` header, an upgrade other than WebSocket, forwarding headers
//! other than tandem's, or more than one `Host`; and nothing panics.

#![no_main]

use http::{HeaderName, HeaderValue, Method, Request, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let version = [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2][pick as usize % 3];
    let method = [Method::GET, Method::POST, Method::OPTIONS, Method::CONNECT][(pick as usize / 3) % 4].clone();
    let uri = ["/", "*", "example.com:443", "http://a.example/x"][(pick as usize / 12) % 4];
    let mut builder = Request::builder().method(method).version(version);
    builder = match uri.parse::<http::Uri>() {
        Ok(u) => builder.uri(u),
        Err(_) => return,
    };
    let Ok(mut req) = builder.body(()) else { return };
    // One header per line: "name: value".
    for line in rest.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value.trim_ascii())) else {
            continue;
        };
        req.headers_mut().append(name, value);
    }
    let peer: std::net::SocketAddr = "10.9.8.7:4242".parse().expect("addr");
    let Some(out) = tandem_proxy_worker::forward::head_for_copy(&req, pick & 1 == 1, 8443, Some(peer)) else { return };
    for (name, value) in &out {
        let n = name.as_str();
        assert!(!n.contains('_'), "{n} reached the copy");
        assert!(!n.starts_with("x-tandem-"), "{n} reached the copy");
        if n == "upgrade" {
            assert_eq!(value, "websocket", "an upgrade to {value:?} reached the copy");
        }
    }
    assert!(out.get_all(http::header::HOST).iter().count() <= 1, "two Host headers");
    for tandems in ["x-forwarded-for", "x-real-ip"] {
        let all: Vec<_> = out.get_all(tandems).iter().collect();
        assert_eq!(all, [&HeaderValue::from_static("10.9.8.7")], "{tandems}: {all:?}");
    }
    assert_eq!(out.get_all(http::header::FORWARDED).iter().count(), 1);
});
