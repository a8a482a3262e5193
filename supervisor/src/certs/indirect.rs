//! `SSL_CERTIFICATE=INDIRECT`: `fullchain.pem` and `privkey.pem` downloaded
//! from `SSL_INDIRECT_URL`, the last good pair cached, a generated stand-in
//! served until the first download succeeds.

use std::path::PathBuf;
use std::time::Duration;

use tandem_config::certs::KeyType;
use tandem_config::values::redact_url;
use tandem_config::Config;
use tandem_shared::certs::cache::{self, CertCache, Layout};
use tandem_shared::certs::primitives::{self, Bundle};

use super::{CertHealth, Obtained, Obtaining, Refresh, Source, SourceError};

/// How long one download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a downloaded `fullchain.pem` or `privkey.pem` may hold.
const MAX_DOWNLOAD_BYTES: usize = 1 << 20;

/// The download source.
#[derive(Debug)]
pub struct Indirect {
    url: String,
    refresh: Duration,
    /// Names and key type of the stand-in.
    sans: Vec<String>,
    key_type: KeyType,
}

impl Indirect {
    /// From `SSL_INDIRECT_URL`, checked every `SSL_REFRESH_INTERVAL`.
    pub fn new(config: &Config) -> Indirect {
        Indirect {
            url: config.certs.indirect_url.clone(),
            refresh: config.certs.refresh_interval,
            sans: primitives::generated_sans(&config.certs.san),
            key_type: config.certs.key_type,
        }
    }
}

impl Source for Indirect {
    fn mode(&self) -> &'static str {
        "INDIRECT"
    }

    fn describe(&self) -> String {
        redact_url(&self.url)
    }

    fn obtain<'a>(&'a self, cache: &'a CertCache) -> Obtaining<'a> {
        Box::pin(async move {
            match self.download().await {
                Ok(b) => {
                    cache.write_secret(cache::INDIRECT, b.to_pem().as_bytes())?;
                    Ok(Obtained::good(b))
                }
                Err(e) => match cache.load(cache::INDIRECT) {
                    Ok(cached) => Ok(Obtained { bundle: cached, health: CertHealth::Good, warning: Some(e) }),
                    Err(_) => Ok(Obtained {
                        bundle: super::generate::generated(cache, &self.sans, self.key_type)?,
                        health: CertHealth::Degraded,
                        warning: Some(e),
                    }),
                },
            }
        })
    }

    fn refresh(&self) -> Refresh {
        Refresh::Every(self.refresh)
    }

    fn files(&self, layout: &Layout) -> Result<(PathBuf, PathBuf), String> {
        Ok((layout.indirect(), layout.indirect()))
    }
}

impl Indirect {
    async fn download(&self) -> Result<Bundle, SourceError> {
        let client = reqwest::Client::builder()
            .timeout(DOWNLOAD_TIMEOUT)
            .https_only(true)
            .build()
            .map_err(|e| SourceError::Client(e.to_string()))?;
        // The files live below the base URL's path; its query (a signed-URL token) applies to each.
        let file_url = |name: &str| -> Result<String, SourceError> {
            let mut u = reqwest::Url::parse(&self.url)
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

#[cfg(test)]
mod redaction {
    use tandem_config::values::redact_url;

    #[test]
    fn urls_lose_credentials_queries_and_fragments() {
        assert_eq!(redact_url("https://u:p@h.example/a/?token=x#f"), "https://h.example/a/?redacted");
        assert_eq!(redact_url("https://h.example/certificate/"), "https://h.example/certificate/");
        assert!(!redact_url("not a url with secret").contains("secret"));
    }
}
