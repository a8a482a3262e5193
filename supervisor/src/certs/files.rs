//! `SSL_CERTIFICATE=/path/cert.pem`: a certificate and key on disk (certbot,
//! cert-manager's secret volume, an operator's files), watched and re-read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_shared::certs::cache::{CertCache, Layout};
use tandem_shared::certs::primitives::{self, Bundle};

use super::{Obtained, Obtaining, Refresh, Source, SourceError};

/// Poll interval for certificate files on disk (inotify is the fast path).
const FILE_POLL: Duration = Duration::from_secs(5);

/// A custom certificate and its key (given with `SSL_KEY`, or found next to it).
#[derive(Debug)]
pub struct Files {
    cert: PathBuf,
    key: Option<PathBuf>,
    poll: Duration,
}

impl Files {
    /// The pair at `cert` (and `key`), polled at most every `refresh`.
    pub fn new(cert: &Path, key: Option<&Path>, refresh: Duration) -> Files {
        Files { cert: cert.to_path_buf(), key: key.map(Path::to_path_buf), poll: FILE_POLL.min(refresh) }
    }
}

impl Source for Files {
    fn mode(&self) -> &'static str {
        "PATH"
    }

    fn describe(&self) -> String {
        match &self.key {
            Some(k) => format!("{} with key {}", self.cert.display(), k.display()),
            None => self.cert.display().to_string(),
        }
    }

    fn preflight(&self, _layout: &Layout) -> Result<(), SourceError> {
        load_custom(&self.cert, self.key.as_deref()).map(|_| ())
    }

    fn obtain<'a>(&'a self, _cache: &'a CertCache) -> Obtaining<'a> {
        Box::pin(async move { Ok(Obtained::good(load_custom(&self.cert, self.key.as_deref())?)) })
    }

    fn refresh(&self) -> Refresh {
        Refresh::Every(self.poll)
    }

    fn watched(&self) -> Vec<PathBuf> {
        let parent = |p: &Path| p.parent().unwrap_or_else(|| Path::new(".")).to_path_buf();
        let mut dirs = vec![parent(&self.cert)];
        if let Some(key) = &self.key {
            let d = parent(key);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        dirs
    }

    fn files(&self, _layout: &Layout) -> Result<(PathBuf, PathBuf), String> {
        let key = match &self.key {
            Some(k) => k.clone(),
            None => discover_key(&self.cert).map_err(|e| e.to_string())?,
        };
        Ok((self.cert.clone(), key))
    }
}

/// Loads a custom certificate and its key (given, or discovered), validated together.
pub fn load_custom(cert: &Path, key: Option<&Path>) -> Result<Bundle, SourceError> {
    let key = match key {
        Some(k) => k.to_path_buf(),
        None => discover_key(cert)?,
    };
    let read = |p: &Path| primitives::read_pem_file(p);
    let origin = format!("certificate {} with key {}", cert.display(), key.display());
    if let Ok(meta) = std::fs::metadata(&key) {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode() & 0o777;
        // Group access for our own group is how Kubernetes mounts secrets (fsGroup, mode 0440).
        let others = mode & 0o004 != 0 || (mode & 0o040 != 0 && meta.gid() != nix::unistd::getegid().as_raw());
        // Once per key and mode: the files are re-read every few seconds.
        static WARNED: std::sync::Mutex<Vec<(PathBuf, u32)>> = std::sync::Mutex::new(Vec::new());
        let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
        if others && !warned.contains(&(key.clone(), mode)) {
            warned.push((key.clone(), mode));
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
