//! TLS termination for the workers that face clients (the HTTPS worker and
//! the proxy worker): the published certificate behind a reloadable resolver
//! (swapped on SIGHUP, TLS-ALPN-01 answers), client certificates (mTLS), the
//! server configuration and the handshake step.

#![forbid(unsafe_code)]

pub mod client_auth;
pub mod h3;
mod handshake;
pub mod resolver;

use std::sync::Arc;

use anyhow::Context;
use tandem_shared::certs::primitives::Bundle;
use tandem_shared::process::control::{ControlClient, WorkerEvent};
use tandem_shared::TlsSettings;
use tokio::signal::unix::{signal, SignalKind};

pub use resolver::ReloadableResolver;

/// Sessions held for TLS 1.2 session-ID resumption (about 200 bytes each).
const SESSION_CACHE: usize = 1 << 14;

/// Resumption state, one per process, kept across the acceptors a CA reload
/// rebuilds: a session cache for TLS 1.2 session IDs and a ticketer (keys in
/// memory only, rotated every 6 hours) so TLS 1.3 and 1.2 clients resume from
/// a ticket without a cache lookup. rustls' default is a 256-entry cache and
/// no ticketer, which a few hundred clients churn through.
type Resumption = (Arc<dyn rustls::server::StoresServerSessions>, Option<Arc<dyn rustls::server::ProducesTickets>>);

fn resumption() -> Resumption {
    static STATE: std::sync::OnceLock<Resumption> = std::sync::OnceLock::new();
    STATE
        .get_or_init(|| {
            let tickets = rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(
                    |e| tracing::warn!(error = %e, "no session tickets (cannot make ticket keys); session IDs only"),
                )
                .ok();
            (rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE), tickets)
        })
        .clone()
}

/// The provider's cipher suites with AES-128-GCM/SHA-256 first. Clients
/// (OpenSSL's default among them) usually prefer AES-256-GCM/SHA-384, whose
/// key schedule runs SHA-512 in software on CPUs with SHA extensions for
/// SHA-256 only: 9% of a proxy worker's CPU under new-connection load went to
/// `sha512_block_data_order`. AES-128-GCM is TLS 1.3's mandatory suite and
/// the first choice of Go and Cloudflare; AES-256 and ChaCha20 stay offered.
fn fast_first(mut provider: rustls::crypto::CryptoProvider) -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite as C;
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        C::TLS13_AES_128_GCM_SHA256 => 0,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 1,
        _ => 2,
    };
    // A stable sort: the provider's own order among the rest.
    provider.cipher_suites.sort_by_key(rank);
    provider
}

/// A rustls server config for TLS 1.3 and (unless `min` says 1.3) 1.2, with ALPN h2 and http/1.1.
/// `client` verifies client certificates (mTLS) when given.
pub fn server_config(
    resolver: Arc<ReloadableResolver>,
    min: tandem_config::tls::TlsVersion,
    client: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(fast_first(rustls::crypto::aws_lc_rs::default_provider()));
    let versions: &[&rustls::SupportedProtocolVersion] = match min {
        tandem_config::tls::TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        tandem_config::tls::TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .context("cannot select TLS versions")?;
    let config = match client {
        Some(v) => config.with_client_cert_verifier(v),
        None => config.with_no_client_auth(),
    };
    let acme = resolver.answers_acme();
    let mut config = config.with_cert_resolver(resolver);
    // Our order, not the client's (every suite offered is strong): see `fast_first`.
    config.ignore_client_order = true;
    let (sessions, tickets) = resumption();
    config.session_storage = sessions;
    if let Some(t) = tickets {
        config.ticketer = t;
    }
    // One TLS 1.3 ticket per connection (rustls sends two by default): a
    // client resumes each new connection with the ticket the last one got.
    config.send_tls13_tickets = 1;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme {
        // Only ever chosen for a client that offers it (an ACME server validating TLS-ALPN-01).
        config.alpn_protocols.push(resolver::ACME_TLS_ALPN.to_vec());
    }
    Ok(config)
}

/// TLS on a listener: the published certificate behind a reloadable resolver,
/// client authentication, and the handshake. The HTTPS worker and the proxy
/// worker terminate TLS with it.
pub struct Tls {
    resolver: Arc<ReloadableResolver>,
    acceptors: Arc<client_auth::Acceptors>,
    /// Fingerprint of the certificate served at start.
    pub fingerprint: String,
}

impl Tls {
    /// Loads `live.pem` and the client CAs the settings name.
    pub fn start(settings: &TlsSettings) -> anyhow::Result<Tls> {
        let bundle = Bundle::load(&settings.live_cert).context("cannot load the published certificate")?;
        let fingerprint = bundle.info.fingerprint.clone();
        let resolver = Arc::new(ReloadableResolver::new(bundle.certified_key(), settings.acme_alpn01.clone()));
        let acceptors = client_auth::Acceptors::new(
            resolver.clone(),
            settings.policy.min_version,
            settings.policy.client_ca.clone(),
            settings.policy.client_auth,
        )?;
        acceptors.watch();
        Ok(Tls { resolver, acceptors, fingerprint })
    }

    /// Reloads the certificate (and client CAs) on every SIGHUP, acknowledging on the control channel.
    pub fn spawn_reloads(
        &self,
        settings: &TlsSettings,
        control: Arc<ControlClient>,
        stats: tandem_shared::stats::Stats,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        let (live, resolver, acceptors) = (settings.live_cert.clone(), self.resolver.clone(), self.acceptors.clone());
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                stats.tls_reload(reload(&live, &resolver, &control));
                acceptors.reload();
            }
        }))
    }

    /// The acceptors (certificate, client verification), for HTTP/3 ([`h3::Http3`]).
    pub fn acceptors(&self) -> Arc<client_auth::Acceptors> {
        self.acceptors.clone()
    }

    /// The handshake step for [`tandem_shared::edge::serve::Server::run`] on the listener at `addr`.
    pub fn handshaker(&self, stats: tandem_shared::stats::Stats, addr: std::net::SocketAddr) -> Handshaker {
        Handshaker { acceptors: self.acceptors.clone(), stats, https_url: tandem_shared::url("https", addr).into() }
    }
}

/// Accepts TLS on one connection: plain HTTP is refused with a hint, ACME
/// validations end with the handshake, failures are counted by reason.
#[derive(Clone)]
pub struct Handshaker {
    acceptors: Arc<client_auth::Acceptors>,
    stats: tandem_shared::stats::Stats,
    https_url: Arc<str>,
}

impl Handshaker {
    /// The TLS stream and the client's verified certificate, or None when the connection ends here.
    pub async fn accept(
        self,
        tcp: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
    ) -> Option<tandem_shared::edge::serve::Accepted<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
        let acceptor = self.acceptors.current().acceptor.clone();
        // Counted as a timeout unless it ends here (the server drops it at HEADER_TIMEOUT).
        let mut pending = handshake::Pending::new(&self.stats);
        let mut first = [0u8; 1];
        let began = std::time::Instant::now();
        let peeked = tcp.peek(&mut first).await;
        let first_byte_after = began.elapsed();
        if matches!(peeked, Ok(1)) && handshake::looks_like_http(first[0]) {
            pending.plain_http();
            handshake::refuse_plain_http(tcp, &self.https_url).await;
            return None;
        }
        match acceptor.accept(tcp).await {
            Ok(tls) => {
                pending.done(tls.get_ref().1);
                if tls.get_ref().1.alpn_protocol() == Some(resolver::ACME_TLS_ALPN) {
                    // A TLS-ALPN-01 validation ends with the handshake (RFC 8737 §3).
                    return None;
                }
                let client = client_auth::identity(tls.get_ref().1);
                Some(tandem_shared::edge::serve::Accepted { io: tls, client })
            }
            Err(e) => {
                pending.failed(&e);
                match client_auth::rejected(&e) {
                    // An operator wants to know why a client was turned away, once a minute per address.
                    Some(why) if client_auth::first_in_a_while(peer.ip()) => {
                        tracing::info!(%peer, reason = %why, "client certificate rejected");
                    }
                    _ => tracing::debug!(
                        %peer,
                        error = %e,
                        ?peeked,
                        first_byte_ms = first_byte_after.as_millis() as u64,
                        total_ms = began.elapsed().as_millis() as u64,
                        "TLS handshake failed"
                    ),
                }
                None
            }
        }
    }
}

/// Re-reads `live.pem`, validates it and swaps it in; the old certificate
/// keeps serving when the new one is refused. Acknowledges on the control
/// channel; returns whether the new certificate serves.
fn reload(live: &std::path::Path, resolver: &ReloadableResolver, control: &ControlClient) -> bool {
    let event = match Bundle::load(live) {
        Ok(bundle) => {
            let next = bundle.certified_key();
            let unchanged = resolver.serves(&next);
            resolver.swap(next);
            if unchanged {
                tracing::info!(fingerprint = %bundle.info.fingerprint, "certificate unchanged; it keeps serving");
            } else {
                tracing::info!(fingerprint = %bundle.info.fingerprint, "certificate reloaded");
            }
            WorkerEvent::Reloaded { fingerprint: bundle.info.fingerprint, unchanged }
        }
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::error!(%reason, "certificate reload refused; the previous certificate keeps serving");
            WorkerEvent::ReloadFailed { reason }
        }
    };
    let ok = matches!(event, WorkerEvent::Reloaded { .. });
    if let Err(e) = control.send(&event) {
        tracing::warn!(error = %e, "cannot acknowledge the reload to the supervisor");
    }
    ok
}
