//! A certificate resolver whose certificate can be replaced while serving,
//! and which answers ACME's TLS-ALPN-01 validation when asked to.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Serves one certificate, swappable at any time. `resolve` is one atomic
/// load: no lock and no I/O on the handshake path (except a TLS-ALPN-01
/// validation, which reads its challenge certificate from the cache).
#[derive(Debug)]
pub struct ReloadableResolver {
    current: ArcSwap<CertifiedKey>,
    /// With ACME's tls-alpn-01: the directory of challenge certificates, one per name.
    acme_alpn: Option<PathBuf>,
}

impl ReloadableResolver {
    /// Starts with `initial`; answers `acme-tls/1` from `acme_alpn` when given.
    pub fn new(initial: Arc<CertifiedKey>, acme_alpn: Option<PathBuf>) -> Self {
        ReloadableResolver { current: ArcSwap::new(initial), acme_alpn }
    }

    /// Whether TLS-ALPN-01 validation is answered (the server must offer `acme-tls/1`).
    pub fn answers_acme(&self) -> bool {
        self.acme_alpn.is_some()
    }

    /// Replaces the certificate for every handshake from now on; sessions
    /// already established keep theirs.
    pub fn swap(&self, next: Arc<CertifiedKey>) {
        self.current.store(next);
    }

    /// Whether `next` is the certificate served now (the same leaf).
    pub fn serves(&self, next: &CertifiedKey) -> bool {
        self.current.load().end_entity_cert().ok() == next.end_entity_cert().ok()
    }

    /// The challenge certificate for `name`, built directly as a
    /// `CertifiedKey` (it carries the critical acmeIdentifier extension,
    /// which rustls' own certificate loading refuses).
    fn challenge(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let path = self.acme_alpn.as_ref()?.join(tandem_shared::certs::cache::alpn01_file_name(name));
        let pem = tandem_shared::certs::primitives::read_pem_file(&path).ok()?;
        let cert = CertificateDer::from_pem_slice(&pem).ok()?;
        let key = PrivateKeyDer::from_pem_slice(&pem).ok()?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let signer = provider.key_provider.load_private_key(key).ok()?;
        Some(Arc::new(CertifiedKey::new(vec![cert], signer)))
    }
}

impl ResolvesServerCert for ReloadableResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if self.acme_alpn.is_some() && hello.alpn().is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN)) {
            let name = hello.server_name()?.to_string();
            tracing::info!(%name, "answering an ACME TLS-ALPN-01 validation");
            return self.challenge(&name);
        }
        Some(self.current.load_full())
    }
}
