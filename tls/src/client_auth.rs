//! Client certificates (mTLS, `SSL_CLIENT_CA` / `SSL_CLIENT_AUTH`): the TLS
//! acceptor with its client verifier, rebuilt when the CA bundle changes on
//! disk or on SIGHUP (a bundle that does not load keeps the previous one), and
//! the verified identity of a connection's client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use tandem_config::tls::ClientAuth;
use tandem_config::tls::TlsVersion;
use tandem_shared::edge::serve::ClientIdentity;
use tokio_rustls::TlsAcceptor;

use crate::ReloadableResolver;

/// How often the CA bundle's size and modification time are looked at.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The acceptor in use, swapped whole when the client CA bundle changes.
pub struct Acceptors {
    current: ArcSwap<Built>,
    /// Counts the swaps, for a listener that builds its own configuration (HTTP/3).
    swapped: tokio::sync::watch::Sender<u64>,
    resolver: Arc<ReloadableResolver>,
    min: TlsVersion,
    ca: Option<PathBuf>,
    auth: ClientAuth,
}

impl std::fmt::Debug for Acceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptors").field("ca", &self.ca).field("auth", &self.auth).finish_non_exhaustive()
    }
}

fn verifier(ca: &std::path::Path, auth: ClientAuth) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    use anyhow::Context;
    let pem = tandem_shared::certs::primitives::read_pem_file(ca)
        .with_context(|| format!("cannot read SSL_CLIENT_CA {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("{} is not a PEM certificate bundle", ca.display()))?;
        roots.add(cert).with_context(|| format!("{} holds a certificate that is not a usable CA", ca.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", ca.display());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if auth == ClientAuth::Optional { builder.allow_unauthenticated() } else { builder };
    builder.build().context("cannot build the client certificate verifier")
}

/// An acceptor and the client verifier it was built with.
pub struct Built {
    /// For TLS over TCP.
    pub acceptor: TlsAcceptor,
    /// Client certificates, when they are asked for.
    pub verifier: Option<Arc<dyn ClientCertVerifier>>,
}

fn build(
    resolver: &Arc<ReloadableResolver>,
    min: TlsVersion,
    ca: Option<&std::path::Path>,
    auth: ClientAuth,
) -> anyhow::Result<Built> {
    let verifier = match (ca, auth) {
        (Some(ca), ClientAuth::Optional | ClientAuth::Required) => Some(verifier(ca, auth)?),
        _ => None,
    };
    let acceptor = TlsAcceptor::from(Arc::new(crate::server_config(resolver.clone(), min, verifier.clone())?));
    Ok(Built { acceptor, verifier })
}

fn stamp(path: &std::path::Path) -> Option<(u64, Option<SystemTime>)> {
    std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()))
}

impl Acceptors {
    /// The acceptor for `resolver`'s certificate, verifying clients as configured.
    pub fn new(
        resolver: Arc<ReloadableResolver>,
        min: TlsVersion,
        ca: Option<PathBuf>,
        auth: ClientAuth,
    ) -> anyhow::Result<Arc<Acceptors>> {
        let first = build(&resolver, min, ca.as_deref(), auth)?;
        let (swapped, _) = tokio::sync::watch::channel(0);
        Ok(Arc::new(Acceptors { current: ArcSwap::from_pointee(first), swapped, resolver, min, ca, auth }))
    }

    /// The acceptor for a new connection, and its client verifier.
    pub fn current(&self) -> Arc<Built> {
        self.current.load_full()
    }

    /// Changes each time the client CA bundle is reloaded.
    pub fn swaps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.swapped.subscribe()
    }

    /// The certificate resolver every configuration serves from.
    pub fn resolver(&self) -> &Arc<ReloadableResolver> {
        &self.resolver
    }

    /// Re-reads the CA bundle; the previous acceptor stays when it does not load.
    pub fn reload(&self) {
        let Some(ca) = &self.ca else { return };
        match build(&self.resolver, self.min, Some(ca), self.auth) {
            Ok(a) => {
                self.current.store(Arc::new(a));
                self.swapped.send_modify(|n| *n += 1);
                tracing::info!(bundle = %ca.display(), "client CA bundle reloaded");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "client CA bundle refused; the previous one keeps verifying")
            }
        }
    }

    /// Watches the CA bundle (size and modification time) and reloads it when it changes.
    pub fn watch(self: &Arc<Self>) {
        let Some(ca) = self.ca.clone() else { return };
        let me = self.clone();
        tokio::spawn(async move {
            let mut seen = stamp(&ca);
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let now = stamp(&ca);
                if now != seen && now.is_some() {
                    seen = now;
                    me.reload();
                }
            }
        });
    }
}

/// The verified client certificate of `conn`, if the client presented one.
pub fn identity(conn: &ServerConnection) -> Option<Arc<ClientIdentity>> {
    identity_of(conn.peer_certificates()?)
}

/// The identity of a verified chain's leaf (the first certificate).
pub fn identity_of(chain: &[CertificateDer<'_>]) -> Option<Arc<ClientIdentity>> {
    let leaf = chain.first()?;
    let info = tandem_shared::certs::primitives::inspect(leaf, "client certificate").ok()?;
    Some(Arc::new(ClientIdentity { subject: info.subject, sans: info.sans, fingerprint: info.fingerprint }))
}

/// Why the handshake refused the client's certificate, when that is why it failed.
pub fn rejected(e: &std::io::Error) -> Option<String> {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())? {
        rustls::Error::NoCertificatesPresented => Some("no client certificate (SSL_CLIENT_AUTH=required)".into()),
        rustls::Error::InvalidCertificate(why) => Some(format!("{why:?} (checked against SSL_CLIENT_CA)")),
        _ => None,
    }
}

/// Addresses told about lately, and when.
static TOLD: std::sync::Mutex<Option<std::collections::HashMap<std::net::IpAddr, std::time::Instant>>> =
    std::sync::Mutex::new(None);
/// How often one address's rejections are logged.
const TELL_EVERY: Duration = Duration::from_secs(60);
/// Addresses remembered at most (a scan from many addresses cannot grow it).
const TOLD_MAX: usize = 4096;

/// Whether a rejection from `ip` should be logged now: the first in
/// [`TELL_EVERY`] for that address.
pub fn first_in_a_while(ip: std::net::IpAddr) -> bool {
    let now = std::time::Instant::now();
    let mut told = TOLD.lock().unwrap_or_else(|p| p.into_inner());
    let told = told.get_or_insert_with(Default::default);
    if told.get(&ip).is_some_and(|&at| now.duration_since(at) < TELL_EVERY) {
        return false;
    }
    if told.len() >= TOLD_MAX {
        told.retain(|_, at| now.duration_since(*at) < TELL_EVERY);
        if told.len() >= TOLD_MAX {
            return false;
        }
    }
    told.insert(ip, now);
    true
}
