//! Certificates, one room: every source behind [`Source`], one file per source,
//! the keeper that obtains, publishes and renews, and `tandem cert status`.
//!
//! Adding a source is one new file implementing [`Source`] and one line in
//! [`choose`] (plus its `SSL_CERTIFICATE` word in the configuration).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use tandem_config::certs::CertSource;
use tandem_config::Config;
use tandem_shared::certs::cache::{CertCache, Layout};
use tandem_shared::certs::primitives::{Bundle, CertError};

mod acme;
pub mod ca;
mod files;
mod generate;
mod indirect;
mod keeper;
pub mod renewal;
pub mod status;

pub use files::load_custom;
pub use keeper::{CertChecked, CertHandle, CertKeeper, StartError};
pub use renewal::Refresh;
pub use tandem_config::values::redact_url;

/// Why no certificate could be obtained.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The certificate or key is unusable (bad PEM, mismatch, expired).
    #[error(transparent)]
    Invalid(#[from] CertError),
    /// No key was found next to a custom certificate.
    #[error("no private key found for {cert}; tried {tried}\nhint: set SSL_KEY to the key's path")]
    KeyNotFound {
        /// The certificate.
        cert: PathBuf,
        /// Every path tried, comma-separated.
        tried: String,
    },
    /// The INDIRECT download failed.
    #[error("cannot download {url}")]
    Download {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The download is larger than any certificate bundle.
    #[error("{url} is larger than {limit} bytes; a certificate bundle is a few KiB")]
    TooLarge {
        /// The URL (redacted).
        url: String,
        /// The bound.
        limit: usize,
    },
    /// The download client could not be built.
    #[error("cannot build the download client: {0}")]
    Client(String),
    /// The private CA is missing or unusable.
    #[error("{0}")]
    Ca(String),
    /// An ACME order failed.
    #[error("ACME: {0}")]
    Acme(String),
}

impl SourceError {
    /// Whether the operator's configuration is at fault (exit 2 at start-up)
    /// rather than something that may pass (a download, a full disk).
    pub fn is_config(&self) -> bool {
        matches!(self, SourceError::Invalid(_) | SourceError::KeyNotFound { .. } | SourceError::Ca(_))
    }
}

/// A unix time as people and tools read it (RFC 3339, UTC).
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

/// Whether the served certificate is the one the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertHealth {
    /// The configured source's certificate.
    Good,
    /// A generated stand-in, because the configured source has not delivered.
    Degraded,
}

/// What one look at a source gave.
#[derive(Debug)]
pub struct Obtained {
    /// The certificate to serve.
    pub bundle: Bundle,
    /// Whether it is the source's own.
    pub health: CertHealth,
    /// A failure the source recovered from (served from its cache meanwhile).
    pub warning: Option<SourceError>,
}

impl Obtained {
    /// The source's own certificate, no warning.
    pub fn good(bundle: Bundle) -> Obtained {
        Obtained { bundle, health: CertHealth::Good, warning: None }
    }
}

/// The future a source's [`Source::obtain`] returns.
pub type Obtaining<'a> = Pin<Box<dyn Future<Output = Result<Obtained, SourceError>> + Send + 'a>>;

/// Where certificates come from.
pub trait Source: Send + Sync + std::fmt::Debug {
    /// The mode as operators write it in `SSL_CERTIFICATE`.
    fn mode(&self) -> &'static str;

    /// Where the certificate comes from, in words (a path, a URL, a CA's name);
    /// never a credential.
    fn describe(&self) -> String;

    /// What can be checked before the cache is touched (a bad custom pair, a
    /// missing CA): an error here is exit 2 with nothing written.
    fn preflight(&self, _layout: &Layout) -> Result<(), SourceError> {
        Ok(())
    }

    /// The certificate the source offers now: its cached one while that is
    /// good, a new one when it is due (the source decides).
    fn obtain<'a>(&'a self, cache: &'a CertCache) -> Obtaining<'a>;

    /// What to serve at start-up, before any worker runs: by default what
    /// [`Source::obtain`] gives; a source whose proof needs the workers
    /// (ACME) serves its cache or a stand-in and obtains on the first check.
    fn obtain_at_start<'a>(&'a self, cache: &'a CertCache) -> Obtaining<'a> {
        self.obtain(cache)
    }

    /// The first retry delay after a failed look (doubled per failure).
    fn first_retry(&self) -> Duration {
        renewal::RETRY_START
    }

    /// When to look at the source again after a good look.
    fn refresh(&self) -> Refresh;

    /// Directories whose changes mean the certificate may have changed.
    fn watched(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// The certificate and key files `tandem cert status` inspects.
    fn files(&self, layout: &Layout) -> Result<(PathBuf, PathBuf), String>;
}

/// The configured source.
pub fn choose(config: &Config) -> Box<dyn Source> {
    let refresh = config.certs.refresh_interval;
    match &config.certs.source {
        CertSource::Generate => Box::new(generate::Generated::new(config)),
        CertSource::Indirect => Box::new(indirect::Indirect::new(config)),
        CertSource::Path(cert) => Box::new(files::Files::new(cert, config.certs.key.as_deref(), refresh)),
        CertSource::Ca => Box::new(ca::CaLeaves::new(config)),
        CertSource::Acme => Box::new(acme::Acme::new(config)),
    }
}

/// The ceiling on how long the keeper waits between looks at any source.
pub fn ceiling(config: &Config) -> Duration {
    config.certs.refresh_interval
}
