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

/// One answered request.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// `http` or `https`.
    pub listener: &'static str,
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
        peer = e.peer.map(tracing::field::display),
        method = e.method,
        path = e.path,
        status = e.status,
        bytes_in = e.bytes_in,
        bytes_out = e.bytes_out,
        duration_ms = e.took.as_secs_f64() * 1e3,
        model = model_of(e.path),
        worker = e.worker,
        client = e.client.map(|c| c.0),
        client_fingerprint = e.client.map(|c| c.1),
        "access"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_read_from_model_paths_only() {
        assert_eq!(model_of("/v2/models/digits/infer"), Some("digits"));
        assert_eq!(model_of("/v2/models/digits"), Some("digits"));
        assert_eq!(model_of("/v2/models/stats"), None);
        assert_eq!(model_of("/v2/health/ready"), None);
        assert_eq!(model_of("/v2/models/"), None);
    }
}
