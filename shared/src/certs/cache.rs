//! The certificate cache: one directory (0700, secrets 0600 from their first
//! byte) and the one place that knows which file in it holds what.
//!
//! ```text
//! ssl_certificates/
//!   live.pem          key + chain the HTTPS worker serves (published by the supervisor)
//!   status.json       what the supervisor knows about it (no secret; read by the engines)
//!   generated.pem     GENERATE: the self-signed certificate
//!   indirect.pem      INDIRECT: the last good download
//!   ca-leaf.pem       CA: the current leaf issued by the private CA
//!   acme.pem          ACME: the current certificate from the ACME server
//!   ca/               the private CA (`tandem ca init`): root.pem, root.key, intermediate.pem, intermediate.key
//!   acme/             account.json (the ACME account key), http-01/<token>, tls-alpn-01/<name>.pem
//! ```

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::certs::primitives::{Bundle, CertError};

/// The file the HTTPS worker serves: private key and full chain together.
const LIVE: &str = "live.pem";

/// Where each file of a cache directory is, without opening it (workers and
/// `tandem cert status` look; only the supervisor writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// The layout of the cache at `dir`.
    pub fn of(dir: &Path) -> Layout {
        Layout { dir: dir.to_path_buf() }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Key + chain the HTTPS worker serves.
    pub fn live(&self) -> PathBuf {
        self.dir.join(LIVE)
    }

    /// The supervisor's view of the served certificate (JSON, no secret).
    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }

    /// GENERATE's self-signed certificate.
    pub fn generated(&self) -> PathBuf {
        self.dir.join(GENERATED)
    }

    /// INDIRECT's last good download.
    pub fn indirect(&self) -> PathBuf {
        self.dir.join(INDIRECT)
    }

    /// CA mode's current leaf.
    pub fn ca_leaf(&self) -> PathBuf {
        self.dir.join(CA_LEAF)
    }

    /// ACME mode's current certificate.
    pub fn acme_cert(&self) -> PathBuf {
        self.dir.join(ACME_CERT)
    }

    /// The private CA's directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join(CA_DIR)
    }

    /// A file of the private CA: `root.pem`, `root.key`, `intermediate.pem`, `intermediate.key`.
    pub fn ca_file(&self, name: &str) -> PathBuf {
        self.ca_dir().join(name)
    }

    /// The ACME directory (account, challenges).
    pub fn acme_dir(&self) -> PathBuf {
        self.dir.join(ACME_DIR)
    }

    /// The persisted ACME account (credentials with its private key).
    pub fn acme_account(&self) -> PathBuf {
        self.acme_dir().join("account.json")
    }

    /// Where HTTP-01 key authorizations wait, one file per token, for whichever worker the validation reaches.
    pub fn acme_http01(&self) -> PathBuf {
        self.acme_dir().join(HTTP01_DIR)
    }

    /// Where TLS-ALPN-01 challenge certificates wait, one file per name, for the HTTPS worker.
    pub fn acme_alpn01(&self) -> PathBuf {
        self.acme_dir().join(ALPN01_DIR)
    }
}

/// Whether an HTTP-01 token is what RFC 8555 allows (base64url characters),
/// and so a safe file name in [`Layout::acme_http01`].
pub fn http01_token_ok(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The key authorization waiting in `dir` (the cache's `acme_http01`) for
/// `token`, when the token is well-formed and an order is in progress.
pub fn http01_answer(dir: &Path, token: &str) -> Option<Vec<u8>> {
    if !http01_token_ok(token) {
        return None;
    }
    let bytes = std::fs::read(dir.join(token)).ok()?;
    (bytes.len() <= 1024).then_some(bytes)
}

/// The file in [`Layout::acme_alpn01`] holding the TLS-ALPN-01 certificate for `name`.
pub fn alpn01_file_name(name: &str) -> String {
    let safe: String =
        name.to_ascii_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-').collect();
    format!("{}.pem", safe.trim_start_matches('.'))
}

/// Names inside the cache, relative to its directory (for [`CertCache::write_secret`]).
pub const GENERATED: &str = "generated.pem";
/// INDIRECT's cache file.
pub const INDIRECT: &str = "indirect.pem";
/// CA mode's leaf.
pub const CA_LEAF: &str = "ca-leaf.pem";
/// ACME mode's certificate.
pub const ACME_CERT: &str = "acme.pem";
/// The status file.
pub const STATUS: &str = "status.json";
/// The private CA's sub-directory.
pub const CA_DIR: &str = "ca";
/// The ACME sub-directory.
pub const ACME_DIR: &str = "acme";
/// HTTP-01 tokens, inside [`ACME_DIR`].
pub const HTTP01_DIR: &str = "http-01";
/// TLS-ALPN-01 certificates, inside [`ACME_DIR`].
pub const ALPN01_DIR: &str = "tls-alpn-01";

/// The certificate cache directory: 0700, secrets 0600 from their first byte.
#[derive(Debug, Clone)]
pub struct CertCache {
    dir: PathBuf,
    layout: Layout,
}

impl CertCache {
    /// Opens the cache, creating it with mode 0700 if needed. An existing cache
    /// (or the directory holding it) that someone else could redirect or read is
    /// refused, never repaired: tandem does not follow a symbolic link there,
    /// and does not chmod what it did not create.
    pub fn open(dir: &Path) -> Result<CertCache, CertError> {
        // Permission denied names who may write where, and the chown that fixes it.
        let werr = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                not_writable(dir).unwrap_or(CertError::Write { path: dir.to_path_buf(), source })
            }
            _ => CertError::Write { path: dir.to_path_buf(), source },
        };
        if let Some(parent) = dir.parent() {
            if !parent.exists() {
                fs::create_dir_all(parent).map_err(werr)?;
            }
            check_parent(parent)?;
        }
        match fs::symlink_metadata(dir) {
            Ok(_) => check_owned_dir(dir, 0o077)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                DirBuilder::new().mode(0o700).create(dir).map_err(werr)?;
                // The process umask may have taken bits away, never added any; check what we made.
                check_owned_dir(dir, 0o077)?;
            }
            Err(e) => return Err(werr(e)),
        }
        Ok(CertCache { dir: dir.to_path_buf(), layout: Layout::of(dir) })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where each file of the cache is.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Path of a file in the cache.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A private sub-directory of the cache (0700, created if missing, refused
    /// if someone else could reach it), for the CA and ACME files.
    pub fn private_dir(&self, name: &str) -> Result<PathBuf, CertError> {
        let dir = self.path(name);
        match fs::symlink_metadata(&dir) {
            Ok(_) => check_owned_dir(&dir, 0o077)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|source| CertError::Write { path: dir.clone(), source })?;
                check_owned_dir(&dir, 0o077)?;
            }
            Err(source) => return Err(CertError::Read { path: dir, source }),
        }
        Ok(dir)
    }

    /// Writes `bytes` to `name` atomically: a 0600 temporary file in the same
    /// directory, fsync, rename, fsync of the directory.
    pub fn write_secret(&self, name: &str, bytes: &[u8]) -> Result<(), CertError> {
        let target = self.path(name);
        // `name` may be inside a sub-directory (`ca/root.key`): the temporary file sits beside its target.
        let dir = target.parent().unwrap_or(&self.dir).to_path_buf();
        let file = target.file_name().and_then(|n| n.to_str()).unwrap_or("secret");
        let tmp = dir.join(format!(".{file}.{}.tmp", std::process::id()));
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CertError::Write { path, source }
        };
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(werr(&tmp))?;
        let written = f.write_all(bytes).and_then(|()| f.sync_all()).map_err(werr(&tmp));
        drop(f);
        // A failed write leaves nothing behind, not a truncated temporary file.
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &target).map_err(werr(&target))) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(werr(&dir))?;
        Ok(())
    }

    /// Publishes `bundle` as `live.pem`.
    pub fn publish(&self, bundle: &Bundle) -> Result<(), CertError> {
        self.write_secret(LIVE, bundle.to_pem().as_bytes())
    }

    /// Loads a cached key + chain file, if present and valid.
    pub fn load(&self, name: &str) -> Result<Bundle, CertError> {
        Bundle::load(&self.path(name))
    }
}

/// `dir` must be a real directory (not a symbolic link), owned by this user,
/// with none of the `forbidden` mode bits.
/// Refuses a private directory of the cache (the cache itself, the CA's) that
/// is a symbolic link, belongs to someone else, or that others can reach:
/// every command that reads keys from it applies the rule `tandem ca init`
/// and start-up apply.
pub fn check_private(dir: &Path) -> Result<(), CertError> {
    check_owned_dir(dir, 0o077)
}

/// Why this user cannot create `dir`: the nearest existing folder above it,
/// its owner and mode (`None` when there is none to look at).
fn not_writable(dir: &Path) -> Option<CertError> {
    use std::os::unix::fs::MetadataExt;
    let parent = dir.ancestors().skip(1).find(|p| p.exists())?;
    let meta = fs::metadata(parent).ok()?;
    Some(CertError::NotWritable {
        path: dir.to_path_buf(),
        parent: parent.to_path_buf(),
        uid: nix::unistd::geteuid().as_raw(),
        owner: meta.uid(),
        mode: meta.mode() & 0o7777,
    })
}

fn check_owned_dir(dir: &Path, forbidden: u32) -> Result<(), CertError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_dir = |reason: String, fix: String| CertError::Unsafe { path: dir.to_path_buf(), reason, fix };
    let meta = fs::symlink_metadata(dir).map_err(|source| CertError::Read { path: dir.to_path_buf(), source })?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            "it is a symbolic link".into(),
            "point MODEL_CACHE_DIR at a real directory of your own".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("it is not a directory".into(), "remove it or choose another MODEL_CACHE_DIR".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_dir(
            format!("it belongs to uid {}, not to this user (uid {me})", meta.uid()),
            format!(
                "chown -R {me} {} (for a bind-mounted folder, on the host), or choose a MODEL_CACHE_DIR that only \
                 this user owns",
                dir.display()
            ),
        ));
    }
    if meta.mode() & forbidden != 0 {
        return Err(unsafe_dir(
            format!("its mode is {:o}: other users can reach it", meta.mode() & 0o777),
            format!("chmod {:o} {} (tandem does not change modes it did not set)", 0o777 & !forbidden, dir.display()),
        ));
    }
    Ok(())
}

/// The directory holding the cache: owned by this user or root, and writable
/// by others only with the sticky bit (as `/tmp`), so nobody can swap the
/// cache for a link of theirs.
fn check_parent(parent: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(parent).map_err(|source| CertError::Read { path: parent.to_path_buf(), source })?;
    let me = nix::unistd::geteuid().as_raw();
    let sticky = meta.mode() & 0o1000 != 0;
    let writable_by_others = meta.mode() & 0o022 != 0;
    let owner_ok = meta.uid() == me || meta.uid() == 0;
    if !owner_ok || (writable_by_others && !sticky) {
        return Err(CertError::Unsafe {
            path: parent.to_path_buf(),
            reason: format!(
                "it holds the certificate cache but belongs to uid {} with mode {:o}, so someone else could replace the cache",
                meta.uid(),
                meta.mode() & 0o7777
            ),
            fix: format!("chown {me} {} (for a bind-mounted folder, on the host), or choose a MODEL_CACHE_DIR inside a directory only this user (or root) can write", parent.display()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_cache_someone_else_could_redirect_is_refused_and_left_alone() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().expect("tmp");
        // A symbolic link where the cache should be.
        let elsewhere = root.path().join("elsewhere");
        fs::create_dir(&elsewhere).expect("mkdir");
        symlink(&elsewhere, root.path().join("linked")).expect("symlink");
        let err = CertCache::open(&root.path().join("linked")).expect_err("symlink");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // A directory others can reach: refused, and its mode is not changed.
        let loose = root.path().join("loose");
        fs::create_dir(&loose).expect("mkdir");
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = CertCache::open(&loose).expect_err("loose");
        assert!(err.to_string().contains("chmod 700"), "{err}");
        assert_eq!(fs::metadata(&loose).expect("meta").permissions().mode() & 0o777, 0o755);
        // A parent anyone can write without the sticky bit.
        let open_parent = root.path().join("open");
        fs::create_dir(&open_parent).expect("mkdir");
        fs::set_permissions(&open_parent, fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = CertCache::open(&open_parent.join("ssl_certificates")).expect_err("open parent");
        assert!(err.to_string().contains("someone else could replace"), "{err}");
        assert!(!open_parent.join("ssl_certificates").exists(), "nothing created inside");
        // Someone else's directory (only root can make one to test with).
        if nix::unistd::geteuid().is_root() {
            let theirs = root.path().join("theirs");
            fs::create_dir(&theirs).expect("mkdir");
            fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).expect("chmod");
            std::os::unix::fs::chown(&theirs, Some(4242), Some(4242)).expect("chown");
            let err = CertCache::open(&theirs).expect_err("theirs");
            assert!(err.to_string().contains("uid 4242"), "{err}");
        }
    }

    #[test]
    fn secrets_are_private_from_creation() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = CertCache::open(&tmp.path().join("a/ssl")).expect("open");
        cache.write_secret("k.pem", b"secret").expect("write");
        let mode = fs::metadata(cache.path("k.pem")).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(cache.dir()).expect("meta").permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
    }

    #[test]
    fn acme_tokens_and_names_become_safe_file_names() {
        assert!(http01_token_ok("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(!http01_token_ok("../../etc/passwd"));
        assert!(!http01_token_ok(""));
        assert_eq!(alpn01_file_name("API.Example.com"), "api.example.com.pem");
        assert_eq!(alpn01_file_name("../x/y"), "xy.pem");
    }

    #[test]
    fn private_sub_directories_are_0700() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = CertCache::open(&tmp.path().join("ssl")).expect("open");
        let ca = cache.private_dir(CA_DIR).expect("ca");
        assert_eq!(ca, cache.layout().ca_dir());
        assert_eq!(fs::metadata(&ca).expect("meta").permissions().mode() & 0o777, 0o700);
        fs::set_permissions(&ca, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(cache.private_dir(CA_DIR).is_err(), "a loosened CA directory is refused");
    }
}
