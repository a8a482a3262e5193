//! `SSL_CERTIFICATE=ACME`: a certificate from an ACME server (Let's Encrypt,
//! or `ACME_DIRECTORY`) for `ACME_DOMAINS`, proven by HTTP-01 (a file the
//! engine workers serve on the HTTP port), TLS-ALPN-01 (a certificate the
//! HTTPS worker answers for ALPN `acme-tls/1`) or DNS-01 (`ACME_DNS_HOOK`).
//!
//! Until the first certificate arrives a generated stand-in serves (and the
//! status says degraded); the certificate is renewed when a third of its
//! lifetime is left, the old one serving meanwhile and on failure.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, CertificateIdentifier, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use tandem_config::acme::Acme as AcmeSettings;
use tandem_config::acme::AcmeChallenge;
use tandem_config::certs::KeyType;
use tandem_config::Config;
use tandem_shared::certs::cache::{self, alpn01_file_name, http01_token_ok, CertCache, Layout};
use tandem_shared::certs::primitives::{self, Bundle};
use tandem_shared::certs::status::unix_now;

use super::{CertHealth, Obtained, Obtaining, Refresh, Source, SourceError};

/// How long one request to the ACME server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an order may take to become ready, and then to be issued.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// First retry after a failed order, doubled per failure: five failures take
/// half an hour, within Let's Encrypt's five failed validations per hour.
const FIRST_RETRY: Duration = Duration::from_secs(60);
/// How long the DNS hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

fn acme_err(what: &str) -> impl Fn(instant_acme::Error) -> SourceError + '_ {
    move |e| SourceError::Acme(format!("{what}: {}", describe_error(&e)))
}

fn describe_error(e: &instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Api(p) => {
            let mut s = format!(
                "{} ({})",
                p.detail.as_deref().unwrap_or("the ACME server refused"),
                p.r#type.as_deref().unwrap_or("no problem type")
            );
            for sub in &p.subproblems {
                s.push_str(&format!("; {}", sub.detail.as_deref().unwrap_or("")));
            }
            s
        }
        other => format!("{other:#}"),
    }
}

/// The ACME source.
#[derive(Debug)]
pub struct Acme {
    settings: AcmeSettings,
    key_type: KeyType,
    /// Names of the stand-in served until the first certificate.
    stand_in: Vec<String>,
}

impl Acme {
    /// From the `ACME_*` settings and `SSL_KEY_TYPE`.
    pub fn new(config: &Config) -> Acme {
        let mut stand_in = primitives::generated_sans(&config.certs.san);
        for d in &config.acme.domains {
            if !stand_in.contains(d) && !d.starts_with("*.") {
                stand_in.push(d.clone());
            }
        }
        Acme { settings: config.acme.clone(), key_type: config.certs.key_type, stand_in }
    }

    /// The cached certificate while it is for our names and still valid.
    fn cached(&self, cache: &CertCache) -> Option<Bundle> {
        let b = cache.load(cache::ACME_CERT).ok()?;
        let mut have = b.info.sans.clone();
        let mut want = primitives::san_strings(&self.settings.domains);
        have.sort();
        want.sort();
        (have == want).then_some(b)
    }

    fn stand_in(&self, cache: &CertCache, warning: Option<SourceError>) -> Result<Obtained, SourceError> {
        let bundle = super::generate::generated(cache, &self.stand_in, self.key_type)?;
        Ok(Obtained { bundle, health: CertHealth::Degraded, warning })
    }

    /// The account: the persisted one for this directory, or a new one (saved 0600).
    async fn account(&self, cache: &CertCache) -> Result<Account, SourceError> {
        let path = cache.layout().acme_account();
        let builder = || AcmeHttp::new().map(|h| Account::builder_with_http(Box::new(h)));
        if let Ok(text) = std::fs::read(&path) {
            let saved: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
            if saved["directory"].as_str() == Some(self.settings.directory.as_str()) {
                if let Ok(creds) = serde_json::from_value::<AccountCredentials>(saved) {
                    return builder()?
                        .from_credentials(creds)
                        .await
                        .map_err(acme_err("cannot restore the ACME account"));
                }
            }
            tracing::info!(path = %path.display(), "the saved ACME account is for another directory; creating one for this one");
        }
        let contact: Vec<String> = self.settings.email.iter().map(|e| format!("mailto:{e}")).collect();
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
        let (account, creds) = builder()?
            .create(&new, self.settings.directory.clone(), None)
            .await
            .map_err(acme_err("cannot create the ACME account"))?;
        cache.private_dir(cache::ACME_DIR)?;
        let json = serde_json::to_vec_pretty(&creds).map_err(|e| SourceError::Acme(e.to_string()))?;
        cache.write_secret(&format!("{}/account.json", cache::ACME_DIR), &json)?;
        tracing::info!(directory = %super::redact_url(&self.settings.directory), account = account.id(), "created an ACME account");
        Ok(account)
    }

    /// ACME renewal information (RFC 9773), where the server offers it: true
    /// once the point this certificate picked in the server's suggested
    /// window has passed (the server may move the window earlier, e.g. before
    /// a mass revocation). Any failure means "no advice": the two-thirds rule stands.
    async fn renewal_window_open(&self, cache: &CertCache, cert: &Bundle) -> bool {
        let Ok(id) = CertificateIdentifier::try_from(&cert.chain[0]) else { return false };
        let Ok(account) = self.account(cache).await else { return false };
        match account.renewal_info(&id).await {
            Ok((info, _retry_after)) => {
                let (start, end) =
                    (info.suggested_window.start.unix_timestamp(), info.suggested_window.end.unix_timestamp());
                let at = ari_point(start, end, &cert.info.fingerprint);
                let open = unix_now() >= at;
                if open {
                    tracing::info!(
                        window_start = start,
                        window_end = end,
                        "the ACME server's renewal window (ARI) is open: renewing early"
                    );
                }
                open
            }
            Err(instant_acme::Error::Unsupported(_)) => false,
            Err(e) => {
                tracing::debug!(error = %describe_error(&e), "no ACME renewal information; renewing at two thirds");
                false
            }
        }
    }

    /// One order, from account to certificate; challenge files and records are removed whatever happens.
    async fn order(&self, cache: &CertCache) -> Result<Bundle, SourceError> {
        let account = self.account(cache).await?;
        cache.private_dir(cache::ACME_DIR)?;
        let mut cleanup = Cleanup { files: Vec::new(), records: Vec::new(), hook: self.settings.dns_hook.clone() };
        let result = self.run_order(&account, cache, &mut cleanup).await;
        cleanup.run().await;
        result
    }

    async fn run_order(
        &self,
        account: &Account,
        cache: &CertCache,
        cleanup: &mut Cleanup,
    ) -> Result<Bundle, SourceError> {
        let ids: Vec<Identifier> = self.settings.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
        let mut order = account.new_order(&NewOrder::new(&ids)).await.map_err(acme_err("cannot create the order"))?;
        let kind = match self.settings.challenge {
            AcmeChallenge::Http01 => ChallengeType::Http01,
            AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            AcmeChallenge::Dns01 => ChallengeType::Dns01,
        };
        let layout = cache.layout().clone();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(acme_err("cannot read an authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(SourceError::Acme(format!("an authorization is {other:?}"))),
            }
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                SourceError::Acme(format!(
                    "the ACME server offers no {kind:?} challenge for this name\nhint: try another ACME_CHALLENGE"
                ))
            })?;
            let name = match challenge.identifier().identifier {
                Identifier::Dns(d) => d.clone(),
                other => return Err(SourceError::Acme(format!("an identifier tandem does not order: {other:?}"))),
            };
            let key_auth = challenge.key_authorization();
            match self.settings.challenge {
                AcmeChallenge::Http01 => {
                    let dir = private(cache, cache::HTTP01_DIR)?;
                    let token = challenge.token.clone();
                    if !http01_token_ok(&token) {
                        return Err(SourceError::Acme(format!(
                            "the ACME server sent a token that is not base64url: {token:?}"
                        )));
                    }
                    cache.write_secret(
                        &format!("{}/{}/{token}", cache::ACME_DIR, cache::HTTP01_DIR),
                        key_auth.as_str().as_bytes(),
                    )?;
                    cleanup.files.push(dir.join(token));
                }
                AcmeChallenge::TlsAlpn01 => {
                    private(cache, cache::ALPN01_DIR)?;
                    let pem = alpn_certificate(&name, key_auth.digest().as_ref())?;
                    let file = alpn01_file_name(&name);
                    cache.write_secret(&format!("{}/{}/{file}", cache::ACME_DIR, cache::ALPN01_DIR), pem.as_bytes())?;
                    cleanup.files.push(layout.acme_alpn01().join(file));
                }
                AcmeChallenge::Dns01 => {
                    let record = format!("_acme-challenge.{}.", name.trim_start_matches("*."));
                    let value = key_auth.dns_value();
                    run_hook(self.settings.dns_hook.as_deref().unwrap_or(""), "set", &record, &value).await?;
                    cleanup.records.push((record, value));
                }
            }
            challenge.set_ready().await.map_err(acme_err("cannot tell the ACME server the challenge is ready"))?;
        }
        let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
        let status = order.poll_ready(&retries).await.map_err(acme_err("the order did not become ready"))?;
        if status != OrderStatus::Ready {
            return Err(SourceError::Acme(format!(
                "the order is {status:?}: the ACME server could not validate {} by {kind:?}\nhint: the server must reach this host for every name ({})",
                self.settings.domains.join(", "),
                match self.settings.challenge {
                    AcmeChallenge::Http01 => "port 80 of each name must reach PORT",
                    AcmeChallenge::TlsAlpn01 => "port 443 of each name must reach SSL_PORT",
                    AcmeChallenge::Dns01 => "the hook must publish the TXT record where the server looks",
                }
            )));
        }
        let key = match self.key_type {
            KeyType::Rsa2048 => rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
            KeyType::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        }
        .map_err(|e| SourceError::Acme(format!("cannot make the key: {e}")))?;
        let mut params = rcgen::CertificateParams::new(self.settings.domains.clone())
            .map_err(|e| SourceError::Acme(format!("cannot make the request: {e}")))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr =
            params.serialize_request(&key).map_err(|e| SourceError::Acme(format!("cannot make the request: {e}")))?;
        order.finalize_csr(csr.der()).await.map_err(acme_err("cannot finalize the order"))?;
        let chain = order.poll_certificate(&retries).await.map_err(acme_err("the certificate was not issued"))?;
        Ok(Bundle::parse(chain.as_bytes(), key.serialize_pem().as_bytes(), "the certificate from the ACME server")?)
    }
}

fn private(cache: &CertCache, sub: &str) -> Result<PathBuf, SourceError> {
    cache.private_dir(cache::ACME_DIR)?;
    Ok(cache.private_dir(&format!("{}/{sub}", cache::ACME_DIR))?)
}

/// The moment in the suggested window `start..end` at which a certificate
/// renews: spread over the window by its fingerprint, as RFC 9773 asks
/// (clients pick a point, so renewals of many certificates do not bunch).
pub fn ari_point(start: i64, end: i64, fingerprint: &str) -> i64 {
    let span = (end - start).max(0);
    let spread = u64::from_str_radix(fingerprint.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    start + i64::try_from(spread % (span as u64 + 1)).unwrap_or(0)
}

/// The TLS-ALPN-01 certificate for `name` (RFC 8737): self-signed, the name as
/// its only SAN and the key authorization's digest in the critical
/// acmeIdentifier extension; key then certificate, PEM.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<String, SourceError> {
    let err = |e: rcgen::Error| SourceError::Acme(format!("cannot make the TLS-ALPN-01 certificate: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(err)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(format!("{}{}", key.serialize_pem(), cert.pem()))
}

/// Marks the hook's exit status on its standard output (see [`run_hook`]).
const STATUS_MARK: &str = "tandem-acme-dns-hook-status:";

/// Runs `ACME_DNS_HOOK set|clear NAME VALUE` through the shell, bounded in time.
///
/// The supervisor reaps every child that exits (it is PID 1 or a subreaper),
/// so the hook's own exit status may be collected before we wait for it: the
/// shell prints it on stdout after the hook ends, and that line is what counts.
async fn run_hook(hook: &str, verb: &str, name: &str, value: &str) -> Result<(), SourceError> {
    use tokio::io::AsyncReadExt;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("{hook} \"$@\" >&2; echo \"{STATUS_MARK}$?\""))
        .arg("acme-dns-hook")
        .args([verb, name, value])
        .env("ACME_DNS_ACTION", verb)
        .env("ACME_DNS_NAME", name)
        .env("ACME_DNS_VALUE", value)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| SourceError::Acme(format!("cannot run ACME_DNS_HOOK: {e}")))?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let read = async {
        let (mut o, mut e) = (String::new(), String::new());
        if let Some(s) = out.as_mut() {
            let _ = s.read_to_string(&mut o).await;
        }
        if let Some(s) = err.as_mut() {
            let _ = s.read_to_string(&mut e).await;
        }
        (o, e)
    };
    let (stdout, stderr) = tokio::time::timeout(HOOK_TIMEOUT, read).await.map_err(|_| {
        SourceError::Acme(format!("ACME_DNS_HOOK {verb} took longer than {} s", HOOK_TIMEOUT.as_secs()))
    })?;
    // Its status may already have been reaped; the line above is the answer either way.
    let _ = child.wait().await;
    let status = stdout.lines().filter_map(|l| l.strip_prefix(STATUS_MARK)).next_back().map(str::trim);
    if status != Some("0") {
        return Err(SourceError::Acme(format!(
            "ACME_DNS_HOOK {verb} {name} failed (exit status {}): {}",
            status.unwrap_or("unknown"),
            stderr.trim()
        )));
    }
    Ok(())
}

/// Challenge files and DNS records to remove once an order is over.
struct Cleanup {
    files: Vec<PathBuf>,
    records: Vec<(String, String)>,
    hook: Option<String>,
}

impl Cleanup {
    async fn run(self) {
        for f in self.files {
            let _ = std::fs::remove_file(f);
        }
        for (name, value) in self.records {
            if let Err(e) = run_hook(self.hook.as_deref().unwrap_or(""), "clear", &name, &value).await {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::new(e)), "cannot remove the dns-01 record");
            }
        }
    }
}

impl Source for Acme {
    fn mode(&self) -> &'static str {
        "ACME"
    }

    fn describe(&self) -> String {
        format!("{} for {}", super::redact_url(&self.settings.directory), self.settings.domains.join(", "))
    }

    fn obtain_at_start<'a>(&'a self, cache: &'a CertCache) -> Obtaining<'a> {
        // No order before the workers serve: HTTP-01 and TLS-ALPN-01 are answered by them.
        Box::pin(async move {
            match self.cached(cache) {
                Some(b) => Ok(Obtained::good(b)),
                None => self.stand_in(cache, None),
            }
        })
    }

    fn obtain<'a>(&'a self, cache: &'a CertCache) -> Obtaining<'a> {
        Box::pin(async move {
            let mut cached = self.cached(cache);
            let keep = match &cached {
                Some(b) => {
                    let due = super::renewal::due_at(Refresh::TWO_THIRDS, b.info.not_before, b.info.not_after);
                    // Renewal information is only asked while the two-thirds rule says "not yet".
                    due.is_some_and(|d| unix_now() < d) && !self.renewal_window_open(cache, b).await
                }
                None => false,
            };
            if let Some(b) = cached.take_if(|_| keep) {
                return Ok(Obtained::good(b));
            }
            tracing::info!(domains = %self.settings.domains.join(","), challenge = ?self.settings.challenge, "ordering a certificate from the ACME server");
            match self.order(cache).await {
                Ok(b) => {
                    cache.write_secret(cache::ACME_CERT, b.to_pem().as_bytes())?;
                    tracing::info!(fingerprint = %b.info.fingerprint, not_after = %super::rfc3339(b.info.not_after), issuer = %b.info.issuer, "the ACME server issued a certificate");
                    Ok(Obtained::good(b))
                }
                // The old certificate serves while it is valid; a stand-in before the first.
                Err(e) => match cached {
                    Some(b) => Ok(Obtained { bundle: b, health: CertHealth::Good, warning: Some(e) }),
                    None => self.stand_in(cache, Some(e)),
                },
            }
        })
    }

    fn refresh(&self) -> Refresh {
        Refresh::TWO_THIRDS
    }

    fn first_retry(&self) -> Duration {
        FIRST_RETRY
    }

    fn files(&self, layout: &Layout) -> Result<(PathBuf, PathBuf), String> {
        Ok((layout.acme_cert(), layout.acme_cert()))
    }
}

/// instant-acme's HTTP client, over reqwest: the same trust as the INDIRECT
/// download (system roots plus `SSL_CERT_FILE` / `SSL_CERT_DIR`), bounded in time.
struct AcmeHttp {
    client: reqwest::Client,
}

impl AcmeHttp {
    fn new() -> Result<AcmeHttp, SourceError> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .https_only(true)
            .build()
            .map_err(|e| SourceError::Client(e.to_string()))?;
        Ok(AcmeHttp { client })
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.client.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let url = parts.uri.to_string();
            let resp = client
                .request(parts.method, &url)
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e.without_url())))?;
            let mut out = http::Response::builder().status(resp.status());
            if let Some(h) = out.headers_mut() {
                *h = resp.headers().clone();
            }
            let bytes = resp.bytes().await.map_err(|e| instant_acme::Error::Other(Box::new(e.without_url())))?;
            let res = out.body(http_body_util::Full::new(bytes)).map_err(instant_acme::Error::Http)?;
            Ok(BytesResponse::from(res))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_points_stay_inside_the_window_and_spread() {
        assert_eq!(ari_point(100, 100, "ffffffff"), 100);
        let points: Vec<i64> =
            ["00000000", "7fffffff", "ffffffff", "1234abcd"].iter().map(|f| ari_point(1000, 2000, f)).collect();
        assert!(points.iter().all(|p| (1000..=2000).contains(p)), "{points:?}");
        assert!(points.windows(2).any(|w| w[0] != w[1]), "{points:?}");
        assert_eq!(ari_point(1000, 900, "ff"), 1000, "an inverted window is its start");
    }

    #[test]
    fn the_alpn_certificate_carries_the_critical_acme_identifier() {
        let pem = alpn_certificate("svc.example.com", &[7u8; 32]).expect("cert");
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("der");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let ext =
            cert.extensions().iter().find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31").expect("acmeIdentifier");
        assert!(ext.critical);
        assert!(ext.value.ends_with(&[7u8; 32]));
    }
}
