//! `tandem cert status [--json]`: what the configured certificate source holds, for operators and scripts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use serde::Serialize;
use tandem_config::Config;
use tandem_shared::certs::cache::Layout;
use tandem_shared::certs::primitives::{self, Bundle};
use tandem_shared::certs::status::{unix_now, CertInfo};

/// One certificate as reported.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The source, as `SSL_CERTIFICATE` names it: `GENERATE`, `INDIRECT`, `PATH`, `CA` or `ACME`.
    pub mode: &'static str,
    /// Where the certificate comes from, in words.
    pub source: String,
    /// The certificate file.
    pub certificate_file: PathBuf,
    /// The key file (the same file for cache entries).
    pub key_file: Option<PathBuf>,
    /// The key file's permission bits, octal.
    pub key_file_mode: Option<String>,
    /// Whether the pair is usable now (parses, matches, within validity).
    pub usable: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// Facts about the leaf, when it could be read.
    #[serde(flatten)]
    pub info: Option<CertInfo>,
    /// Validity start, RFC 3339.
    pub valid_from: Option<String>,
    /// Validity end, RFC 3339.
    pub valid_until: Option<String>,
    /// Whole days left.
    pub days_left: Option<i64>,
    /// The certificate the HTTPS worker serves now (`live.pem`), if any.
    pub served_fingerprint: Option<String>,
}

fn mode_of(p: &Path) -> Option<String> {
    std::fs::metadata(p).ok().map(|m| format!("{:04o}", m.permissions().mode() & 0o7777))
}

/// Inspects the configured source without changing anything.
pub fn report(config: &Config) -> Report {
    let layout = Layout::of(&config.process.cert_dir());
    let source = super::choose(config);
    let (cert, key) = match source.files(&layout) {
        Ok((c, k)) => (c, Ok(k)),
        Err(e) => (PathBuf::new(), Err(e)),
    };
    let served_fingerprint = Bundle::load(&layout.live()).ok().map(|b| b.info.fingerprint);
    let mut r = Report {
        mode: source.mode(),
        source: source.describe(),
        certificate_file: cert.clone(),
        key_file: key.as_ref().ok().cloned(),
        key_file_mode: key.as_ref().ok().and_then(|k| mode_of(k)),
        usable: false,
        error: None,
        info: None,
        valid_from: None,
        valid_until: None,
        days_left: None,
        served_fingerprint,
    };
    let key = match key {
        Ok(k) => k,
        Err(e) => {
            r.error = Some(e);
            return r;
        }
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let (cert_pem, key_pem) = match (read(&cert), read(&key)) {
        (Ok(c), Ok(k)) => (c, k),
        (Err(e), _) | (_, Err(e)) => {
            r.error = Some(e);
            return r;
        }
    };
    // Inspect the leaf even when the pair is unusable, so an expired
    // certificate still shows its dates.
    if let Some(Ok(der)) = rustls_pki_types::CertificateDer::pem_slice_iter(&cert_pem).next() {
        r.info = primitives::inspect(&der, &cert.display().to_string()).ok();
    }
    let origin = format!("certificate {} with key {}", cert.display(), key.display());
    match Bundle::parse(&cert_pem, &key_pem, &origin) {
        Ok(_) => r.usable = true,
        Err(e) => r.error = Some(e.to_string()),
    }
    if let Some(info) = &r.info {
        r.valid_from = Some(super::rfc3339(info.not_before));
        r.valid_until = Some(super::rfc3339(info.not_after));
        r.days_left = Some(tandem_shared::certs::status::days_left(info.seconds_left(unix_now())));
    }
    r
}

/// Renders a report for people.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13} {v}\n"));
    line("mode", r.mode.to_string());
    line("source", r.source.clone());
    line("certificate", r.certificate_file.display().to_string());
    line("key", r.key_file.as_ref().map_or("-".into(), |k| k.display().to_string()));
    line("key mode", r.key_file_mode.clone().unwrap_or_else(|| "-".into()));
    if let Some(i) = &r.info {
        line("subject", i.subject.clone());
        line("issuer", i.issuer.clone());
        line("SANs", i.sans.join(", "));
        line("key type", i.key_algorithm.clone());
        line("valid from", r.valid_from.clone().unwrap_or_default());
        line("valid until", r.valid_until.clone().unwrap_or_default());
        line("days left", r.days_left.map_or("-".into(), |d| d.to_string()));
        line("sha256", i.fingerprint.clone());
    }
    line("served", r.served_fingerprint.clone().unwrap_or_else(|| "(nothing published yet)".into()));
    line("usable", if r.usable { "yes".into() } else { format!("no: {}", r.error.clone().unwrap_or_default()) });
    out
}
