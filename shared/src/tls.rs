//! Certificate primitives: parse and validate a key + chain, generate a
//! self-signed certificate, and write secrets into the cache safely.
//!
//! The supervisor decides *which* certificate to publish; the HTTPS worker
//! only ever reads `live.pem` through [`Bundle::load`].

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use crate::config::KeyType;

/// The file the HTTPS worker serves: private key and full chain together.
pub const LIVE_FILE: &str = "live.pem";
/// The cached self-signed certificate (key + certificate).
pub const GENERATED_FILE: &str = "generated.pem";
/// What the supervisor last learnt about the served certificate (JSON, no secret).
pub const STATUS_FILE: &str = "status.json";

/// The served certificate's state, written by the supervisor for `GET /` and readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CertStatus {
    /// `GENERATE`, `INDIRECT` or `PATH`.
    pub mode: String,
    /// The served leaf.
    #[serde(flatten)]
    pub info: CertInfo,
    /// A generated stand-in is served because the configured source failed.
    pub degraded: bool,
    /// The last failure of the source, if the last check failed.
    pub last_error: Option<String>,
    /// When the source was last checked, unix seconds.
    pub checked_at: i64,
}

impl CertStatus {
    /// The status of `info` as served from `mode`.
    pub fn new(mode: &str, info: &CertInfo, degraded: bool, last_error: Option<String>) -> Self {
        CertStatus { mode: mode.to_string(), info: info.clone(), degraded, last_error, checked_at: unix_now() }
    }

    /// A JSON view with the remaining lifetime computed now.
    pub fn to_json(&self) -> serde_json::Value {
        let now = unix_now();
        let left = self.info.seconds_left(now);
        let lifetime = (self.info.not_after - self.info.not_before).max(1);
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("seconds_left".into(), left.into());
            o.insert("days_left".into(), (left / 86400).into());
            o.insert("renew_soon".into(), (left * 3 < lifetime).into());
        }
        v
    }
}

/// Why a certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The cache directory could be redirected or read by someone else.
    #[error("{path} is not safe for private keys: {reason}\nhint: {fix}")]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// What the operator can do.
        fix: String,
    },
    /// No certificate in the PEM data.
    #[error("{origin}: no PEM certificate found")]
    NoCertificate {
        /// Where the data came from.
        origin: String,
    },
    /// No private key in the PEM data.
    #[error("{origin}: no PEM private key found (PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        /// Where the data came from.
        origin: String,
    },
    /// A PEM section could not be decoded.
    #[error("{origin}: malformed PEM: {reason}")]
    Pem {
        /// Where the data came from.
        origin: String,
        /// The decoder's message.
        reason: String,
    },
    /// The key cannot be used, or does not match the leaf certificate.
    #[error("{origin}: private key does not match the certificate or is unusable: {reason}")]
    KeyMismatch {
        /// Where the data came from (both files).
        origin: String,
        /// rustls' message.
        reason: String,
    },
    /// The leaf certificate could not be parsed as X.509.
    #[error("{origin}: certificate is not valid X.509: {reason}")]
    X509 {
        /// Where the data came from.
        origin: String,
        /// The parser's message.
        reason: String,
    },
    /// The leaf certificate is outside its validity window.
    #[error("{origin}: certificate is not valid now (valid from {not_before} to {not_after}, unix seconds)")]
    Expired {
        /// Where the data came from.
        origin: String,
        /// Start of validity.
        not_before: i64,
        /// End of validity.
        not_after: i64,
    },
    /// Certificate generation failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
}

/// What an operator wants to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CertInfo {
    /// SHA-256 of the leaf certificate's DER, lower-case hex.
    pub fingerprint: String,
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Subject alternative names (`DNS:x`, `IP:y`).
    pub sans: Vec<String>,
    /// Start of validity, unix seconds.
    pub not_before: i64,
    /// End of validity, unix seconds.
    pub not_after: i64,
    /// Public key algorithm and size, e.g. `RSA-2048` or `EC-256`.
    pub key_algorithm: String,
}

impl CertInfo {
    /// Seconds left until expiry (negative once expired).
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.not_after - now
    }

    /// Whether less than a third of the lifetime is left.
    pub fn needs_renewal(&self, now: i64) -> bool {
        let lifetime = (self.not_after - self.not_before).max(1);
        self.seconds_left(now) * 3 < lifetime
    }
}

/// A validated private key with its certificate chain.
#[derive(Debug)]
pub struct Bundle {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Facts about the leaf.
    pub info: CertInfo,
    certified: Arc<CertifiedKey>,
}

/// Current time as unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

impl Bundle {
    /// Parses and validates a certificate chain and its key. `origin` names the
    /// file(s) in error messages.
    pub fn parse(cert_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<Bundle, CertError> {
        let pem_err =
            |e: rustls_pki_types::pem::Error| CertError::Pem { origin: origin.to_string(), reason: e.to_string() };
        if cert_pem.len() > MAX_CHAIN_BYTES {
            return Err(CertError::Pem {
                origin: origin.to_string(),
                reason: format!(
                    "the chain is {} bytes; more than {MAX_CHAIN_BYTES} is not a certificate chain",
                    cert_pem.len()
                ),
            });
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(pem_err)?;
        if chain.is_empty() {
            return Err(CertError::NoCertificate { origin: origin.to_string() });
        }
        if chain.len() > MAX_CHAIN_CERTS {
            return Err(CertError::Pem {
                origin: origin.to_string(),
                reason: format!("the chain has {} certificates; at most {MAX_CHAIN_CERTS} are served", chain.len()),
            });
        }
        let key = match PrivateKeyDer::from_pem_slice(key_pem) {
            Ok(k) => k,
            Err(rustls_pki_types::pem::Error::NoItemsFound) => {
                return Err(CertError::NoKey { origin: origin.to_string() })
            }
            Err(e) => return Err(pem_err(e)),
        };
        let info = inspect(&chain[0], origin)?;
        let now = unix_now();
        if now < info.not_before || now > info.not_after {
            return Err(CertError::Expired {
                origin: origin.to_string(),
                not_before: info.not_before,
                not_after: info.not_after,
            });
        }
        let certified = CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(|e| CertError::KeyMismatch { origin: origin.to_string(), reason: e.to_string() })?;
        Ok(Bundle { chain, key, info, certified: Arc::new(certified) })
    }

    /// Reads a combined key + chain file such as `live.pem`.
    pub fn load(path: &Path) -> Result<Bundle, CertError> {
        let bytes = read_pem_file(path)?;
        Bundle::parse(&bytes, &bytes, &path.display().to_string())
    }

    /// Whether the key is RSA.
    pub fn is_rsa(&self) -> bool {
        self.info.key_algorithm.starts_with("RSA")
    }

    /// The rustls view, ready to serve.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// Key then chain, PEM-encoded: the format of `live.pem`.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        let (label, der) = match &self.key {
            PrivateKeyDer::Pkcs1(k) => ("RSA PRIVATE KEY", k.secret_pkcs1_der()),
            PrivateKeyDer::Sec1(k) => ("EC PRIVATE KEY", k.secret_sec1_der()),
            PrivateKeyDer::Pkcs8(k) => ("PRIVATE KEY", k.secret_pkcs8_der()),
            _ => ("PRIVATE KEY", &[][..]),
        };
        out.push_str(&pem_block(label, der));
        for c in &self.chain {
            out.push_str(&pem_block("CERTIFICATE", c));
        }
        out
    }

    /// The chain alone, PEM-encoded (what a client would trust for a self-signed certificate).
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem_block("CERTIFICATE", c)).collect()
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}

/// Reads the facts of one certificate.
pub fn inspect(der: &CertificateDer<'_>, origin: &str) -> Result<CertInfo, CertError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::X509 { origin: origin.to_string(), reason: e.to_string() })?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    sans.push(ip.map_or_else(|| "IP:?".to_string(), |ip| format!("IP:{ip}")));
                }
                other => sans.push(other.to_string()),
            }
        }
    }
    let key_algorithm = match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(k)) => format!("RSA-{}", k.key_size()),
        Ok(x509_parser::public_key::PublicKey::EC(p)) => format!("EC-{}", p.key_size()),
        _ => "other".to_string(),
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    Ok(CertInfo {
        fingerprint: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        key_algorithm,
    })
}

/// The SANs of a generated certificate: the fixed set plus the operator's extras.
pub fn generated_sans(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1", "*.roboflow.host"].map(String::from).to_vec();
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// The SAN strings (`DNS:x` / `IP:y`) that `names` produce in a certificate.
pub fn san_strings(names: &[String]) -> Vec<String> {
    names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => format!("IP:{ip}"),
            Err(_) => format!("DNS:{n}"),
        })
        .collect()
}

/// Generates a self-signed certificate valid for `lifetime`, with IP names as IP SANs.
pub fn generate(names: &[String], key_type: KeyType, lifetime: Duration) -> Result<Bundle, CertError> {
    let gen_err = |e: rcgen::Error| CertError::Generate(e.to_string());
    let key = match key_type {
        KeyType::Rsa2048 => rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
        KeyType::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
    }
    .map_err(gen_err)?;
    let mut params = rcgen::CertificateParams::default();
    for n in names {
        let san = match n.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(n.clone().try_into().map_err(gen_err)?),
        };
        params.subject_alt_names.push(san);
    }
    params.distinguished_name.push(rcgen::DnType::CommonName, "tandem self-signed");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "tandem");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::try_from(lifetime).map_err(|e| CertError::Generate(e.to_string()))?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Bundle::parse(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), "generated certificate")
}

/// `dir` must be a real directory (not a symbolic link), owned by this user,
/// with none of the `forbidden` mode bits.
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
            "remove it, or choose a MODEL_CACHE_DIR that only this user owns".into(),
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
            fix: "choose a MODEL_CACHE_DIR inside a directory only this user (or root) can write".into(),
        });
    }
    Ok(())
}

/// Reads a certificate or key file: a regular file (a FIFO or device would
/// block or never end), opened non-blocking, at most 1 MiB.
pub fn read_pem_file(path: &Path) -> Result<Vec<u8>, CertError> {
    use std::io::Read;
    let rerr = |source| CertError::Read { path: path.to_path_buf(), source };
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(rerr)?;
    let meta = file.metadata().map_err(rerr)?;
    if !meta.is_file() {
        return Err(rerr(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
    }
    let mut bytes = Vec::new();
    file.take(1 << 20 | 1).read_to_end(&mut bytes).map_err(rerr)?;
    if bytes.len() > 1 << 20 {
        return Err(rerr(std::io::Error::new(std::io::ErrorKind::InvalidData, "larger than 1 MiB")));
    }
    Ok(bytes)
}

/// The largest certificate chain accepted (PEM bytes): a handshake must carry it.
pub const MAX_CHAIN_BYTES: usize = 256 << 10;
/// The most certificates in a served chain.
pub const MAX_CHAIN_CERTS: usize = 10;

/// The certificate cache directory: 0700, secrets 0600 from their first byte.
#[derive(Debug, Clone)]
pub struct CertCache {
    dir: PathBuf,
}

impl CertCache {
    /// Opens the cache, creating it with mode 0700 if needed. An existing cache
    /// (or the directory holding it) that someone else could redirect or read is
    /// refused, never repaired: tandem does not follow a symbolic link there,
    /// and does not chmod what it did not create.
    pub fn open(dir: &Path) -> Result<CertCache, CertError> {
        let werr = |source| CertError::Write { path: dir.to_path_buf(), source };
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
        Ok(CertCache { dir: dir.to_path_buf() })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a file in the cache.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `bytes` to `name` atomically: a 0600 temporary file in the same
    /// directory, fsync, rename, fsync of the directory.
    pub fn write_secret(&self, name: &str, bytes: &[u8]) -> Result<(), CertError> {
        let target = self.path(name);
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
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
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(werr(&self.dir))?;
        Ok(())
    }

    /// Publishes `bundle` as `live.pem`.
    pub fn publish(&self, bundle: &Bundle) -> Result<(), CertError> {
        self.write_secret(LIVE_FILE, bundle.to_pem().as_bytes())
    }

    /// Loads a cached key + chain file, if present and valid.
    pub fn load(&self, name: &str) -> Result<Bundle, CertError> {
        Bundle::load(&self.path(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_certificate_round_trips() {
        let names = generated_sans(&["example.test".to_string(), "10.1.2.3".to_string()]);
        let b = generate(&names, KeyType::EcdsaP256, Duration::from_secs(86400)).expect("generate");
        assert!(b.info.sans.contains(&"IP:127.0.0.1".to_string()));
        assert!(b.info.sans.contains(&"IP:::1".to_string()));
        assert!(b.info.sans.contains(&"DNS:localhost".to_string()));
        assert!(b.info.sans.contains(&"IP:10.1.2.3".to_string()));
        let pem = b.to_pem();
        let again = Bundle::parse(pem.as_bytes(), pem.as_bytes(), "round trip").expect("parse");
        assert_eq!(again.info.fingerprint, b.info.fingerprint);
    }

    #[test]
    fn chains_too_long_for_a_handshake_are_refused() {
        let b = generate(&[], KeyType::EcdsaP256, Duration::from_secs(3600)).expect("generate");
        let pem = b.to_pem();
        let start = pem.find("-----BEGIN CERTIFICATE-----").expect("cert");
        let (key, cert) = pem.split_at(start);
        let eleven = cert.repeat(MAX_CHAIN_CERTS + 1);
        let err = Bundle::parse(eleven.as_bytes(), key.as_bytes(), "chain").expect_err("too many");
        assert!(err.to_string().contains("at most 10"), "{err}");
        let huge = format!("{cert}{}", "#".repeat(MAX_CHAIN_BYTES));
        assert!(Bundle::parse(huge.as_bytes(), key.as_bytes(), "chain")
            .expect_err("big")
            .to_string()
            .contains("bytes"));
        assert!(Bundle::parse(cert.as_bytes(), key.as_bytes(), "chain").is_ok());
    }

    #[test]
    fn mismatched_key_is_refused() {
        let names = generated_sans(&[]);
        let a = generate(&names, KeyType::EcdsaP256, Duration::from_secs(3600)).expect("a");
        let b = generate(&names, KeyType::EcdsaP256, Duration::from_secs(3600)).expect("b");
        let a_pem = a.to_pem();
        let b_pem = b.to_pem();
        let err =
            Bundle::parse(a.chain_pem().as_bytes(), b_pem.as_bytes(), "cert.pem + key.pem").expect_err("mismatch");
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
        assert!(Bundle::parse(a_pem.as_bytes(), b"", "x").is_err());
    }

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
}
