//! Counts TLS handshakes for the statistics: completed ones by protocol and
//! ALPN, failed ones by a reason an operator can act on.

use rustls::ServerConnection;
use tandem_shared::stats::{Stats, TLS_ALPN, TLS_FAILURES, TLS_PROTOCOLS};

fn failure(reason: &str) -> usize {
    TLS_FAILURES.iter().position(|r| *r == reason).unwrap_or(TLS_FAILURES.len() - 1)
}

/// Why the handshake failed, from the error tokio-rustls returned.
pub fn reason(e: &std::io::Error) -> usize {
    use std::io::ErrorKind::*;
    if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        return failure(match tls {
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => "invalid_message",
            rustls::Error::PeerIncompatible(_) => "incompatible",
            rustls::Error::AlertReceived(_) => "alert_received",
            rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => "bad_certificate",
            _ => "other",
        });
    }
    failure(match e.kind() {
        UnexpectedEof => "eof",
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset",
        TimedOut => "timeout",
        InvalidData => "invalid_message",
        _ => "other",
    })
}

/// Whether the first byte a client sent starts a plain HTTP request (a TLS
/// connection starts with a handshake record, 0x16).
pub fn looks_like_http(first: u8) -> bool {
    first.is_ascii_uppercase()
}

/// Answers a plain HTTP request sent to the TLS port with a 400 that says so
/// (as nginx does), after reading what the client sent of its request.
pub async fn refuse_plain_http(mut tcp: tokio::net::TcpStream, https_url: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while seen.len() < 16 << 10 && !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
    let message = format!("this port speaks TLS: the request was sent as plain HTTP; use {https_url}");
    let (_, body) = tandem_shared::edge::front::error_parts(http::StatusCode::BAD_REQUEST, &message);
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tcp.write_all(head.as_bytes()).await;
    let _ = tcp.write_all(&body).await;
    let _ = tcp.shutdown().await;
}

/// A handshake under way: counted once, as done, failed, or (dropped unfinished) timed out.
pub struct Pending<'a> {
    stats: &'a Stats,
    counted: bool,
}

impl<'a> Pending<'a> {
    /// Starts counting a handshake.
    pub fn new(stats: &'a Stats) -> Self {
        Pending { stats, counted: false }
    }

    /// The handshake completed on `conn`.
    pub fn done(&mut self, conn: &ServerConnection) {
        let protocol = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => 1,
            _ => 0,
        };
        let alpn = match conn.alpn_protocol() {
            Some(b"h2") => 0,
            Some(b"http/1.1") => 1,
            _ => TLS_ALPN.len() - 1,
        };
        debug_assert!(protocol < TLS_PROTOCOLS.len());
        self.stats.tls_handshake(protocol, alpn);
        self.counted = true;
    }

    /// The client spoke plain HTTP to the TLS port.
    pub fn plain_http(&mut self) {
        self.stats.tls_failure(failure("plain_http"));
        self.counted = true;
    }

    /// The handshake failed with `e`.
    pub fn failed(&mut self, e: &std::io::Error) {
        self.stats.tls_failure(reason(e));
        self.counted = true;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.counted {
            self.stats.tls_failure(failure("timeout"));
        }
    }
}

/// The TLS alert a QUIC handshake failed with, when it failed in TLS (RFC 9001 §4.8).
fn quic_alert(e: &quinn::ConnectionError) -> Option<u8> {
    let quinn::ConnectionError::TransportError(t) = e else { return None };
    let code = u64::from(t.code);
    (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8)
}

/// Alerts about the client's certificate: bad, unsupported, revoked, expired,
/// unknown, unknown CA, certificate required.
const CERTIFICATE_ALERTS: [u8; 7] = [42, 43, 44, 45, 46, 48, 116];

/// Why a QUIC handshake failed, as a [`TLS_FAILURES`] index.
pub fn quic_reason(e: &quinn::ConnectionError) -> usize {
    use quinn::ConnectionError as E;
    if let Some(alert) = quic_alert(e) {
        return failure(match alert {
            a if CERTIFICATE_ALERTS.contains(&a) => "bad_certificate",
            // handshake_failure, protocol_version, insufficient_security, no_application_protocol.
            40 | 70 | 71 | 120 => "incompatible",
            _ => "invalid_message",
        });
    }
    failure(match e {
        E::TimedOut => "timeout",
        E::Reset => "reset",
        E::ConnectionClosed(_) | E::ApplicationClosed(_) => "alert_received",
        E::TransportError(_) | E::VersionMismatch => "invalid_message",
        _ => "other",
    })
}

/// Why the handshake refused the client's certificate, when that is why it failed.
pub fn quic_rejected(e: &quinn::ConnectionError) -> Option<String> {
    let quinn::ConnectionError::TransportError(t) = e else { return None };
    quic_alert(e)
        .filter(|a| CERTIFICATE_ALERTS.contains(a))
        .map(|_| format!("{} (checked against SSL_CLIENT_CA)", t.reason))
}

impl Pending<'_> {
    /// A QUIC handshake (TLS 1.3, ALPN h3) completed.
    pub fn done_quic(&mut self) {
        self.stats.tls_handshake(1, crate::h3::alpn_index());
        self.counted = true;
    }

    /// A QUIC handshake failed with `e`.
    pub fn failed_quic(&mut self, e: &quinn::ConnectionError) {
        self.stats.tls_failure(quic_reason(e));
        self.counted = true;
    }
}
