//! The certificate keeper: obtains the first certificate at start-up and
//! publishes it, then, on a thread of its own, looks at the source again when
//! renewal timing, a file change or SIGHUP says so, and publishes what changed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_config::Config;
use tandem_shared::certs::cache::{self, CertCache, Layout};
use tandem_shared::certs::primitives::CertError;
use tandem_shared::certs::status::{unix_now, CertInfo, CertStatus};

use super::{renewal, CertHealth, Source};

/// At most one expiry warning per this period.
const EXPIRY_WARN_EVERY: Duration = Duration::from_secs(3600);
/// Quiet time after a file event before re-reading certificate files (editors write in steps).
const CERT_DEBOUNCE: Duration = Duration::from_millis(200);

/// Why the keeper could not start.
#[derive(Debug)]
pub enum StartError {
    /// The operator's configuration is at fault: exit 2.
    Config(anyhow::Error),
    /// Something that may pass (a disk, a network): exit 1.
    Runtime(anyhow::Error),
}

fn chain(e: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

/// The served certificate and when to look at the source again.
#[derive(Debug)]
pub struct CertKeeper {
    source: Box<dyn Source>,
    cache: CertCache,
    ceiling: Duration,
    /// The certificate published in `live.pem` now.
    served: CertInfo,
    /// Failed (or degraded) looks in a row.
    failures: u32,
    /// The health of the last look.
    health: CertHealth,
    next_check: Instant,
    next_check_unix: i64,
    last_expiry_warning: Option<Instant>,
    /// Where checks and the served certificate's expiry are counted (set by `spawn`).
    stats: Option<tandem_shared::stats::Stats>,
}

impl CertKeeper {
    /// Chooses the configured source, checks it, opens the cache, obtains the
    /// first certificate and publishes it.
    pub async fn start(config: &Config) -> Result<CertKeeper, StartError> {
        let source = super::choose(config);
        let layout = Layout::of(&config.process.cert_dir());
        let mode = source.mode();
        // Checked before anything is written: a bad custom pair or a missing CA is exit 2 with no cache created.
        source.preflight(&layout).map_err(|e| {
            StartError::Config(anyhow::Error::new(e).context(format!("SSL_CERTIFICATE={mode} is not usable")))
        })?;
        let cache = CertCache::open(layout.dir()).map_err(|e| match e {
            CertError::Unsafe { .. } | CertError::NotWritable { .. } => {
                StartError::Config(anyhow::Error::new(e).context("refusing the certificate cache"))
            }
            _ => StartError::Runtime(anyhow::Error::new(e).context("cannot prepare the certificate cache")),
        })?;
        let obtained = source.obtain_at_start(&cache).await.map_err(|e| {
            let config_fault = e.is_config();
            let e = anyhow::Error::new(e).context(format!("SSL_CERTIFICATE={mode} is not usable"));
            if config_fault {
                StartError::Config(e)
            } else {
                StartError::Runtime(e)
            }
        })?;
        let error = obtained.warning.map(chain);
        if let Some(e) = &error {
            tracing::warn!(error = %e, mode, "certificate source unavailable at start");
        }
        if obtained.health == CertHealth::Degraded {
            tracing::warn!(mode, source = %source.describe(), "no certificate from the configured source yet and none cached: serving a generated self-signed certificate until it delivers\nhint: check that the source is reachable, or set SSL_CERTIFICATE=GENERATE or a path");
        }
        cache
            .publish(&obtained.bundle)
            .map_err(|e| StartError::Runtime(anyhow::Error::new(e).context("cannot publish the certificate")))?;
        tracing::info!(mode, source = %source.describe(), fingerprint = %obtained.bundle.info.fingerprint, not_after = %super::rfc3339(obtained.bundle.info.not_after), "certificate published");
        let mut k = CertKeeper {
            source,
            cache,
            ceiling: super::ceiling(config),
            served: obtained.bundle.info,
            failures: 0,
            health: obtained.health,
            next_check: Instant::now(),
            next_check_unix: unix_now(),
            last_expiry_warning: None,
            stats: None,
        };
        k.schedule(obtained.health, error.is_some());
        k.write_status(obtained.health, error);
        k.warn_if_expiring();
        Ok(k)
    }

    /// The source's directories to watch.
    pub fn watched(&self) -> Vec<PathBuf> {
        self.source.watched()
    }

    fn schedule(&mut self, health: CertHealth, failed: bool) {
        self.health = health;
        self.failures = if failed || health == CertHealth::Degraded { self.failures.saturating_add(1) } else { 0 };
        let wait = renewal::next_check(
            self.source.refresh(),
            &self.served,
            unix_now(),
            self.failures,
            self.source.first_retry(),
            self.ceiling,
        );
        self.next_check = Instant::now() + wait;
        self.next_check_unix = unix_now() + wait.as_secs() as i64;
    }

    fn write_status(&self, health: CertHealth, error: Option<String>) {
        let status = CertStatus {
            mode: self.source.mode().to_string(),
            source: self.source.describe(),
            info: self.served.clone(),
            degraded: health == CertHealth::Degraded,
            last_error: error,
            checked_at: unix_now(),
            next_check_at: self.next_check_unix,
        };
        let json = serde_json::to_vec_pretty(&status).unwrap_or_default();
        if let Err(e) = self.cache.write_secret(cache::STATUS, &json) {
            tracing::warn!(error = %chain(e), "cannot write the certificate status");
        }
    }

    fn warn_if_expiring(&mut self) {
        let now = unix_now();
        if !renewal::should_warn(self.source.refresh(), &self.served, now)
            || self.last_expiry_warning.is_some_and(|t| t.elapsed() < EXPIRY_WARN_EVERY)
        {
            return;
        }
        self.last_expiry_warning = Some(Instant::now());
        tracing::warn!(
            fingerprint = %self.served.fingerprint,
            mode = self.source.mode(),
            days_left = tandem_shared::certs::status::days_left(self.served.seconds_left(now)),
            seconds_left = self.served.seconds_left(now),
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
        match self.source.obtain(&self.cache).await {
            Ok(obtained) => {
                let (bundle, health) = (obtained.bundle, obtained.health);
                let error = obtained.warning.map(chain);
                let failed = error.is_some();
                // The retry delay this failure earns, for the log line.
                let retry_s =
                    renewal::backoff(self.source.first_retry(), self.failures.saturating_add(1), self.ceiling)
                        .as_secs();
                if let Some(e) = &error {
                    tracing::warn!(error = %e, retry_s, "certificate source unavailable; keeping the cached certificate");
                }
                if health == CertHealth::Degraded {
                    tracing::warn!(
                        retry_s,
                        "serving a generated stand-in certificate until the configured source answers"
                    );
                }
                let mut published = false;
                if bundle.info.fingerprint != self.served.fingerprint {
                    match self.cache.publish(&bundle) {
                        Ok(()) => {
                            tracing::info!(fingerprint = %bundle.info.fingerprint, previous = %self.served.fingerprint, not_after = %super::rfc3339(bundle.info.not_after), "published a new certificate");
                            self.served = bundle.info;
                            published = true;
                        }
                        Err(e) => {
                            tracing::error!(error = %chain(e), "cannot publish the new certificate; the previous one keeps serving")
                        }
                    }
                }
                let was_failing = self.failures > 0;
                self.schedule(health, failed);
                // A quiet look (files polled every few seconds) writes nothing.
                if published || failed || was_failing || health == CertHealth::Degraded {
                    self.write_status(health, error);
                }
                self.warn_if_expiring();
                (published, failed)
            }
            Err(e) => {
                let e = chain(e);
                self.schedule(self.health, true);
                let retry_s = self.next_check.saturating_duration_since(Instant::now()).as_secs();
                tracing::error!(error = %e, retry_s, "certificate refused; the previous one keeps serving");
                self.write_status(self.health, Some(e));
                self.warn_if_expiring();
                (false, true)
            }
        }
    }
}

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
    degraded: Arc<AtomicBool>,
}

impl CertHandle {
    /// Whether a stand-in serves because the source has not delivered yet.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

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
    /// Runs the keeper on a thread of its own: downloads, ACME orders, file
    /// reads and key generation can take seconds (or, for a hostile file,
    /// block), and the supervisor's loop must keep reaping and restarting
    /// workers meanwhile. Checks are counted in `stats`.
    pub fn spawn(mut self, stats: tandem_shared::stats::Stats) -> std::io::Result<CertHandle> {
        stats.cert_checked(Some(self.served.not_after), false, false);
        self.stats = Some(stats);
        let (requests, mut asked) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (report, events) = tokio::sync::mpsc::unbounded_channel();
        let fingerprint = Arc::new(std::sync::Mutex::new(self.served.fingerprint.clone()));
        let shown = fingerprint.clone();
        let degraded = Arc::new(AtomicBool::new(self.health == CertHealth::Degraded));
        let degraded_now = degraded.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("cert-keeper".into()).spawn(move || {
            runtime.block_on(async move {
                let mut files = watch(&self.watched());
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
                    degraded_now.store(self.health == CertHealth::Degraded, Ordering::Relaxed);
                    if report.send(CertChecked { published, requested }).is_err() {
                        return;
                    }
                }
            });
        })?;
        Ok(CertHandle { requests, events, fingerprint, degraded })
    }
}

/// Watches directories (inotify through `notify`) and reports that something
/// changed; the periodic poll covers anything missed.
fn watch(dirs: &[PathBuf]) -> Option<(notify::RecommendedWatcher, tokio::sync::mpsc::UnboundedReceiver<()>)> {
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
