//! Certificate primitives: parse and validate a key + chain, inspect a leaf,
//! generate a self-signed certificate.
//!
//! The supervisor decides *which* certificate to publish (its `certs` module)
//! and where it lives ([`crate::certs::cache`]); the HTTPS worker only ever reads
//! `live.pem` through [`Bundle::load`].

use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::certs::status::{unix_now, CertInfo};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tandem_config::certs::KeyType;

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
    /// The cache cannot be made where it is asked for: this user may not write there.
    #[error(
        "cannot create the certificate cache {path}: this user (uid {uid}) may not write in {parent}, which belongs \
         to uid {owner} with mode {mode:o}\nhint: chown {uid} {parent} (for a bind-mounted folder, on the host), or \
         set MODEL_CACHE_DIR to a directory uid {uid} owns"
    )]
    NotWritable {
        /// The cache directory.
        path: PathBuf,
        /// The directory it would be made in.
        parent: PathBuf,
        /// This process's user.
        uid: u32,
        /// The owner of `parent`.
        owner: u32,
        /// The mode of `parent`.
        mode: u32,
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

/// A distinguished name as RFC 4514 writes it: most specific part first,
/// `CN=alice,O=Example` with short attribute names, every special character
/// of a value escaped (`,` `+` `"` `\\` `<` `>` `;`, a leading `#` or space, a
/// trailing space, control characters as `\\XX`), so a subject can never pass
/// for another when it is read back (an identity header, a log line).
pub fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let ty = x509_parser::objects::oid2abbrev(atv.attr_type(), registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| atv.attr_type().to_id_string());
                    let value = match atv.as_str() {
                        Ok(s) => escape_dn_value(s),
                        Err(_) => format!("#{}", atv.as_slice().iter().map(|b| format!("{b:02x}")).collect::<String>()),
                    };
                    format!("{ty}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(c);
            }
            '#' | ' ' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
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
                GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                GeneralName::DirectoryName(n) => sans.push(format!("DirName:{}", rfc4514(n))),
                other => sans.push(other.to_string()),
            }
        }
    }
    let key_algorithm = match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(k)) => format!("RSA-{}", k.key_size()),
        Ok(x509_parser::public_key::PublicKey::EC(p)) => format!("EC-{}", p.key_size()),
        _ => "other".to_string(),
    };
    Ok(CertInfo {
        fingerprint: hex(&sha256(der)),
        subject: rfc4514(cert.subject()),
        issuer: rfc4514(cert.issuer()),
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

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `bytes` as lower-case hex (fingerprints, key hashes).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_written_as_rfc_4514_with_every_special_character_escaped() {
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "Example, Inc.");
        dn.push(rcgen::DnType::CommonName, "alice,O=Admins+x\"\n #");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            rcgen::SanType::DnsName("a.example".try_into().expect("dns")),
            rcgen::SanType::URI("spiffe://example/ns/a".try_into().expect("uri")),
            rcgen::SanType::Rfc822Name("alice@example.com".try_into().expect("email")),
        ];
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let info = inspect(cert.der(), "test").expect("inspect");
        assert_eq!(info.subject, "CN=alice\\,O=Admins\\+x\\\"\\0A #,O=Example\\, Inc.");
        assert_eq!(info.sans, ["DNS:a.example", "URI:spiffe://example/ns/a", "email:alice@example.com"]);
        assert_eq!(escape_dn_value(" #lead and trail "), "\\ #lead and trail\\ ");
        assert_eq!(escape_dn_value("#x"), "\\#x");
    }

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
}
