//! The certificate manager: obtains a certificate from the configured source,
//! validates it, caches it and publishes `live.pem` for the HTTPS worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_shared::config::{CertSource, Config, KeyType};
use tandem_shared::tls::{self, Bundle, CertCache, CertError, CertInfo, CertStatus, GENERATED_FILE, STATUS_FILE};

/// Lifetime of generated certificates.
const GENERATED_LIFETIME: Duration = Duration::from_secs(365 * 86400);
/// Cache file of the last good INDIRECT download (key + chain).
pub const INDIRECT_FILE: &str = "indirect.pem";
/// How long one INDIRECT download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// First retry delay after a failed check, doubled up to the refresh interval.
const RETRY_START: Duration = Duration::from_secs(2);
/// Poll interval for certificate files on disk (inotify is the fast path).
const FILE_POLL: Duration = Duration::from_secs(5);
/// At most one expiry warning per this period.
const EXPIRY_WARN_EVERY: Duration = Duration::from_secs(3600);

/// The most a downloaded `fullchain.pem` or `privkey.pem` may hold.
const MAX_DOWNLOAD_BYTES: usize = 1 << 20;

/// A URL as it may be shown and logged: no user or password, and no query or
/// fragment (where tokens live), so `GET /` and the log never leak a credential.
pub fn redact_url(raw: &str) -> String {
    match reqwest::Url::parse(raw) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("redacted"));
            }
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(a URL that does not parse)".to_string(),
    }
}

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
}

/// Whether the served certificate is the one the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertHealth {
    /// The configured source's certificate.
    Good,
    /// A generated stand-in, because the configured source is unavailable.
    Degraded,
}

/// Owns the certificate cache and knows the configured source.
#[derive(Debug)]
pub struct CertManager {
    source: CertSource,
    key_path: Option<PathBuf>,
    key_type: KeyType,
    sans: Vec<String>,
    indirect_url: String,
    cache: CertCache,
}

impl CertManager {
    /// Opens the cache (creating it 0700) for the configured source.
    pub fn new(config: &Config) -> Result<Self, CertError> {
        Ok(CertManager {
            source: config.ssl_certificate.clone(),
            key_path: config.ssl_key.clone(),
            key_type: config.ssl_key_type,
            sans: tls::generated_sans(&config.ssl_san),
            indirect_url: config.ssl_indirect_url.clone(),
            cache: CertCache::open(&config.cert_dir())?,
        })
    }

    /// The cache.
    pub fn cache(&self) -> &CertCache {
        &self.cache
    }

    /// The source's name as operators write it.
    pub fn mode(&self) -> &'static str {
        match self.source {
            CertSource::Generate => "GENERATE",
            CertSource::Indirect => "INDIRECT",
            CertSource::Path(_) => "PATH",
        }
    }

    /// Directories whose changes mean the certificate may have changed (custom path only).
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let CertSource::Path(cert) = &self.source else { return Vec::new() };
        let mut dirs = vec![cert.parent().unwrap_or_else(|| Path::new(".")).to_path_buf()];
        if let Some(key) = &self.key_path {
            let d = key.parent().unwrap_or_else(|| Path::new(".")).to_path_buf();
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        dirs
    }

    /// Obtains the certificate the configured source offers now.
    ///
    /// INDIRECT falls back to its cache, then to a generated certificate
    /// (reported as [`CertHealth::Degraded`]); the download error is returned
    /// alongside so the caller can log it and retry.
    pub async fn obtain(&self) -> Result<(Bundle, CertHealth, Option<SourceError>), SourceError> {
        match &self.source {
            CertSource::Generate => Ok((self.generated()?, CertHealth::Good, None)),
            CertSource::Path(cert) => Ok((self.from_files(cert)?, CertHealth::Good, None)),
            CertSource::Indirect => match self.download().await {
                Ok(b) => {
                    self.cache.write_secret(INDIRECT_FILE, b.to_pem().as_bytes())?;
                    Ok((b, CertHealth::Good, None))
                }
                Err(e) => match self.cache.load(INDIRECT_FILE) {
                    Ok(cached) => Ok((cached, CertHealth::Good, Some(e))),
                    Err(_) => Ok((self.generated()?, CertHealth::Degraded, Some(e))),
                },
            },
        }
    }

    /// The cached self-signed certificate, or a new one when it is missing,
    /// has other names, another key type, or less than a third of its life left.
    pub fn generated(&self) -> Result<Bundle, CertError> {
        let want = tls::san_strings(&self.sans);
        if let Ok(cached) = self.cache.load(GENERATED_FILE) {
            let mut have = cached.info.sans.clone();
            let mut want_sorted = want.clone();
            have.sort();
            want_sorted.sort();
            let same_type =
                matches!((self.key_type, cached.is_rsa()), (KeyType::Rsa2048, true) | (KeyType::EcdsaP256, false));
            if have == want_sorted && same_type && !cached.info.needs_renewal(tls::unix_now()) {
                return Ok(cached);
            }
            tracing::info!(fingerprint = %cached.info.fingerprint, "regenerating the self-signed certificate (names, key type or remaining lifetime changed)");
        }
        let bundle = tls::generate(&self.sans, self.key_type, GENERATED_LIFETIME)?;
        self.cache.write_secret(GENERATED_FILE, bundle.to_pem().as_bytes())?;
        tracing::info!(fingerprint = %bundle.info.fingerprint, sans = %bundle.info.sans.join(","), "generated a self-signed certificate");
        Ok(bundle)
    }

    /// The custom certificate and its key, validated together.
    pub fn from_files(&self, cert: &Path) -> Result<Bundle, SourceError> {
        load_custom(cert, self.key_path.as_deref())
    }

    async fn download(&self) -> Result<Bundle, SourceError> {
        let client = reqwest::Client::builder()
            .timeout(DOWNLOAD_TIMEOUT)
            .https_only(true)
            .build()
            .map_err(|e| SourceError::Client(e.to_string()))?;
        // The files live below the base URL's path; its query (a signed-URL token) applies to each.
        let file_url = |name: &str| -> Result<String, SourceError> {
            let mut u = reqwest::Url::parse(&self.indirect_url)
                .map_err(|e| SourceError::Client(format!("SSL_INDIRECT_URL does not parse: {e}")))?;
            let mut path = u.path().to_string();
            if !path.ends_with('/') {
                path.push('/');
            }
            path.push_str(name);
            u.set_path(&path);
            u.set_fragment(None);
            Ok(u.to_string())
        };
        let fetch = |url: String| {
            let shown = redact_url(&url);
            let client = client.clone();
            async move {
                // reqwest's errors name the URL: strip it, ours is the redacted one.
                let failed =
                    |source: reqwest::Error| SourceError::Download { url: shown.clone(), source: source.without_url() };
                let mut resp = client.get(&url).send().await.and_then(|r| r.error_for_status()).map_err(failed)?;
                let too_large = || SourceError::TooLarge { url: shown.clone(), limit: MAX_DOWNLOAD_BYTES };
                if resp.content_length().is_some_and(|n| n > MAX_DOWNLOAD_BYTES as u64) {
                    return Err(too_large());
                }
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(failed)? {
                    if body.len() + chunk.len() > MAX_DOWNLOAD_BYTES {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
        };
        let (chain_url, key_url) = (file_url("fullchain.pem")?, file_url("privkey.pem")?);
        let label = format!("{} with {}", redact_url(&chain_url), redact_url(&key_url));
        let chain = fetch(chain_url).await?;
        let key = fetch(key_url).await?;
        Ok(Bundle::parse(&chain, &key, &label)?)
    }
}

/// The served certificate and when to look at the source again: the
/// supervisor's view of certificate renewal.
#[derive(Debug)]
pub struct CertKeeper {
    manager: CertManager,
    refresh: Duration,
    /// The certificate published in `live.pem` now.
    served: CertInfo,
    retry: Duration,
    next_check: Instant,
    last_expiry_warning: Option<Instant>,
    /// Where checks and the served certificate's expiry are counted (set by `spawn`).
    stats: Option<tandem_shared::stats::Stats>,
}

impl CertKeeper {
    /// Keeps `served`, obtained at start with `health` (and `error` if the source failed).
    pub fn new(
        manager: CertManager,
        refresh: Duration,
        served: &Bundle,
        health: CertHealth,
        error: Option<String>,
    ) -> Self {
        let mut k = CertKeeper {
            manager,
            refresh,
            served: served.info.clone(),
            retry: RETRY_START,
            next_check: Instant::now(),
            last_expiry_warning: None,
            stats: None,
        };
        k.schedule(health, error.is_some());
        k.write_status(health, error);
        k.warn_if_expiring();
        k
    }

    fn schedule(&mut self, health: CertHealth, failed: bool) {
        let now = Instant::now();
        if failed || health == CertHealth::Degraded {
            self.next_check = now + self.retry;
            self.retry = (self.retry * 2).min(self.refresh);
        } else {
            self.retry = RETRY_START;
            let every = match self.manager.source {
                CertSource::Path(_) => FILE_POLL.min(self.refresh),
                _ => self.refresh,
            };
            self.next_check = now + every;
        }
    }

    fn write_status(&self, health: CertHealth, error: Option<String>) {
        let status = CertStatus::new(self.manager.mode(), &self.served, health == CertHealth::Degraded, error);
        let json = serde_json::to_vec_pretty(&status).unwrap_or_default();
        if let Err(e) = self.manager.cache.write_secret(STATUS_FILE, &json) {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::new(e)), "cannot write the certificate status");
        }
    }

    fn warn_if_expiring(&mut self) {
        let now = tls::unix_now();
        if !self.served.needs_renewal(now) || self.last_expiry_warning.is_some_and(|t| t.elapsed() < EXPIRY_WARN_EVERY)
        {
            return;
        }
        self.last_expiry_warning = Some(Instant::now());
        tracing::warn!(
            fingerprint = %self.served.fingerprint,
            days_left = self.served.seconds_left(now) / 86400,
            "the served certificate has less than a third of its lifetime left\nhint: renew it at its source; tandem publishes the new one as soon as it sees it"
        );
    }

    /// Checks the source now. Returns true when a new certificate was
    /// published (the HTTPS worker must reload).
    pub async fn check(&mut self) -> bool {
        let (published, failed) = self.check_source().await;
        if let Some(stats) = &self.stats {
            stats.cert_checked(Some(self.served.not_after), failed, published);
        }
        published
    }

    /// One check; returns whether a certificate was published and whether the source failed.
    async fn check_source(&mut self) -> (bool, bool) {
        let result = self.manager.obtain().await;
        match result {
            Ok((bundle, health, warning)) => {
                let error = warning.map(|e| format!("{:#}", anyhow::Error::new(e)));
                if let Some(e) = &error {
                    tracing::warn!(error = %e, retry_s = self.retry.as_secs(), "certificate source unavailable; keeping the cached certificate");
                }
                if health == CertHealth::Degraded {
                    tracing::warn!(
                        retry_s = self.retry.as_secs(),
                        "serving a generated stand-in certificate until the configured source answers"
                    );
                }
                let mut published = false;
                if bundle.info.fingerprint != self.served.fingerprint {
                    match self.manager.cache.publish(&bundle) {
                        Ok(()) => {
                            tracing::info!(fingerprint = %bundle.info.fingerprint, previous = %self.served.fingerprint, "published a new certificate");
                            self.served = bundle.info;
                            published = true;
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{:#}", anyhow::Error::new(e)), "cannot publish the new certificate; the previous one keeps serving")
                        }
                    }
                }
                let failed = error.is_some();
                self.schedule(health, failed);
                if published || failed || health == CertHealth::Degraded {
                    self.write_status(health, error);
                }
                self.warn_if_expiring();
                (published, failed)
            }
            Err(e) => {
                let e = format!("{:#}", anyhow::Error::new(e));
                tracing::error!(error = %e, retry_s = self.retry.as_secs(), "certificate refused; the previous one keeps serving");
                self.write_status(CertHealth::Good, Some(e));
                self.schedule(CertHealth::Good, true);
                (false, true)
            }
        }
    }
}

/// Quiet time after a file event before re-reading certificate files (editors write in steps).
const CERT_DEBOUNCE: Duration = Duration::from_millis(200);

/// What the certificate thread reports after each check.
#[derive(Debug, Clone, Copy)]
pub struct CertChecked {
    /// A new certificate was published: the HTTPS worker must reload.
    pub published: bool,
    /// The check was asked for (SIGHUP): the HTTPS worker reloads either way.
    pub requested: bool,
}

/// The supervisor's side of the certificate thread.
#[derive(Debug)]
pub struct CertHandle {
    requests: tokio::sync::mpsc::UnboundedSender<()>,
    /// One report per check.
    pub events: tokio::sync::mpsc::UnboundedReceiver<CertChecked>,
    fingerprint: Arc<std::sync::Mutex<String>>,
}

impl CertHandle {
    /// Asks for a check now (SIGHUP); the answer comes as an event.
    pub fn check_now(&self) {
        let _ = self.requests.send(());
    }

    /// The served certificate's fingerprint.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl CertKeeper {
    /// Runs the keeper on a thread of its own: downloads, file reads and key
    /// generation can take seconds (or, for a hostile file, block), and the
    /// supervisor's loop must keep reaping and restarting workers meanwhile.
    /// Checks are counted in `stats`.
    pub fn spawn(mut self, stats: tandem_shared::stats::Stats) -> std::io::Result<CertHandle> {
        stats.cert_checked(Some(self.served.not_after), false, false);
        self.stats = Some(stats);
        let (requests, mut asked) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (report, events) = tokio::sync::mpsc::unbounded_channel();
        let fingerprint = Arc::new(std::sync::Mutex::new(self.served.fingerprint.clone()));
        let shown = fingerprint.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("cert-keeper".into()).spawn(move || {
            runtime.block_on(async move {
                let mut files = watch(&self.manager.watched_dirs());
                loop {
                    let requested = tokio::select! {
                        r = asked.recv() => match r {
                            Some(()) => true,
                            None => return,
                        },
                        _ = tokio::time::sleep_until(self.next_check.into()) => false,
                        Some(()) = async { match &mut files { Some((_, rx)) => rx.recv().await, None => std::future::pending().await } } => {
                            // Let a multi-file update (key and chain, or a ..data swap) settle.
                            tokio::time::sleep(CERT_DEBOUNCE).await;
                            if let Some((_, rx)) = &mut files {
                                while rx.try_recv().is_ok() {}
                            }
                            tracing::debug!("certificate files changed on disk");
                            false
                        }
                    };
                    let published = self.check().await;
                    *shown.lock().unwrap_or_else(|p| p.into_inner()) = self.served.fingerprint.clone();
                    if report.send(CertChecked { published, requested }).is_err() {
                        return;
                    }
                }
            });
        })?;
        Ok(CertHandle { requests, events, fingerprint })
    }
}

/// Watches the directories of a custom certificate (inotify through `notify`)
/// and reports that something changed; the periodic poll covers anything missed.
pub fn watch(dirs: &[PathBuf]) -> Option<(notify::RecommendedWatcher, tokio::sync::mpsc::UnboundedReceiver<()>)> {
    use notify::Watcher;
    if dirs.is_empty() {
        return None;
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch certificate files; polling only");
            return None;
        }
    };
    for d in dirs {
        if let Err(e) = watcher.watch(d, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch the certificate directory; polling only");
        }
    }
    Some((watcher, rx))
}

/// Loads a custom certificate and its key (given, or discovered), validated together.
pub fn load_custom(cert: &Path, key: Option<&Path>) -> Result<Bundle, SourceError> {
    let key = match key {
        Some(k) => k.to_path_buf(),
        None => discover_key(cert)?,
    };
    let read = |p: &Path| tls::read_pem_file(p);
    let origin = format!("certificate {} with key {}", cert.display(), key.display());
    if let Ok(meta) = std::fs::metadata(&key) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o044 != 0 {
            tracing::warn!(key = %key.display(), mode = format!("{mode:o}"), "the private key is readable by other users\nhint: chmod 600 the key file");
        }
    }
    Ok(Bundle::parse(&read(cert)?, &read(&key)?, &origin)?)
}

/// Finds the private key of a custom certificate: same stem with `.key`, then
/// the usual neighbours, in the certificate's own directory only.
pub fn discover_key(cert: &Path) -> Result<PathBuf, SourceError> {
    let candidates = key_candidates(cert);
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| SourceError::KeyNotFound {
        cert: cert.to_path_buf(),
        tried: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// Where a certificate's key may be, in the order they are tried.
pub fn key_candidates(cert: &Path) -> Vec<PathBuf> {
    let dir = cert.parent().unwrap_or_else(|| Path::new("."));
    let mut out = vec![cert.with_extension("key")];
    let name = cert.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let neighbour = match name {
        "fullchain.pem" | "chain.pem" => Some("privkey.pem"),
        "cert.pem" => Some("key.pem"),
        "tls.crt" => Some("tls.key"),
        _ => None,
    };
    if let Some(n) = neighbour {
        out.push(dir.join(n));
    }
    for n in ["privkey.pem", "key.pem", "tls.key"] {
        let p = dir.join(n);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod redaction {
    use super::redact_url;

    #[test]
    fn urls_lose_credentials_queries_and_fragments() {
        assert_eq!(redact_url("https://u:p@h.example/a/?token=x#f"), "https://h.example/a/?redacted");
        assert_eq!(redact_url("https://h.example/certificate/"), "https://h.example/certificate/");
        assert!(!redact_url("not a url with secret").contains("secret"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_candidates_follow_naming_patterns() {
        let c = key_candidates(Path::new("/etc/tls/tls.crt"));
        assert_eq!(c[0], PathBuf::from("/etc/tls/tls.key"));
        let c = key_candidates(Path::new("/le/fullchain.pem"));
        assert_eq!(c[0], PathBuf::from("/le/fullchain.key"));
        assert_eq!(c[1], PathBuf::from("/le/privkey.pem"));
        let c = key_candidates(Path::new("/x/cert.pem"));
        assert_eq!(c[1], PathBuf::from("/x/key.pem"));
        assert!(c.iter().all(|p| p.parent() == Some(Path::new("/x"))));
    }
}
