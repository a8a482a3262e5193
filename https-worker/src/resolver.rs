//! A certificate resolver whose certificate can be replaced while serving.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Serves one certificate, swappable at any time. `resolve` is one atomic
/// load: no lock and no I/O on the handshake path.
#[derive(Debug)]
pub struct ReloadableResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableResolver {
    /// Starts with `initial`.
    pub fn new(initial: Arc<CertifiedKey>) -> Self {
        ReloadableResolver { current: ArcSwap::new(initial) }
    }

    /// Replaces the certificate for every handshake from now on; sessions
    /// already established keep theirs.
    pub fn swap(&self, next: Arc<CertifiedKey>) {
        self.current.store(next);
    }
}

impl ResolvesServerCert for ReloadableResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
