//! The access log (`ACCESS_LOG=true`): one line per request, written by the
//! process that answered it (an engine worker, or the HTTPS worker for the
//! answers it makes itself), at target `tandem::access`. With
//! `LOG_FORMAT=json` every field is a JSON value of its own; the message is `access`.

use std::net::SocketAddr;
use std::time::Duration;

/// The request header that carries the client's address over the ring. The
/// HTTPS worker always overwrites it, so a client cannot choose its value.
pub const PEER_HEADER: &str = "x-tandem-peer";

/// Request headers that carry the verified client certificate to the engine
/// (subject, subject alternative names comma-separated, SHA-256 fingerprint).
/// Only the HTTPS worker sets them; every incoming header of these names is removed.
pub const CLIENT_HEADERS: [&str; 3] =
    ["x-tandem-client-subject", "x-tandem-client-sans", "x-tandem-client-fingerprint"];

/// The request header that tells the engine a request over the ring came
/// over HTTP/3 (value `h3`), for its statistics and access log. Only the
/// HTTPS worker sets it.
pub const PROTOCOL_HEADER: &str = "x-tandem-protocol";

/// Removes every header only the HTTPS worker may set on a request it sends
/// through the ring ([`PEER_HEADER`], [`CLIENT_HEADERS`], [`PROTOCOL_HEADER`],
/// [`crate::edge::keys::KEY_NAME_HEADER`]), whatever a client sent under those names.
pub fn remove_vouched(headers: &mut http::HeaderMap) {
    headers.remove(PEER_HEADER);
    headers.remove(PROTOCOL_HEADER);
    for h in CLIENT_HEADERS {
        headers.remove(h);
    }
    headers.remove(crate::edge::keys::KEY_NAME_HEADER);
}

/// The values of [`CLIENT_HEADERS`] for a verified client certificate: the
/// subject as RFC 4514 writes it (escaped, so a subject cannot pass for
/// another), every subject alternative name as its own quoted string
/// (`"DNS:a.example", "URI:spiffe://example/a"`: a name holding a comma stays
/// one name), and the SHA-256 fingerprint. Nothing that cannot travel in a
/// header survives: control characters are written `\xNN`.
pub fn client_header_values(id: &crate::edge::serve::ClientIdentity) -> [String; 3] {
    // What a header cannot carry, written byte by byte as `\xNN`; `quote`
    // also escapes what would end or break a quoted string.
    let escaped = |s: &str, quote: bool| {
        let mut out = String::with_capacity(s.len() + 2);
        for c in s.chars() {
            match c {
                '"' | '\\' if quote => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_control() || !c.is_ascii() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out
    };
    let sans: Vec<String> = id.sans.iter().map(|s| format!("\"{}\"", escaped(s, true))).collect();
    [escaped(&id.subject, false), sans.join(", "), id.fingerprint.clone()]
}

/// The status an answer counts as: its HTTP status, or for a gRPC call that
/// failed at once (a trailers-only answer: HTTP 200 with a non-zero
/// `grpc-status`) the HTTP status gRPC's own mapping gives its code, so a
/// failed call is not counted as a 200. (A call that fails after its first
/// message says so in trailers, after the count.)
pub fn counted_status(status: http::StatusCode, headers: &http::HeaderMap) -> u16 {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<u8>().ok());
    match code {
        None | Some(0) => status.as_u16(),
        Some(3 | 9 | 11) => 400, // INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
        Some(16) => 401,         // UNAUTHENTICATED
        Some(7) => 403,          // PERMISSION_DENIED
        Some(5) => 404,          // NOT_FOUND
        Some(8) => 429,          // RESOURCE_EXHAUSTED
        Some(12) => 501,         // UNIMPLEMENTED
        Some(14) => 503,         // UNAVAILABLE
        Some(4) => 504,          // DEADLINE_EXCEEDED
        Some(_) => 500,
    }
}

/// One answered request.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// `http` or `https`.
    pub listener: &'static str,
    /// `h3` for HTTP/3 (on the HTTPS listener), else none.
    pub protocol: Option<&'static str>,
    /// The client, when known.
    pub peer: Option<SocketAddr>,
    /// Method.
    pub method: &'a str,
    /// Path, without the query string (it may carry secrets).
    pub path: &'a str,
    /// Status code.
    pub status: u16,
    /// Request body bytes, when known.
    pub bytes_in: Option<u64>,
    /// Response body bytes, when known.
    pub bytes_out: Option<u64>,
    /// Time to the response headers.
    pub took: Duration,
    /// The worker that answered.
    pub worker: u64,
    /// The client certificate's subject and fingerprint, when one was verified.
    pub client: Option<(&'a str, &'a str)>,
    /// The name of the API key the request carried, when it had a good one.
    pub api_key: Option<&'a str>,
}

/// The model a `/v2/models/{name}/...` path names.
pub fn model_of(path: &str) -> Option<&str> {
    let mut segs = path.strip_prefix("/v2/models/")?.split('/');
    segs.next().filter(|m| !m.is_empty() && *m != "stats")
}

/// Writes `e` as one log line.
pub fn log(e: &Entry<'_>) {
    tracing::info!(
        target: "tandem::access",
        listener = e.listener,
        protocol = e.protocol,
        peer = e.peer.map(tracing::field::display),
        method = e.method,
        path = e.path,
        status = e.status,
        bytes_in = e.bytes_in,
        bytes_out = e.bytes_out,
        // Milliseconds to the microsecond (0.412, 12.5): no float noise in the log.
        duration_ms = e.took.as_micros() as f64 / 1e3,
        model = model_of(e.path),
        worker = e.worker,
        client = e.client.map(|c| c.0),
        client_fingerprint = e.client.map(|c| c.1),
        api_key = e.api_key,
        "access"
    );
}

/// A request as it arrived, kept until it is answered: every request path
/// counts its answer into the statistics and (with `ACCESS_LOG`) writes its
/// line through this, the same way.
#[derive(Debug)]
pub struct Arrival {
    started: std::time::Instant,
    listener: crate::stats::Listener,
    route: usize,
    method: http::Method,
    /// What the access-log line needs, when there is one.
    logged: Option<Logged>,
    /// The name of the API key the request proved it holds.
    key: Option<std::sync::Arc<str>>,
}

#[derive(Debug)]
struct Logged {
    path: String,
    peer: Option<SocketAddr>,
    bytes_in: Option<u64>,
    client: Option<(String, String)>,
}

impl Arrival {
    /// Notes `req`, which came on a listener of this process (the HTTPS one
    /// when `https`); `log` keeps what the access-log line needs. The client
    /// certificate is the connection's ([`crate::edge::serve::ClientIdentity`]);
    /// the API key's name is noted by [`Arrival::identified`] once the front door let it in.
    pub fn new<B: hyper::body::Body>(req: &http::Request<B>, https: bool, log: bool) -> Self {
        Self::noted(req, https, log, false)
    }

    /// Notes `req`, which came over the ring from the HTTPS worker: the client
    /// certificate and the API key's name are what that worker vouched for in
    /// [`CLIENT_HEADERS`] and [`crate::edge::keys::KEY_NAME_HEADER`] (it
    /// removes whatever a client sent under those names).
    pub fn from_ring<B: hyper::body::Body>(req: &http::Request<B>, log: bool) -> Self {
        Self::noted(req, true, log, true)
    }

    fn noted<B: hyper::body::Body>(req: &http::Request<B>, https: bool, log: bool, vouched: bool) -> Self {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let logged = log.then(|| {
            let client = match req.extensions().get::<std::sync::Arc<crate::edge::serve::ClientIdentity>>() {
                Some(c) => Some((c.subject.clone(), c.fingerprint.clone())),
                None if vouched => {
                    header(CLIENT_HEADERS[0]).map(String::from).zip(header(CLIENT_HEADERS[2]).map(String::from))
                }
                None => None,
            };
            Logged {
                path: req.uri().path().to_string(),
                peer: req.extensions().get::<crate::edge::serve::Peer>().map(|p| p.0),
                bytes_in: req.body().size_hint().exact(),
                client,
            }
        });
        let key = if vouched { header(crate::edge::keys::KEY_NAME_HEADER).map(std::sync::Arc::from) } else { None };
        let h3 = if vouched { header(PROTOCOL_HEADER) == Some("h3") } else { req.version() == http::Version::HTTP_3 };
        let listener = match (https, h3) {
            (false, _) => crate::stats::Listener::Http,
            (true, false) => crate::stats::Listener::Https,
            (true, true) => crate::stats::Listener::H3,
        };
        Arrival {
            started: std::time::Instant::now(),
            listener,
            route: crate::stats::route_index(req.uri().path()),
            method: req.method().clone(),
            logged,
            key,
        }
    }

    /// Notes the API key the front door found in `req` (its [`crate::edge::gate::KeyName`]).
    pub fn identified<B>(&mut self, req: &http::Request<B>) {
        if let Some(k) = req.extensions().get::<crate::edge::gate::KeyName>() {
            self.key = Some(k.0.clone());
        }
    }

    /// Counts the answer (`status`, `bytes_out` when known) that `worker` gave,
    /// and writes its access-log line when there is one.
    pub fn answered(self, stats: &crate::stats::Stats, status: u16, bytes_out: Option<u64>, worker: u64) {
        let took = self.started.elapsed();
        stats.request(self.listener, self.route, self.method.as_str(), status, took);
        if let Some(k) = &self.key {
            stats.client_answer(k, status);
        }
        if let Some(l) = &self.logged {
            log(&Entry {
                listener: crate::stats::LISTENERS[self.listener as usize],
                protocol: (self.listener == crate::stats::Listener::H3).then_some("h3"),
                peer: l.peer,
                method: self.method.as_str(),
                path: &l.path,
                status,
                bytes_in: l.bytes_in,
                bytes_out,
                took,
                worker,
                client: l.client.as_ref().map(|(s, f)| (s.as_str(), f.as_str())),
                api_key: self.key.as_deref(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_values_cannot_be_read_as_another_identity() {
        let id = crate::edge::serve::ClientIdentity {
            subject: "CN=alice\\,O=Admins".into(),
            sans: vec!["DNS:a.example,DNS:admin.example".into(), "URI:spiffe://x/\"y\"".into(), "DNS:b\ne".into()],
            fingerprint: "ab12".into(),
        };
        let [subject, sans, fingerprint] = client_header_values(&id);
        assert_eq!(subject, "CN=alice\\,O=Admins");
        assert_eq!(sans, r#""DNS:a.example,DNS:admin.example", "URI:spiffe://x/\"y\"", "DNS:b\x0ae""#);
        assert_eq!(fingerprint, "ab12");
        for v in [&subject, &sans] {
            assert!(http::HeaderValue::from_str(v).is_ok(), "{v}");
        }
        // Beyond ASCII, byte by byte in both: no escape can be read as two characters.
        let id = crate::edge::serve::ClientIdentity {
            subject: "CN=é中".into(),
            sans: vec!["DNS:é".into()],
            fingerprint: String::new(),
        };
        let [subject, sans, _] = client_header_values(&id);
        assert_eq!(subject, r"CN=\xc3\xa9\xe4\xb8\xad");
        assert_eq!(sans, r#""DNS:\xc3\xa9""#);
    }

    #[test]
    fn a_failed_grpc_call_counts_as_what_its_code_means() {
        let mut h = http::HeaderMap::new();
        assert_eq!(counted_status(http::StatusCode::OK, &h), 200);
        h.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert_eq!(counted_status(http::StatusCode::OK, &h), 200);
        for (code, want) in [("3", 400), ("5", 404), ("16", 401), ("8", 429), ("14", 503), ("12", 501), ("13", 500)] {
            h.insert("grpc-status", http::HeaderValue::from_static(code));
            assert_eq!(counted_status(http::StatusCode::OK, &h), want, "{code}");
        }
    }

    #[test]
    fn the_model_is_read_from_model_paths_only() {
        assert_eq!(model_of("/v2/models/digits/infer"), Some("digits"));
        assert_eq!(model_of("/v2/models/digits"), Some("digits"));
        assert_eq!(model_of("/v2/models/stats"), None);
        assert_eq!(model_of("/v2/health/ready"), None);
        assert_eq!(model_of("/v2/models/"), None);
    }
}
