//! Where the HTTPS certificate comes from and how it is kept fresh.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scope::https;
use crate::{values, Config, Reader};

crate::declare! {
    SSL_CERTIFICATE {
        default: "INDIRECT",
        doc: "INDIRECT, GENERATE, CA (the private CA of `tandem ca init`), ACME, or a path to a PEM certificate (chain)",
        accepted: "INDIRECT, GENERATE, CA, ACME, or the path of a readable PEM certificate file",
        scope: https,
    }
    SSL_KEY {
        default: "discovered",
        doc: "private key for a custom certificate (overrides discovery)",
        accepted: "the path of a readable PEM private key file",
        scope: |c| https(c).or_else(|| (!from_files(c)).then_some("SSL_CERTIFICATE is not a certificate file; SSL_KEY only goes with one")),
    }
    SSL_KEY_TYPE {
        default: "rsa2048",
        doc: "key type of generated certificates: rsa2048 or ecdsa-p256",
        accepted: "rsa2048 or ecdsa-p256",
        scope: |c| https(c).or_else(|| from_files(c).then_some("the certificate comes from files; SSL_KEY_TYPE is for generated ones")),
    }
    SSL_INDIRECT_URL {
        default: "https://roboflow.host/certificate/",
        doc: "base URL holding fullchain.pem and privkey.pem (https only)",
        accepted: "an https:// URL",
        scope: |c| https(c).or_else(|| (c.certs.source != CertSource::Indirect).then_some("SSL_CERTIFICATE is not INDIRECT")),
    }
    SSL_REFRESH_INTERVAL {
        default: "86400",
        doc: "seconds between checks of the certificate source (1-31536000)",
        accepted: "seconds 1-31536000 (one year), as a number (30) or with a unit s, m, h or d (30s, 2m, 1h)",
        scope: https,
    }
    SSL_CERT_VALIDITY {
        default: "7d",
        doc: "lifetime of the leaves SSL_CERTIFICATE=CA issues (seconds, or with s/m/h/d; 1m-365d), renewed at 2/3",
        accepted: "a lifetime from 60 seconds to 365 days: seconds, or a number with s, m, h or d (e.g. 7d, 12h)",
        scope: |c| https(c).or_else(|| (c.certs.source != CertSource::Ca).then_some("SSL_CERTIFICATE is not CA; SSL_CERT_VALIDITY is the lifetime of the private CA's leaves")),
    }
    SSL_SAN {
        default: "(none)",
        doc: "extra DNS names / IPs for generated certificates, comma-separated",
        accepted: "comma-separated DNS names or IP addresses",
        scope: |c| https(c).or_else(|| from_files(c).then_some("the certificate comes from files; SSL_SAN is for generated ones")),
    }
}

fn from_files(c: &Config) -> bool {
    matches!(c.certs.source, CertSource::Path(_))
}

/// Where the HTTPS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertSource {
    /// Downloaded from `SSL_INDIRECT_URL`.
    #[serde(rename = "INDIRECT")]
    Indirect,
    /// Self-signed, generated and cached by tandem.
    #[serde(rename = "GENERATE")]
    Generate,
    /// A PEM certificate chain on disk.
    #[serde(rename = "path")]
    Path(PathBuf),
    /// Leaves issued by the private CA in the cache (`tandem ca init`).
    #[serde(rename = "CA")]
    Ca,
    /// A certificate from an ACME server (Let's Encrypt), renewed by tandem.
    #[serde(rename = "ACME")]
    Acme,
}

/// Key algorithm for generated certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    /// RSA with a 2048-bit modulus (the default, for the widest client support).
    #[serde(rename = "rsa2048")]
    Rsa2048,
    /// ECDSA on P-256 (smaller, faster handshakes).
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
}

/// The certificate section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certs {
    /// Where the certificate comes from.
    pub source: CertSource,
    /// Explicit private key path for a certificate from files.
    pub key: Option<PathBuf>,
    /// Key type for generated certificates.
    pub key_type: KeyType,
    /// Base URL for INDIRECT downloads.
    pub indirect_url: String,
    /// Between checks of the certificate source.
    pub refresh_interval: Duration,
    /// Lifetime of the leaves the private CA issues.
    pub validity: Duration,
    /// Extra subject alternative names for generated certificates.
    pub san: Vec<String>,
}

/// Reads the certificate section.
pub fn parse(r: &mut Reader) -> Certs {
    let source = r.get(&SSL_CERTIFICATE, CertSource::Indirect, |v| match v.to_ascii_uppercase().as_str() {
        "INDIRECT" => Some(CertSource::Indirect),
        "GENERATE" => Some(CertSource::Generate),
        "CA" => Some(CertSource::Ca),
        "ACME" => Some(CertSource::Acme),
        _ => values::readable_file(v).map(CertSource::Path),
    });
    let key = r.get(&SSL_KEY, None, |v| values::readable_file(v).map(Some));
    let key_type = r.get(&SSL_KEY_TYPE, KeyType::Rsa2048, |v| {
        values::one_of(
            v,
            &[
                ("rsa2048", KeyType::Rsa2048),
                ("rsa", KeyType::Rsa2048),
                ("ecdsa-p256", KeyType::EcdsaP256),
                ("ecdsa", KeyType::EcdsaP256),
                ("p256", KeyType::EcdsaP256),
            ],
        )
    });
    let indirect_url = r.get(&SSL_INDIRECT_URL, "https://roboflow.host/certificate/".to_string(), |v| {
        (v.starts_with("https://") && v.len() > "https://".len()).then(|| v.to_string())
    });
    let refresh_interval =
        r.get(&SSL_REFRESH_INTERVAL, Duration::from_secs(86400), |v| values::seconds(v, 1, 31_536_000));
    let validity = r.get(&SSL_CERT_VALIDITY, Duration::from_secs(7 * 86400), |v| {
        values::lifetime(v).filter(|d| (60..=365 * 86400).contains(&d.as_secs()))
    });
    let san = r.get(&SSL_SAN, Vec::new(), |v| {
        let names = values::list(v);
        names.iter().all(|n| values::is_name_or_address(n)).then_some(names)
    });
    Certs { source, key, key_type, indirect_url, refresh_interval, validity, san }
}
