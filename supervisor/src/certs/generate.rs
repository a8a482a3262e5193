//! `SSL_CERTIFICATE=GENERATE`: a self-signed certificate made and cached by
//! tandem, renewed when a third of its year is left or its names change.

use std::time::Duration;

use tandem_config::certs::KeyType;
use tandem_config::Config;
use tandem_shared::certs::cache::{self, CertCache, Layout};
use tandem_shared::certs::primitives::{self, Bundle, CertError};

use super::{Obtained, Obtaining, Refresh, Source};

/// Lifetime of generated certificates.
const LIFETIME: Duration = Duration::from_secs(365 * 86400);

/// The self-signed source.
#[derive(Debug)]
pub struct Generated {
    sans: Vec<String>,
    key_type: KeyType,
}

impl Generated {
    /// For `HOST`'s usual names plus `SSL_SAN`, with `SSL_KEY_TYPE`.
    pub fn new(config: &Config) -> Generated {
        Generated { sans: primitives::generated_sans(&config.certs.san), key_type: config.certs.key_type }
    }
}

impl Source for Generated {
    fn mode(&self) -> &'static str {
        "GENERATE"
    }

    fn describe(&self) -> String {
        format!("self-signed for {}", self.sans.join(", "))
    }

    fn obtain<'a>(&'a self, cache: &'a CertCache) -> Obtaining<'a> {
        Box::pin(async move { Ok(Obtained::good(generated(cache, &self.sans, self.key_type)?)) })
    }

    fn refresh(&self) -> Refresh {
        Refresh::TWO_THIRDS
    }

    fn files(&self, layout: &Layout) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
        Ok((layout.generated(), layout.generated()))
    }
}

/// The cached self-signed certificate for `sans`, or a new one when it is
/// missing, has other names, another key type, or less than a third of its
/// life left. Also the stand-in other sources serve until they deliver.
pub fn generated(cache: &CertCache, sans: &[String], key_type: KeyType) -> Result<Bundle, CertError> {
    let mut want = primitives::san_strings(sans);
    want.sort();
    if let Ok(cached) = cache.load(cache::GENERATED) {
        let mut have = cached.info.sans.clone();
        have.sort();
        let same_type = matches!((key_type, cached.is_rsa()), (KeyType::Rsa2048, true) | (KeyType::EcdsaP256, false));
        if have == want && same_type && !cached.info.needs_renewal(tandem_shared::certs::status::unix_now()) {
            return Ok(cached);
        }
        tracing::info!(fingerprint = %cached.info.fingerprint, "regenerating the self-signed certificate (names, key type or remaining lifetime changed)");
    }
    let bundle = primitives::generate(sans, key_type, LIFETIME)?;
    cache.write_secret(cache::GENERATED, bundle.to_pem().as_bytes())?;
    tracing::info!(fingerprint = %bundle.info.fingerprint, sans = %bundle.info.sans.join(","), "generated a self-signed certificate");
    Ok(bundle)
}
