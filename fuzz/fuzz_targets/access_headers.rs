//! Fuzzes the front door's access-control parsing: the API key a request
//! carries (`Authorization: Bearer`, `x-api-key`), the address it counts
//! against behind trusted proxies (`X-Forwarded-For`), and the category its
//! path is in. Whatever the head: nothing panics; a key is at most 512
//! visible bytes taken from one of the two headers; an untrusted peer is
//! always itself and a trusted one is replaced only by an address the header
//! holds; a path that classifies has no dot or empty segment once decoded.

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tandem_shared::edge::keys::{presented, Presented, MAX_KEY_BYTES};
use tandem_shared::edge::limit::client_address;

fuzz_target!(|data: &[u8]| {
    let Some((path, rest)) = data.split_first().map(|(&n, rest)| rest.split_at((n as usize).min(rest.len()))) else {
        return;
    };
    let mut headers = HeaderMap::new();
    // One header per line: "name: value".
    for line in rest.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value.trim_ascii())) else {
            continue;
        };
        headers.append(name, value);
    }
    if let Presented::Key(key) = presented(&headers) {
        assert!(!key.is_empty() && key.len() <= MAX_KEY_BYTES && key.iter().all(|b| b.is_ascii_graphic()));
        let in_a_header = headers
            .get_all("authorization")
            .iter()
            .chain(headers.get_all("x-api-key"))
            .any(|v| v.as_bytes().windows(key.len()).any(|w| w == key));
        assert!(in_a_header, "a key that no header carries");
    }
    let trusted = [tandem_config::access::Network { addr: "10.0.0.0".parse().unwrap(), prefix: 8 }];
    let outsider: std::net::IpAddr = "198.51.100.1".parse().unwrap();
    assert_eq!(client_address(outsider, &headers, &trusted), outsider);
    let proxy: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    let client = client_address(proxy, &headers, &trusted);
    if client != proxy {
        let named = headers.get_all("x-forwarded-for").iter().flat_map(|v| v.to_str().unwrap_or("").split(',')).any(|e| {
            let e = e.trim();
            e.parse::<std::net::IpAddr>().ok().or_else(|| e.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
                == Some(client)
        });
        assert!(named, "{client} is not in X-Forwarded-For");
    }
    let path = String::from_utf8_lossy(path);
    if let Ok((decoded, _)) = tandem_shared::edge::restricted::classify(&path) {
        assert!(!decoded.contains("//") && !decoded.split('/').any(|s| s == "." || s == ".."), "{decoded}");
    }
});
